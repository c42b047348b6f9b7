"""The HTTP plumbing both service clients share: request budget, retries, typed errors,
decoding, paging, filter chunking and the timestamp format of query filters.

Each service gets one :class:`RequestBudget` for the whole daemon, so every task that talks
to Katana draws from the same 60-per-minute allowance. GET, PUT, PATCH and DELETE are retried
with backoff and jitter on 5xx and transport failures; a POST is retried only when the
service honours an idempotency key, otherwise the caller looks its natural key up first.
A 429 means the request was not processed, so any method waits for the window and retries.

A client for one service adds only what is its own: the envelope its lists come in
(:meth:`ServiceClient._records`) and how it spells an array filter
(:meth:`ServiceClient._array_filter`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

import anyio
import httpx
import msgspec
import stamina

from syncd.config import RETRY
from syncd.errors import (
    ApiError,
    AuthError,
    DecodeError,
    NotFound,
    PaymentRequired,
    RateLimited,
    RetryPolicy,
    ServerError,
    TransportError,
    ValidationFailed,
)

__all__ = [
    "Params",
    "RequestBudget",
    "ServiceClient",
    "chunks",
    "describe_error_body",
    "format_time",
    "is_last_page",
    "parse_reset",
]

T = TypeVar("T")

log = logging.getLogger("syncd.http")

Params = Mapping[str, str | int | Sequence[str | int]]

_IDEMPOTENT = frozenset({"GET", "PUT", "PATCH", "DELETE", "HEAD"})


def format_time(moment: datetime) -> str:
    """A timestamp as both services write them (UTC, milliseconds, ``Z``); naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def chunks(values: Sequence[T], size: int) -> list[list[T]]:
    """``values`` without repeats (first occurrence kept), cut into lists of at most ``size``."""
    unique = list(dict.fromkeys(values))
    return [unique[i : i + size] for i in range(0, len(unique), size)]


def is_last_page(header: str | None, page: int, count: int, page_size: int) -> bool:
    """Whether ``page`` (which held ``count`` records) is the last one of a list.

    Both services describe paging in a JSON ``X-Pagination`` header: TradeGecko with
    booleans and numbers, Katana with the same facts as strings. The header's word wins;
    without a usable one, a short page is the last. An empty page always ends the walk, so
    no header, however odd, can page forever.
    """
    if count == 0:
        return True
    facts: object = None
    if header:
        try:
            facts = json.loads(header)
        except (ValueError, RecursionError):
            facts = None
    if isinstance(facts, dict):
        last = _flag(facts.get("last_page"))
        if last or _flag(facts.get("out_of_bounds")):
            return True
        total_pages = _whole_number(facts.get("total_pages"))
        if total_pages is not None:
            return page >= total_pages
        if last is False:
            return False
    return count < page_size


def _flag(value: object) -> bool | None:
    """``true``/``false`` as a JSON boolean or as a string (any case); else ``None``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _whole_number(value: object) -> int | None:
    """A count as a JSON integer or a string of digits; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return None


def parse_reset(value: str, now: float) -> float | None:
    """Turn a rate-limit reset header into an absolute epoch time in seconds.

    Katana's spec says epoch milliseconds, its docs show epoch seconds, and some proxies send
    seconds-until-reset; all three are accepted.
    """
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    if number > 1e12:
        return number / 1000.0
    if number > 1e9:
        return number
    return now + number


