"""The dispatcher with a real store and statechart and a scripted effects runner."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from syncd.adapters._http import RequestBudget
from syncd.config import RETRY
from syncd.domain.orders import (
    LinkedOrder,
    PurchaseOrderLine,
    PurchaseOrderSnapshot,
    SalesOrderFacts,
)
from syncd.domain.statechart import Statechart, default_statechart_path, load_statechart
from syncd.errors import RetryPolicy, StatechartError
from syncd.runtime import inbox
from syncd.runtime.dispatcher import Dispatcher, check_chart
from syncd.runtime.effects import EFFECTS, Outcome
from syncd.runtime.inbox import InboxWatch
from syncd.store import InboxEvent, Store

pytestmark = pytest.mark.anyio


class ScriptedEffects:
    """Stands in for Effects: counts runs and answers what the test scripted."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []
        self.so_ids: dict[str, int] = {}
        self.delay = 0.0

    async def run(self, effect: str, link: LinkedOrder) -> Outcome:
        self.runs.append((effect, link.po_number))
        await anyio.sleep(self.delay)
        if effect == "import_order":
            so_id = self.so_ids.get(link.po_number, 100 + link.id)
            return Outcome(
                effect=effect,
                trigger="so_created",
                cause="made",
                so_id=so_id,
                so_number=f"TG-{link.po_number}",
            )
        return Outcome(effect=effect, trigger="po_received", cause="received")


def chart_data() -> dict[str, Any]:
    return tomllib.loads(default_statechart_path().read_text(encoding="utf-8"))


def snapshot(po_id: int, number: str) -> PurchaseOrderSnapshot:
    now = datetime.now(UTC)
    return PurchaseOrderSnapshot(
        po_id=po_id,
        po_number=number,
        status="active",
        company_id=1,
        currency_id=1,
        created_at=now,
        updated_at=now,
        lines=(
            PurchaseOrderLine(line_id=po_id * 10, variant_id=5, quantity=Decimal(1), price=None),
        ),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "syncd.db")
    yield opened
    await opened.close()


async def discover(store: Store, po_id: int, number: str) -> None:
    await store.add_event(
        "tradegecko",
        inbox.PO_DISCOVERED,
        inbox.encode(snapshot(po_id, number)),
        dedup_key=f"po:{po_id}",
        po_id=po_id,
    )


async def settle(store: Store, numbers: list[str], states: set[str]) -> list[LinkedOrder]:
    with anyio.fail_after(10):
        while True:
            links = [await store.link_by_po_number(n) for n in numbers]
            if all(link is not None and link.state in states for link in links):
                return [link for link in links if link is not None]
            await anyio.sleep(0.02)


@asynccontextmanager
async def run_dispatcher(
    store: Store, effects: Any, *, concurrency: int = 4
) -> AsyncIterator[Dispatcher]:
    retry = RETRY._replace(effect=RetryPolicy(initial=0.05, maximum=0.1))
    dispatcher = Dispatcher(store, load_statechart(), effects, retry=retry, concurrency=concurrency)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        yield dispatcher
        tg.cancel_scope.cancel()


def test_the_statechart_fits_the_effects_and_triggers_of_the_code() -> None:
    chart = load_statechart()
    assert check_chart(chart) is chart  # raises naming any mismatch
    broken = copy.deepcopy(chart_data())
    broken["states"]["delivered"]["effect"] = "recieve_order"
    with pytest.raises(StatechartError, match="names effect 'recieve_order', which syncd does not"):
        check_chart(Statechart(broken, source="typo.toml"))


