"""The request frame both simulators serve their API through.

Each simulated service differs in its words (error bodies, rate-limit headers, paging
header), not in the steps every request goes through. :class:`Frame` does those steps once:
count the request by endpoint, check the bearer token (and the control panel's "revoked"
knob), take one request from the rate window, run the handler and turn what it returns (or
the :class:`ServiceError` it raises) into the answer, with the service's headers on it. A
:class:`Dialect` says how the service words its answers.

The control panel (``/_sim``) shares the error answers but has no auth and no rate limit:
it plays the people using the service and must not eat into the client's budget. It lists
itself at ``GET /_sim/``.

Errors, one tree for both services::

    ServiceError            an answer in the service's own words: status and JSON body
    ├── KatanaError         {statusCode, name, message[, code, details]}  (katana world)
    └── TradeGeckoError     (tradegecko world)
        ├── BadRequest      400 {type: BadRequest, message}
        ├── NotFound        404 {type: NotFound, message}
        └── Refused         422 {errors: {field: [message]}}
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

__all__ = [
    "ControlRoute",
    "Dialect",
    "FixedWindow",
    "Frame",
    "Handler",
    "Json",
    "Page",
    "Quota",
    "RateWindow",
    "ServiceError",
    "SlidingWindow",
    "json_response",
]

Json = dict[str, Any]
#: An endpoint: answers a dict or list (sent as JSON, 200) or a whole :class:`Response`.
Handler = Callable[[Request], Awaitable[Any]]

_ENCODER = msgspec.json.Encoder(decimal_format="number")


class ServiceError(Exception):
    """An error answer in the service's own words; raised by handlers and the worlds."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> Json:
        raise NotImplementedError

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return json_response(self.body(), self.status, headers)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``data`` as compact UTF-8 JSON (decimals as numbers)."""
    return Response(
        _ENCODER.encode(data), status_code=status, headers=headers, media_type="application/json"
    )


# -- rate windows -------------------------------------------------------------------------


class Quota(NamedTuple):
    """One request taken from a rate window."""

    allowed: bool
    limit: int
    remaining: int
    #: Wall-clock (epoch) seconds when the window frees a slot or ends.
    reset_at: float
    #: Seconds until the next request is allowed (0 while allowed).
    wait: float


class RateWindow:
    """``limit`` requests per ``period`` seconds for each key (the token)."""

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period

    def take(self, key: str) -> Quota:
        raise NotImplementedError


class SlidingWindow(RateWindow):
    """Katana: no more than ``limit`` requests in any ``period`` seconds."""

    def __init__(
        self, limit: int, period: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(limit, period)
        self._clock = clock
        self._sent: dict[str, deque[float]] = {}

    def take(self, key: str) -> Quota:
        now = self._clock()
        sent = self._sent.setdefault(key, deque())
        while sent and now - sent[0] >= self.period:
            sent.popleft()
        if len(sent) >= self.limit:
            wait = sent[0] + self.period - now
            return Quota(False, self.limit, 0, time.time() + max(wait, 0.0), wait)
        sent.append(now)
        reset = sent[0] + self.period - now
        return Quota(True, self.limit, self.limit - len(sent), time.time() + max(reset, 0.0), 0.0)


class FixedWindow(RateWindow):
    """TradeGecko: fixed windows aligned to the epoch, as its reset times are."""

    def __init__(self, limit: int, period: float, *, clock: Callable[[], float] = time.time):
        super().__init__(limit, period)
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def take(self, key: str) -> Quota:
        now = self._clock()
        end, used = self._windows.get(key, (0.0, 0))
        if now >= end:
            end, used = (math.floor(now / self.period) + 1) * self.period, 0
        allowed = used < self.limit
        if allowed:
            used += 1
        self._windows[key] = (end, used)
        return Quota(
            allowed, self.limit, max(0, self.limit - used), end, 0.0 if allowed else end - now
        )


# -- paging -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """Page ``number`` (from 1) of ``limit`` records out of ``total``."""

    number: int
    limit: int
    total: int

    @property
    def pages(self) -> int:
        return math.ceil(self.total / self.limit) if self.limit else 0

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.limit

    def of(self, records: Sequence[Any]) -> list[Any]:
        return list(records[self.offset : self.offset + self.limit]) if self.limit else []


# -- the frame ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """How a service words the answers the frame gives by itself."""

    #: Shown in the control panel's index.
    service: str
    unauthorized: ServiceError
    rate_limited: ServiceError
    #: A path under ``/_sim`` that is not there (or not for that method).
    control_not_found: ServiceError
    #: A control request whose body is not what the endpoint takes.
    bad_request: Callable[[str], ServiceError]
    #: Rate-limit headers for one request (on every API answer, 429s included).
    quota_headers: Callable[[Quota], dict[str, str]]
    #: The answer to an API path the service does not have.
    unknown_route: Callable[[Request], Response]
    #: Headers on every API answer (e.g. a request id).
    extra_headers: Callable[[], dict[str, str]] = dict


@dataclass(frozen=True)
class ControlRoute:
    """One control-panel endpoint, for the index: ``method path``: what it does."""

    methods: tuple[str, ...]
    path: str
    does: str


@dataclass
class Frame:
    """The steps every request to one simulated service goes through; see the module doc.

    :param dialect: the service's words.
    :param token: the one bearer token accepted.
    :param window: the rate window, or ``None`` for no limit.
    :param requests: API requests by ``"METHOD /template"`` (a world may share its own).
    """

    dialect: Dialect
    token: str
    window: RateWindow | None = None
    requests: Counter[str] = field(default_factory=Counter)
    responses_429: int = 0
    #: The control panel's knob: the token was revoked (every API call answers 401).
    revoked: bool = False
    _control: list[ControlRoute] = field(default_factory=list)
    _api_prefix: str = ""

    def authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and given.strip() == self.token and not self.revoked

    async def answer(self, request: Request, handler: Handler) -> Response:
        """The handler's answer as a response; a :class:`ServiceError` as the service's."""
        try:
            result = await handler(request)
        except ServiceError as error:
            return error.response()
        return result if isinstance(result, Response) else json_response(result)

    def api(self, template: str, handler: Handler, methods: Sequence[str]) -> Route:
        """An API endpoint: counted, authenticated, rate-limited."""

        async def endpoint(request: Request) -> Response:
            self.requests[f"{request.method} {template}"] += 1
            headers = self.dialect.extra_headers()
            if not self.authorized(request):
                return self.dialect.unauthorized.response(headers)
            if self.window is not None:
                quota = self.window.take(self.token)
                headers.update(self.dialect.quota_headers(quota))
                if not quota.allowed:
                    self.responses_429 += 1
                    return self.dialect.rate_limited.response(headers)
            response = await self.answer(request, handler)
            response.headers.update(headers)
            return response

        # Counted by the template as given; a bare {id} routes integers only.
        return Route(template.replace("{id}", "{id:int}"), endpoint, methods=list(methods))

    def control(self, path: str, handler: Handler, methods: Sequence[str]) -> Route:
        """A control-panel endpoint (``path`` under ``/_sim``); its docstring's first line
        is what the index says it does."""
        does = (handler.__doc__ or "").strip().splitlines()
        self._control.append(ControlRoute(tuple(methods), f"/_sim{path}", does[0] if does else ""))

        async def endpoint(request: Request) -> Response:
            return await self.answer(request, handler)

        return Route(path, endpoint, methods=list(methods))

    def traffic(self) -> Json:
        """What the API was asked, for ``/_sim/counters``."""
        return {"requests": dict(self.requests), "responses_429": self.responses_429}

    def app(
        self,
        api_routes: Sequence[BaseRoute],
        control_routes: Sequence[BaseRoute],
        *,
        api_prefix: str = "",
    ) -> Starlette:
        """The service as an ASGI app: the API (under ``api_prefix``) and ``/_sim``."""
        self._api_prefix = api_prefix
        token_route = self.control("/token", self._token, ["POST"])
        # /_sim/faults is served by the fault layer in front of the app (see faults.py).
        self._control.append(
            ControlRoute(
                ("GET", "PUT", "DELETE"),
                "/_sim/faults",
                "Injected faults: GET shows them, PUT replaces them, DELETE clears them.",
            )
        )
        index = Route("/", self._index, methods=["GET"])
        control = Mount("/_sim", routes=[index, *control_routes, token_route])
        api: list[BaseRoute] = (
            [Mount(api_prefix, routes=list(api_routes))] if api_prefix else list(api_routes)
        )

        async def not_found(request: Request, exc: Exception) -> Response:
            if request.url.path == "/_sim" or request.url.path.startswith("/_sim/"):
                return self.dialect.control_not_found.response()
            return self.dialect.unknown_route(request)

        # The control panel first: an API without a prefix would otherwise take /_sim paths.
        return Starlette(
            routes=[control, *api], exception_handlers={404: not_found, 405: not_found}
        )

    async def _token(self, request: Request) -> Any:
        """{"revoked": true} revokes the API token (401 everywhere); false restores it."""
        data = await self.control_body(request)
        self.revoked = bool(data.get("revoked", True))
        return {"revoked": self.revoked}

    async def control_body(self, request: Request) -> Json:
        """A control request's JSON object body (``{}`` when empty)."""
        body = await request.body()
        try:
            data = msgspec.json.decode(body) if body.strip() else {}
        except msgspec.DecodeError:
            raise self.dialect.bad_request("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise self.dialect.bad_request("the body must be a JSON object")
        return data

    async def _index(self, request: Request) -> Response:
        return json_response(
            {
                "service": self.dialect.service,
                "api": self._api_prefix or "/",
                "control": [
                    {"methods": list(r.methods), "path": r.path, "does": r.does}
                    for r in sorted(self._control, key=lambda r: r.path)
                ],
            }
        )