class RequestBudget:
    """A sliding-window allowance of ``limit`` requests per ``period`` seconds.

    :meth:`acquire` waits until a request fits; :meth:`complete` tells that its answer came.
    A request counts from the moment it is sent until ``period`` after its answer: the
    service counts it on arrival, somewhere in between, so no window the service can look
    at holds more than ``limit``. The service's own headers correct the picture: when it
    says nothing remains, callers wait until its reset time.
    """

    def __init__(self, limit: int, period: float, *, clock: Callable[[], float] = time.monotonic):
        if limit < 1 or period <= 0:
            raise ValueError("a request budget needs limit >= 1 and period > 0")
        self.limit = limit
        self.period = period
        self._clock = clock
        self._sent: deque[float] = deque()
        self._in_flight = 0
        self._blocked_until = 0.0
        self._lock = anyio.Lock()
        self.remaining_reported: int | None = None

    def _wait_time(self) -> float:
        now = self._clock()
        while self._sent and now - self._sent[0] >= self.period:
            self._sent.popleft()
        wait = max(0.0, self._blocked_until - now)
        if len(self._sent) + self._in_flight >= self.limit:
            # With every slot on the wire, look again shortly.
            oldest = self._sent[0] + self.period - now if self._sent else 0.05
            wait = max(wait, oldest)
        return wait

    async def acquire(self) -> None:
        """Wait until one more request fits in the window, then count it as sent."""
        async with self._lock:
            # The wait is computed from the window, not signalled by anyone.
            while (wait := self._wait_time()) > 0:  # noqa: ASYNC110
                await anyio.sleep(wait)
            self._in_flight += 1

    def complete(self) -> None:
        """The answer to an acquired request came (or it failed): it now ages out."""
        self._in_flight = max(0, self._in_flight - 1)
        self._sent.append(self._clock())

    def block_for(self, seconds: float) -> None:
        """Stop every caller for ``seconds`` (a 429, or the service saying nothing remains)."""
        self._blocked_until = max(self._blocked_until, self._clock() + max(0.0, seconds))

    @property
    def used(self) -> int:
        """Requests counted in the current window, those on the wire included."""
        self._wait_time()
        return len(self._sent) + self._in_flight