def test_make_to_order_is_registered_and_its_outcomes_each_leave_its_state() -> None:
    auto = load_statechart(holding={"make_to_order_auto"})
    assert check_chart(auto) is auto  # conditions change decisions, not what the file names
    assert set(EFFECTS["make_to_order"].fires) == {
        "production_ordered",
        "make_to_order_failed",
        "nothing_to_make",
        "found_delivered",
    }
    data = chart_data()
    moved = copy.deepcopy(data)
    for transition in moved["transitions"]:
        if transition["trigger"] == "nothing_to_make":
            transition["source"] = ["in_production"]
    with pytest.raises(
        StatechartError,
        match="effect 'make_to_order' fires 'nothing_to_make', but no transition leaves "
        "making_to_order on it",
    ):
        check_chart(Statechart(moved, source="moved.toml"))
    dropped = copy.deepcopy(data)
    dropped["transitions"] = [
        t for t in dropped["transitions"] if t["trigger"] != "found_delivered"
    ]
    with pytest.raises(StatechartError, match="syncd fires trigger 'found_delivered', which no"):
        check_chart(Statechart(dropped, source="dropped.toml"))


async def test_each_effect_runs_once_when_work_was_waiting_at_start(store: Store) -> None:
    await discover(store, 1, "PO1")
    await discover(store, 2, "PO2")
    effects = ScriptedEffects()
    effects.delay = 0.05
    async with run_dispatcher(store, effects):
        await settle(store, ["PO1", "PO2"], {"imported"})
        await anyio.sleep(0.2)
    assert sorted(effects.runs) == [("import_order", "PO1"), ("import_order", "PO2")]


class BudgetedEffects(ScriptedEffects):
    """Each order's import sends one request, PO1's to a service whose budget is full."""

    def __init__(self, full: RequestBudget, free: RequestBudget) -> None:
        super().__init__()
        self.budgets = {"PO1": full}
        self.free = free
        self.started: list[str] = []
        self.done: list[str] = []

    async def run(self, effect: str, link: LinkedOrder) -> Outcome:
        self.started.append(link.po_number)
        budget = self.budgets.get(link.po_number, self.free)
        await budget.acquire()
        budget.complete()
        self.done.append(link.po_number)
        return await super().run(effect, link)


async def test_an_effect_parked_on_a_full_budget_leaves_its_slot_to_other_work(
    store: Store,
) -> None:
    full = RequestBudget(1, 0.5)  # TradeGecko's window, full for half a second
    await full.acquire()
    full.complete()
    effects = BudgetedEffects(full, RequestBudget(50, 60.0))
    await discover(store, 1, "PO1")
    await discover(store, 2, "PO2")
    async with run_dispatcher(store, effects, concurrency=1) as dispatcher:
        await settle(store, ["PO2"], {"imported"})
        # PO1 took the only slot first and waits for its budget; PO2 ran meanwhile.
        assert effects.started == ["PO1", "PO2"]
        assert effects.done == ["PO2"]
        assert full.waiting == 1
        await settle(store, ["PO1"], {"imported"})
        assert effects.done == ["PO2", "PO1"]
        assert dispatcher._limiter.borrowed_tokens <= 1


async def test_an_so_already_owned_by_another_order_needs_attention(store: Store) -> None:
    effects = ScriptedEffects()
    effects.so_ids = {"PO1": 500, "PO1-again": 500}
    await discover(store, 1, "PO1")
    async with run_dispatcher(store, effects):
        await settle(store, ["PO1"], {"imported"})
        await discover(store, 2, "PO1-again")
        (second,) = await settle(store, ["PO1-again"], {"needs_attention"})
    assert second.reason is not None and "already belongs to PO PO1" in second.reason
    first = await store.link_by_po_number("PO1")
    assert first is not None and first.so_id == 500 and first.state == "imported"


async def test_retry_applies_the_sales_order_seen_while_waiting(store: Store) -> None:
    chart = load_statechart()
    effects = ScriptedEffects()
    await discover(store, 1, "PO1")
    async with run_dispatcher(store, effects) as dispatcher:
        (link,) = await settle(store, ["PO1"], {"imported"})
        # The PO was voided after import: the order needs attention.
        await store.add_event(
            "tradegecko",
            inbox.PO_OBSERVED,
            inbox.encode(inbox.PurchaseOrderObserved(po_id=1, status="void")),
            po_id=1,
        )
        dispatcher.wake()
        (link,) = await settle(store, ["PO1"], {"needs_attention"})
        # Meanwhile Katana delivered the SO; the look cannot move the waiting order.
        facts = SalesOrderFacts(
            so_id=link.so_id or 0,
            order_no="TG-PO1",
            status="DELIVERED",
            production_status="DONE",
            deleted=False,
        )
        await store.add_event(
            "katana", inbox.SO_OBSERVED, inbox.encode(facts), so_id=link.so_id, link_id=link.id
        )
        dispatcher.wake()
        await anyio.sleep(0.2)
        link = await store.link_by_po_number("PO1") or link
        assert link.state == "needs_attention"
        # The operator retries: the order returns to imported and the delivery seen before
        # moves it on, without waiting for Katana to change again.
        assert chart.decide(link.state, "retry", resume_state=link.resume_state) is not None
        await dispatcher.fire(link, "retry", "operator: retry")
        await settle(store, ["PO1"], {"received"})
    assert ("receive_order", "PO1") in effects.runs


