"""Make to order without a click (``katana.make_to_order = "auto"``), end to end on the
simulators: the daemon on a real SQLite file, Katana traffic checked against the OpenAPI
contract. The factory player only starts and finishes the manufacturing orders syncd made;
it never presses "Make to order" here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from conftest import Sims, running_sims
from syncd.config import Config
from syncd.domain.statechart import load_statechart
from syncd.runtime.daemon import Daemon
from syncd.sim.faults import FaultRule, Faults
from test_effects import settling
from test_flow import is_state, wait_for

pytestmark = pytest.mark.anyio

CHAIR = {"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"}
TABLE = {"sku": "TABLE-OAK", "name": "Oak table", "quantity": "1", "price": "520.00"}
#: Unknown to Katana: syncd creates the product, which has no recipe.
SHELF = {"sku": "SHELF-WALNUT", "name": "Walnut shelf", "quantity": "3", "price": "88.00"}

AUTO_PATH = [
    (None, "discovered", "po_discovered"),
    ("discovered", "making_to_order", "so_created"),
    ("making_to_order", "in_production", "production_ordered"),
    ("in_production", "delivered", "so_delivered"),
    ("delivered", "received", "po_received"),
]


def auto(config: Config, *, subassemblies: bool = False) -> Config:
    katana = msgspec.structs.replace(
        config.katana, make_to_order="auto", create_subassemblies=subassemblies
    )
    # factories={}: the default factory is made anew of these settings (it would win).
    return msgspec.structs.replace(config, katana=katana, factories={})


async def steps_of(daemon: Daemon, po_number: str, *, holding: set[str]) -> list[Any]:
    link = await daemon.store.link_by_po_number(po_number)
    assert link is not None
    history = await daemon.store.history(link.id)
    steps = [(h.from_state, h.to_state, h.trigger) for h in history]
    assert load_statechart(holding=holding).valid_path(steps), steps
    return steps


async def katana_state(sims: Sims) -> dict[str, Any]:
    state: dict[str, Any] = (await sims.control.get(f"{sims.katana_url}/_sim/state")).json()
    return state


async def rows_of(sims: Sims, order_no: str) -> list[dict[str, Any]]:
    (so,) = [s for s in (await katana_state(sims))["sales_orders"] if s["order_no"] == order_no]
    rows: list[dict[str, Any]] = so["sales_order_rows"]
    return rows


async def mos_per_row(sims: Sims) -> dict[str, int]:
    katana_counts, _ = await sims.counters()
    counts: dict[str, int] = katana_counts["manufacturing_orders_per_row"]
    return counts


async def test_auto_makes_one_mo_per_row_and_the_order_is_received(
    sims: Sims, tmp_path: Path
) -> None:
    config = auto(sims.config(tmp_path / "syncd.db"), subassemblies=True)
    async with sims.daemon(config) as daemon, sims.factory(make_to_order=False):
        po = await sims.create_po([CHAIR, TABLE])
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("received"))
        assert await steps_of(daemon, po["order_number"], holding={"make_to_order_auto"}) == (
            AUTO_PATH
        )
        rows = await rows_of(sims, f"TG-{po['order_number']}")
    assert len(rows) == 2
    assert await mos_per_row(sims) == {str(row["id"]): 1 for row in rows}
    assert all(row["linked_manufacturing_order_id"] is not None for row in rows)
    assert not [n for n in link.notes if "recipe" in n]


async def test_a_row_without_a_recipe_is_left_alone_and_noted(sims: Sims, tmp_path: Path) -> None:
    """The chair gets its MO; the shelf (a SKU syncd created: no recipe) none. Production
    is done when the chair's is, so the floor delivers (the shelf from stock)."""
    async with (
        sims.daemon(auto(sims.config(tmp_path / "syncd.db"))) as daemon,
        sims.factory(make_to_order=False),
    ):
        po = await sims.create_po([CHAIR, SHELF])
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("received"))
        assert await steps_of(daemon, po["order_number"], holding={"make_to_order_auto"}) == (
            AUTO_PATH
        )
        chair_row, shelf_row = await rows_of(sims, f"TG-{po['order_number']}")
    assert await mos_per_row(sims) == {str(chair_row["id"]): 1}
    assert shelf_row["linked_manufacturing_order_id"] is None
    (note,) = [n for n in link.notes if "has no recipe" in n]
    assert f"row {shelf_row['id']} (SHELF-WALNUT)" in note


