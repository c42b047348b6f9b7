"""The inbox's kinds and the daemon's one look at the inbox for all its factories."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from syncd.errors import StoreError
from syncd.runtime import inbox
from syncd.runtime.inbox import InboxWatch
from syncd.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "syncd.db")
    yield opened
    await opened.close()


async def written_elsewhere(store: Store, factory: str, kind: str) -> int:
    """An event of ``factory`` written by another process (syncctl, another daemon): this
    process's store is not told, only the database has it."""
    other = await Store.open(store.path)
    try:
        event = await other.for_factory(factory).add_event("syncctl", kind, b"{}")
    finally:
        await other.close()
    assert event is not None
    return event


class Woken:
    """Counts one reader's wake-ups."""

    def __init__(self) -> None:
        self.times = 0
        self.event = anyio.Event()

    def __call__(self) -> None:
        self.times += 1
        self.event.set()


async def test_a_look_wakes_only_the_readers_with_events_of_their_kinds(store: Store) -> None:
    watch = InboxWatch(store, every=0.05)
    dispatcher, consumer, imports, other_factory = Woken(), Woken(), Woken(), Woken()
    with (
        watch.watching("north", dispatcher, exclude_kinds=inbox.SOURCE_KINDS),
        watch.watching("north", consumer, kinds=inbox.WEBHOOK_KINDS),
        watch.watching("north", imports, kinds=(inbox.IMPORT_REQUESTED,)),
        watch.watching("south", other_factory, exclude_kinds=inbox.SOURCE_KINDS),
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            await written_elsewhere(store, "north", inbox.WEBHOOK_RECEIVED)
            with anyio.fail_after(5):
                await consumer.event.wait()
            # A delivery is the consumer's alone: the others sleep on.
            assert (dispatcher.times, imports.times, other_factory.times) == (0, 0, 0)
            # Woken again at each look while it waits (a delivery left by a failure).
            looks = watch.looks
            with anyio.fail_after(5):
                while watch.looks < looks + 2:  # noqa: ASYNC110 - the watch's own counter
                    await anyio.sleep(0.02)
            assert consumer.times >= 2

            await written_elsewhere(store, "north", inbox.IMPORT_REQUESTED)
            await written_elsewhere(store, "south", inbox.OPERATOR)
            with anyio.fail_after(5):
                await imports.event.wait()
                await other_factory.event.wait()
            assert dispatcher.times == 0
            tg.cancel_scope.cancel()


async def test_one_query_a_look_whatever_the_number_of_factories(store: Store) -> None:
    watch = InboxWatch(store, every=0.01)
    woken = {f"f{i}": Woken() for i in range(200)}
    queries: list[str] = []
    fetchall = store._db.fetchall

    async def counted(sql: str, args: Any = ()) -> Any:
        queries.append(sql)
        return await fetchall(sql, args)

    store._db.fetchall = counted  # type: ignore[method-assign]
    watching = [watch.watching(name, wake) for name, wake in woken.items()]
    for block in watching:
        block.__enter__()
    try:
        with anyio.move_on_after(1.2):
            await watch.run()
    finally:
        for block in watching:
            block.__exit__(None, None, None)
    # The summary is read again once older than its age (0.5 s): at most three reads in
    # 1.2 s for 200 factories' readers, none of which is woken (nothing waits).
    assert watch.looks >= 50
    assert 1 <= len(queries) <= 3, queries
    assert all(w.times == 0 for w in woken.values())


async def test_a_reader_that_left_is_not_woken_and_a_failed_look_is_made_again(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "syncd.inbox")
    watch = InboxWatch(store, every=0.05)
    gone, staying = Woken(), Woken()
    with watch.watching("north", staying):
        with watch.watching("north", gone):
            pass
        real = store.pending_kinds_per_factory
        failures = 0

        async def failing() -> dict[str, set[str]]:
            nonlocal failures
            if failures < 3:
                failures += 1
                raise StoreError("database is locked")
            return await real()

        store.pending_kinds_per_factory = failing  # type: ignore[method-assign]
        await written_elsewhere(store, "north", inbox.OPERATOR)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            with anyio.fail_after(5):
                await staying.event.wait()
            tg.cancel_scope.cancel()
    assert gone.times == 0
    assert failures == 3
    # Said once for the three failures in a row, and once when it reads again.
    assert [r.getMessage()[:26] for r in caplog.records if r.name == "syncd.inbox"] == [
        "cannot look at the inbox (",
        "the inbox can be read agai",
    ]
    assert watch._readers == {}


async def test_a_reader_waits_without_a_timer_only_with_a_watch(store: Store) -> None:
    watch = InboxWatch(store)
    wake = Woken()
    with inbox.watched(None, "north", wake, alone=2.5) as patience:
        assert patience == 2.5  # alone: it looks this often itself
    with inbox.watched(watch, "north", wake, kinds=inbox.WEBHOOK_KINDS) as patience:
        assert patience is None  # woken: no timer of its own
        watch.wake_waiting({"north": {inbox.WEBHOOK_RECEIVED}, "south": {inbox.OPERATOR}})
        assert wake.times == 1
    watch.wake_waiting({"north": {inbox.WEBHOOK_RECEIVED}})
    assert wake.times == 1  # it left the watch with its block
