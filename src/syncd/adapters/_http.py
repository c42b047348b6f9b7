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

import bisect
import contextvars
import enum
import functools
import itertools
import json
import logging
import math
import ssl
import time
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ParamSpec, Protocol, Self, TypeVar

import anyio
import httpcore
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
    WriteWithheld,
)

__all__ = [
    "HOST_CONNECTIONS",
    "HOST_KEEPALIVE",
    "HOST_WAIT",
    "HostPool",
    "Params",
    "PlannedRequest",
    "Priority",
    "RequestBudget",
    "RequestGuard",
    "ServiceClient",
    "Slot",
    "WritePlan",
    "chunks",
    "current_priority",
    "describe_error_body",
    "format_time",
    "guarded_transport",
    "is_last_page",
    "parse_reset",
    "planning",
    "request_priority",
    "slot_given_back",
]

T = TypeVar("T")

log = logging.getLogger("syncd.http")

Params = Mapping[str, str | int | Sequence[str | int]]

_IDEMPOTENT = frozenset({"GET", "PUT", "PATCH", "DELETE", "HEAD"})
#: What a shadow run sends; anything else is withheld.
_READING = frozenset({"GET", "HEAD", "OPTIONS"})


def _decoded(body: bytes | None) -> Any:
    """A withheld request's body as JSON values (its text if it is not JSON); numbers with
    a fraction as :class:`~decimal.Decimal`, their digits as sent."""
    if body is None:
        return None
    try:
        return json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")


@dataclass(frozen=True)
class PlannedRequest:
    """A writing request a shadow run did not send: what the client would have sent, and
    the placeholder answer it gave the caller instead (``None``: none, it was withheld)."""

    service: str
    method: str
    #: The endpoint as a template (``/sales_orders/{id}``).
    endpoint: str
    path: str
    #: The JSON body, decoded; ``None``: no body.
    body: Any
    #: The placeholder answer (negative ids), decoded.
    answer: Any = None
    #: What the caller adds to explain it to a person (the client knows only the request).
    detail: Any = None


class WritePlan:
    """The writes one effect would send, in order, while :func:`planning` is active. Each
    planned write is answered with a placeholder whose new ids count down from -1, so they
    can never be mistaken for a service's ids."""

    def __init__(self) -> None:
        self.requests: list[PlannedRequest] = []
        self._last_id = 0

    def new_id(self) -> int:
        """A placeholder id not yet given in this plan."""
        self._last_id -= 1
        return self._last_id


_plan: ContextVar[WritePlan | None] = ContextVar("syncd_write_plan", default=None)


@contextmanager
def planning() -> Iterator[WritePlan]:
    """Within the block (this task and those it starts), a shadow client answers each write
    it knows how to plan with a placeholder and records it in the yielded plan, instead of
    raising :class:`~syncd.errors.WriteWithheld`. Nothing is sent either way."""
    plan = WritePlan()
    token = _plan.set(plan)
    try:
        yield plan
    finally:
        _plan.reset(token)


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


class Priority(enum.IntEnum):
    """How urgent a request is; waiting requests are served highest first.

    ``FINISH``: work on an order already under way (a receipt, the reads that move an
    order forward, Katana's polls); ``START``: new work (an import, TradeGecko's polls,
    which find new POs); ``BACKGROUND``: reconciliation under webhooks, which loses nothing
    by waiting.
    """

    BACKGROUND = 0
    START = 1
    FINISH = 2


#: The priority of the requests the current task sends; :func:`request_priority` sets it.
_PRIORITY: ContextVar[Priority] = ContextVar("syncd_request_priority", default=Priority.START)

P = ParamSpec("P")
R = TypeVar("R")