class _Retryable(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


class ServiceClient:
    """A thin async HTTP client for one service, with budget, retries and typed errors.

    A subclass names its service (``service``, for errors and metrics), its published rate
    limit (``default_limit``), its rate-limit headers and its largest page; it implements
    the envelope of its lists (:meth:`_records`) and its array filters
    (:meth:`_array_filter`). Everything else, paging and chunking included, is here.

    :param base_url: the API root.
    :param token: the bearer token.
    :param budget: the shared request budget, one per service per daemon; by default one
        at the service's published limit.
    :param transport: an httpx transport, for tests.
    :param retry: how an idempotent request that failed for a passing reason (5xx, no
        answer) is tried again; by default :data:`syncd.config.RETRY`'s ``request``.
    :param attempts: tries in all, instead of the policy's (``1``: no retry).
    :param max_rate_wait: the longest total time spent waiting out 429s for one request.
    """

    service = "api"
    #: Requests per period (seconds) the service allows.
    default_limit: tuple[int, float] = (60, 60.0)
    #: The header names of the service's rate limit.
    remaining_header = "X-RateLimit-Remaining"
    reset_header = "X-RateLimit-Reset"
    #: The largest page the service serves; every list asks for this many.
    page_size = 250
    #: Values of one array filter sent in one request, so that a URL stays short.
    chunk_size = 100

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        budget: RequestBudget | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RETRY.request,
        attempts: int | None = None,
        max_rate_wait: float = 180.0,
        on_response: Callable[[str, str, int, float], None] | None = None,
    ) -> None:
        self.budget = budget if budget is not None else RequestBudget(*self.default_limit)
        self.retry = retry if attempts is None else replace(retry, attempts=attempts)
        self.max_rate_wait = max_rate_wait
        self._on_response = on_response
        #: Records of list answers skipped because they did not decode.
        self.skipped_records = 0
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            transport=transport,
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- requests ----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: bytes | None = None,
        idempotency_key: str | None = None,
        template: str | None = None,
    ) -> httpx.Response:
        """Send one request and return the 2xx response, or raise a typed :class:`ApiError`.

        :param template: the endpoint as a template (``/sales_orders/{id}``) for errors and
            metrics, so that ids do not explode label cardinality.
        """
        endpoint = template or path
        retry_errors = method in _IDEMPOTENT or idempotency_key is not None
        headers: dict[str, str] = {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key

        rate_waited = 0.0
        policy = self.retry
        try:
            async for attempt in stamina.retry_context(
                on=_Retryable,
                attempts=policy.attempts if retry_errors else 1,
                wait_initial=policy.initial,
                wait_max=policy.maximum,
                wait_exp_base=policy.coefficient,
                timeout=None,
            ):
                with attempt:
                    while True:
                        response = await self._send_once(
                            method, path, endpoint, params, body, headers
                        )
                        if response.status_code != 429:
                            break
                        wait = self._retry_after(response)
                        if rate_waited + wait > self.max_rate_wait:
                            raise self._error(method, endpoint, response, RateLimited)
                        rate_waited += wait
                        self.budget.block_for(wait)
                    if response.status_code >= 500:
                        raise _Retryable(self._error(method, endpoint, response, ServerError))
                    if response.status_code >= 400:
                        raise self._client_error(method, endpoint, response)
                    return response
        except _Retryable as exc:
            raise exc.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_once(
        self,
        method: str,
        path: str,
        endpoint: str,
        params: Params | None,
        body: bytes | None,
        headers: dict[str, str],
    ) -> httpx.Response:
        await self.budget.acquire()
        started = time.perf_counter()
        try:
            try:
                response = await self._http.request(
                    method, path, params=params, content=body, headers=headers
                )
                await response.aread()
            finally:
                self.budget.complete()
        except httpx.TimeoutException as exc:
            self._observe(method, endpoint, 0, started)
            raise _Retryable(
                TransportError(self.service, method, endpoint, f"timed out ({exc!r})")
            ) from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            self._observe(method, endpoint, 0, started)
            raise _Retryable(
                TransportError(self.service, method, endpoint, f"connection failed ({exc!r})")
            ) from exc
        self._observe(method, endpoint, response.status_code, started)
        self._read_rate_headers(response)
        return response

    def _observe(self, method: str, endpoint: str, status: int, started: float) -> None:
        if self._on_response is not None:
            self._on_response(method, endpoint, status, time.perf_counter() - started)

    def _read_rate_headers(self, response: httpx.Response) -> None:
        remaining = response.headers.get(self.remaining_header)
        if remaining is None:
            return
        try:
            left = int(float(remaining))
        except ValueError:
            return
        self.budget.remaining_reported = left
        if left <= 0:
            reset = parse_reset(response.headers.get(self.reset_header, ""), time.time())
            if reset is not None:
                self.budget.block_for(min(reset - time.time(), self.budget.period))

    def _retry_after(self, response: httpx.Response) -> float:
        value = response.headers.get("Retry-After")
        if value is not None:
            try:
                return max(0.5, float(value))
            except ValueError:
                pass
        reset = parse_reset(response.headers.get(self.reset_header, ""), time.time())
        if reset is not None:
            return max(0.5, min(reset - time.time(), self.budget.period))
        return min(5.0, self.budget.period)

    async def fetch(
        self,
        method: str,
        path: str,
        kind: type[T],
        *,
        params: Params | None = None,
        body: bytes | None = None,
        idempotency_key: str | None = None,
        template: str | None = None,
    ) -> T:
        """:meth:`request`, then its body decoded as ``kind``.

        :raises syncd.errors.DecodeError: the body does not match ``kind``.
        """
        response = await self.request(
            method,
            path,
            params=params,
            body=body,
            idempotency_key=idempotency_key,
            template=template,
        )
        return self.decode(response.content, kind, method, template or path)

    # -- lists -------------------------------------------------------------------------

    async def list_all(
        self, path: str, kind: type[T], params: Mapping[str, Any] | None = None
    ) -> list[T]:
        """Every record of a list endpoint, following its pages to the last one."""
        items: list[T] = []
        page = 1
        while True:
            query: Params = {**(params or {}), "limit": self.page_size, "page": page}
            response = await self.request("GET", path, params=query)
            records = self._records(response, path)
            items.extend(self.decode_each(records, kind, "GET", path))
            header = response.headers.get("X-Pagination")
            if is_last_page(header, page, len(records), self.page_size):
                return items
            page += 1

    async def list_matching(
        self,
        path: str,
        kind: type[T],
        name: str,
        values: Sequence[str | int],
        params: Mapping[str, Any] | None = None,
    ) -> list[T]:
        """Every record whose ``name`` is one of ``values``, asked for in chunks.

        Nothing is asked (and nothing found) when ``values`` is empty: an empty filter must
        never turn into a request for everything.
        """
        found: list[T] = []
        for chunk in chunks(values, self.chunk_size):
            query = {**(params or {}), **self._array_filter(name, chunk)}
            found.extend(await self.list_all(path, kind, query))
        return found

    def _records(self, response: httpx.Response, endpoint: str) -> list[msgspec.Raw]:
        """The undecoded records of one list answer: the service's list envelope."""
        raise NotImplementedError

    def _array_filter(self, name: str, values: Sequence[str | int]) -> dict[str, Any]:
        """The query parameters that ask for records whose ``name`` is one of ``values``."""
        raise NotImplementedError

    # -- decoding ----------------------------------------------------------------------

    def decode(self, data: bytes | msgspec.Raw, kind: type[T], method: str, endpoint: str) -> T:
        """A 2xx body (or part of one) as ``kind``.

        :raises syncd.errors.DecodeError: it does not match ``kind``.
        """
        try:
            return msgspec.json.decode(data, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise self.decode_error(method, endpoint, str(exc)) from exc

    def decode_each(
        self, raws: Sequence[msgspec.Raw], kind: type[T], method: str, endpoint: str
    ) -> list[T]:
        """Decode the records of a list one by one, skipping (and logging) any that break the
        contract: one odd record among hundreds must not stop the daemon reading the rest."""
        items: list[T] = []
        for raw in raws:
            try:
                items.append(msgspec.json.decode(raw, type=kind))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self.skipped_records += 1
                log.warning(
                    "%s %s %s: skipped a record that does not decode: %s",
                    self.service,
                    method,
                    endpoint,
                    exc,
                )
        return items

    def decode_error(self, method: str, endpoint: str, problem: str) -> DecodeError:
        """A :class:`DecodeError` for a 2xx body that breaks the contract."""
        return DecodeError(self.service, method, endpoint, f"unexpected answer: {problem}")

    # -- errors ------------------------------------------------------------------------

    def _client_error(self, method: str, endpoint: str, response: httpx.Response) -> ApiError:
        kinds: dict[int, type[ApiError]] = {
            401: AuthError,
            402: PaymentRequired,
            404: NotFound,
            422: ValidationFailed,
        }
        return self._error(method, endpoint, response, kinds.get(response.status_code, ApiError))

    def _error(
        self, method: str, endpoint: str, response: httpx.Response, kind: type[ApiError]
    ) -> ApiError:
        reason, details = describe_error_body(response)
        return kind(
            self.service,
            method,
            endpoint,
            reason,
            status=response.status_code,
            details=details,
            request_id=response.headers.get("X-Request-Id"),
        )


def describe_error_body(response: httpx.Response) -> tuple[str, Any]:
    """A short reason and any field details from an error body of either service.

    Handles Katana's ``{statusCode, name, message, details}`` and its ``{"error": {...}}``
    wrapper, TradeGecko's ``{"errors": {field: [msg]}}``, and bodies that are HTML or empty.
    """
    text = response.content
    if not text.strip():
        return f"{response.reason_phrase or 'error'} (empty body)", None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        kind = response.headers.get("Content-Type", "unknown type").split(";")[0]
        return f"{response.reason_phrase or 'error'} (non-JSON body of {kind})", None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]
    if not isinstance(data, dict):
        return f"{response.reason_phrase or 'error'}", data
    if "errors" in data:
        errors = data["errors"]
        if isinstance(errors, dict):
            parts = [
                f"{field} {', '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                for field, msgs in errors.items()
            ]
            return "; ".join(parts) or "validation failed", errors
        return str(errors), errors
    message = data.get("message") or data.get("name") or response.reason_phrase or "error"
    details = data.get("details")
    if isinstance(details, list) and details:
        parts = []
        for item in details:
            if isinstance(item, dict):
                parts.append(f"{item.get('path', '?')}: {item.get('message', item.get('code'))}")
        if parts:
            message = f"{message} ({'; '.join(parts)})"
    return str(message), details
