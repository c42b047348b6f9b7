"""Several daemons on one database: which daemon runs which factory.

Each daemon runs one :class:`Coordinator`. Every ``renew`` seconds it says it is alive,
works out its share of the factories among the live daemons, renews the leases it holds,
hands over the ones beyond its share (the factory stopped first, then the lease released)
and takes free or expired ones up to its share, starting each on the daemon's
:class:`FactoryRuntime`.

The safety rule: a factory's effects stop before its lease can expire, even when the
database cannot be reached or the process was frozen. Each lease has a local deadline, the
:func:`lease_clock` reading taken *before* the renewal was sent, plus the TTL, minus a
margin; the database's expiry is later than that whatever the two clocks read. The
:class:`LeaseGuard` of a factory is valid only before its deadline: the runtime checks it
before each effect (:meth:`LeaseGuard.check`), and a watchdog stops the factory once the
deadline passes, without asking the database. After a freeze longer than the TTL, the
first look at the clock finds the guard invalid, so no API call goes out; the factory's
fenced writes fail with :class:`~syncd.errors.LeaseLost` in the store anyway.

On SQLite one daemon holds the file (a second one exits 6), so the coordinator is alone:
it removes every other daemon's heartbeat and leases at start (the file lock proves they
are gone) and owns every factory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc

from syncd.errors import LeaseLost, StoreError
from syncd.store import Lease, Store, new_owner_id

__all__ = [
    "Coordinator",
    "FactoryRuntime",
    "LeaseGuard",
    "LeaseTimes",
    "fair_share",
    "lease_clock",
]

log = logging.getLogger("syncd.coordinator")

_Clock = Callable[[], float]
#: A stop under way: the event it sets when done, and the start it waits for first.
_Stopping = tuple[anyio.Event, anyio.Event | None]
#: Every owner whose heartbeat the database still has (SQLite's clearing at start).
_EVER = 1e12


# CLOCK_BOOTTIME (Linux), unlike time.monotonic, goes on while the host is suspended.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def lease_clock() -> float:
    """Seconds on the clock the lease deadlines are kept in.

    ``CLOCK_BOOTTIME`` where there is one (Linux): unlike ``time.monotonic`` it goes on
    while the host is suspended, so a daemon whose VM was paused past its leases finds them
    gone on resume. Never set by hand, never jumps back.
    """
    return time.clock_gettime(_CLOCK)


class FactoryRuntime(Protocol):
    """What the daemon offers the coordinator: starting, stopping and waking factories."""

    async def start_factory(self, name: str, guard: LeaseGuard) -> object:
        """Start the factory's work; return once it runs (promptly: no API call needs to
        finish first). Its effects and requests check ``guard`` first; its writes go
        through ``store.for_factory(name, lease=guard.lease)``. A
        :class:`~syncd.errors.LeaseLost` from either ends the factory's work (log it,
        never retry). It looks at the inbox once started: a wake-up before is not
        forwarded."""

    async def stop_factory(self, name: str) -> None:
        """Stop the factory's work; return once nothing of it runs (within the lease's
        TTL). The coordinator calls it once per start, after revoking the guard, and only
        then releases the lease."""

    def wake(self, name: str) -> None:
        """A delivery for ``name`` is in the inbox (it may be spurious): look now. Never
        blocks."""


@dataclass(frozen=True)
class LeaseTimes:
    """How long a lease lasts and how often it is renewed (``daemon.lease_ttl`` and
    ``daemon.lease_renew``).

    :raises ValueError: ``ttl`` or ``renew`` is not positive, or ``renew`` is not less than
        half the TTL (a renewal may fail once without losing the lease).
    """

    ttl: float = 10.0
    renew: float = 3.0

    def __post_init__(self) -> None:
        if not self.ttl > 0 or not self.renew > 0:
            raise ValueError(f"lease ttl and renew must be positive, got {self.ttl}, {self.renew}")
        if not self.renew < self.ttl / 2:
            raise ValueError(
                f"lease renew ({self.renew} s) must be less than half the ttl ({self.ttl} s)"
            )

    @property
    def margin(self) -> float:
        """How long before the database's expiry a factory's effects stop: a tenth of the
        TTL, room for a request checked just before the deadline to reach its service."""
        return self.ttl / 10

    @property
    def within(self) -> float:
        """A daemon is live while its last heartbeat is this recent: two renew intervals,
        so one slow round does not make it look dead."""
        return 2 * self.renew


def fair_share(owner: str, live: Sequence[str], count: int) -> int:
    """How many of ``count`` factories ``owner`` should hold among the ``live`` daemons:
    ``count // len(live)``, one more for the first ``count % len(live)`` by name, so the
    shares differ by at most one and add up to ``count``."""
    ranked = sorted(set(live) | {owner})
    base, extra = divmod(count, len(ranked))
    return base + (1 if ranked.index(owner) < extra else 0)


def _preference(owner: str, factory: str) -> bytes:
    # Rendezvous hashing: each daemon prefers the factories in its own order, so daemons
    # claiming at once mostly reach for different ones.
    return hashlib.sha256(f"{owner}\0{factory}".encode()).digest()


class LeaseGuard:
    """A factory's permission to act, valid while its lease is surely current: until
    :attr:`deadline` on :func:`lease_clock`, unless revoked. Once invalid it stays so (the
    factory is stopped, and a later start gets a new guard).

    The runtime calls :meth:`check` before each effect and each request, and may run the
    factory's work inside :meth:`cancel_scope` so that it is cancelled at the deadline even
    if nothing checks.
    """

    def __init__(self, lease: Lease, deadline: float, *, clock: _Clock = lease_clock) -> None:
        self._lease = lease
        self._deadline = deadline
        self._clock = clock
        self._revoked: str | None = None
        self._scopes: set[anyio.CancelScope] = set()

    @property
    def lease(self) -> Lease:
        """The lease, as last renewed (its fence never changes)."""
        return self._lease

    @property
    def factory(self) -> str:
        return self._lease.factory

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def valid(self) -> bool:
        if self._revoked is None and self._clock() >= self._deadline:
            self._revoke("its deadline passed without a renewal")
        return self._revoked is None

    def remaining(self) -> float:
        """Seconds until the deadline; 0 once invalid. A request's timeout should not
        exceed it."""
        return max(0.0, self._deadline - self._clock()) if self.valid else 0.0

    def check(self) -> None:
        """Return if the factory may act now.

        :raises LeaseLost: the deadline passed or the guard was revoked; nothing may be
            sent for the factory.
        """
        if not self.valid:
            raise LeaseLost(
                f"factory {self.factory}: the lease of {self._lease.owner} "
                f"(fence {self._lease.fence}) may be lost ({self._revoked}): nothing sent"
            )

    @contextmanager
    def cancel_scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope whose deadline follows the guard's (renewals move it on),
        cancelled when the guard is revoked."""
        scope = anyio.CancelScope(deadline=self._loop_deadline())
        if not self.valid:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def revoke(self, reason: str) -> None:
        """Make the guard invalid at once (the coordinator stops the factory)."""
        if self._revoked is None:
            self._revoke(reason)

    def extend(self, lease: Lease, deadline: float) -> bool:
        """A renewal came back: valid until ``deadline`` now. ``False`` (nothing changed)
        when the guard is no longer valid: a renewal never revives it."""
        if not self.valid or lease.fence != self._lease.fence:
            return False
        self._lease = lease
        self._deadline = max(self._deadline, deadline)
        for scope in self._scopes:
            scope.deadline = self._loop_deadline()
        return True

    def _revoke(self, reason: str) -> None:
        self._revoked = reason
        for scope in self._scopes:
            scope.cancel()

    def _loop_deadline(self) -> float:
        # The event loop has its own clock: convert by what remains.
        try:
            return anyio.current_time() + max(0.0, self._deadline - self._clock())
        except RuntimeError:  # pragma: no cover - no event loop
            return math.inf