class request_priority:  # lower case: it reads as a function, `with request_priority(...)`
    """Send the requests of a block, or of an async function, at ``priority``.

    ``with request_priority(Priority.FINISH): ...`` or ``@request_priority(Priority.START)``
    on an ``async def``. A context variable carries it, so the clients' methods take no
    extra argument and tasks started inside inherit it.
    """

    def __init__(self, priority: Priority) -> None:
        self.priority = priority
        self._tokens: list[Token[Priority]] = []

    def __enter__(self) -> None:
        self._tokens.append(_PRIORITY.set(self.priority))

    def __exit__(self, *exc_info: object) -> None:
        _PRIORITY.reset(self._tokens.pop())

    def __call__(self, function: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        priority = self.priority

        @functools.wraps(function)
        async def prioritised(*args: P.args, **kwargs: P.kwargs) -> R:
            # A token per call: the decorated function may run in several tasks at once.
            token = _PRIORITY.set(priority)
            try:
                return await function(*args, **kwargs)
            finally:
                _PRIORITY.reset(token)

        return prioritised


def current_priority() -> Priority:
    """The priority requests sent from here go out at (``START`` unless set)."""
    return _PRIORITY.get()


class Slot:
    """One of a bounded pool's places (the dispatcher's effect slots, ``daemon.concurrency``),
    held by the task that entered it: ``async with Slot(limiter): ...``.

    A request that must wait for its service's budget gives the slot back for the wait and
    takes it again before it is sent (:meth:`RequestBudget.acquire`), so work that needs the
    other service runs meanwhile. The slot itself is the limiter's borrower, so giving back
    and taking again never touch another task's token; a task started inside inherits no
    slot to give back (only the one that entered it holds it).
    """

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._owner: object = None
        self._token: Token[Slot | None] | None = None
        #: Whether the slot is taken now (false while its task is parked on a budget).
        self.held = False

    async def __aenter__(self) -> Self:
        await self._limiter.acquire_on_behalf_of(self)
        self.held = True
        self._owner = anyio.get_current_task().id
        self._token = _SLOT.set(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _SLOT.reset(self._token)
            self._token = None
        if self.held:
            self.held = False
            self._limiter.release_on_behalf_of(self)

    def give_back(self) -> bool:
        """Free the place for a wait; ``False`` (nothing done) if this task holds none."""
        if not self.held or anyio.get_current_task().id != self._owner:
            return False
        self.held = False
        self._limiter.release_on_behalf_of(self)
        return True

    async def take_again(self) -> None:
        """Wait for a place again, in line behind those already waiting. Cancelled, it holds
        nothing (the limiter hands no token to a cancelled borrower)."""
        await self._limiter.acquire_on_behalf_of(self)
        self.held = True


#: The slot of the effect running in this task (none outside the dispatcher).
_SLOT: ContextVar[Slot | None] = ContextVar("syncd_slot", default=None)


@asynccontextmanager
async def slot_given_back() -> AsyncIterator[None]:
    """Give this task's :class:`Slot` (if it holds one) back for the body, then take it
    again in line: for a wait on another effect's work, such as a shared read it joined.
    That effect may wait for a slot itself (after a wait for its budget), and slots held
    by the effects waiting for it would never come free."""
    slot = _SLOT.get()
    parked = slot is not None and slot.give_back()
    try:
        yield
    finally:
        if parked:
            assert slot is not None
            await slot.take_again()


@dataclass(eq=False)
class _Waiter:
    priority: Priority
    seq: int
    since: float


class RequestBudget:
    """A sliding-window allowance of ``limit`` requests per ``period`` seconds, of which
    ``reserve`` are left to the key's other users.

    :meth:`acquire` waits until a request fits; :meth:`complete` tells that its answer came.
    A request counts from the moment it is sent until ``period`` after its answer: the
    service counts it on arrival, somewhere in between, so no window the service can look
    at holds more than syncd's share.

    **Priorities.** Waiting requests are served highest :class:`Priority` first, in arrival
    order within one priority, and a lower priority leaves the last ``headroom`` slots of
    syncd's share per step to the higher ones (a poll never takes the slot a receipt needs
    next). A request that has waited ``promote_after`` seconds (default: one ``period``)
    moves up one priority, again after each further ``promote_after``: a background request
    ranks as ``FINISH`` after ``2 * promote_after`` and then goes before every request that
    came after it, so none waits for ever.

    **Others on the key.** The key is shared (a factory's Shopify link, its accounting,
    people's scripts). Each answer's remaining count (:meth:`observe`) says how many
    requests the window holds; what syncd's own count does not explain is others'. A
    request goes out only when, after it, syncd's requests, others' and the ``reserve``
    still fit in ``limit``: syncd never takes the remaining count below the reserve, and
    its share shrinks while others spend. How others' use is guessed between answers is
    :meth:`others`. With ``reserve = 0`` the key is syncd's alone and only its own count
    holds, as before. The service's headers also stop every caller outright: a 429 or
    nothing remaining blocks until its reset (:meth:`block_for`).
    """

    def __init__(
        self,
        limit: int,
        period: float,
        *,
        reserve: int = 0,
        promote_after: float | None = None,
        headroom: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if limit < 1 or period <= 0:
            raise ValueError("a request budget needs limit >= 1 and period > 0")
        if not 0 <= reserve < limit:
            raise ValueError(f"a request budget's reserve must be 0..{limit - 1}, got {reserve}")
        if promote_after is not None and promote_after <= 0:
            raise ValueError("a request budget's promote_after must be positive")
        if headroom is not None and not 0 <= 2 * headroom < limit - reserve:
            # A background request must still fit in an otherwise empty window.
            raise ValueError("a request budget's headroom must leave a poll room to send")
        self.limit = limit
        self.period = period
        self.reserve = reserve
        self.promote_after = promote_after if promote_after is not None else period
        # A twentieth of syncd's share: 2 of Katana's 50, 13 of TradeGecko's 270.
        self.headroom = headroom if headroom is not None else (limit - reserve) // 20
        self._clock = clock
        self._sent: deque[float] = deque()
        self._in_flight = 0
        self._blocked_until = 0.0
        self._waiting: list[_Waiter] = []
        #: The waiter that was first when one last looked.
        self._head: _Waiter | None = None
        self._seq = itertools.count()
        self._changed = anyio.Event()
        #: Others' requests in the window at the last answer, and when it came.
        self._others = 0
        self._others_at = 0.0
        self._others_until = 0.0
        self._others_fixed = False
        self.remaining_reported: int | None = None
        #: Requests sent, by priority (for tests and the benchmark).
        self.sent_by_priority: dict[Priority, int] = dict.fromkeys(Priority, 0)

    # -- the window --------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        while self._sent and now - self._sent[0] >= self.period:
            self._sent.popleft()

    def others(self, at: float | None = None) -> int:
        """Others' requests syncd assumes the window holds at ``at`` (default: now).

        Until those seen at the last answer can have left (``period`` later; a fixed
        window's reset): all of them, and newcomers at the pace they were seen (``others``
        per ``period``), none assumed gone. Then a fixed window starts empty; a sliding one
        holds newcomers in their place, a guess that fades out over one more period, so
        that a key others emptied is tried again at the latest two periods after the last
        answer.
        """
        now = self._clock() if at is None else at
        seen, until = self._others, self._others_until
        if seen == 0 or (self._others_fixed and now >= until):
            return 0
        if now < until:
            return seen + math.ceil(seen * max(0.0, now - self._others_at) / self.period)
        return max(0, math.ceil(seen * (1.0 - (now - until) / self.period)))

    def _room(self, ours: int, priority: Priority) -> int:
        """How many of others' requests fit beside ``ours``, one more at ``priority`` and
        the slots that priority leaves to higher ones."""
        return self.limit - self.reserve - ours - 1 - self.headroom * (Priority.FINISH - priority)

    def _wait_time(self, priority: Priority = Priority.FINISH) -> float:
        """Seconds until one more request at ``priority`` fits (0: now)."""
        now = self._clock()
        self._prune(now)
        blocked = max(0.0, self._blocked_until - now)
        if self.others(now) <= self._room(len(self._sent) + self._in_flight, priority):
            return blocked
        # Between these moments our count is steady and others' guess only grows (before
        # ``until``) or only fades (after): the first fit is at a moment's start, or where
        # the fading guess meets the room.
        expiries = [s + self.period for s in self._sent]  # in order: answers come in order
        until = self._others_until
        moments = sorted({now, *expiries} | {m for m in (until, until + self.period) if m > now})
        for start, end in zip(moments, [*moments[1:], math.inf], strict=True):
            ours = len(expiries) - bisect.bisect_right(expiries, start) + self._in_flight
            room = self._room(ours, priority)
            if room < 0:
                continue
            if self.others(start) <= room:
                return max(blocked, start - now)
            if start >= until and not self._others_fixed:
                meets = until + self.period * (1.0 - room / self._others)
                if start <= meets < end:
                    return max(blocked, meets - now)
        # Only requests on the wire stand in the way: :meth:`complete` wakes the waiters
        # when one is answered; the period is only a safety net.
        return max(blocked, self.period)

    # -- callers -----------------------------------------------------------------------

    def _promoted(self, waiter: _Waiter, now: float) -> Priority:
        steps = int((now - waiter.since) // self.promote_after)
        return Priority(min(waiter.priority + steps, Priority.FINISH))

    def _rank(self, waiter: _Waiter, now: float) -> tuple[int, int]:
        return (-self._promoted(waiter, now), waiter.seq)

    def _first(self) -> _Waiter:
        now = self._clock()
        return min(self._waiting, key=lambda waiter: self._rank(waiter, now))

    def _notify(self) -> None:
        """Something changed (a slot, an answer, a waiter): waiting callers look again."""
        self._changed.set()
        self._changed = anyio.Event()

    async def acquire(self, priority: Priority | None = None) -> None:
        """Wait until one more request fits in syncd's share and it is the first waiting
        (by priority, then arrival), then count it as sent.

        A caller that must wait and holds a dispatcher :class:`Slot` gives it back for the
        wait and takes it again before returning: an effect parked on one service's budget
        does not keep work for the other service from running. The request is counted
        while the slot is taken again, so the budget never overcommits; cancelled then, it
        is uncounted (it was never sent).

        :param priority: default: the one :class:`request_priority` set here.
        """
        waiter = _Waiter(
            priority if priority is not None else _PRIORITY.get(), next(self._seq), self._clock()
        )
        slot = _SLOT.get()
        parked = False
        self._waiting.append(waiter)
        try:
            while True:
                first = self._first()
                if first is not self._head:
                    # A new first (an arrival, a promotion): wake it, once.
                    self._head = first
                    self._notify()
                if first is waiter:
                    wait = self._wait_time(self._promoted(waiter, self._clock()))
                else:
                    wait = math.inf
                if wait <= 0:
                    break
                if slot is not None and not parked:
                    parked = slot.give_back()
                changed = self._changed
                with anyio.move_on_after(wait):
                    await changed.wait()
            self._in_flight += 1
            self.sent_by_priority[waiter.priority] += 1
        finally:
            self._waiting.remove(waiter)
            if self._head is waiter:
                self._head = None
            self._notify()
        if parked:
            assert slot is not None
            try:
                await slot.take_again()
            except BaseException:
                self._in_flight -= 1
                self.sent_by_priority[waiter.priority] -= 1
                self._notify()
                raise

    def complete(self) -> None:
        """The answer to an acquired request came (or it failed): it now ages out."""
        self._in_flight = max(0, self._in_flight - 1)
        self._sent.append(self._clock())
        self._notify()

    def observe(self, remaining: int, *, empties_in: float | None = None) -> None:
        """The service said ``remaining`` requests are left in its window (after one of
        ours, :meth:`complete` already called): what syncd's count does not explain is
        others'.

        :param empties_in: seconds until the service's window empties (a fixed window's
            reset); ``None`` for a sliding window, which others' requests leave at the
            latest ``period`` from now.
        """
        now = self._clock()
        self._prune(now)
        self.remaining_reported = remaining
        ours = len(self._sent) + self._in_flight
        # With no reserve the key is syncd's alone: nothing to make room for, and what the
        # count does not explain is the service's own drift, which a 429 corrects.
        self._others = max(0, self.limit - remaining - ours) if self.reserve else 0
        self._others_at = now
        self._others_fixed = empties_in is not None
        span = self.period if empties_in is None else min(self.period, max(0.0, empties_in))
        self._others_until = now + span
        self._notify()

    def block_for(self, seconds: float) -> None:
        """Stop every caller for ``seconds`` (a 429, or the service saying nothing remains)."""
        self._blocked_until = max(self._blocked_until, self._clock() + max(0.0, seconds))

    def share(self, seconds: float) -> float:
        """The requests syncd may send in ``seconds`` at its steady rate (the reserve left
        to the key's other users)."""
        return (self.limit - self.reserve) * seconds / self.period

    @property
    def used(self) -> int:
        """Requests counted in the current window, those on the wire included."""
        self._prune(self._clock())
        return len(self._sent) + self._in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._waiting)

    def waiting_by_priority(self) -> dict[str, int]:
        """Requests waiting for room by the priority they rank at now (promotions counted),
        named in lower case: what a full window holds back."""
        now = self._clock()
        ranks = Counter(self._promoted(waiter, now).name.lower() for waiter in self._waiting)
        return dict(sorted(ranks.items()))


class RequestGuard(Protocol):
    """What may stop a client's requests: a factory's lease guard
    (:class:`syncd.runtime.coordinator.LeaseGuard`)."""

    def check(self) -> None:
        """Raise (:class:`~syncd.errors.LeaseLost`) if nothing may be sent now."""

    def remaining(self) -> float:
        """Seconds a request may still take."""


#: The guard of the request being sent in this task: the network stream checks it right
#: before each write (:func:`guarded_transport`).
_sending_for: contextvars.ContextVar[RequestGuard | None] = contextvars.ContextVar(
    "syncd_sending_for", default=None
)


class _GuardedStream(httpcore.AsyncNetworkStream):
    """A connection that checks the sending request's guard right before each write: no
    await between the check and the bytes leaving, so a process frozen after a client's
    check (waiting for a pooled connection, connecting) still sends nothing once it wakes
    up past its lease."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - httpcore's interface
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 - httpcore's interface
        guard = _sending_for.get()
        if guard is not None:
            guard.check()
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        return _GuardedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _GuardedStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _GuardedStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


#: Connections to one service host, shared by every factory of the daemon.
HOST_CONNECTIONS = 100
#: Seconds an idle connection is kept (uvicorn closes them after 5, nginx after 75).
HOST_KEEPALIVE = 4.0
#: Seconds a request waits for one of them before it fails (nothing sent: retried as any
#: passing failure, whatever its method). Far longer than a request's own timeout: the
#: wait is the daemon's own queue, not the service being slow.
HOST_WAIT = 300.0


def guarded_transport(
    connections: int = 100, *, verify: ssl.SSLContext | None = None
) -> httpx.AsyncHTTPTransport:
    """An httpx transport (a connection pool of at most ``connections``, all kept alive)
    whose connections check the guard of the request they send right before each write
    (see :class:`RequestGuard`). Shared by several factories' clients: each request
    carries its own client's guard.

    :param verify: the TLS context (default: a new one, which reads the CA bundle: 0.1 s).
    """
    # Every connection kept alive (httpx's default keeps 20 of 100, so a burst closes and
    # reopens 80 connections per round), for less than the usual servers' 5 s at least:
    # a request on a connection the server is closing fails unsent or, worse, unanswered.
    transport = httpx.AsyncHTTPTransport(
        verify=verify if verify is not None else True,
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=HOST_KEEPALIVE,
        ),
    )
    # httpx takes no network backend; its pool (httpcore) does.
    pool = transport._pool
    pool._network_backend = _GuardedBackend(pool._network_backend)
    return transport


class HostPool(httpx.AsyncBaseTransport):
    """One service host's ``connections`` behind a first-come, first-served queue.

    A request takes a slot before it reaches a pool and holds it until its body is read,
    so a pool always has a connection for it: httpcore's own queue is never used (its
    wait counted against the request's timeout: a burst of 1,000 factories failed with
    pool timeouts). The wait for a slot is bounded by ``wait`` seconds
    (:class:`httpx.PoolTimeout` after, nothing sent); a request's timeout starts once it
    has its slot.

    The connections are split into pools of at most ``shard`` (:func:`guarded_transport`
    each), a request going to the least busy: httpcore looks at every connection of its
    pool at each request and each answer (a system call each), so one pool of 100 cost
    a third of the daemon's CPU in a burst.
    """

    def __init__(
        self, connections: int = HOST_CONNECTIONS, wait: float = HOST_WAIT, shard: int = 10
    ) -> None:
        if connections < 1 or shard < 1:
            raise ValueError("a host pool needs at least one connection")
        self.connections = connections
        self.wait = wait
        sizes = [shard] * (connections // shard) + (
            [connections % shard] if connections % shard else []
        )
        tls = httpx.create_ssl_context()  # one for all: each reads the CA bundle
        self.transports = [guarded_transport(size, verify=tls) for size in sizes]
        self._sizes = sizes
        self._busy = [0] * len(sizes)
        self._slots = anyio.Semaphore(connections)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (for tests and the benchmark)."""
        return self._slots.statistics().tasks_waiting

    @property
    def in_use(self) -> int:
        """Slots held: requests sent or being sent, and answers not read to their end."""
        return sum(self._busy)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with anyio.move_on_after(self.wait) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise httpx.PoolTimeout(
                f"no connection to {request.url.host} free within {self.wait:g} s",
                request=request,
            )
        # The least busy pool, in proportion to its size: one has room, as the slots held
        # are fewer than the connections.
        shard = min(range(len(self._busy)), key=lambda i: self._busy[i] / self._sizes[i])
        self._busy[shard] += 1

        def release() -> None:
            self._busy[shard] -= 1
            self._slots.release()

        try:
            response = await self.transports[shard].handle_async_request(request)
        except BaseException:
            release()
            raise
        response.stream = _SlotStream(response.stream, release)
        return response

    async def aclose(self) -> None:
        for transport in self.transports:
            await transport.aclose()


class _SlotStream(httpx.AsyncByteStream):
    """A response body that gives its connection slot back once closed (read to its end or
    dropped): then its connection is free again in its pool."""

    def __init__(
        self, inner: httpx.SyncByteStream | httpx.AsyncByteStream, release: Callable[[], None]
    ) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._release is not None:
                self._release()
                self._release = None


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
    :param shadow: send no writing request (POST, PUT, PATCH, DELETE): raise
        :class:`~syncd.errors.WriteWithheld` with what it would have sent instead. The one
        place a shadow run stops writes, so no caller can write by forgetting to ask.

    :param guard: the factory's lease guard, when daemons share the factories: checked
        right before each request is sent (:class:`~syncd.errors.LeaseLost`, nothing sent,
        once the lease may be lost), and each request's timeout is cut to what remains of
        it, so no answer is awaited past the lease.
    """

    service = "api"
    #: Requests per period (seconds) the service allows.
    default_limit: tuple[int, float] = (60, 60.0)
    #: The header names of the service's rate limit.
    remaining_header = "X-RateLimit-Remaining"
    reset_header = "X-RateLimit-Reset"
    #: Whether the service's window empties at its reset time (a fixed window); otherwise
    #: a sliding one, where the reset frees only the oldest request.
    fixed_window = False
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
        shadow: bool = False,
        guard: RequestGuard | None = None,
    ) -> None:
        self.shadow = shadow
        self.guard = guard
        self._timeout = timeout
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
        if self.shadow and method.upper() not in _READING:
            return self._plan_write(method.upper(), endpoint, path, _decoded(body))
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

    def _plan_write(self, method: str, endpoint: str, path: str, body: Any) -> httpx.Response:
        """A shadow run's write: planned (recorded, answered with a placeholder) when a plan
        is being made and the client knows the endpoint; else withheld. Never sent."""
        plan = _plan.get()
        answer = None if plan is None else self._placeholder(plan, method, endpoint, path, body)
        if plan is None or answer is None:
            raise WriteWithheld(self.service, method, endpoint, path, body)
        plan.requests.append(PlannedRequest(self.service, method, endpoint, path, body, answer))
        return httpx.Response(200, content=msgspec.json.encode(answer))

    def _placeholder(
        self, plan: WritePlan, method: str, endpoint: str, path: str, body: Any
    ) -> Any:
        """The answer the service would give this write, with new ids from ``plan``
        (:meth:`WritePlan.new_id`); ``None``: not planned here, so withheld. Each service's
        client knows its own writes."""
        return None

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
                timeout: float | httpx.Timeout = self._http.timeout
                if self.guard is not None:
                    # Checked after the budget's wait: that wait may outlast the lease.
                    self.guard.check()
                    timeout = max(0.001, min(self._timeout, self.guard.remaining()))
                sending = _sending_for.set(self.guard)
                try:
                    response = await self._http.request(
                        method, path, params=params, content=body, headers=headers, timeout=timeout
                    )
                    await response.aread()
                finally:
                    _sending_for.reset(sending)
            finally:
                self.budget.complete()
        except httpx.PoolTimeout as exc:
            self._observe(method, endpoint, 0, started)
            raise _Retryable(
                TransportError(self.service, method, endpoint, f"nothing sent: {exc}")
            ) from exc
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
        reset = parse_reset(response.headers.get(self.reset_header, ""), time.time())
        reset_in = None if reset is None else max(0.0, reset - time.time())
        # An empty window with a reset announced (a 429) holds others' requests only until
        # that reset: the service said when it takes requests again.
        exhausted = left <= 0 and reset_in is not None
        self.budget.observe(left, empties_in=reset_in if self.fixed_window or exhausted else None)
        if left <= 0 and reset_in is not None:
            self.budget.block_for(min(reset_in, self.budget.period))

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
