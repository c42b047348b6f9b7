"""The Katana poller costs what it must: the MO list only when the SO list left a followed
order unseen, at most once per ``mo_every``; a slower cadence while polls find nothing."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from conftest import Sims
from syncd.adapters._http import Priority
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.errors import TransportError
from syncd.runtime import inbox
from syncd.runtime.daemon import Daemon
from syncd.runtime.pollers import TradeGeckoPoller, snapshot_of
from syncd.store import Store
from test_flow import is_state, wait_for

pytestmark = pytest.mark.anyio


async def katana_requests(sims: Sims) -> Counter[str]:
    katana, _ = await sims.counters()
    return Counter(katana["requests"])


async def imported(sims: Sims, daemon: Daemon) -> None:
    """One PO imported; then the daemon's own loop is left idle (60 s polls)."""
    po = await sims.create_po()
    with anyio.fail_after(20):
        while (link := await daemon.store.link_by_po_number(po["order_number"])) is None or (
            link.state != "imported"
        ):
            daemon.poll_now()
            await anyio.sleep(0.1)
    await wait_for(daemon, [po["order_number"]], is_state("imported"))
    await anyio.sleep(0.5)  # the kicked polls are done


@asynccontextmanager
async def tradegecko_poller(sims: Sims, tmp_path: Path) -> AsyncIterator[TradeGeckoPoller]:
    """A TradeGecko poller of its own (no daemon), activated a second ago."""
    config = sims.config(tmp_path / "syncd.db", poll=60.0)
    store = await Store.open(config.daemon.database)
    try:
        async with TradeGeckoClient(config.tradegecko.base_url, config.tradegecko.token) as tg:
            activated = datetime.now(UTC) - timedelta(seconds=1)
            yield TradeGeckoPoller(store, tg, config, activated, lambda: None)
    finally:
        await store.close()


async def spent_by_poll(sims: Sims, daemon: Daemon) -> dict[str, int]:
    before = await katana_requests(sims)
    await daemon.katana_poller.poll_once()
    return {k: n for k, n in (await katana_requests(sims) - before).items() if n}


