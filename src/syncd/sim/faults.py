"""Faults for both simulators: errors, latency, hangs, dropped connections, cut bodies, 429s.

One ASGI middleware, :class:`FaultInjector`, sits in front of a simulator's API and, per
request, may

- add latency (``latency_ms`` plus up to ``jitter_ms``, uniform);
- answer an error (``error_rate``, status ``error_status``, the body the service would send);
- hang (``timeout_rate``): answer nothing for ``timeout_seconds`` (or until the client gives
  up), then close the connection;
- drop the connection without answering (``drop_rate``);
- hold a request (``hold_rate``): read it whole, say nothing for ``hold_seconds``, then let
  it land whether the client still waits or gave up (as a proxy or the service carries on
  with a request its client abandoned), answering if anyone still listens;
- cut a 2xx JSON body mid-way (``truncate_rate``), status and ``Content-Length`` consistent
  with the cut, so the client reads a complete but broken document;
- answer 429 during a burst (the next ``requests`` API calls, or for ``seconds``), with the
  service's real rate-limit headers and body.

With ``after = true`` a rule's error, hang or drop happens *after* the simulator has done
the work: a create has landed but the client never learns it. That is the dangerous case for
a POST without an idempotency key.

Rules match a method (or ``*``) and a path in the API's own terms (``/sales_orders``, a
template ``/sales_orders/{id}``, a prefix ``/sales_orders*``, or ``*``); every matching
rule adds its latency, and the first fault that fires wins. The random source is seeded, so a
run with the same seed and the same sequence of requests injects the same faults.

A rule or a burst may name an ``account`` (its API token): it then touches only requests
bearing that token; by default it touches every account. (A request with no or an unknown
token belongs to the default account, as it is counted there.) What was injected is
counted in all and per account.

Faults never touch ``/_sim/``. ``/_sim/faults`` is the control endpoint: ``GET`` shows the
settings and what was injected, ``PUT`` replaces the settings (a burst starts then), ``DELETE``
clears them. Both simulators always carry the layer, so faults can be switched on at run time.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
import msgspec

__all__ = [
    "CONTROL_PATH",
    "ASGIApp",
    "Burst",
    "ConnectionDropped",
    "FaultInjector",
    "FaultLayer",
    "FaultRule",
    "Faults",
    "Message",
    "NonNegative",
    "Rate",
    "Receive",
    "Scope",
    "Send",
    "Service",
    "install_faults",
]

Service = Literal["katana", "tradegecko"]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTROL_PATH = "/_sim/faults"

Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class FaultRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults for the requests matching ``method`` and ``path``."""

    #: ``*``, an exact API path, a template (``/sales_orders/{id}``) or a prefix (``/x*``).
    path: str = "*"
    #: ``*`` or one HTTP method.
    method: str = "*"
    #: Only requests of this account (its token); ``None`` for every account.
    account: str | None = None
    error_rate: Rate = 0.0
    error_status: Annotated[int, msgspec.Meta(ge=400, le=599)] = 500
    timeout_rate: Rate = 0.0
    #: How long a hang lasts (longer than the client's timeout); ends early when it gives up.
    timeout_seconds: NonNegative = 60.0
    drop_rate: Rate = 0.0
    #: Held requests land after ``hold_seconds``, even when the client gave up before.
    hold_rate: Rate = 0.0
    hold_seconds: NonNegative = 5.0
    truncate_rate: Rate = 0.0
    latency_ms: NonNegative = 0.0
    jitter_ms: NonNegative = 0.0
    #: Fail errors, hangs and drops after the simulator has done the work.
    after: bool = False
    #: The most faults (not latencies) this rule injects; ``None`` for no bound.
    times: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Burst(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """429 for the next ``requests`` API calls and/or for ``seconds`` after it is set."""

    requests: Annotated[int, msgspec.Meta(ge=0)] = 0
    seconds: NonNegative = 0.0
    #: The wait the 429 announces; by default what is left of a timed burst, else 1 s.
    retry_after: NonNegative | None = None
    #: Only requests of this account (its token); ``None`` for every account.
    account: str | None = None


class Faults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fault settings of one simulator (the JSON of ``PUT /_sim/faults``)."""

    seed: int | None = 0
    rules: list[FaultRule] = []
    burst: Burst | None = None

    @classmethod
    def everywhere(
        cls,
        *,
        error_rate: float = 0.0,
        error_status: int = 500,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        timeout_rate: float = 0.0,
        drop_rate: float = 0.0,
        truncate_rate: float = 0.0,
        seed: int | None = 0,
    ) -> Faults:
        """One rule for every API endpoint (what the command-line flags build)."""
        rule = FaultRule(
            error_rate=error_rate,
            error_status=error_status,
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            timeout_rate=timeout_rate,
            drop_rate=drop_rate,
            truncate_rate=truncate_rate,
        )
        return cls(seed=seed, rules=[rule] if rule != FaultRule() else [])


_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _pattern(path: str) -> Callable[[str], bool]:
    if path == "*":
        return lambda _: True
    if path.endswith("*"):
        prefix = path[:-1]
        return lambda candidate: candidate.startswith(prefix)
    if "{" in path:
        regex = re.compile("^" + re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(path)) + "/?$")
        return lambda candidate: regex.match(candidate) is not None
    exact = path.rstrip("/") or "/"
    return lambda candidate: (candidate.rstrip("/") or "/") == exact


@dataclass
class _Plan:
    delay: float = 0.0
    rate_limited: float | None = None
    kind: str | None = None
    after: bool = False
    status: int = 500
    hang: float = 0.0


class FaultLayer:
    """The live fault state of one simulator: settings, random source, burst, counts.

    :param service: whose error bodies and rate-limit headers to imitate.
    :param faults: the initial settings; none when omitted.
    :param api_prefix: the API's root path (Katana's ``/v1``); rules match below it.
    :param rate_limit: the limit the 429 headers announce.
    """

    def __init__(
        self,
        service: Service,
        faults: Faults | None = None,
        *,
        api_prefix: str = "",
        rate_limit: int = 60,
    ) -> None:
        self.service = service
        self.api_prefix = api_prefix.rstrip("/")
        self.rate_limit = rate_limit
        self.injected: Counter[str] = Counter()
        self.injected_by_account: dict[str, Counter[str]] = {}
        #: The account key of a request's bearer token (the simulator sets it; the token
        #: itself until then).
        self.account_of: Callable[[str | None], str] = lambda token: token or ""
        self.configure(faults or Faults())

    def count(self, kind: str, account: str, by: int = 1) -> None:
        self.injected[kind] += by
        self.injected_by_account.setdefault(account, Counter())[kind] += by

    def injected_for(self, account: str) -> dict[str, int]:
        """What was injected into ``account``'s requests."""
        return dict(self.injected_by_account.get(account, Counter()))

    def configure(self, faults: Faults) -> None:
        """Replace the settings; the random source is re-seeded and a burst starts now."""
        self.faults = faults
        self._random = random.Random(faults.seed)
        self._matchers = [(_pattern(rule.path), rule) for rule in faults.rules]
        self._fired: Counter[int] = Counter()
        burst = faults.burst
        self._burst_left = burst.requests if burst else 0
        self._burst_until = time.monotonic() + burst.seconds if burst else 0.0

    def report(self) -> dict[str, Any]:
        """The settings and the faults injected so far (``GET /_sim/faults``)."""
        return {
            "faults": msgspec.to_builtins(self.faults),
            "injected": dict(self.injected),
            "injected_by_account": {k: dict(v) for k, v in self.injected_by_account.items()},
            "burst_requests_left": self._burst_left,
            "burst_seconds_left": round(max(0.0, self._burst_until - time.monotonic()), 3),
        }

    # -- deciding ------------------------------------------------------------------------

    def api_path(self, path: str) -> str | None:
        """The path in the API's terms, or ``None`` when faults do not apply to it."""
        if path == "/_sim" or path.startswith("/_sim/"):
            return None
        if not self.api_prefix:
            return path
        if path == self.api_prefix or path.startswith(self.api_prefix + "/"):
            return path[len(self.api_prefix) :] or "/"
        return None

    def plan(self, method: str, path: str, account: str = "") -> _Plan:
        """What to do to one API request of ``account``."""
        plan = _Plan()
        now = time.monotonic()
        burst = self.faults.burst
        if (
            burst is not None
            and burst.account in (None, account)
            and (self._burst_left > 0 or now < self._burst_until)
        ):
            if self._burst_left > 0:
                self._burst_left -= 1
            timed = max(0.0, self._burst_until - now)
            wait = burst.retry_after if burst.retry_after is not None else (timed or 1.0)
            plan.rate_limited = wait
            return plan
        rnd = self._random
        for index, (matches, rule) in enumerate(self._matchers):
            if rule.method not in ("*", method.upper()) or not matches(path):
                continue
            if rule.account not in (None, account):
                continue
            if rule.latency_ms or rule.jitter_ms:
                plan.delay += (rule.latency_ms + rnd.uniform(0.0, rule.jitter_ms)) / 1000.0
            if plan.kind is not None:
                continue
            if rule.times is not None and self._fired[index] >= rule.times:
                continue
            for kind, rate in (
                ("timeout", rule.timeout_rate),
                ("drop", rule.drop_rate),
                ("hold", rule.hold_rate),
                ("error", rule.error_rate),
                ("truncate", rule.truncate_rate),
            ):
                if rate > 0 and rnd.random() < rate:
                    plan.kind = kind
                    plan.after = rule.after and kind not in ("truncate", "hold")
                    plan.status = rule.error_status
                    plan.hang = rule.hold_seconds if kind == "hold" else rule.timeout_seconds
                    self._fired[index] += 1
                    break
        return plan

    # -- answers in the service's own words -----------------------------------------------

    def error_response(self, status: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        reason = _REASONS.get(status, "Error")
        name = reason.replace(" ", "")
        if self.service == "katana":
            body: dict[str, Any] = {"statusCode": status, "name": name, "message": reason}
        else:
            body = {"type": name, "message": reason}
        return status, self._headers(), json.dumps(body, separators=(",", ":")).encode()

    def rate_limited_response(self, wait: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        headers = self._headers()
        reset_at = time.time() + wait
        if self.service == "katana":
            headers += [
                (b"retry-after", str(max(1, math.ceil(wait))).encode()),
                (b"x-ratelimit-limit", str(self.rate_limit).encode()),
                (b"x-ratelimit-remaining", b"0"),
                (b"x-ratelimit-reset", str(int(reset_at * 1000)).encode()),
            ]
            body: dict[str, Any] = {
                "statusCode": 429,
                "name": "TooManyRequests",
                "message": "Too Many Requests",
            }
        else:
            headers += [
                (b"x-rate-limit-limit", str(self.rate_limit).encode()),
                (b"x-rate-limit-remaining", b"0"),
                (b"x-rate-limit-reset", str(math.ceil(reset_at)).encode()),
            ]
            body = {"type": "TooManyRequests", "message": "Rate limit exceeded"}
        return 429, headers, json.dumps(body, separators=(",", ":")).encode()

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.service == "tradegecko":
            headers.append((b"x-request-id", str(uuid.uuid4()).encode()))
        return headers


class ConnectionDropped(Exception):
    """Raised where the server gives no way to drop the connection (not uvicorn)."""


async def _respond(send: Send, answer: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    status, headers, body = answer
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _drop(receive: Receive) -> None:
    """Close the client's connection without a word (uvicorn's transport, found via receive)."""
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionDropped("the connection was dropped on purpose")
    transport.abort()
    # uvicorn notices the loss on the next loop turn; returning before would make it answer 500.
    with anyio.move_on_after(1.0):
        while not getattr(cycle, "disconnected", True):  # noqa: ASYNC110 - uvicorn sets a flag
            await anyio.sleep(0.001)


async def _hang(receive: Receive, seconds: float) -> None:
    """Say nothing for ``seconds``, or until the client hangs up."""
    with anyio.move_on_after(seconds):
        while (await receive())["type"] != "http.disconnect":
            pass


class FaultInjector:
    """ASGI middleware applying a :class:`FaultLayer` to every API request."""

    def __init__(self, app: ASGIApp, *, layer: FaultLayer) -> None:
        self.app = app
        self.layer = layer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.rstrip("/") == CONTROL_PATH:
            await self._control(scope, receive, send)
            return
        api_path = self.layer.api_path(path)
        if api_path is None:
            await self.app(scope, receive, send)
            return
        layer = self.layer
        account = layer.account_of(_bearer(scope))
        plan = layer.plan(scope["method"], api_path, account)
        if plan.delay > 0:
            layer.count("latency", account)
            await anyio.sleep(plan.delay)
        if plan.rate_limited is not None:
            layer.count("rate_limited", account)
            await _respond(send, layer.rate_limited_response(plan.rate_limited))
            return
        if plan.kind is None:
            await self.app(scope, receive, send)
            return
        layer.count(f"{plan.kind}_after" if plan.after else plan.kind, account)
        if plan.kind == "hold":
            await self._hold(scope, receive, send, plan.hang)
            return
        if plan.kind == "truncate" or plan.after:
            start, body = await self._capture(scope, receive)
            if plan.kind == "truncate":
                await self._truncated(send, start, body, account)
                return
        await self._fail(plan, receive, send)

    async def _fail(self, plan: _Plan, receive: Receive, send: Send) -> None:
        if plan.kind == "error":
            await _respond(send, self.layer.error_response(plan.status))
            return
        if plan.kind == "timeout":
            await _hang(receive, plan.hang)
        await _drop(receive)

    async def _hold(self, scope: Scope, receive: Receive, send: Send, seconds: float) -> None:
        """Read the request whole, wait ``seconds``, then run it: it lands even when the
        client hung up meanwhile (its answer then goes nowhere)."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # gone before it was sent whole: nothing to carry through
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                break
        await anyio.sleep(seconds)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        async def answer(message: Message) -> None:
            # The client may be gone: the work stands, the answer is lost.
            with contextlib.suppress(OSError, RuntimeError):
                await send(message)

        await self.app(scope, replay, answer)

    async def _capture(self, scope: Scope, receive: Receive) -> tuple[Message, bytes]:
        """Run the simulator and keep its answer instead of sending it."""
        start: Message = {}
        chunks: list[bytes] = []

        async def keep(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await self.app(scope, receive, keep)
        return start, b"".join(chunks)

    async def _truncated(self, send: Send, start: Message, body: bytes, account: str) -> None:
        status = int(start.get("status", 500))
        if 200 <= status < 300 and len(body) > 1:
            body = body[: max(1, len(body) // 2)]
        else:
            # Nothing to cut (an error, or a 204): the answer goes out whole, uncounted.
            self.layer.count("truncate", account, -1)
        headers = [
            (name, value)
            for name, value in start.get("headers", [])
            if name.lower() != b"content-length"
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        layer = self.layer
        method = scope["method"]
        if method == "PUT":
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            try:
                faults = msgspec.json.decode(b"".join(chunks), type=Faults)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                await _plain(send, 400, {"error": str(exc)})
                return
            layer.configure(faults)
        elif method == "DELETE":
            layer.configure(Faults())
        elif method != "GET":
            await _plain(send, 405, {"error": "use GET, PUT or DELETE"})
            return
        await _plain(send, 200, layer.report())


def _bearer(scope: Scope) -> str | None:
    """The bearer token of an ASGI request, if it has one."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            return given.strip() if scheme.lower() == "bearer" else None
    return None


async def _plain(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data, separators=(",", ":")).encode()
    await _respond(send, (status, [(b"content-type", b"application/json")], body))


def install_faults(
    app: Any,
    service: Service,
    faults: Faults | None = None,
    *,
    api_prefix: str = "",
    rate_limit: int = 60,
) -> FaultLayer:
    """Put the fault layer in front of a simulator's Starlette ``app``; it is also kept on
    ``app.state.faults`` (its counts appear in ``/_sim/counters`` as ``faults_injected``)."""
    layer = FaultLayer(service, faults, api_prefix=api_prefix, rate_limit=rate_limit)
    app.add_middleware(FaultInjector, layer=layer)
    app.state.faults = layer
    return layer
