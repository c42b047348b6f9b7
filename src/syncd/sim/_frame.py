"""The request frame both simulators serve their API through.

Each simulated service differs in its words (error bodies, rate-limit headers, paging
header), not in the steps every request goes through. :class:`Frame` does those steps once:
find the account of the bearer token (and its control-panel "revoked" knob), count the
request by endpoint in that account, take one request from the token's rate window, run the
handler on that account and turn what it returns (or the :class:`ServiceError` it raises)
into the answer, with the service's headers on it. A :class:`Dialect` says how the service
words its answers.

One simulator serves many accounts, one per token (:class:`Accounts`): each has its own
state (made on first use, so a thousand idle accounts cost little), request counts, rate
budget and revocation knob. The default account is there from the start with the default
token; a request with an unknown token is answered 401 and counted in it, as when there was
only one account.

The control panel (``/_sim``) shares the error answers but has no auth and no rate limit:
it plays the people using the service and must not eat into the client's budget. A control
call acts on the account named by the ``X-Sim-Account`` header or the ``account`` query
parameter (its token), else on the default account. It lists itself and the accounts at
``GET /_sim/``; ``POST /_sim/accounts`` adds an account.

Errors, one tree for both services::

    ServiceError            an answer in the service's own words: status and JSON body
    ├── KatanaError         {statusCode, name, message[, code, details]}  (katana world)
    └── TradeGeckoError     (tradegecko world)
        ├── BadRequest      400 {type: BadRequest, message}
        ├── NotFound        404 {type: NotFound, message}
        └── Refused         422 {errors: {field: [message]}}
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from syncd.ops.asgi import serving
from syncd.sim.faults import Faults, Service, install_faults
from syncd.sim.webhooks import WebhookSender

__all__ = [
    "ACCOUNT_HEADER",
    "Account",
    "Accounts",
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
    "StateHandler",
    "bearer_token",
    "json_response",
    "numbered_tokens",
    "serve",
]

Json = dict[str, Any]
#: An endpoint: answers a dict or list (sent as JSON, 200) or a whole :class:`Response`.
Handler = Callable[[Request], Awaitable[Any]]
#: An endpoint given its account's state too (a simulator's world), see :meth:`Frame.state_api`.
StateHandler = Callable[[Request, Any], Awaitable[Any]]

_ENCODER = msgspec.json.Encoder(decimal_format="number")

#: The control-panel header naming the account a call acts on (its token).
ACCOUNT_HEADER = "X-Sim-Account"


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


# -- accounts -----------------------------------------------------------------------------

S = TypeVar("S")


@dataclass(eq=False)
class Account(Generic[S]):
    """One account of the service: its token, knobs and counts, and its state.

    :param make: builds the state (the world) the first time it is used.
    """

    token: str
    make: Callable[[Account[S]], S] = field(repr=False)
    #: API requests by ``"METHOD /template"``.
    requests: Counter[str] = field(default_factory=Counter)
    responses_429: int = 0
    #: The control panel's knob: the token was revoked (every API call answers 401).
    revoked: bool = False
    #: What signs this account's webhooks, where the service signs per account.
    webhook_secret: str | None = None
    _state: S | None = field(default=None, repr=False)

    @property
    def state(self) -> S:
        if self._state is None:
            self._state = self.make(self)
        return self._state

    @property
    def started(self) -> bool:
        """Whether the state was made (an idle account has none yet)."""
        return self._state is not None

    def describe(self) -> Json:
        data: Json = {
            "token": self.token,
            "revoked": self.revoked,
            "started": self.started,
            "requests": sum(self.requests.values()),
            "responses_429": self.responses_429,
        }
        if self.webhook_secret is not None:
            data["webhook_secret"] = self.webhook_secret
        return data


class Accounts(Generic[S]):
    """The accounts of one simulator by token; the default account is made at once.

    :param make: builds an account's state on first use.
    :param default_token: the default account's token.
    :param default_state: the default account's state, when the caller has one already.
    """

    def __init__(
        self,
        make: Callable[[Account[S]], S],
        default_token: str,
        *,
        default_state: S | None = None,
        requests: Counter[str] | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        self._make = make
        self._by_token: dict[str, Account[S]] = {}
        self.default = self.create(default_token, webhook_secret=webhook_secret)
        self.default._state = default_state
        if requests is not None:
            self.default.requests = requests

    def create(self, token: str, *, webhook_secret: str | None = None) -> Account[S]:
        """A new account with its own empty state.

        :raises ValueError: the token is empty or another account has it.
        """
        if not token:
            raise ValueError("token must not be empty")
        if token in self._by_token:
            raise ValueError(f"an account with token {token!r} exists")
        account = Account(token, self._make, webhook_secret=webhook_secret)
        self._by_token[token] = account
        return account

    def get(self, token: str | None) -> Account[S] | None:
        return self._by_token.get(token) if token is not None else None

    def resolve(self, token: str | None) -> Account[S]:
        """The account of ``token``, the default account for none or an unknown one."""
        return self._by_token.get(token, self.default) if token is not None else self.default

    def __getitem__(self, token: str) -> Account[S]:
        return self._by_token[token]

    def __contains__(self, token: object) -> bool:
        return token in self._by_token

    def __iter__(self) -> Iterator[Account[S]]:
        return iter(list(self._by_token.values()))

    def __len__(self) -> int:
        return len(self._by_token)


def numbered_tokens(default_token: str, count: int) -> list[str]:
    """The tokens of ``count`` extra accounts, predictably: ``<default>-1`` ... ``<default>-N``."""
    return [f"{default_token}-{n}" for n in range(1, count + 1)]


async def serve(
    app: Starlette,
    host: str,
    port: int,
    *,
    token: str,
    accounts: int,
    on_ready: Callable[[str], None] | None = None,
    beside: Callable[[str], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Serve a simulator's app (its ``create_app``'s) and send its webhooks until cancelled.

    :param token: the default account's token; the others are ``<token>-1`` ... (``accounts``
        in all).
    :param on_ready: told the base URL once the simulator listens.
    :param beside: started with the base URL too (the Katana factory player).
    """
    for extra in numbered_tokens(token, accounts - 1):
        app.state.frame.create_account(extra)
    async with serving(app, host, port) as url, anyio.create_task_group() as tg:
        if on_ready is not None:
            on_ready(url)
        tg.start_soon(app.state.webhooks.run)
        if beside is not None:
            tg.start_soon(beside, url)
        await anyio.sleep_forever()


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, else ``None``."""
    scheme, _, given = authorization.partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


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
    #: A control call naming an account the simulator does not have (404).
    unknown_account: Callable[[str], ServiceError]
    #: ``POST /_sim/accounts`` with a token another account has (a conflict, 409 or 422).
    account_exists: Callable[[str], ServiceError]
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
    :param token: the default account's bearer token.
    :param window: the rate window (each token has its own budget), or ``None`` for no limit.
    :param requests: the default account's request counts (a world may share its own).
    :param make_state: builds a new account's state on first use.
    :param default_state: the default account's state.
    :param webhook_secrets: accounts sign webhooks with their own secret; a new one gets
        ``<token>-webhook-secret`` unless ``POST /_sim/accounts`` names one.
    :param default_webhook_secret: the default account's secret.
    """

    dialect: Dialect
    token: str
    window: RateWindow | None = None
    requests: Counter[str] = field(default_factory=Counter)
    make_state: Callable[[Account[Any]], Any] = field(default=lambda account: None, repr=False)
    default_state: Any = None
    webhook_secrets: bool = False
    default_webhook_secret: str | None = None
    accounts: Accounts[Any] = field(init=False)
    _control: list[ControlRoute] = field(default_factory=list)
    _api_prefix: str = ""

    def __post_init__(self) -> None:
        self.accounts = Accounts(
            self.make_state,
            self.token,
            default_state=self.default_state,
            requests=self.requests,
            webhook_secret=self.default_webhook_secret,
        )

    @property
    def revoked(self) -> bool:
        """The default account's token was revoked."""
        return self.accounts.default.revoked

    @property
    def responses_429(self) -> int:
        return self.accounts.default.responses_429

    def create_account(self, token: str, *, webhook_secret: str | None = None) -> Account[Any]:
        """A new account (see :meth:`Accounts.create`), with its webhook secret if it signs."""
        if self.webhook_secrets and webhook_secret is None:
            webhook_secret = f"{token}-webhook-secret"
        return self.accounts.create(token, webhook_secret=webhook_secret)

    def authorized(self, request: Request) -> Account[Any] | None:
        """The account whose unrevoked token the request bears, else ``None``."""
        account = self.accounts.get(bearer_token(request.headers.get("Authorization", "")))
        return account if account is not None and not account.revoked else None

    async def answer(self, request: Request, handler: Handler) -> Response:
        """The handler's answer as a response; a :class:`ServiceError` as the service's."""
        try:
            result = await handler(request)
        except ServiceError as error:
            return error.response()
        return result if isinstance(result, Response) else json_response(result)

    def api(self, template: str, handler: Handler, methods: Sequence[str]) -> Route:
        """An API endpoint: counted, authenticated, rate-limited per token; the handler
        finds its account on ``request.state.account``."""

        async def endpoint(request: Request) -> Response:
            account = self.authorized(request)
            # A refused request is counted where it was when there was one account.
            counted = account or self.accounts.resolve(
                bearer_token(request.headers.get("Authorization", ""))
            )
            counted.requests[f"{request.method} {template}"] += 1
            headers = self.dialect.extra_headers()
            if account is None:
                return self.dialect.unauthorized.response(headers)
            if self.window is not None:
                quota = self.window.take(account.token)
                headers.update(self.dialect.quota_headers(quota))
                if not quota.allowed:
                    account.responses_429 += 1
                    return self.dialect.rate_limited.response(headers)
            request.state.account = account
            response = await self.answer(request, handler)
            response.headers.update(headers)
            return response

        # Counted by the template as given; a bare {id} routes integers only.
        return Route(template.replace("{id}", "{id:int}"), endpoint, methods=list(methods))

    def control(self, path: str, handler: Handler, methods: Sequence[str]) -> Route:
        """A control-panel endpoint (``path`` under ``/_sim``) acting on the account the
        call names (``request.state.account``); its docstring's first line is what the
        index says it does."""
        does = (handler.__doc__ or "").strip().splitlines()
        self._control.append(ControlRoute(tuple(methods), f"/_sim{path}", does[0] if does else ""))

        async def endpoint(request: Request) -> Response:
            try:
                request.state.account = self.named_account(request)
            except ServiceError as error:
                return error.response()
            return await self.answer(request, handler)

        return Route(path, endpoint, methods=list(methods))

    def state_api(
        self,
        template: str,
        handler: StateHandler,
        methods: Sequence[str],
        *,
        wrap: Callable[[Handler], Handler] | None = None,
    ) -> Route:
        """:meth:`api` for a handler given its account's state; ``wrap`` (if any) goes
        around the bound handler inside the frame's steps."""
        bound = _on_state(handler)
        return self.api(template, wrap(bound) if wrap is not None else bound, methods)

    def state_control(self, path: str, handler: StateHandler, methods: Sequence[str]) -> Route:
        """:meth:`control` for a handler given its account's state."""
        return self.control(path, _on_state(handler), methods)

    def named_account(self, request: Request) -> Account[Any]:
        """The account a control call names, the default one when it names none.

        :raises ServiceError: the service's 404 for a token no account has.
        """
        name = request.headers.get(ACCOUNT_HEADER) or request.query_params.get("account")
        if not name:
            return self.accounts.default
        account = self.accounts.get(name)
        if account is None:
            raise self.dialect.unknown_account(name)
        return account

    def traffic(self, account: Account[Any] | None = None) -> Json:
        """What the API was asked of ``account`` (the default one), for ``/_sim/counters``."""
        account = account or self.accounts.default
        return {"requests": dict(account.requests), "responses_429": account.responses_429}

    def app(
        self,
        api_routes: Sequence[BaseRoute],
        control_routes: Sequence[BaseRoute],
        *,
        service: Service,
        world: Any,
        webhooks: WebhookSender,
        faults: Faults | None,
        rate_limit: int,
        api_prefix: str = "",
    ) -> Starlette:
        """The service as an ASGI app: the API (under ``api_prefix``) and ``/_sim``, behind
        the fault layer (see :mod:`syncd.sim.faults`) keyed by account.

        :param world: the default account's state, kept on ``app.state.world``.
        :param webhooks: the service's sender; run ``app.state.webhooks.run()`` beside the
            served app to send webhooks.
        :param rate_limit: requests per window, for the fault layer's 429 bursts.
        """
        self._api_prefix = api_prefix
        token_route = self.control("/token", self._token, ["POST"])
        accounts_route = self.control("/accounts", self._accounts, ["GET", "POST"])
        # /_sim/faults is served by the fault layer in front of the app (see faults.py).
        self._control.append(
            ControlRoute(
                ("GET", "PUT", "DELETE"),
                "/_sim/faults",
                "Injected faults: GET shows them, PUT replaces them, DELETE clears them.",
            )
        )
        index = Route("/", self._index, methods=["GET"])
        control = Mount("/_sim", routes=[index, *control_routes, token_route, accounts_route])
        api: list[BaseRoute] = (
            [Mount(api_prefix, routes=list(api_routes))] if api_prefix else list(api_routes)
        )

        async def not_found(request: Request, exc: Exception) -> Response:
            if request.url.path == "/_sim" or request.url.path.startswith("/_sim/"):
                return self.dialect.control_not_found.response()
            return self.dialect.unknown_route(request)

        # The control panel first: an API without a prefix would otherwise take /_sim paths.
        app = Starlette(routes=[control, *api], exception_handlers={404: not_found, 405: not_found})
        app.state.world = world
        app.state.accounts = self.accounts
        app.state.frame = self
        app.state.webhooks = webhooks
        layer = install_faults(app, service, faults, api_prefix=api_prefix, rate_limit=rate_limit)
        layer.account_of = lambda given: self.accounts.resolve(given).token
        return app

    async def _token(self, request: Request) -> Any:
        """{"revoked": true} revokes the account's API token (401 everywhere); false restores it."""
        data = await self.control_body(request)
        account: Account[Any] = request.state.account
        account.revoked = bool(data.get("revoked", True))
        return {"revoked": account.revoked}

    async def _accounts(self, request: Request) -> Any:
        """GET lists the accounts; POST {"token"[, "webhook_secret"]} adds one (201)."""
        if request.method == "GET":
            return {"accounts": [account.describe() for account in self.accounts]}
        data = await self.control_body(request)
        allowed = {"token", "webhook_secret"} if self.webhook_secrets else {"token"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.dialect.bad_request(f"unknown field {unknown[0]!r}")
        token, secret = data.get("token"), data.get("webhook_secret")
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise self.dialect.bad_request("token must be a non-empty string without spaces")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise self.dialect.bad_request("webhook_secret must be a non-empty string")
        if token in self.accounts:
            raise self.dialect.account_exists(token)
        account = self.create_account(token, webhook_secret=secret)
        return json_response({"account": account.describe()}, 201)

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
                "default_account": self.accounts.default.token,
                "accounts": [account.token for account in self.accounts],
                "control": [
                    {"methods": list(r.methods), "path": r.path, "does": r.does}
                    for r in sorted(self._control, key=lambda r: r.path)
                ],
            }
        )


def _on_state(handler: StateHandler) -> Handler:
    """The handler called with the state of the account the frame found for the request."""

    @functools.wraps(handler)
    async def on(request: Request) -> Any:
        account: Account[Any] = request.state.account
        return await handler(request, account.state)

    return on