async def test_the_mo_list_is_read_only_when_the_so_list_leaves_an_order_unseen_and_due(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(sims.config(tmp_path / "syncd.db", poll=60.0)) as daemon:
        await imported(sims, daemon)
        poller = daemon.katana_poller
        assert poller.mo_every == 4 * 60.0
        both = {"GET /sales_orders": 1, "GET /manufacturing_orders": 1}
        # The SO list shows nothing new (the cursor is past it): the MO list looks for
        # changes behind a followed order, once.
        later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        await daemon.store.set_cursor(poller.so_cursor, later)
        poller.mo_listed_at = None
        assert await spent_by_poll(sims, daemon) == both
        assert await spent_by_poll(sims, daemon) == {"GET /sales_orders": 1}  # not due
        poller.mo_listed_at = time.monotonic() - poller.mo_every
        assert await spent_by_poll(sims, daemon) == both  # due again
        # Due, but the SO list (from before the SO was made) saw every followed order.
        earlier = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        await daemon.store.set_cursor(poller.so_cursor, earlier)
        poller.mo_listed_at = None
        assert await spent_by_poll(sims, daemon) == {"GET /sales_orders": 1}


async def test_polls_that_find_nothing_stretch_the_interval_to_twice_it(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(sims.config(tmp_path / "syncd.db", poll=60.0)) as daemon:
        poller = daemon.katana_poller
        waits = []
        for idle in range(4):
            poller.idle_polls = idle
            waits.append(poller.next_wait())
        assert waits == [60.0, 60.0, 120.0, 120.0]
        # TradeGecko's poll finds new POs: it never stretches.
        daemon.tradegecko_poller.idle_polls = 5
        assert daemon.tradegecko_poller.next_wait() == 60.0
        # The reconcile interval is the webhooks' safety net: never stretched.
        poller.reconcile()
        poller.idle_polls = 5
        assert poller.next_wait() == poller.interval


async def test_a_kick_or_a_new_followed_order_brings_the_interval_back(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(sims.config(tmp_path / "syncd.db", poll=60.0)) as daemon:
        poller = daemon.katana_poller
        await imported(sims, daemon)
        # A newly followed order (an import made its SO) counts as found.
        poller._followed = set()
        await poller.poll_once()
        assert poller._moved(0)
        await poller.poll_once()
        assert not poller._moved(0)
        # A kick counts the idle polls from nought again.
        poller.idle_polls = 5
        poller.kick.set()
        with anyio.fail_after(5):
            while poller.idle_polls >= 5:  # noqa: ASYNC110 - the poller's own counter
                await anyio.sleep(0.02)
        assert poller.idle_polls <= 1  # the kicked poll found nothing: 1
        assert poller.next_wait() == 60.0


async def test_a_poll_finding_several_new_pos_reads_their_lines_together(
    sims: Sims, tmp_path: Path
) -> None:
    async with tradegecko_poller(sims, tmp_path) as poller:
        pos = [await sims.create_po(lines) for lines in (1, 3, 2)]
        await poller.supplier_ids()
        _, before = await sims.counters()
        added = await poller.poll_once()
        _, after = await sims.counters()
        pending = await poller.store.pending_events()
        alone = {
            po["id"]: snapshot_of(*await poller.client.get_purchase_order(po["id"])) for po in pos
        }
    spent = dict(Counter(after["requests"]) - Counter(before["requests"]))
    assert added == 3
    # One list of the POs, one read of all their lines: no read of each PO.
    assert spent == {"GET /purchase_orders": 1, "GET /purchase_order_line_items": 1}, spent
    found = {event.po_id: event for event in pending if event.kind == inbox.PO_DISCOVERED}
    # The same snapshots as reading each PO by itself.
    assert {
        po_id: inbox.decode(inbox.PO_DISCOVERED, event.payload) for po_id, event in found.items()
    } == alone


async def test_webhooks_registered_during_a_wait_put_the_next_poll_a_reconcile_interval_on(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(sims.config(tmp_path / "syncd.db", poll=0.3)) as daemon:
        poller = daemon.katana_poller
        with anyio.fail_after(5):
            while poller._waiting is None or poller.last_success is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        polled = poller.last_success
        # As the listener does once the webhooks are registered (the daemon's start).
        poller.reconcile()
        assert poller.interval == 300.0
        await anyio.sleep(1.0)
        # The 0.3 s wait under way was moved: no second poll at the old interval (at start,
        # 1,000 factories' second polls fell inside their first minute of idling).
        assert poller.last_success == polled
        assert poller._waiting is not None
        assert poller._waiting.deadline - poller._polled_at == pytest.approx(300.0)
        # Asked to look now, it still does at once.
        poller.kick.set()
        with anyio.fail_after(5):
            while poller.last_success == polled:  # noqa: ASYNC110 - the poller's own record
                await anyio.sleep(0.02)


async def test_changes_are_seen_up_to_the_last_poll_that_skipped_no_po(
    sims: Sims, tmp_path: Path
) -> None:
    async with tradegecko_poller(sims, tmp_path) as poller:
        now = datetime.now(UTC)
        never = poller.changes_seen_at(now)
        await sims.create_po()
        before = time.monotonic()
        await poller.poll_once()
        seen = poller.changes_seen_at(now)
        # Made before activation (imported on purpose): the polls never list it.
        unlisted = poller.changes_seen_at(poller.activated_at - timedelta(seconds=1))

        async def fails(po: object, **_: object) -> int:
            raise TransportError("TradeGecko", "GET", "/purchase_orders/1", "reset")

        await sims.create_po()
        poller.consider = fails  # type: ignore[method-assign]
        await poller.poll_once()
        after_skip = poller.changes_seen_at(now)
    assert never is None and unlisted is None
    assert seen is not None and before <= seen <= time.monotonic()
    # A PO this poll skipped may have changed unseen: the moment stays where it was.
    assert after_skip == seen


async def test_suppliers_asked_for_together_are_read_once(sims: Sims, tmp_path: Path) -> None:
    async with tradegecko_poller(sims, tmp_path) as poller:
        _, before = await sims.counters()
        found: list[list[int]] = []

        async def ask() -> None:
            found.append(await poller.supplier_ids())

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(ask)
        _, after = await sims.counters()
    spent = dict(Counter(after["requests"]) - Counter(before["requests"]))
    assert spent == {"GET /companies": 1}, spent
    assert len(found) == 5 and all(ids == found[0] != [] for ids in found)


async def test_a_poll_goes_at_the_priority_of_the_work_it_feeds(sims: Sims, tmp_path: Path) -> None:
    async with sims.daemon(sims.config(tmp_path / "syncd.db", poll=60.0)) as daemon:
        tradegecko, katana = daemon.tradegecko_poller, daemon.katana_poller
        # New POs start work; production and deliveries seen move orders to receipt.
        assert (tradegecko.priority(), katana.priority()) == (Priority.START, Priority.FINISH)
        # Under webhooks a due poll is the safety net; one a delivery asked for is not.
        katana.reconcile()
        assert katana.priority() is Priority.BACKGROUND
        assert katana.priority(kicked=True) is Priority.FINISH
    async with tradegecko_poller(sims, tmp_path) as poller:
        await sims.create_po()
        # A window full but for the slots a poll at background leaves to the others (a
        # burst of receipts ageing out): it starved there for 90-150 s; it goes now.
        budget = poller.client.budget
        ours = budget.limit - budget.reserve - 2 * budget.headroom  # background: one short
        assert budget.headroom >= 3  # room at start for the poll's reads (suppliers, POs, lines)
        budget._sent.extend([time.monotonic()] * ours)
        assert budget._wait_time(Priority.BACKGROUND) > 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            with anyio.fail_after(5):
                while poller.last_success is None:  # noqa: ASYNC110 - the poller's own record
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert budget.sent_by_priority[Priority.START] >= 1
    assert budget.sent_by_priority[Priority.BACKGROUND] == 0
