"""A shadow run (``daemon.mode = "shadow"``): both services read for real, nothing written
to either (the simulators' per-endpoint counters prove it), each order's withheld write
kept as its plan; a live run afterwards does what the plan said, order by order."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from click.testing import CliRunner

from conftest import KATANA_TOKEN, Sims
from syncd.adapters.katana import KatanaClient
from syncd.cli import syncctl
from syncd.config import Config, DaemonConfig, config_problems, shadow_database
from syncd.errors import ConfigError
from syncd.sim import katana as katana_sim
from syncd.store import PlannedWrite, Store
from test_flow import wait_for

pytestmark = pytest.mark.anyio

#: Known SKUs only: the first write of each import is then the SO itself.
ORDERS = [
    [
        {"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"},
        {"sku": "TABLE-OAK", "name": "Oak table", "quantity": "1", "price": "520.00"},
    ],
    [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "5", "price": "140.00"}],
]


def shadowed(config: Config) -> Config:
    """``config`` with ``mode = "shadow"``, as a config file would say it."""
    return msgspec.structs.replace(
        config, daemon=msgspec.structs.replace(config.daemon, mode="shadow")
    )


def writes(counts: dict[str, Any]) -> dict[str, int]:
    """The writing requests among a simulator's per-endpoint counters."""
    return {k: v for k, v in counts["requests"].items() if not k.startswith(("GET ", "HEAD "))}


async def plans_for(store: Any, numbers: list[str], seconds: float = 20) -> list[PlannedWrite]:
    with anyio.fail_after(seconds):
        while True:
            plans = await store.plans()
            if {p.po_number for p in plans} >= set(numbers):
                return list(plans)
            await anyio.sleep(0.05)


def rows_of(body: dict[str, Any]) -> list[tuple[int, Decimal, Decimal]]:
    return sorted(
        (r["variant_id"], Decimal(str(r["quantity"])), Decimal(str(r["price_per_unit"])))
        for r in body["sales_order_rows"]
    )


async def test_shadow_run_writes_nothing_and_a_live_run_does_what_it_planned(
    sims: Sims, tmp_path: Path
) -> None:
    async with KatanaClient(sims.katana_url + katana_sim.API_PREFIX, KATANA_TOKEN) as katana:
        # The customer exists (as after a native integration): the SO is each order's
        # first write, so the plan holds its rows and prices.
        customer = await katana.create_customer(name="Tradegecko", reference_id="syncd-tradegecko")
    katana_before, tradegecko_before = await sims.counters()

    live = tmp_path / "syncd.db"
    async with sims.daemon(shadowed(sims.config(live))) as daemon:
        pos = [await sims.create_po(lines) for lines in ORDERS]
        numbers = [po["order_number"] for po in pos]
        activated = await daemon.store.get_meta("activated_at")
        daemon.poll_now()
        plans = await plans_for(daemon.store, numbers)
        # Decided as a live run would, and waiting in the effect's state, not retrying.
        for number in numbers:
            link = await daemon.store.link_by_po_number(number)
            assert link is not None and link.last_error is None
            assert daemon.chart.state(link.state).effect == "import_order"
        await anyio.sleep(0.5)  # more polls: still nothing written
        assert await daemon.store.plans() == plans

    katana_after, tradegecko_after = await sims.counters()
    assert writes(katana_after) == writes(katana_before)
    assert writes(tradegecko_after) == writes(tradegecko_before) == {}
    assert katana_after["sales_orders_created"] == 0
    assert any(k.startswith("GET ") for k in katana_after["requests"])  # it did read
    # Its state is its own: the live database was never made.
    assert (tmp_path / "syncd.shadow.db").exists() and not live.exists()

    planned = {p.po_number: p for p in plans}
    assert set(planned) == set(numbers)
    for number in numbers:
        plan = planned[number]
        assert (plan.effect, plan.service, plan.method, plan.endpoint) == (
            "import_order",
            "katana",
            "POST",
            "/sales_orders",
        )
        assert plan.body["order_no"] == f"TG-{number}"
        assert plan.body["customer_id"] == customer.id
    assert [sorted((q, p) for _, q, p in rows_of(planned[n].body)) for n in numbers] == [
        [(Decimal(1), Decimal(520)), (Decimal(2), Decimal(150))],
        [(Decimal(5), Decimal(140))],
    ]

    # Live now, from a clean database that adopts only when the shadow run began (else the
    # POs it saw, raised before the live run's start, would be left to a person).
    store = await Store.open(str(live))
    try:
        assert activated is not None
        await store.set_meta("activated_at", activated)
    finally:
        await store.close()
    async with sims.daemon(live) as daemon:
        daemon.poll_now()
        links = await wait_for(daemon, numbers, lambda link: link.so_id is not None)
    async with KatanaClient(sims.katana_url + katana_sim.API_PREFIX, KATANA_TOKEN) as katana:
        for link in links:
            so = await katana.get_sales_order(link.so_id or 0)
            plan = planned[link.po_number].body
            assert (so.order_no, so.customer_id) == (plan["order_no"], plan["customer_id"])
            made = sorted(
                (r.variant_id, r.quantity, r.price_per_unit or Decimal(0))
                for r in so.sales_order_rows
            )
            assert made == rows_of(plan)
    katana_live, _ = await sims.counters()
    assert katana_live["sales_orders_created"] == len(numbers)
    assert katana_live["customers_created"] == 1  # the one made above: none by syncd


