"""Checking Katana traffic against the published OpenAPI contract, for any test.

:class:`ValidatingTransport` wraps another httpx transport: every request it forwards and
every response it returns is validated with openapi-core against ``katana/openapi.yaml``.
A violation names the operation (``getAllSalesOrders``) and what broke, is recorded on
``violations`` and, when ``strict`` (the default), raised as :class:`ContractViolation`.

Two checks go beyond openapi-core: query parameters the operation does not declare are
violations (openapi-core ignores them, Katana silently ignores them too, which hides typos
like ``variant_ids``), and ``X-Pagination`` is checked as the JSON object Katana sends
(the spec declares it with the default header style, which cannot express JSON).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import jsonschema  # type: ignore[import-untyped]
import yaml
from jsonschema_path import SchemaPath
from openapi_core import OpenAPI
from openapi_core.configurations import Config
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

__all__ = [
    "ContractViolation",
    "KatanaContract",
    "Operation",
    "ValidatingTransport",
    "load_contract",
]

SERVER = "https://api.katanamrp.com"
SERVER_PATH = "/v1"


class ContractViolation(AssertionError):
    """A request or response that breaks the Katana contract."""


@dataclass(frozen=True)
class Operation:
    """One operation of the spec: its id, method, path template and query parameters."""

    operation_id: str
    method: str
    template: str
    pattern: re.Pattern[str]
    query: frozenset[str]


@dataclass
class KatanaContract:
    """The loaded spec: openapi-core's validator plus an operation index."""

    openapi: OpenAPI
    raw: dict[str, Any]
    operations: list[Operation] = field(default_factory=list)

    def find(self, method: str, path: str) -> Operation | None:
        """The operation serving ``method path`` (path relative to the API root)."""
        matches = [
            op for op in self.operations if op.method == method and op.pattern.fullmatch(path)
        ]
        # A literal segment beats a template (``/sales_orders/search`` vs ``/{id}``).
        matches.sort(key=lambda op: op.template.count("{"))
        return matches[0] if matches else None

    @property
    def pagination_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = self.raw["components"]["headers"]["X-Pagination"]["schema"]
        return schema


def _resolve(raw: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = raw
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


@functools.cache
def load_contract(spec_path: Path) -> KatanaContract:
    """Load and index the spec once per test session."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with spec_path.open(encoding="utf-8") as handle:
        raw: dict[str, Any] = yaml.load(handle, Loader=loader)
    openapi = OpenAPI(SchemaPath.from_dict(raw), config=Config(spec_validator_cls=None))
    contract = KatanaContract(openapi, raw)
    for template, item in raw["paths"].items():
        shared = item.get("parameters", [])
        for method, operation in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            params = [_resolve(raw, p) for p in [*shared, *operation.get("parameters", [])]]
            query = frozenset(p["name"] for p in params if p.get("in") == "query")
            regex = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            contract.operations.append(
                Operation(
                    operation.get("operationId", f"{method} {template}"),
                    method.upper(),
                    template,
                    re.compile(regex),
                    query,
                )
            )
    return contract


class _OpenAPIRequest:
    def __init__(self, request: httpx.Request, path: str) -> None:
        self.method = request.method.lower()
        self.host_url = SERVER
        self.path = SERVER_PATH + path
        self.full_url_pattern = SERVER + self.path
        self.body: bytes | None = request.content or None
        self.content_type = request.headers.get("Content-Type", "application/json")
        query = parse_qsl(request.url.query.decode(), keep_blank_values=True)
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(query), header=Headers(list(request.headers.items()))
        )


class _OpenAPIResponse:
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.data = response.content
        self.content_type = response.headers.get("Content-Type", "application/json")
        self.headers = Headers(
            [(k, v) for k, v in response.headers.items() if k.lower() != "x-pagination"]
        )


class ValidatingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that validates Katana traffic against the OpenAPI contract.

    :param inner: the transport that really sends (``httpx.AsyncHTTPTransport()``, an ASGI
        or mock transport).
    :param spec_path: ``katana/openapi.yaml``; by default the repository's ``apis/`` folder.
    :param api_root: the path prefix of the API on the server being called (``/v1``).
    :param strict: raise on the first violation; otherwise only record it.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        spec_path: Path | None = None,
        api_root: str = SERVER_PATH,
        strict: bool = True,
    ) -> None:
        if spec_path is None:
            from conftest import APIS

            spec_path = APIS / "katana" / "openapi.yaml"
        self.inner = inner
        self.contract = load_contract(spec_path)
        self.api_root = api_root.rstrip("/")
        self.strict = strict
        self.violations: list[str] = []
        self.checked: list[str] = []

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _fail(self, operation: str, problem: str) -> None:
        message = f"{operation}: {problem}"
        self.violations.append(message)
        if self.strict:
            raise ContractViolation(message)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self.api_root and path.startswith(self.api_root):
            path = path[len(self.api_root) :] or "/"
        await request.aread()
        operation = self.contract.find(request.method, path)
        name = operation.operation_id if operation else f"{request.method} {path}"
        if operation is None:
            self._fail(name, "no such operation in the Katana spec")
        else:
            self.checked.append(name)
            self._check_request(operation, request, path)
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        await response.aclose()
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        checked = httpx.Response(
            response.status_code, headers=headers, content=content, request=request
        )
        if operation is not None:
            self._check_response(operation, request, path, checked)
        return checked

    def _check_request(self, operation: Operation, request: httpx.Request, path: str) -> None:
        names = {key for key, _ in parse_qsl(request.url.query.decode())}
        unknown = sorted(names - operation.query)
        if unknown:
            self._fail(operation.operation_id, f"undeclared query parameters {unknown}")
        try:
            self.contract.openapi.validate_request(_OpenAPIRequest(request, path))
        except Exception as exc:  # openapi-core raises a family of errors
            self._fail(operation.operation_id, f"request invalid: {_explain(exc)}")

    def _check_response(
        self, operation: Operation, request: httpx.Request, path: str, response: httpx.Response
    ) -> None:
        pagination = response.headers.get("X-Pagination")
        if pagination is not None:
            try:
                jsonschema.validate(json.loads(pagination), self.contract.pagination_schema)
            except (ValueError, jsonschema.ValidationError) as exc:
                self._fail(operation.operation_id, f"X-Pagination invalid: {exc}")
        try:
            self.contract.openapi.validate_response(
                _OpenAPIRequest(request, path), _OpenAPIResponse(response)
            )
        except Exception as exc:
            self._fail(
                operation.operation_id,
                f"response {response.status_code} invalid: {_explain(exc)}",
            )


def _explain(exc: BaseException) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__
    while cause is not None:
        parts.append(f"{type(cause).__name__}: {cause}")
        errors = getattr(cause, "schema_errors", None)
        if errors:
            parts.extend(f"  at {list(e.absolute_path)}: {e.message}" for e in errors)
        cause = cause.__cause__
    return "\n".join(parts)
