"""The import effect against both simulators: a first attempt creates without a look-up; one
after an attempt that may have landed finds the SO by its natural key (create-only
``ecommerce_*`` fields), whatever a person did to its ``order_no``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from conftest import Sims, running_sims
from syncd.adapters._http import RequestBudget, Slot
from syncd.adapters.katana import KatanaClient, NewSalesOrder, NewSalesOrderRow
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.config import Config
from syncd.domain import triggers
from syncd.domain.orders import LinkedOrder
from syncd.errors import TransportError
from syncd.runtime import effects as effects_module
from syncd.runtime import inbox
from syncd.runtime.effects import ECOMMERCE_ORDER_TYPE, Effects, Outcome, natural_key
from syncd.runtime.pollers import snapshot_of
from syncd.sim.faults import FaultRule, Faults
from syncd.store import Store
from test_flow import is_state, wait_for
from test_http import wait_until

pytestmark = pytest.mark.anyio


@dataclass
class Bench:
    sims: Sims
    store: Store
    effects: Effects
    tradegecko: TradeGeckoClient

    async def link(self) -> LinkedOrder:
        """A new PO in TradeGecko and its link, as the poller would make it."""
        po = await self.sims.create_po()
        snapshot = snapshot_of(*await self.tradegecko.get_purchase_order(po["id"]))
        link = await self.store.create_link(
            snapshot, state="discovered", trigger="po_discovered", cause="test", event_id=None
        )
        assert link is not None
        return link

    async def warm(self) -> None:
        """Import a first PO: the customer and factory are cached, and the store notes when
        attempts began (links made before are treated as an earlier syncd's)."""
        outcome = await self.effects.import_order(await self.link())
        assert outcome.trigger == triggers.SO_CREATED, outcome

    async def imported(self, *lines: int, state: str = "delivered") -> list[LinkedOrder]:
        """New POs (``lines`` each), imported, their links stored in ``state`` (by default
        waiting for their receipts: what the PO read-ahead looks for)."""
        links = []
        for count in lines:
            po = await self.sims.create_po(count)
            link = await self.store.create_link(
                snapshot_of(*await self.tradegecko.get_purchase_order(po["id"])),
                state=state,
                trigger="po_discovered",
                cause="test",
                event_id=None,
            )
            assert link is not None
            made = await self.effects.import_order(link)
            assert made.trigger == triggers.SO_CREATED, made
            links.append(msgspec.structs.replace(link, so_id=made.so_id, lines=made.lines))
        return links

    async def together(
        self, run: Callable[[LinkedOrder], Awaitable[Outcome]], links: Sequence[LinkedOrder]
    ) -> list[Outcome]:
        """``run`` (an effect) for every one of ``links`` at once: their outcomes, as they
        finished."""
        outcomes: list[Outcome] = []

        async def one(link: LinkedOrder) -> None:
            outcomes.append(await run(link))

        async with anyio.create_task_group() as tg:
            for link in links:
                tg.start_soon(one, link)
        return outcomes

    async def katana_requests(self) -> Counter[str]:
        katana, _ = await self.sims.counters()
        return Counter(katana["requests"])

    async def tradegecko_requests(self) -> Counter[str]:
        _, tradegecko = await self.sims.counters()
        return Counter(tradegecko["requests"])

    async def tradegecko_reads(self) -> Counter[str]:
        requests = await self.tradegecko_requests()
        return Counter({k: n for k, n in requests.items() if k.startswith("GET")})


def settling(config: Config, *, timeout: float = 2.0, settle: float = 0.5) -> Config:
    """``config`` with a short Katana timeout and settle margin: a retry after an uncertain
    create waits ``timeout + settle`` from its start, not the default 35 s."""
    return msgspec.structs.replace(
        config,
        daemon=msgspec.structs.replace(config.daemon, retry_settle=settle),
        katana=msgspec.structs.replace(config.katana, timeout=timeout),
    )


@asynccontextmanager
async def bench(
    sims: Sims, tmp_path: Path, *, store: bool = True, config: Config | None = None
) -> AsyncIterator[Bench]:
    config = config or sims.config(tmp_path / "syncd.db")
    opened = await Store.open(config.daemon.database)
    try:
        async with (
            KatanaClient(
                config.katana.base_url,
                config.katana.token,
                transport=sims.katana_contract,
                timeout=config.katana.timeout,
            ) as katana,
            TradeGeckoClient(config.tradegecko.base_url, config.tradegecko.token) as tradegecko,
        ):
            effects = Effects(config, katana, tradegecko, opened if store else None)
            yield Bench(sims, opened, effects, tradegecko)
    finally:
        await opened.close()


def _spent(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: n for k, n in (after - before).items() if n}


async def test_a_first_import_creates_without_a_look_up_and_sets_the_natural_key(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        link = await b.link()
        before = await b.katana_requests()
        outcome = await b.effects.import_order(link)
        spent = _spent(before, await b.katana_requests())
        account = await b.tradegecko.get_current_account()
    assert outcome.trigger == triggers.SO_CREATED, outcome
    # The POST alone: no sales order look-up, and the variant is cached from the warm-up.
    assert spent == {"POST /sales_orders": 1}, spent
    (so,) = [s for s in sims.katana_world.sales_order_list() if s["id"] == outcome.so_id]
    assert so["order_no"] == f"TG-{link.po_number}"
    assert (so["ecommerce_order_type"], so["ecommerce_store_name"], so["ecommerce_order_id"]) == (
        ECOMMERCE_ORDER_TYPE,
        f"TradeGecko {account.id}",
        str(link.po_id),
    )


async def test_an_import_after_an_attempt_finds_the_so_by_its_key_though_renamed(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        link = await b.link()
        first = await b.effects.import_order(link)
        assert first.so_id is not None
        # A person renames the order in Katana before syncd recorded it (its answer lost).
        renamed = await sims.control.patch(
            f"{sims.katana_url}/_sim/sales_orders/{first.so_id}", json={"order_no": "RUSH-1"}
        )
        assert renamed.json()["order_no"] == "RUSH-1"
        before = await b.katana_requests()
        again = await b.effects.import_order(link)
        spent = _spent(before, await b.katana_requests())
    assert again.trigger == triggers.SO_CREATED and again.so_id == first.so_id, again
    assert again.so_number == "RUSH-1" and again.cause.startswith("found Katana SO"), again
    # One look-up by the key, no POST; no order_no fallback (the link is newer than keys).
    assert spent == {"GET /sales_orders": 1}, spent  # the variant is cached
    assert sims.katana_world.counter_report()["sales_orders_created"] == 2


async def test_an_import_attempted_before_keys_falls_back_to_order_no(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        # Links made before this moment predate noted attempts: as if an earlier syncd's.
        await b.store.set_meta("import_attempts_since", repr(4e9))
        await b.warm()
        link = await b.link()
        # What an earlier syncd made: an SO with this PO's order_no and no ecommerce key.
        (variant,) = await b.effects.katana.list_variants(skus=["CHAIR-OAK"])
        customer = await b.effects.katana.create_customer(name="Someone")
        made = await b.effects.katana.create_sales_order(
            NewSalesOrder(
                customer_id=customer.id,
                order_no=f"TG-{link.po_number}",
                sales_order_rows=[NewSalesOrderRow(variant_id=variant.id, quantity=Decimal(1))],
            )
        )
        before = await b.katana_requests()
        outcome = await b.effects.import_order(link)
        spent = _spent(before, await b.katana_requests())
    assert outcome.so_id == made.id, outcome
    # By the key (nothing), then by order_no (found): never a second SO.
    assert spent == {"GET /sales_orders": 2}, spent  # the variant is cached
    # The warm-up's and the earlier syncd's: none made by this import.
    assert sims.katana_world.counter_report()["sales_orders_created"] == 2


async def test_without_a_store_every_import_looks_first(sims: Sims, tmp_path: Path) -> None:
    async with bench(sims, tmp_path, store=False) as b:
        link = await b.link()
        first = await b.effects.import_order(link)
        again = await b.effects.import_order(link)
    assert first.so_id == again.so_id is not None
    assert sims.katana_world.counter_report()["sales_orders_created"] == 1


async def test_a_cached_variant_katana_refuses_is_looked_up_again_with_one_so(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        warm = await b.effects.import_order(await b.link())
        assert warm.lines is not None
        sku, stale = warm.lines[0].sku, warm.lines[0].katana_variant_id
        link = await b.link()  # the same catalogue line: the same SKU
        assert await b.store.cached_variant_ids("katana", [sku], since=0) == {sku: stale}
        sims.katana_world.delete_variant(stale)  # a person deleted it in Katana
        before = await b.katana_requests()
        outcome = await b.effects.import_order(link)
        spent = _spent(before, await b.katana_requests())
        cached = await b.store.cached_variant_ids("katana", [sku], since=0)
    assert outcome.trigger == triggers.SO_CREATED, outcome
    # Refused, the entries dropped, the SO looked up by its key (the attempt was noted:
    # none), the SKU looked up (gone: a product made for it), created once.
    assert spent == {
        "POST /sales_orders": 2,
        "GET /sales_orders": 1,
        "GET /variants": 1,
        "POST /products": 1,
    }, spent
    made = [
        s
        for s in sims.katana_world.sales_order_list()
        if s["ecommerce_order_id"] == str(link.po_id)
    ]
    assert len(made) == 1
    assert outcome.lines is not None
    fresh = outcome.lines[0].katana_variant_id
    assert fresh != stale and cached == {sku: fresh}
    # The spec lists no 422 for createSalesOrder, but Katana answers one (apis/README.md).
    violations = sims.katana_contract.violations
    assert violations and all("createSalesOrder: response 422" in v for v in violations)
    violations.clear()


async def test_receipts_due_together_share_one_inventory_read(sims: Sims, tmp_path: Path) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        # Not yet due: the PO read-ahead leaves them be (this test is the inventory's).
        links = await b.imported(1, 2, 1, state="discovered")
        b.effects.inventory.window = 1.0  # wide: the PO reads before it vary under load
        before = await b.katana_requests()
        outcomes = await b.together(b.effects.receive_order, links)
        spent = _spent(before, await b.katana_requests())
        # One alone still reads once.
        alone = await b.link()
        made = await b.effects.import_order(alone)
        before = await b.katana_requests()
        alone = msgspec.structs.replace(alone, so_id=made.so_id, lines=made.lines)
        single = await b.effects.receive_order(alone)
        spent_alone = _spent(before, await b.katana_requests())
    assert [o.trigger for o in outcomes] == [triggers.PO_RECEIVED] * 3, outcomes
    assert spent == {"GET /inventory": 1}, spent
    assert single.trigger == triggers.PO_RECEIVED and spent_alone == {"GET /inventory": 1}
    # Each receipt re-costed its own lines only.
    assert sorted(len(o.lines or ()) for o in outcomes) == [1, 1, 2]
    assert (b.effects.inventory.reads, b.effects.inventory.served) == (2, 4)


async def test_receipts_due_together_share_one_po_read_and_read_ahead_those_due(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        links = await b.imported(1, 2, 1, 1, 1)
        reads = b.effects.purchase_orders
        reads.window = 1.0  # wide: the two receipts start together under load
        before = await b.tradegecko_reads()
        outcomes = await b.together(b.effects.receive_order, links[:2])
        together = _spent(before, await b.tradegecko_reads())
        # The other three were read ahead with them: their receipts read nothing.
        before = await b.tradegecko_reads()
        for link in links[2:4]:
            outcomes.append(await b.effects.receive_order(link))
        ahead = _spent(before, await b.tradegecko_reads())
        # Voided after its PO was read ahead: the refused receipt reads again and says so.
        await sims.control.patch(
            f"{sims.tradegecko_url}/_sim/purchase_orders/{links[4].po_id}", json={"status": "void"}
        )
        voided = await b.effects.receive_order(links[4])
        # A read ahead serves once: a retry reads again.
        reads.window = 0.0
        again = await b.tradegecko_reads()
        retried = await b.effects.receive_order(links[2])
        retry = _spent(again, await b.tradegecko_reads())
    assert [o.trigger for o in outcomes] == [triggers.PO_RECEIVED] * 4, outcomes
    assert together == {"GET /purchase_orders": 1, "GET /purchase_order_line_items": 1}, together
    assert ahead == {}, ahead
    assert sorted(len(o.lines or ()) for o in outcomes) == [1, 1, 1, 2]
    assert voided.trigger == triggers.RECEIVE_FAILED and "void" in (voided.reason or ""), voided
    assert retried.trigger == triggers.PO_RECEIVED, retried
    assert "received in TradeGecko" in retried.cause
    assert sum(retry.values()) >= 1 and "GET /purchase_orders" in retry, retry
    # Two receipts together, three ahead (one voided), the retry by its own batch.
    assert (reads.reads, reads.served) == (2, 6)


async def test_a_receipt_whose_po_is_being_read_ahead_waits_for_that_read(
    tmp_path: Path,
) -> None:
    # The list read answers after 1.5 s: the other receipts ask while it is on its way.
    slow = Faults(rules=[FaultRule(path="/purchase_orders", method="GET", latency_ms=1500)])
    async with running_sims(tradegecko_faults=slow) as sims, bench(sims, tmp_path) as b:
        await b.warm()
        links = await b.imported(1, 1, 1, 1, 1)
        reads = b.effects.purchase_orders
        reads.window = 0.0
        before = await b.tradegecko_reads()
        outcomes: list[Outcome] = []

        async def receive(link: LinkedOrder) -> None:
            outcomes.append(await b.effects.receive_order(link))

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive, links[0])
            await anyio.sleep(0.5)  # its read (the others read ahead) is on its way
            for link in links[1:]:
                tg.start_soon(receive, link)
        spent = _spent(before, await b.tradegecko_reads())
    assert [o.trigger for o in outcomes] == [triggers.PO_RECEIVED] * 5, outcomes
    # One read for all five: before, each later receipt read its PO again.
    assert spent == {"GET /purchase_orders": 1, "GET /purchase_order_line_items": 1}, spent
    assert (reads.reads, reads.served) == (1, 5), (reads.reads, reads.served, outcomes)


async def test_receipts_waiting_for_a_read_ahead_free_their_slots_for_its_reader(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        first, second = await b.imported(1, 1)
        reads = b.effects.purchase_orders
        reads.window = 0.0
        # A full budget: the first receipt's read (the second's PO read ahead) must wait.
        budget = b.tradegecko.budget = RequestBudget(2, 2.0)
        for _ in range(2):
            await budget.acquire()
            budget.complete()
        limiter = anyio.CapacityLimiter(1)  # the dispatcher's slots, one
        outcomes: list[Outcome] = []

        async def receive(link: LinkedOrder) -> None:
            async with Slot(limiter):
                outcomes.append(await b.effects.receive_order(link))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive, first)
                await wait_until(lambda: budget.waiting == 1)  # parked: the slot is free
                tg.start_soon(receive, second)
    # The second waited for the read ahead without its slot: the first could take its slot
    # again to send (holding it, both waited for ever).
    assert [o.trigger for o in outcomes] == [triggers.PO_RECEIVED] * 2, outcomes
    assert (reads.reads, reads.served) == (1, 2)


async def test_the_read_ahead_takes_only_what_the_budget_serves_while_fresh(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        links = await b.imported(1, 1, 1, 1, 1, 1)
        reads = b.effects.purchase_orders
        reads.window = 0.0
        budget = b.tradegecko.budget
        # 300 calls per 300 s: 6 calls within 6 s, 2 of them this receipt's own, so two
        # receipts more (2 calls each) can use a read ahead before it is stale.
        assert (budget.limit, budget.period, budget.reserve) == (300, 300.0, 0)
        reads.fresh_for = 6.0
        first = await b.effects.receive_order(links[0])
        read_ahead = set(reads._ahead)
        # Room for none: the receipt reads its PO alone.
        reads.fresh_for = 2.0
        before = await b.tradegecko_reads()
        alone = await b.effects.receive_order(links[5])
        spent = _spent(before, await b.tradegecko_reads())
    assert first.trigger == alone.trigger == triggers.PO_RECEIVED, (first, alone)
    assert len(read_ahead) == 2 and read_ahead < {link.po_id for link in links[1:5]}, read_ahead
    assert spent == {"GET /purchase_orders/{id}": 1}, spent


async def test_imports_that_find_the_currencies_stale_together_read_them_once(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        links = [await b.link() for _ in range(4)]
        b.effects._currencies.at = b.effects._base_currency.at = -1e18  # both expired
        before = await b.tradegecko_requests()
        katana_before = await b.katana_requests()
        outcomes = await b.together(b.effects.import_order, links)
        spent = _spent(before, await b.tradegecko_requests())
        katana_spent = _spent(katana_before, await b.katana_requests())
    assert [o.trigger for o in outcomes] == [triggers.SO_CREATED] * 4, outcomes
    assert spent == {"GET /currencies": 1}, spent
    assert katana_spent.get("GET /factory") == 1, katana_spent


def test_the_po_observed_kind_is_inboxs() -> None:
    assert effects_module._PO_OBSERVED == inbox.PO_OBSERVED


async def test_a_first_receipt_of_a_po_the_polls_saw_unchanged_reads_nothing(
    sims: Sims, tmp_path: Path
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        (link,) = await b.imported(2)
        for n, line in enumerate(link.lines):
            sims.katana_world.set_average_cost(line.katana_variant_id, Decimal(f"3.2{n}"))
        b.effects.purchase_orders_seen = lambda created_at: time.monotonic()
        before = await b.tradegecko_requests()
        outcome = await b.effects.receive_order(link)
        spent = _spent(before, await b.tradegecko_requests())
        po, lines = await b.tradegecko.get_purchase_order(link.po_id)
    assert outcome.trigger == triggers.PO_RECEIVED, outcome
    assert spent == {
        "PUT /purchase_order_line_items/{id}": 2,
        "POST /purchase_orders/{id}/actions/receive": 1,
    }, spent
    assert (b.effects.unread_receipts, b.effects.unread_refused) == (1, 0)
    # The record as a read would have made it: before, the imported price; after, the PO's.
    assert outcome.lines is not None
    assert [(ln.cost_before, ln.cost_after) for ln in outcome.lines] == [
        (imported.price, now.price) for imported, now in zip(link.lines, lines, strict=True)
    ]
    assert po.status == "received"


@pytest.mark.parametrize("why", ["drift seen", "poll stale", "a retry", "no poll yet"])
async def test_a_receipt_reads_its_po_unless_the_polls_saw_it_unchanged_just_now(
    sims: Sims, tmp_path: Path, why: str
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        (link,) = await b.imported(1)
        seen: float | None = time.monotonic()
        if why == "drift seen":
            await b.store.add_event(
                "tradegecko",
                inbox.PO_OBSERVED,
                inbox.encode(inbox.PurchaseOrderObserved(po_id=link.po_id, status="active")),
                dedup_key=f"po:{link.po_id}:updated:test",
                po_id=link.po_id,
                link_id=link.id,
            )
        elif why == "poll stale":
            seen = time.monotonic() - b.effects.purchase_orders.fresh_for - 1
        elif why == "a retry":
            await b.store.set_meta(f"receipt_attempt:{link.id}", repr(time.time()))
        else:
            seen = None
        b.effects.purchase_orders_seen = lambda created_at: seen
        before = await b.tradegecko_reads()
        outcome = await b.effects.receive_order(link)
        spent = _spent(before, await b.tradegecko_reads())
    assert outcome.trigger == triggers.PO_RECEIVED, outcome
    assert spent == {"GET /purchase_orders/{id}": 1}, spent
    assert b.effects.unread_receipts == 0


@pytest.mark.parametrize("edit", ["void", "received", "line removed"])
async def test_a_po_changed_since_the_last_poll_is_read_when_a_write_is_refused(
    sims: Sims, tmp_path: Path, edit: str
) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        (link,) = await b.imported(2)
        for line in link.lines:
            sims.katana_world.set_average_cost(line.katana_variant_id, Decimal("4.5"))
        b.effects.purchase_orders_seen = lambda created_at: time.monotonic()
        change: dict[str, Any] = {"remove_line_ids": [link.lines[0].line_id]}
        if edit != "line removed":
            change = {"status": edit}
        # A person, after the poll that last saw the PO.
        answer = await sims.control.patch(
            f"{sims.tradegecko_url}/_sim/purchase_orders/{link.po_id}", json=change
        )
        assert answer.status_code == 200, answer.text
        outcome = await b.effects.receive_order(link)
        _, tradegecko = await sims.counters()
    if edit == "void":
        # The price PUT is refused: the PO read says why nothing is received.
        assert outcome.trigger == triggers.RECEIVE_FAILED and "void" in (outcome.reason or "")
        assert b.effects.unread_refused == 1
    elif edit == "received":
        # The prices are set (as after a read a minute old), the receive refused: received.
        assert outcome.trigger == triggers.PO_RECEIVED, outcome
        assert outcome.cause == f"PO {link.po_number} was already received"
        assert tradegecko["receipts_per_po"].get(str(link.po_id), 0) == 0
    else:
        # The gone line's PUT is refused (404): read, the other line re-costed, received.
        assert outcome.trigger == triggers.PO_RECEIVED, outcome
        assert f"line {link.lines[0].line_id} is gone from the PO: not re-costed" in outcome.notes
        assert tradegecko["receipts_per_po"] == {str(link.po_id): 1}
        assert b.effects.unread_refused == 1


def test_the_natural_key_names_tradegecko_the_account_and_the_po() -> None:
    key = natural_key(4711, 435)
    assert (key.order_type, key.store_name, key.order_id) == (
        "tradegecko",
        "TradeGecko 4711",
        "435",
    )


async def test_an_order_renamed_in_katana_mid_run_still_completes_with_one_so(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(tmp_path / "syncd.db") as daemon, sims.factory():
        po = await sims.create_po()
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], lambda lk: lk.so_id is not None)
        answer = await sims.control.patch(
            f"{sims.katana_url}/_sim/sales_orders/{link.so_id}", json={"order_no": "EDITED-7"}
        )
        assert answer.status_code == 200, answer.text
        (done,) = await wait_for(daemon, [po["order_number"]], is_state("received"), seconds=30)
    katana_counts, tg_counts = await sims.counters()
    assert done.so_id == link.so_id
    assert katana_counts["sales_orders_created"] == 1, katana_counts
    assert tg_counts["receipts_per_po"] == {str(po["id"]): 1}


async def test_a_create_whose_answer_is_dropped_is_found_by_its_key_not_made_twice(
    tmp_path: Path,
) -> None:
    dropped = Faults(
        rules=[FaultRule(path="/sales_orders", method="POST", drop_rate=1.0, after=True, times=1)]
    )
    async with running_sims(katana_faults=dropped) as sims:
        async with sims.daemon(settling(sims.config(tmp_path / "syncd.db"))) as daemon:
            po = await sims.create_po()
            daemon.poll_now()
            (link,) = await wait_for(daemon, [po["order_number"]], lambda lk: lk.so_id is not None)
        katana_counts, _ = await sims.counters()
    assert katana_counts["faults_injected"] == {"drop_after": 1}, katana_counts
    assert katana_counts["sales_orders_created"] == 1, katana_counts
    (so,) = sims.katana_world.sales_order_list()
    assert (link.so_id, so["ecommerce_order_id"]) == (so["id"], str(po["id"]))


# -- a create that lands late ------------------------------------------------------------


def _sos_of(sims: Sims, po_id: int, *, live: bool = True) -> list[dict[str, Any]]:
    return [
        so
        for so in sims.katana_world.sales_order_list()
        if so["ecommerce_order_id"] == str(po_id) and (so["deleted_at"] is None or not live)
    ]


async def test_an_uncertain_create_that_lands_after_the_timeout_ends_with_one_so(
    sims: Sims, tmp_path: Path
) -> None:
    """The POST is held past the client's timeout, then lands (a proxy carried it through).
    The retry, at once and from a new runner as after a restart, waits until the first
    cannot land any more (its start + timeout + settle), then finds it: no second SO."""
    config = settling(sims.config(tmp_path / "syncd.db"), timeout=0.5, settle=1.0)
    async with bench(sims, tmp_path, config=config) as b:
        await b.warm()
        held = Faults(
            rules=[
                FaultRule(
                    path="/sales_orders", method="POST", hold_rate=1.0, hold_seconds=1.0, times=1
                )
            ]
        )
        answer = await sims.control.put(
            f"{sims.katana_url}/_sim/faults", json=msgspec.to_builtins(held)
        )
        assert answer.status_code == 200, answer.text
        link = await b.link()
        began = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            await b.effects.import_order(link)
        assert _sos_of(sims, link.po_id) == []  # not landed yet: a look now finds nothing
        restarted = Effects(config, b.effects.katana, b.tradegecko, b.store)
        again = await restarted.import_order(link)
        waited = time.monotonic() - began
        injected = (await sims.counters())[0]["faults_injected"]
    assert injected == {"hold": 1}, injected
    assert again.trigger == triggers.SO_CREATED, again
    assert again.cause.startswith("found Katana SO"), again
    (so,) = _sos_of(sims, link.po_id)
    assert again.so_id == so["id"]
    assert waited >= 0.5 + 1.0 - 0.1, waited


async def test_a_create_refused_is_answered_so_a_later_look_does_not_wait(
    sims: Sims, tmp_path: Path
) -> None:
    """An answered create leaves nothing in flight: an import run again at once (its outcome
    lost) looks without waiting for the timeout."""
    config = settling(sims.config(tmp_path / "syncd.db"), timeout=5.0, settle=5.0)
    async with bench(sims, tmp_path, config=config) as b:
        await b.warm()
        link = await b.link()
        first = await b.effects.import_order(link)
        began = time.monotonic()
        again = await b.effects.import_order(link)
        waited = time.monotonic() - began
    assert (first.so_id, again.so_id) == (again.so_id, first.so_id) and first.so_id is not None
    assert waited < 5.0, waited


# -- duplicates ----------------------------------------------------------------------------


async def _duplicate(b: Bench, so_id: int) -> int:
    """A second SO with the same natural key and rows, made behind syncd's back."""
    so = await b.effects.katana.get_sales_order(so_id)
    made = await b.effects.katana.create_sales_order(
        NewSalesOrder(
            customer_id=so.customer_id,
            order_no=f"{so.order_no}-BIS",
            sales_order_rows=[
                NewSalesOrderRow(
                    variant_id=row.variant_id,
                    quantity=row.quantity,
                    price_per_unit=row.price_per_unit,
                )
                for row in so.sales_order_rows
            ],
            ecommerce_order_type=so.ecommerce_order_type,
            ecommerce_store_name=so.ecommerce_store_name,
            ecommerce_order_id=so.ecommerce_order_id,
        )
    )
    return made.id


async def test_an_untouched_duplicate_is_deleted_and_noted(sims: Sims, tmp_path: Path) -> None:
    async with bench(sims, tmp_path) as b:
        await b.warm()
        link = await b.link()
        first = await b.effects.import_order(link)
        assert first.so_id is not None
        duplicate = await _duplicate(b, first.so_id)
        again = await b.effects.import_order(link)
        before = await b.katana_requests()
        third = await b.effects.import_order(link)
        spent = _spent(before, await b.katana_requests())
    assert again.so_id == first.so_id, again
    (note,) = [n for n in again.notes if "duplicate" in n]
    assert note.startswith(f"deleted Katana SO {first.so_number}-BIS (id {duplicate})"), note
    assert f"SO {first.so_number} (id {first.so_id})" in note, note
    (live,) = _sos_of(sims, link.po_id)
    assert live["id"] == first.so_id
    # Done once: the next look finds one SO, deletes nothing, notes nothing.
    assert third.so_id == first.so_id and not [n for n in third.notes if "duplicate" in n]
    assert "DELETE /sales_orders/{id}" not in spent, spent


async def test_a_touched_duplicate_is_kept_and_reported_with_both_numbers(
    sims: Sims, tmp_path: Path
) -> None:
    """The link records the newer SO: the older one is the extra; a person edited its rows,
    so syncd does not delete it and names both."""
    async with bench(sims, tmp_path) as b:
        await b.warm()
        link = await b.link()
        first = await b.effects.import_order(link)
        assert first.so_id is not None
        duplicate = await _duplicate(b, first.so_id)
        row = (await b.effects.katana.get_sales_order(first.so_id)).sales_order_rows[0]
        edited = await sims.control.patch(
            f"{sims.katana_url}/_sim/sales_orders/{first.so_id}",
            json={"rows": [{"id": row.id, "quantity": "7"}]},
        )
        assert edited.status_code == 200, edited.text
        followed = msgspec.structs.replace(link, so_id=duplicate)
        again = await b.effects.import_order(followed)
    assert again.so_id == duplicate, again
    (note,) = [n for n in again.notes if "duplicate" in n]
    assert note == (
        f"Katana SO {first.so_number} (id {first.so_id}) duplicates SO {first.so_number}-BIS "
        f"(id {duplicate}), which syncd follows; not deleted (its rows were edited): "
        "settle it in Katana"
    ), note
    assert sorted(so["id"] for so in _sos_of(sims, link.po_id)) == [first.so_id, duplicate]


async def test_a_duplicate_the_poller_sees_later_is_deleted_or_reported(
    sims: Sims, tmp_path: Path
) -> None:
    """After the import, SOs with the order's key land behind syncd's back (a create that
    landed later still): the Katana poll sees them; the untouched one is deleted, the other
    (its rows not as created) noted in the order with both numbers."""
    async with sims.daemon(tmp_path / "syncd.db") as daemon:
        po = await sims.create_po()
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], lambda lk: lk.so_id is not None)
        assert link.so_id is not None
        config = sims.config(tmp_path / "unused.db")
        async with KatanaClient(config.katana.base_url, config.katana.token) as katana:
            so = await katana.get_sales_order(link.so_id)
            (row,) = so.sales_order_rows

            async def twin(order_no: str, quantity: Decimal) -> int:
                made = await katana.create_sales_order(
                    NewSalesOrder(
                        customer_id=so.customer_id,
                        order_no=order_no,
                        sales_order_rows=[
                            NewSalesOrderRow(
                                variant_id=row.variant_id,
                                quantity=quantity,
                                price_per_unit=row.price_per_unit,
                            )
                        ],
                        ecommerce_order_type=so.ecommerce_order_type,
                        ecommerce_store_name=so.ecommerce_store_name,
                        ecommerce_order_id=so.ecommerce_order_id,
                    )
                )
                return made.id

            untouched = await twin("LATE-1", row.quantity)
            touched = await twin("LATE-2", row.quantity + 1)
        expected = (
            f"Katana SO LATE-2 (id {touched}) duplicates SO {so.order_no} (id {so.id}), "
            "which syncd follows; not deleted (its rows were edited): settle it in Katana"
        )
        (noted,) = await wait_for(
            daemon, [po["order_number"]], lambda lk: expected in lk.notes, seconds=20
        )
    live = sorted(s["id"] for s in _sos_of(sims, link.po_id))
    assert live == [so.id, touched], live
    assert any(n.startswith(f"deleted Katana SO LATE-1 (id {untouched})") for n in noted.notes)
    assert noted.so_id == so.id
