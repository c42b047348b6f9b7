"""The whole flow, end to end: both simulators on loopback sockets, the daemon on a real
SQLite file, every Katana request and answer checked against the OpenAPI contract."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from conftest import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from syncd.adapters.katana import KatanaClient
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.domain.orders import LinkedOrder
from syncd.domain.statechart import load_statechart
from syncd.runtime.daemon import Daemon
from syncd.runtime.effects import Effects
from syncd.sim import katana as katana_sim
from syncd.sim.catalog import MATERIALS, PRODUCTS

pytestmark = pytest.mark.anyio


def unit_cost(sku: str) -> Decimal:
    """What the Katana simulator must charge for one unit made from the catalogue."""
    materials = {m.sku: m.purchase_price for m in MATERIALS}
    product = next(p for p in PRODUCTS if p.sku == sku)
    return sum((materials[r.sku] * r.quantity for r in product.recipe), Decimal(0)) + sum(
        (op.hours * op.cost_per_hour for op in product.operations), Decimal(0)
    )


async def wait_for(
    daemon: Daemon, po_numbers: list[str], done: Callable[[LinkedOrder], bool], seconds: float = 20
) -> list[LinkedOrder]:
    with anyio.fail_after(seconds):
        while True:
            links = [await daemon.store.link_by_po_number(n) for n in po_numbers]
            if all(link is not None and done(link) for link in links):
                return [link for link in links if link is not None]
            await anyio.sleep(0.05)


def is_state(*states: str) -> Callable[[LinkedOrder], bool]:
    return lambda link: link.state in states


async def test_whole_flow_imports_follows_and_receives_each_po_once(
    sims: Sims, tmp_path: Path
) -> None:
    chart = load_statechart()
    async with sims.daemon(tmp_path / "syncd.db") as daemon, sims.factory():
        plain = await sims.create_po(
            [
                {"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"},
                {"sku": "TABLE-OAK", "name": "Oak table", "quantity": "1", "price": "520.00"},
            ]
        )
        new_sku = await sims.create_po(
            [
                {"sku": "SHELF-WALNUT", "name": "Walnut shelf", "quantity": "3", "price": "88.00"},
                {"sku": "STOOL-PINE", "name": "Pine stool", "quantity": "4", "price": "30.00"},
            ]
        )
        odd = await sims.create_po(
            [
                {
                    "sku": "LAMP-BRASS",
                    "name": "Brass lamp",
                    "quantity": "1",
                    "price": "70.00",
                    "extra_cost_value": "12.50",
                },
                {"freeform": True, "label": "Shipping", "quantity": "1", "price": "25.00"},
            ],
            currency="EUR",
        )
        numbers = [plain["order_number"], new_sku["order_number"], odd["order_number"]]
        daemon.poll_now()
        links = await wait_for(daemon, numbers, is_state("received"))

        # Every transition history is a path through the statechart.
        for link in links:
            history = await daemon.store.history(link.id)
            steps = [(h.from_state, h.to_state, h.trigger) for h in history]
            assert chart.valid_path(steps), steps
            assert [s[1] for s in steps][-1] == "received"

    katana_counts, tg_counts = await sims.counters()
    # Exactly one SO per PO, one customer, one product for the one unknown SKU.
    assert katana_counts["sales_orders_by_order_no"] == {f"TG-{n}": 1 for n in numbers}
    assert katana_counts["customers_created"] == 1
    assert katana_counts["products_created"] == 1
    # Exactly one receipt per PO.
    assert tg_counts["receipts_per_po"] == {str(po["id"]): 1 for po in (plain, new_sku, odd)}

    async with (
        KatanaClient(sims.katana_url + katana_sim.API_PREFIX, KATANA_TOKEN) as katana,
        TradeGeckoClient(sims.tradegecko_url, TRADEGECKO_TOKEN) as tradegecko,
    ):
        customers = await katana.list_customers(name="Tradegecko")
        assert [c.name for c in customers] == ["Tradegecko"]
        orders = {so.order_no: so for so in await katana.list_sales_orders()}
        assert set(orders) == {f"TG-{n}" for n in numbers}
        for so in orders.values():
            assert so.customer_id == customers[0].id
            for row in so.sales_order_rows:
                assert row.tax_rate_id is None  # no tax
        variants = {
            v.id: v.sku
            for v in await katana.list_variants(
                skus=["CHAIR-OAK", "TABLE-OAK", "SHELF-WALNUT", "STOOL-PINE", "LAMP-BRASS"]
            )
        }

        def priced(order_no: str) -> dict[str | None, tuple[Decimal, Decimal | None]]:
            return {
                variants.get(r.variant_id): (r.quantity, r.price_per_unit)
                for r in orders[order_no].sales_order_rows
            }

        # Price per unit = the PO line's item cost; the SO keeps it after re-costing.
        assert priced(f"TG-{numbers[0]}") == {
            "CHAIR-OAK": (Decimal(2), Decimal("150")),
            "TABLE-OAK": (Decimal(1), Decimal("520")),
        }
        assert priced(f"TG-{numbers[1]}") == {
            "SHELF-WALNUT": (Decimal(3), Decimal("88")),
            "STOOL-PINE": (Decimal(4), Decimal("30")),
        }
        # Landed cost left out of the price, freeform line left out, PO currency kept.
        assert priced(f"TG-{numbers[2]}") == {"LAMP-BRASS": (Decimal(1), Decimal("70"))}
        assert orders[f"TG-{numbers[2]}"].currency == "EUR"
        assert orders[f"TG-{numbers[0]}"].currency == "USD"

        # Received at Katana's average cost; the variant made with no recipe costs 0, so
        # its line keeps its price.
        async def tg_prices(po_id: int) -> dict[str | None, Decimal | None]:
            po, lines = await tradegecko.get_purchase_order(po_id)
            assert po.status == "received"
            tg_variants: dict[int | None, str | None] = {
                v.id: v.sku
                for v in await tradegecko.list_variants(
                    ids=[ln.variant_id for ln in lines if ln.variant_id]
                )
            }
            return {tg_variants.get(ln.variant_id): ln.price for ln in lines}

        assert await tg_prices(plain["id"]) == {
            "CHAIR-OAK": unit_cost("CHAIR-OAK"),
            "TABLE-OAK": unit_cost("TABLE-OAK"),
        }
        assert await tg_prices(new_sku["id"]) == {
            "SHELF-WALNUT": Decimal("88.00"),
            "STOOL-PINE": unit_cost("STOOL-PINE"),
        }
        odd_prices = await tg_prices(odd["id"])
        assert odd_prices["LAMP-BRASS"] == unit_cost("LAMP-BRASS")

    by_number = {link.po_number: link for link in links}
    assert any(
        "SHELF-WALNUT" in n and "average cost is 0" in n for n in by_number[numbers[1]].notes
    )
    assert any("created Katana product" in n for n in by_number[numbers[1]].notes)
    odd_notes = " ".join(by_number[numbers[2]].notes)
    assert "EUR differs from Katana's base currency USD" in odd_notes
    assert "landed cost 12.5 left out" in odd_notes
    assert "Shipping" in odd_notes
    assert sims.katana_contract.checked, "no Katana traffic went through the validator"


async def test_a_receipt_of_a_po_the_polls_saw_unchanged_reads_no_po(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(tmp_path / "syncd.db") as daemon, sims.factory():
        po = await sims.create_po()
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("received"))
        effects = daemon.dispatcher.effects
    _, tg_counts = await sims.counters()
    assert isinstance(effects, Effects) and effects.unread_receipts == 1
    # Its receipt read no PO (a poll between its PUT and its receive may read it: drift
    # of syncd's own write, not noted).
    assert (effects.purchase_orders.reads, effects.purchase_orders.served) == (0, 0)
    assert tg_counts["receipts_per_po"] == {str(po["id"]): 1}
    assert link.lines and all(line.cost_before == line.price for line in link.lines)


async def test_history_is_not_imported_and_a_second_run_changes_nothing(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    before = await sims.create_po(
        [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "150.00"}]
    )
    await anyio.sleep(0.05)
    async with sims.daemon(database) as daemon, sims.factory():
        await anyio.sleep(0.05)
        after = await sims.create_po(
            [{"sku": "STOOL-PINE", "name": "Pine stool", "quantity": "2", "price": "30.00"}]
        )
        daemon.poll_now()
        await wait_for(daemon, [after["order_number"]], is_state("received"))
        transitions = len(await daemon.store.recent_transitions(1000))
        assert await daemon.store.link_by_po(before["id"]) is None
    counts_first = await sims.counters()

    # A second run over the same database and the same orders: nothing new happens.
    async with sims.daemon(database) as daemon:
        for _ in range(5):
            daemon.poll_now()
            await anyio.sleep(0.15)
        assert len(await daemon.store.recent_transitions(1000)) == transitions
        assert await daemon.store.link_by_po(before["id"]) is None
        backlog, _ = await daemon.store.inbox_backlog()
        assert backlog == 0
    katana_counts, tg_counts = await sims.counters()
    assert katana_counts["sales_orders_by_order_no"] == {f"TG-{after['order_number']}": 1}
    assert tg_counts["receipts_per_po"] == {str(after["id"]): 1}
    assert katana_counts["sales_orders_created"] == counts_first[0]["sales_orders_created"]
    assert tg_counts["receipts"] == counts_first[1]["receipts"]


async def test_null_average_cost_keeps_the_price(sims: Sims, tmp_path: Path) -> None:
    async with sims.daemon(tmp_path / "syncd.db") as daemon:
        po = await sims.create_po(
            [{"sku": "LAMP-BRASS", "name": "Brass lamp", "quantity": "1", "price": "70.00"}]
        )
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("imported"))
        assert link.so_id is not None
        # Katana has no inventory record for the variant at all: its cost is null.
        lamp = link.lines[0].katana_variant_id
        for key in [k for k in sims.katana_world.stock if k[0] == lamp]:
            del sims.katana_world.stock[key]
        response = await sims.control.post(
            f"{sims.katana_url}/_sim/sales_orders/{link.so_id}/deliver"
        )
        assert response.status_code == 200, response.text
        for key in [k for k in sims.katana_world.stock if k[0] == lamp]:
            del sims.katana_world.stock[key]
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("received"))
    assert any("average cost is null" in note for note in link.notes), link.notes
    async with TradeGeckoClient(sims.tradegecko_url, TRADEGECKO_TOKEN) as tradegecko:
        _, lines = await tradegecko.get_purchase_order(po["id"])
    assert [line.price for line in lines] == [Decimal("70.00")]


async def test_a_line_without_sku_needs_attention(sims: Sims, tmp_path: Path) -> None:
    async with sims.daemon(tmp_path / "syncd.db") as daemon:
        po = await sims.create_po([{"sku": None, "name": "Mystery", "quantity": "1", "price": "5"}])
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("needs_attention"))
    assert link.reason is not None and "cannot match without a SKU" in link.reason
    assert link.resume_state == "discovered"
    katana_counts, _ = await sims.counters()
    assert katana_counts["sales_orders_created"] == 0