class Coordinator:
    """One daemon's share of the factories, kept while :meth:`run` runs.

    :param store: the daemon's store (its default view; leases read across factories).
    :param runtime: where factories are started, stopped and woken.
    :param factories: the configured factories' names; a reload may set
        :attr:`factories` (the next round starts the new ones, hands back the removed).
    :param owner: this daemon's name in the leases; a new :func:`new_owner_id` by default.
    :param times: the lease's TTL and renew interval.
    :param alone: the only daemon on the database: others' heartbeats and leases are
        removed at start. By default, on SQLite (a second daemon on the file is refused).
    :param clock: the deadlines' clock (tests move it by hand).
    """

    def __init__(
        self,
        store: Store,
        runtime: FactoryRuntime,
        factories: Sequence[str],
        *,
        owner: str | None = None,
        times: LeaseTimes | None = None,
        alone: bool | None = None,
        clock: _Clock = lease_clock,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.factories = list(dict.fromkeys(factories))
        self.owner = owner or new_owner_id()
        self.times = times or LeaseTimes()
        self.alone = store.dialect == "sqlite" if alone is None else alone
        self._clock = clock
        self._owned: dict[str, LeaseGuard] = {}
        # A factory being stopped: its next start waits for the stop to finish.
        self._stopping: dict[str, anyio.Event] = {}
        # A factory being started: a stop asked for meanwhile waits for the start to end.
        self._starting: dict[str, anyio.Event] = {}
        # Where starts and stops run, apart from the rounds: a slow start or stop of one
        # factory must not hold up the renewal of the others (their guards would lapse).
        self._tasks: anyio.abc.TaskGroup | None = None
        # A factory that failed here: not taken here again before this (event loop) time.
        self._resting: dict[str, float] = {}

    @property
    def owned(self) -> dict[str, LeaseGuard]:
        """The factories running here now, and their guards."""
        return dict(self._owned)

    def hold_off(self, name: str, seconds: float) -> None:
        """``name`` failed here: do not take it here again for ``seconds`` (its backoff).
        Once stopped, its lease is released: another daemon may take it meanwhile."""
        self._resting[name] = anyio.current_time() + seconds
        guard = self._owned.get(name)
        # Stopped and let go now: a round or the watchdog would see the revoked guard only
        # later, maybe past a short backoff. A start that failed lets go by itself.
        if guard is not None and name not in self._starting:
            self._stop_soon(name, guard, release=True, failed=True)

    def _rests(self, name: str) -> bool:
        until = self._resting.get(name)
        if until is None:
            return False
        if anyio.current_time() < until:
            return True
        del self._resting[name]
        return False

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Share the factories until cancelled, then stop every factory here and leave
        (the others take them at their next round, not after the TTL). ``task_status``
        is told once the first round is over."""
        try:
            if self.alone:
                await self._clear_others()
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._watchdog)
                tasks.start_soon(self._forward_wakeups)
                next_round = anyio.current_time()
                started = False
                while True:
                    with anyio.move_on_after(self.times.ttl):
                        try:
                            await self.round()
                        except StoreError as exc:
                            log.warning("cannot renew or claim leases: %s", exc)
                    if not started:
                        # The first round's factories running (or failed) before the
                        # caller goes on: a daemon says it runs once it runs its share.
                        with anyio.move_on_after(self.times.ttl):
                            for starting in list(self._starting.values()):
                                await starting.wait()
                        task_status.started()
                        started = True
                    next_round += self.times.renew
                    # After a freeze the rounds missed are not made up.
                    next_round = max(next_round, anyio.current_time())
                    await anyio.sleep_until(next_round)
        finally:
            with anyio.CancelScope(shield=True):
                await self._leave()

    async def round(self) -> None:
        """One round: heartbeat, renew, hand over what is beyond the share, take up to it."""
        store, owner, ttl = self.store, self.owner, self.times.ttl
        await store.heartbeat(owner)
        live = [owner] if self.alone else await store.live_owners(self.times.within)
        share = fair_share(owner, live, len(self.factories))
        order = sorted(self.factories, key=lambda name: _preference(owner, name))
        for name, guard in list(self._owned.items()):
            if not guard.valid:
                self._stop_soon(name, guard)
                continue
            sent = self._clock()
            renewed = await store.renew_lease(guard.lease, ttl)
            if self._owned.get(name) is not guard:
                continue  # the watchdog stopped it meanwhile
            if renewed is None:
                guard.revoke("the renewal was refused")
                log.warning("factory %s: lease lost (fence %s)", name, guard.lease.fence)
                self._stop_soon(name, guard)
            elif not guard.extend(renewed, sent + ttl - self.times.margin):
                self._stop_soon(name, guard)
        # Hand over: factories no longer configured, then the least preferred extras.
        extras = [name for name in self._owned if name not in self.factories]
        kept = [name for name in order if name in self._owned]
        extras += list(reversed(kept))[: max(0, len(kept) - share)]
        for name in extras:
            found = self._owned.get(name)
            if found is None:
                continue  # the watchdog stopped it meanwhile
            found.revoke("handed over to another daemon")
            # Released once stopped, never before: the next owner must not run it meanwhile.
            self._stop_soon(name, found, release=True, share=share)
        if len(self._owned) >= share:
            return
        taken = {r.factory for r in await store.leases() if r.held and r.owner != owner}
        for name in order:
            if len(self._owned) >= share:
                break
            if name in self._owned or name in taken or self._rests(name):
                continue
            sent = self._clock()
            lease = await store.acquire_lease(name, owner, ttl)
            if lease is None:
                continue
            guard = LeaseGuard(lease, sent + ttl - self.times.margin, clock=self._clock)
            if guard.valid:
                self._start_soon(name, guard)
            else:
                await store.release_lease(lease)

    def _start_soon(self, name: str, guard: LeaseGuard) -> None:
        """Own ``name`` from now on (the next rounds renew it) and start it in the
        background."""
        self._owned[name] = guard
        log.info("factory %s: taken (fence %d)", name, guard.lease.fence)
        done = self._starting[name] = anyio.Event()
        if self._tasks is None:  # a round called by hand (tests): start it here
            raise RuntimeError("the coordinator is not running")
        self._tasks.start_soon(self._start, name, guard, done)

    async def _start(self, name: str, guard: LeaseGuard, done: anyio.Event) -> None:
        try:
            stopping = self._stopping.get(name)
            if stopping is not None:
                await stopping.wait()
            if not guard.valid:
                return  # stopped or lapsed while it waited
            # Not cancelled halfway by the daemon's stop: started, or failed.
            with anyio.CancelScope(shield=True):
                await self.runtime.start_factory(name, guard)
        except Exception:
            log.exception("factory %s: cannot start", name)
            guard.revoke("it failed to start")
            done.set()
            await self._stop(name, guard)
            with anyio.CancelScope(shield=True):
                await self.store.release_lease(guard.lease)
        finally:
            done.set()
            if self._starting.get(name) is done:
                del self._starting[name]

    def _stop_soon(
        self,
        name: str,
        guard: LeaseGuard,
        *,
        release: bool = False,
        share: int = 0,
        failed: bool = False,
    ) -> None:
        """Revoke and forget ``name`` now, stop it in the background (then release its
        lease when handed over)."""
        forgotten = self._forget(name, guard)
        if forgotten is None:
            return
        assert self._tasks is not None
        self._tasks.start_soon(self._stopped, name, guard, forgotten, release, share, failed)

    async def _stopped(
        self,
        name: str,
        guard: LeaseGuard,
        forgotten: _Stopping,
        release: bool,
        share: int,
        failed: bool = False,
    ) -> None:
        await self._finish_stop(name, *forgotten)
        if release:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.times.ttl):
                try:
                    await self.store.release_lease(guard.lease)
                    if failed:
                        log.info("factory %s: released (it failed here)", name)
                    else:
                        log.info("factory %s: handed over (share %d)", name, share)
                except StoreError as exc:
                    log.warning("factory %s: lease not released (it expires): %s", name, exc)

    def _forget(self, name: str, guard: LeaseGuard) -> _Stopping | None:
        """Revoke and forget ``name``: the event its stop sets, and its start in progress
        (the stop waits for it), or ``None`` when ``guard`` is not the one it runs with."""
        if self._owned.get(name) is not guard:
            return None
        guard.revoke("the factory is stopping")
        del self._owned[name]
        done = self._stopping[name] = anyio.Event()
        return done, self._starting.get(name)

    async def _stop(self, name: str, guard: LeaseGuard) -> None:
        """Revoke, forget and stop ``name`` (``guard`` is the one it runs with)."""
        forgotten = self._forget(name, guard)
        if forgotten is not None:
            await self._finish_stop(name, *forgotten)

    async def _finish_stop(
        self, name: str, done: anyio.Event, starting: anyio.Event | None
    ) -> None:
        stopped = False
        try:
            # Shielded, so that a stop asked for completes, yet bounded: a runtime that
            # hangs cannot hold up the rounds (its guard refuses every effect anyway).
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + self.times.ttl):
                if starting is not None:
                    await starting.wait()  # its guard is revoked: it ends at once
                await self.runtime.stop_factory(name)
                stopped = True
            if not stopped:
                log.error("factory %s: not stopped within %s s", name, self.times.ttl)
        except Exception:
            log.exception("factory %s: stopping failed", name)
        finally:
            done.set()
            if self._stopping.get(name) is done:
                del self._stopping[name]

    async def _watchdog(self) -> None:
        """Stop each factory at its deadline, whether or not the database answers."""
        while True:
            now = self._clock()
            late = [(n, g) for n, g in self._owned.items() if not g.valid]
            for name, guard in late:
                log.warning(
                    "factory %s: lease not renewed in time: stopping it before it expires",
                    name,
                )
                self._stop_soon(name, guard)
            pending = [g.deadline - now for g in self._owned.values()]
            # Sleep in steps of at most a second: the loop's clock may stand still while
            # the host is suspended, the lease clock does not.
            await anyio.sleep(min([1.0, *pending]) if pending else 1.0)

    async def _forward_wakeups(self) -> None:
        while True:
            try:
                async with self.store.wakeups() as wakeups:
                    async for name in wakeups:
                        guard = self._owned.get(name)
                        if guard is not None and guard.valid:
                            try:
                                self.runtime.wake(name)
                            except Exception:  # one factory's fault ends no other's work
                                log.exception("factory %s: cannot be woken", name)
            except StoreError as exc:
                log.warning("cannot listen for wake-ups: %s", exc)
                await anyio.sleep(self.times.renew)

    async def _clear_others(self) -> None:
        others = set(await self.store.live_owners(_EVER))
        others |= {r.owner for r in await self.store.leases() if r.held}
        for other in sorted(others - {self.owner}):
            log.info("removing the leases of %s (this daemon holds the database)", other)
            await self.store.leave(other)

    async def _leave(self) -> None:
        for guard in self._owned.values():
            guard.revoke("the daemon is stopping")
        # Together: each stop is bounded by the TTL, so is the lot.
        async with anyio.create_task_group() as stops:
            for name, guard in list(self._owned.items()):
                stops.start_soon(self._stop, name, guard)
        with anyio.move_on_after(self.times.ttl):
            try:
                await self.store.leave(self.owner)
            except StoreError as exc:
                log.warning("cannot release the leases (they expire by themselves): %s", exc)