async def test_nothing_to_make_waits_in_imported_for_a_person(sims: Sims, tmp_path: Path) -> None:
    """No row has a recipe: the order waits in imported, as in manual mode, until a person
    makes the goods or delivers them from stock."""
    async with (
        sims.daemon(auto(sims.config(tmp_path / "syncd.db"))) as daemon,
        sims.factory(make_to_order=False),
    ):
        po = await sims.create_po([SHELF])
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("imported"))
        assert any("has no recipe" in n for n in link.notes)
        await anyio.sleep(0.5)  # several polls and factory steps: nothing moves it
        assert (await daemon.store.get_link(link.id)).state == "imported"  # type: ignore[union-attr]
        assert await mos_per_row(sims) == {}
        assert link.so_id is not None
        delivered = await sims.control.post(
            f"{sims.katana_url}/_sim/sales_orders/{link.so_id}/deliver"
        )
        assert delivered.status_code == 200, delivered.text
        await wait_for(daemon, [po["order_number"]], is_state("received"))
        assert await steps_of(daemon, po["order_number"], holding={"make_to_order_auto"}) == [
            (None, "discovered", "po_discovered"),
            ("discovered", "making_to_order", "so_created"),
            ("making_to_order", "imported", "nothing_to_make"),
            ("imported", "delivered", "so_delivered"),
            ("delivered", "received", "po_received"),
        ]


async def test_manual_mode_makes_no_mo(sims: Sims, tmp_path: Path) -> None:
    """The default: syncd never presses the button; the order waits in imported until a
    person does, then goes on as before."""
    async with sims.daemon(sims.config(tmp_path / "syncd.db")) as daemon:
        po = await sims.create_po([CHAIR])
        daemon.poll_now()
        (link,) = await wait_for(daemon, [po["order_number"]], is_state("imported"))
        await anyio.sleep(0.5)
        assert await mos_per_row(sims) == {}
        assert (await daemon.store.get_link(link.id)).state == "imported"  # type: ignore[union-attr]
        # Production lasts 1 s: several polls see it (at the default 0.05 s a poll at 0.1 s,
        # stretched to 0.2 s while idle, could miss it and see the SO delivered at once).
        async with sims.factory(step_delay=1.0):
            await wait_for(daemon, [po["order_number"]], is_state("received"))
        steps = await steps_of(daemon, po["order_number"], holding=set())
    assert [s[1] for s in steps] == [
        "discovered",
        "imported",
        "in_production",
        "delivered",
        "received",
    ]
    assert len(await mos_per_row(sims)) == 1


async def test_a_dropped_answer_is_retried_without_a_second_mo(tmp_path: Path) -> None:
    """Katana makes the MO, then the connection drops before the answer: the retry reads
    the row's link and makes none again."""
    faults = Faults(
        rules=[
            FaultRule(
                path="/manufacturing_order_make_to_order",
                method="POST",
                drop_rate=1.0,
                after=True,
                times=1,
            )
        ]
    )
    async with running_sims(katana_faults=faults) as sims:
        # The dropped POST is uncertain: the retry waits katana.timeout + settle first.
        config = auto(settling(sims.config(tmp_path / "syncd.db")))
        async with sims.daemon(config) as daemon, sims.factory(make_to_order=False):
            po = await sims.create_po([CHAIR, TABLE])
            daemon.poll_now()
            await wait_for(daemon, [po["order_number"]], is_state("received"))
            rows = await rows_of(sims, f"TG-{po['order_number']}")
        katana_counts, _ = await sims.counters()
    assert katana_counts["faults_injected"] == {"drop_after": 1}
    assert katana_counts["manufacturing_orders_per_row"] == {str(row["id"]): 1 for row in rows}


async def test_a_refusal_for_a_row_that_got_its_mo_meanwhile_counts_it_made(
    tmp_path: Path,
) -> None:
    """Katana makes the MO but answers 422 (as the simulator does when a person pressed the
    button between syncd's read and its call): syncd reads the row again, finds it linked,
    goes on. The spec documents no 422 for this endpoint: that one answer is let through
    the contract check."""
    faults = Faults(
        rules=[
            FaultRule(
                path="/manufacturing_order_make_to_order",
                method="POST",
                error_rate=1.0,
                error_status=422,
                after=True,
                times=1,
            )
        ]
    )
    async with running_sims(katana_faults=faults) as sims:
        config = auto(sims.config(tmp_path / "syncd.db"))
        async with sims.daemon(config) as daemon, sims.factory(make_to_order=False):
            po = await sims.create_po([CHAIR])
            daemon.poll_now()
            (link,) = await wait_for(daemon, [po["order_number"]], is_state("received"))
            steps = await steps_of(daemon, po["order_number"], holding={"make_to_order_auto"})
            history = await daemon.store.history(link.id)
        katana_counts, _ = await sims.counters()
        (refusal,) = sims.katana_contract.violations
        assert refusal.startswith("makeToOrderManufacturingOrder: response 422"), refusal
        sims.katana_contract.violations.clear()
    assert steps == AUTO_PATH
    assert katana_counts["faults_injected"] == {"error_after": 1}
    assert list(katana_counts["manufacturing_orders_per_row"].values()) == [1]
    ordered = next(h for h in history if h.trigger == "production_ordered")
    assert "made 0 manufacturing orders" in ordered.cause and "1 already linked" in ordered.cause
