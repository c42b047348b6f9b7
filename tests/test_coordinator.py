"""The coordinator: several daemons sharing the factories of one PostgreSQL database
(the session's real server, ``pg_server``), each a :class:`Coordinator` with a fake runtime
that records when it starts and stops each factory; one in a process of its own
(tests/coordinator_child.py) to freeze with SIGSTOP; and the lone daemon of a SQLite file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from pg_server import PostgresServer, pg_server_fixture  # noqa: F401 - for pytest to find
from syncd.errors import LeaseLost, StoreInUse
from syncd.runtime.coordinator import (
    Coordinator,
    LeaseGuard,
    LeaseTimes,
    fair_share,
)
from syncd.store import Lease, LeaseRecord, Store

pytestmark = pytest.mark.anyio

FACTORIES = [f"f{i:02d}" for i in range(12)]
#: Short leases so that a takeover is seconds; the renewals still have room under load.
TIMES = LeaseTimes(ttl=3.0, renew=0.5)
CHILD = Path(__file__).with_name("coordinator_child.py")


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


Event = tuple[str, str, str]  # (owner, factory, "start" | "stop")


class FakeRuntime:
    """Records its starts and stops in a log shared by every daemon of the test (one
    event loop: the log's order is the order things happened in)."""

    def __init__(self, log: list[Event], who: str) -> None:
        self.log = log
        self.who = who
        self.running: dict[str, LeaseGuard] = {}
        self.woken: list[str] = []
        self.started_at: dict[str, float] = {}
        #: Called at each stop, before it is recorded (a test looks at the database then).
        self.on_stop: Callable[[str, LeaseGuard], Any] | None = None

    async def start_factory(self, name: str, guard: LeaseGuard) -> None:
        assert name not in self.running, f"{name} started twice on {self.who}"
        assert guard.valid
        self.running[name] = guard
        self.started_at[name] = time.monotonic()
        self.log.append((self.who, name, "start"))

    async def stop_factory(self, name: str) -> None:
        guard = self.running.pop(name)
        assert not guard.valid, "the guard is revoked before the stop"
        if self.on_stop is not None:
            await self.on_stop(name, guard)
        self.log.append((self.who, name, "stop"))

    def wake(self, name: str) -> None:
        self.woken.append(name)


def assert_never_two_owners(log: list[Event]) -> None:
    holder: dict[str, str] = {}
    for who, name, what in log:
        if what == "start":
            assert name not in holder, f"{who} started {name} while {holder[name]} ran it"
            holder[name] = who
        else:
            assert holder.pop(name) == who


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``condition`` held, polling; fails after ``within``."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > within:
            raise AssertionError(f"not within {within} s: {what}")
        await anyio.sleep(0.02)
    return time.monotonic() - began


class Daemons:
    """Coordinators run in one task group, each stoppable on its own."""

    def __init__(self, tasks: anyio.abc.TaskGroup, url: str, log: list[Event]) -> None:
        self.tasks, self.url, self.log = tasks, url, log
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.stores: list[Store] = []

    async def start(
        self, who: str, *, factories: list[str] = FACTORIES, kind: type[Coordinator] = Coordinator
    ) -> tuple[Coordinator, FakeRuntime]:
        store = await Store.open(self.url)
        self.stores.append(store)
        runtime = FakeRuntime(self.log, who)
        coordinator = kind(store, runtime, factories, owner=who, times=TIMES)
        scope = self.scopes[who] = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await coordinator.run(task_status=task_status)

        await self.tasks.start(run)
        return coordinator, runtime

    def stop(self, who: str) -> None:
        self.scopes[who].cancel()


@asynccontextmanager
async def daemons(url: str, log: list[Event]) -> AsyncIterator[Daemons]:
    async with anyio.create_task_group() as tasks:
        group = Daemons(tasks, url, log)
        try:
            yield group
        finally:
            tasks.cancel_scope.cancel()
    for store in group.stores:
        await store.close()


class Crashing(Coordinator):
    """A daemon that dies: its factories stop with the process, its leases stay behind."""

    async def _leave(self) -> None:
        for name, guard in list(self._owned.items()):
            await self._stop(name, guard)


class WritingRuntime(FakeRuntime):
    """Each factory it runs writes on and on, each write a transaction held open ``hold``
    seconds (a group of inbox inserts on a loaded machine): the writer session is never
    free for long."""

    def __init__(
        self, log: list[Event], who: str, store: Store, tasks: anyio.abc.TaskGroup, hold: float
    ) -> None:
        super().__init__(log, who)
        self.store, self.tasks, self.hold = store, tasks, hold
        self.writes = 0

    async def start_factory(self, name: str, guard: LeaseGuard) -> None:
        await super().start_factory(name, guard)
        self.tasks.start_soon(self._write_on, name, guard)

    async def _write_on(self, name: str, guard: LeaseGuard) -> None:
        view = self.store.for_factory(name, lease=guard.lease)
        with guard.cancel_scope():
            while True:
                async with view._transaction() as db:
                    await db.execute(
                        "INSERT INTO meta (factory, key, value) VALUES (?, 'k', ?) "
                        "ON CONFLICT (factory, key) DO UPDATE SET value = excluded.value",
                        (name, str(self.writes)),
                    )
                    await anyio.sleep(self.hold)
                self.writes += 1


def counts(*runtimes: FakeRuntime) -> list[int]:
    return [len(r.running) for r in runtimes]


# -- the share --------------------------------------------------------------------------


def test_fair_shares_differ_by_at_most_one_and_add_up() -> None:
    live = ["c", "a", "b", "d", "e"]
    assert [fair_share(o, live, 12) for o in sorted(live)] == [3, 3, 2, 2, 2]
    assert [fair_share(o, live[:3], 12) for o in "abc"] == [4, 4, 4]
    assert fair_share("z", [], 12) == 12  # not yet seen live: counts itself
    assert sum(fair_share(o, live, 7) for o in live) == 7


def test_lease_times_are_checked() -> None:
    assert (TIMES.margin, TIMES.within) == (0.3, 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        LeaseTimes(ttl=0, renew=1)
    with pytest.raises(ValueError, match=r"renew \(8.0 s\) must be less than half the ttl"):
        LeaseTimes(ttl=15.0, renew=8.0)


# -- the guard --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def a_lease(fence: int = 1) -> Lease:
    return Lease("north", "d1", fence, 0.0, 0.0)


def test_a_guard_is_valid_only_before_its_deadline_and_never_again() -> None:
    clock = Clock()
    guard = LeaseGuard(a_lease(), 110.0, clock=clock)
    clock.now = 109.9
    assert guard.valid and guard.remaining() == pytest.approx(0.1)
    guard.check()
    assert guard.extend(a_lease(), 120.0) and guard.deadline == 120.0
    assert not guard.extend(a_lease(fence=2), 130.0), "another fence is not a renewal"
    clock.now = 120.0
    assert not guard.valid and guard.remaining() == 0.0
    with pytest.raises(LeaseLost, match=r"factory north: the lease of d1 \(fence 1\) may be lost"):
        guard.check()
    # A renewal that comes back late does not revive it: the factory was stopped.
    assert not guard.extend(a_lease(), 200.0)
    clock.now = 150.0
    assert not guard.valid


def test_a_revoked_guard_refuses_and_names_why() -> None:
    guard = LeaseGuard(a_lease(), 110.0, clock=Clock())
    guard.revoke("handed over to another daemon")
    assert not guard.valid
    with pytest.raises(LeaseLost, match="handed over to another daemon"):
        guard.check()


async def test_a_guards_cancel_scope_follows_renewals_and_revocation() -> None:
    guard = LeaseGuard(a_lease(), time.clock_gettime(time.CLOCK_BOOTTIME) + 0.2)
    began = anyio.current_time()
    with guard.cancel_scope() as scope:
        await anyio.sleep(0.1)
        assert guard.extend(a_lease(), time.clock_gettime(time.CLOCK_BOOTTIME) + 0.3)
        await anyio.sleep(5)
    assert scope.cancelled_caught
    assert 0.3 <= anyio.current_time() - began < 2.0, "cancelled at the renewed deadline"
    with guard.cancel_scope() as scope:
        guard.revoke("gone")
        await anyio.sleep(5)
    assert scope.cancelled_caught
    with guard.cancel_scope() as scope:
        await anyio.sleep(5)  # already invalid: cancelled at once
    assert scope.cancelled_caught


# -- several daemons on PostgreSQL ------------------------------------------------------


async def test_three_daemons_share_twelve_factories_and_take_over_and_rebalance(
    pg_database: str,
) -> None:
    log: list[Event] = []
    ttl, renew = TIMES.ttl, TIMES.renew
    async with daemons(pg_database, log) as group:
        _, a = await group.start("a")
        _, b = await group.start("b")
        _, c = await group.start("c", kind=Crashing)
        await wait_for(lambda: counts(a, b, c) == [4, 4, 4], 4 * renew + 2, "4 each")
        assert set(a.running) | set(b.running) | set(c.running) == set(FACTORIES)

        # A clean stop: its leases are released, the others take them at their next round.
        group.stop("a")
        took = await wait_for(lambda: counts(b, c) == [6, 6], 4 * renew + 2, "6 each")
        assert not a.running and took < 4 * renew + 1

        # A crash: its leases stay until they expire, then the other takes them.
        group.stop("c")
        await wait_for(lambda: not c.running, 2, "c's factories stopped with it")
        took = await wait_for(lambda: counts(b) == [12], ttl + 4 * renew + 2, "b has all")
        assert took >= ttl - 2 * renew, "taken only once the leases could have expired"

        # Two join: the share goes down to 4, handed over factory by factory.
        _, d = await group.start("d")
        _, e = await group.start("e")
        await wait_for(lambda: counts(b, d, e) == [4, 4, 4], 8 * renew + 2, "4 each again")

        fences = {r.factory: r.fence for r in await group.stores[0].leases()}
        assert all(fences[n] >= 2 for n in FACTORIES), "every factory changed hands once"
    assert_never_two_owners(log)
    # Every daemon stopped: everything started was stopped.
    assert sum(1 for e in log if e[2] == "start") == sum(1 for e in log if e[2] == "stop")


async def test_a_daemon_whose_renewals_hang_stops_its_factories_before_the_lease_expires(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[Event] = []
    factories = FACTORIES[:4]
    seen: dict[str, LeaseRecord] = {}
    async with daemons(pg_database, log) as group:
        frozen, f = await group.start("frozen", factories=factories)
        _, g = await group.start("other", factories=factories)
        await wait_for(lambda: counts(f, g) == [2, 2], 4 * TIMES.renew + 2, "2 each")
        observer = group.stores[1]

        async def note(name: str, guard: LeaseGuard) -> None:
            seen[name] = next(r for r in await observer.leases() if r.factory == name)

        f.on_stop = note

        async def unreachable(*args: object, **kwargs: object) -> None:
            await anyio.sleep_forever()

        # The database no longer answers this daemon: every call hangs.
        for method in ("heartbeat", "renew_lease", "live_owners", "leases", "acquire_lease"):
            monkeypatch.setattr(frozen.store, method, unreachable)
        held = set(f.running)
        await wait_for(lambda: not f.running, TIMES.ttl + 1, "the frozen one stopped")
        await wait_for(lambda: counts(g) == [4], TIMES.ttl + 4 * TIMES.renew + 2, "taken over")
    assert set(seen) == held
    for name, record in seen.items():
        assert record.owner == "frozen" and record.remaining > 0, (
            f"{name} stopped while its lease was still current: {record}"
        )
    assert_never_two_owners(log)


async def test_renewals_do_not_wait_for_the_factories_writes(pg_database: str) -> None:
    """Six factories keep the daemon's writer busy (each write holds its transaction 0.3 s):
    the renewals, on a session of their own, keep every lease; the watchdog stops nothing.
    With one session for both, each renewal would wait behind every queued write (about
    1.8 s, six renewals a round: the leases would lapse)."""
    log: list[Event] = []
    factories = FACTORIES[:6]
    async with daemons(pg_database, log) as group:
        store = await Store.open(pg_database)
        group.stores.append(store)
        runtime = WritingRuntime(log, "busy", store, group.tasks, hold=0.3)
        coordinator = Coordinator(store, runtime, factories, owner="busy", times=TIMES)
        await group.tasks.start(coordinator.run)
        await wait_for(lambda: counts(runtime) == [6], 4 * TIMES.renew + 2, "all six taken")
        writes = runtime.writes
        await anyio.sleep(3 * TIMES.ttl)
        assert [e for e in log if e[2] == "stop"] == []
        assert counts(runtime) == [6]
        assert runtime.writes > writes + 10, "the factories wrote on meanwhile"
        assert all(r.owner == "busy" and r.fence == 1 for r in await store.leases())


#: A daemon frozen halfway through a transaction that locked its lease's row: a fenced
#: write's check (``FOR SHARE`` until it commits) or a renewal (the row updated).
_HALFWAY = {
    "a fenced write": "SELECT fence FROM leases WHERE factory = ? FOR SHARE",
    "a renewal": "UPDATE leases SET renewed_at = renewed_at WHERE factory = ?",
}


@pytest.mark.parametrize("halfway", sorted(_HALFWAY))
async def test_a_daemon_frozen_halfway_through_a_transaction_holds_no_takeover_up(
    pg_database: str, halfway: str
) -> None:
    """Frozen (SIGSTOP, a paused VM) with a transaction open, a daemon's connection holds
    its lock on the lease's row: the server must end that session, or no other daemon can
    ever take the factory (its ``acquire_lease`` waits on the lock, then times out)."""
    log: list[Event] = []
    factories = FACTORIES[:4]
    async with daemons(pg_database, log) as group:
        gone, g = await group.start("gone", factories=factories, kind=Crashing)
        await wait_for(lambda: counts(g) == [4], 4 * TIMES.renew + 2, "gone has all")
        group.stop("gone")
        await wait_for(lambda: not g.running, 2, "gone's factories stopped with it")
        stuck = anyio.Event()

        async def frozen_halfway() -> None:
            # The frozen daemon's own store and session, the one the statement runs on.
            backend = gone.store._db
            session = backend.lease_transaction if halfway == "a renewal" else backend.transaction
            async with session() as tx:
                await tx.execute(_HALFWAY[halfway], (factories[0],))
                stuck.set()
                await anyio.sleep_forever()

        group.tasks.start_soon(frozen_halfway)
        await stuck.wait()
        frozen_at = time.monotonic()
        _, here = await group.start("here", factories=factories)
        await wait_for(
            lambda: counts(here) == [4], TIMES.ttl + 4 * TIMES.renew + 2, "here took all four"
        )
        # No later than the frozen daemon's leases expired, give or take a round.
        assert time.monotonic() - frozen_at < TIMES.ttl + 2 * TIMES.renew + 1
    assert_never_two_owners(log)


async def test_the_owner_is_woken_for_its_factories_only(pg_database: str) -> None:
    log: list[Event] = []
    async with daemons(pg_database, log) as group:
        _, a = await group.start("a", factories=FACTORIES[:2])
        _, b = await group.start("b", factories=FACTORIES[:2])
        await wait_for(lambda: counts(a, b) == [1, 1], 4 * TIMES.renew + 2, "1 each")
        # Any daemon persists a delivery and notifies: here a third connection.
        async with _store(pg_database) as intake:
            for name in FACTORIES[:2]:
                await intake.notify(name)
            await wait_for(lambda: len(a.woken) + len(b.woken) >= 2, 5, "both woken")
        assert set(a.woken) <= set(a.running) and set(b.woken) <= set(b.running)
    assert set(a.woken) | set(b.woken) == set(FACTORIES[:2])


@asynccontextmanager
async def _store(url: str) -> AsyncIterator[Store]:
    store = await Store.open(url)
    try:
        yield store
    finally:
        await store.close()


# -- a real process, frozen -------------------------------------------------------------


class Child:
    """tests/coordinator_child.py, its lines read as they come."""

    def __init__(
        self, url: str, ttl: float, renew: float, factories: list[str], errors: Path
    ) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # stderr to a file: a pipe nobody reads could fill and block the child.
        with errors.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(CHILD), url, str(ttl), str(renew), *factories],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        self.lines: list[dict[str, Any]] = []

    async def read(self) -> None:
        assert self.process.stdout is not None
        stream = self.process.stdout
        while True:
            line = await anyio.to_thread.run_sync(stream.readline)
            if not line:
                return
            self.lines.append(json.loads(line))

    def events(self, event: str, factory: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.lines
            if e["event"] == event and (factory is None or e["factory"] == factory)
        ]

    def kill(self) -> None:
        """SIGKILL (its stdout ends, so does :meth:`read`); again does nothing."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)


async def test_a_process_frozen_past_its_leases_stops_them_before_any_effect_on_resume(
    pg_database: str, tmp_path: Path
) -> None:
    factories = FACTORIES[:4]
    ttl, renew = 2.0, 0.4
    child = Child(pg_database, ttl, renew, factories, tmp_path / "child.err")
    log: list[Event] = []
    try:
        async with anyio.create_task_group() as reader:
            reader.start_soon(child.read)
            try:
                # The child alone first, so that it holds all four.
                await wait_for(lambda: len(child.events("start")) == 4, 20, "the child started")
                await wait_for(lambda: len(child.events("effect")) >= 8, 5, "the child's effects")
                async with daemons(pg_database, log) as group:
                    _, here = await group.start("here", factories=factories)
                    await wait_for(lambda: counts(here) == [2], 10, "2 each")
                    mine = set(factories) - set(here.running)
                    stop_before = {n: len(child.events("stop", n)) for n in mine}
                    child.process.send_signal(signal.SIGSTOP)
                    frozen_at = time.monotonic()
                    await wait_for(lambda: counts(here) == [4], ttl + 4 * renew + 3, "taken over")
                    await anyio.sleep(0.5)
                    resumed_at = time.monotonic()
                    child.process.send_signal(signal.SIGCONT)
                    await wait_for(
                        lambda: all(len(child.events("stop", n)) > stop_before[n] for n in mine),
                        5,
                        "the resumed child stopped its factories",
                    )
                    await anyio.sleep(0.3)
                    for name in mine:
                        after = [
                            e for e in child.lines if e["factory"] == name and e["t"] > resumed_at
                        ]
                        kinds = [e["event"] for e in after]
                        # Its effect task and watchdog woke: the guard refused, nothing was sent.
                        assert "effect" not in kinds[: kinds.index("stop")], after
                        assert next(e["outcome"] for e in after if e["event"] == "probe") == (
                            "LeaseLost"
                        ), after
                        # Its last effect came before this daemon took the factory.
                        before = [
                            e["t"] for e in child.events("effect", name) if e["t"] < resumed_at
                        ]
                        assert max(before) < here.started_at[name]
                        assert here.started_at[name] - frozen_at < ttl + 4 * renew + 3
            finally:
                child.kill()  # before the reader is waited for: its read ends
    finally:
        child.kill()
        if child.process.stdout is not None:
            child.process.stdout.close()
    errors = (tmp_path / "child.err").read_text()
    assert "Traceback" not in errors, errors


# -- SQLite: one daemon ------------------------------------------------------------------


async def test_on_sqlite_the_daemon_is_alone_and_owns_every_factory(tmp_path: Path) -> None:
    path = tmp_path / "syncd.db"
    store = await Store.open(path, exclusive=True)
    try:
        # A daemon that crashed on this file left its heartbeat and leases.
        await store.heartbeat("crashed:1:x")
        for name in FACTORIES[:3]:
            assert await store.acquire_lease(name, "crashed:1:x", 600) is not None
        with pytest.raises(StoreInUse):
            await Store.open(path, exclusive=True)
        log: list[Event] = []
        runtime = FakeRuntime(log, "only")
        coordinator = Coordinator(store, runtime, FACTORIES, owner="only", times=TIMES)
        assert coordinator.alone
        async with anyio.create_task_group() as tasks:
            await tasks.start(coordinator.run)
            # At once, not after the crashed one's leases expire.
            assert set(runtime.running) == set(FACTORIES)
            lease = runtime.running["f00"].lease
            await store.for_factory("f00", lease=lease).set_meta("k", "v")
            await store.notify("f05")
            await wait_for(lambda: runtime.woken == ["f05"], 5, "woken in-process")
            tasks.cancel_scope.cancel()
        assert not runtime.running
        assert {r.expires_at for r in await store.leases()} == {0}, "left: all released"
    finally:
        await store.close()


async def test_factories_added_and_removed_are_started_and_handed_back(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "syncd.db", exclusive=True)
    try:
        runtime = FakeRuntime([], "only")
        coordinator = Coordinator(store, runtime, FACTORIES[:3], owner="only", times=TIMES)
        async with anyio.create_task_group() as tasks:
            await tasks.start(coordinator.run)
            assert set(runtime.running) == set(FACTORIES[:3])
            # A reload: one factory gone, one new.
            coordinator.factories = [*FACTORIES[1:3], "f99"]
            await wait_for(
                lambda: set(runtime.running) == {*FACTORIES[1:3], "f99"}, 4 * TIMES.renew, "reload"
            )
            tasks.cancel_scope.cancel()
        gone = next(r for r in await store.leases() if r.factory == FACTORIES[0])
        assert gone.expires_at == 0, "the removed factory's lease was released"
    finally:
        await store.close()


class HangingStop(FakeRuntime):
    async def stop_factory(self, name: str) -> None:
        self.running.pop(name)
        await anyio.sleep_forever()


async def test_a_runtime_that_never_stops_holds_nothing_up_beyond_the_ttl(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await Store.open(tmp_path / "syncd.db", exclusive=True)
    times = LeaseTimes(ttl=1.0, renew=0.3)
    try:
        runtime = HangingStop([], "only")
        coordinator = Coordinator(store, runtime, FACTORIES[:1], owner="only", times=times)
        async with anyio.create_task_group() as tasks:
            await tasks.start(coordinator.run)
            guard = runtime.running["f00"]
            began = time.monotonic()
            tasks.cancel_scope.cancel()
        assert time.monotonic() - began < 3 * times.ttl
        assert not guard.valid
        assert "factory f00: not stopped within 1.0 s" in caplog.text
        assert [r.expires_at for r in await store.leases()] == [0], "it left all the same"
    finally:
        await store.close()