def test_shadow_database_sits_beside_the_live_one() -> None:
    assert shadow_database(DaemonConfig(database="/var/lib/syncd/syncd.db")) == (
        "/var/lib/syncd/syncd.shadow.db"
    )
    assert shadow_database(DaemonConfig(database="/x/y.db", shadow_database="/z/s.db")) == (
        "/z/s.db"
    )
    shadow = Config(daemon=DaemonConfig(database="/x/y.db")).as_shadow()
    assert (shadow.shadow, shadow.daemon.database, shadow.webhooks.register) == (
        True,
        "/x/y.shadow.db",
        False,
    )
    assert shadow.as_shadow().daemon.database == "/x/y.shadow.db"  # once, not twice


def test_shadow_on_postgresql_needs_its_own_database() -> None:
    daemon = DaemonConfig(database="postgresql://syncd@db/syncd", mode="shadow")
    with pytest.raises(ConfigError, match=r"daemon\.shadow_database"):
        shadow_database(daemon)
    problems = config_problems(Config(daemon=daemon), require_tokens=False)
    assert any(p.key == "daemon.shadow_database" for p in problems)


def test_an_unknown_mode_is_refused() -> None:
    problems = config_problems(Config(daemon=DaemonConfig(mode="dry")), require_tokens=False)
    assert [str(p) for p in problems if p.key == "daemon.mode"] == [
        "daemon.mode: must be one of ['live', 'shadow'], got 'dry'"
    ]


async def record_one_plan(database: Path) -> None:
    store = await Store.open(str(database))
    try:
        await store.record_plan(
            7,
            "PO0007",
            "import_order",
            service="katana",
            method="POST",
            endpoint="/sales_orders",
            path="/sales_orders",
            body={
                "order_no": "TG-PO0007",
                "sales_order_rows": [
                    {"variant_id": 3, "quantity": "2", "price_per_unit": "150.00"}
                ],
            },
        )
    finally:
        await store.close()


def test_syncctl_plan_shows_each_order_and_the_sum(tmp_path: Path) -> None:
    database = tmp_path / "syncd.shadow.db"
    anyio.run(record_one_plan, database)
    runner = CliRunner()
    shown = runner.invoke(syncctl.main, ["plan", "--db", str(database), "--json"])
    assert shown.exit_code == 0, shown.output
    answer = json.loads(shown.output)
    assert answer["summary"]["orders"] == 1 and answer["summary"]["sales_orders"] == 1
    assert answer["orders"][0]["body"]["order_no"] == "TG-PO0007"
    text = runner.invoke(syncctl.main, ["plan", "PO0007", "--db", str(database)])
    assert text.exit_code == 0 and "variant 3: 2 at 150.00" in text.output, text.output
    missing = runner.invoke(syncctl.main, ["plan", "PO9999", "--db", str(database)])
    assert missing.exit_code == 5 and "no plan for PO PO9999" in missing.output


def test_the_demo_in_shadow_writes_nothing_and_shows_the_plan(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "syncd"), "demo", "--shadow", "--orders", "2", "--json", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["sales_orders_created"], summary["receipts"]) == (0, 0)
    assert summary["planned_writes"] == 2
    assert "PO0001: would POST katana" in result.stderr
    shadow = tmp_path / "demo.shadow.db"
    assert shadow.exists() and not db.exists()
    shown = CliRunner().invoke(syncctl.main, ["plan", "--db", str(shadow), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["summary"]["orders"] == 2