async def test_an_event_that_keeps_failing_is_set_aside(store: Store) -> None:
    effects = ScriptedEffects()
    await discover(store, 1, "PO1")
    async with run_dispatcher(store, effects) as dispatcher:
        (link,) = await settle(store, ["PO1"], {"imported"})
        # An outcome naming a trigger the statechart does not know cannot be applied.
        bogus = Outcome(effect="import_order", trigger="teleported", cause="?")
        event_id = await store.add_event(
            "effect", inbox.EFFECT_OUTCOME, inbox.encode(bogus), link_id=link.id
        )
        dispatcher.wake()
        with anyio.fail_after(10):
            while (await store.inbox_backlog())[0]:  # noqa: ASYNC110 - polling the store
                await anyio.sleep(0.05)
        # The dispatcher is still alive: the order still moves.
        await store.add_event(
            "katana",
            inbox.SO_OBSERVED,
            inbox.encode(
                SalesOrderFacts(
                    so_id=link.so_id or 0,
                    order_no="TG-PO1",
                    status="DELIVERED",
                    production_status="NONE",
                    deleted=False,
                )
            ),
            link_id=link.id,
        )
        dispatcher.wake()
        await settle(store, ["PO1"], {"received"})
    assert event_id is not None
    events = {e.id: e for e in await store.events_for_link(link.id)}
    assert event_id in events


async def test_every_inbox_kind_is_handled_by_exactly_one_party(store: Store) -> None:
    dispatcher = Dispatcher(store, load_statechart(), ScriptedEffects())
    kinds = set(inbox._TYPES)
    assert set(dispatcher.handlers) == kinds - set(inbox.SOURCE_KINDS)
    assert set(inbox.SOURCE_KINDS) == {inbox.WEBHOOK_RECEIVED, inbox.IMPORT_REQUESTED}


async def test_with_the_daemons_watch_an_idle_dispatcher_sleeps_until_its_events_are_written(
    store: Store,
) -> None:
    watch = InboxWatch(store, every=0.1)
    dispatcher = Dispatcher(store, load_statechart(), ScriptedEffects(), watch=watch)
    reads = 0
    pending_events = store.pending_events

    async def counted(*args: Any, **kwargs: Any) -> list[InboxEvent]:
        nonlocal reads
        reads += 1
        return await pending_events(*args, **kwargs)

    store.pending_events = counted  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        await tg.start(dispatcher.run)
        reads = 0
        await anyio.sleep(1.5)
        # Idle, it looks at nothing by itself: no timer of its own (it used to look each
        # second); the watch's looks found nothing for it.
        assert reads == 0
        assert watch.looks >= 5
        # Written by another process (syncctl, another daemon): no one in this process
        # tells the dispatcher, the watch's next look does.
        other = await Store.open(store.path)
        try:
            await discover(other, 1, "PO1")
        finally:
            await other.close()
        with anyio.fail_after(1.5):
            await settle(store, ["PO1"], {"imported"})
        # Written here: woken at once, not at the next look.
        watch.every = 3600
        await anyio.sleep(0.2)  # the watch's sleep under way takes its old length
        await discover(store, 2, "PO2")
        dispatcher.wake()
        with anyio.fail_after(1):
            await settle(store, ["PO2"], {"imported"})
        tg.cancel_scope.cancel()
