"""A shadow run (``daemon.mode = "shadow"``): both services read for real, nothing written
to either (the simulators' per-endpoint counters prove it), every write of each order's
effect kept as its plan (new customer and variants, the SO, the re-costed lines, the
receipt of an SO another integration made); ``syncctl adopt`` and a live run afterwards
do what the plan said, order by order."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from click.testing import CliRunner, Result

from conftest import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from syncd.adapters._http import PlannedRequest
from syncd.adapters.katana import KatanaClient, NewSalesOrder, NewSalesOrderRow
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.cli import syncctl
from syncd.config import Config, DaemonConfig, config_problems, shadow_database
from syncd.errors import ConfigError
from syncd.sim import katana as katana_sim
from syncd.store import PlannedWrite, Store
from test_flow import is_state, unit_cost, wait_for

pytestmark = pytest.mark.anyio

#: A: known SKUs; B: a SKU Katana lacks (a new product first). The customer is new too.
ORDERS = [
    [
        {"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"},
        {"sku": "TABLE-OAK", "name": "Oak table", "quantity": "1", "price": "520.00"},
    ],
    [{"sku": "SHELF-WALNUT", "name": "Walnut shelf", "quantity": "3", "price": "88.00"}],
]
#: C: a PO whose SO the integration the shadow run shadows (Zapier, say) makes itself.
OTHERS = [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "4", "price": "140.00"}]


def shadowed(config: Config) -> Config:
    """``config`` with ``mode = "shadow"``, as a config file would say it."""
    return msgspec.structs.replace(
        config, daemon=msgspec.structs.replace(config.daemon, mode="shadow")
    )


def writes(counts: dict[str, Any]) -> Counter[str]:
    """The writing requests among a simulator's per-endpoint counters (``{id}`` spelled as
    the client spells it)."""
    return Counter(
        {
            k.replace(":int}", "}"): v
            for k, v in counts["requests"].items()
            if not k.startswith(("GET ", "HEAD "))
        }
    )


def planned_writes(plans: list[PlannedWrite], service: str) -> Counter[str]:
    return Counter(f"{p.method} {p.endpoint}" for p in plans if p.service == service)


async def plans_for(
    store: Any, effects: dict[str, str], seconds: float = 30
) -> dict[str, list[PlannedWrite]]:
    """Each PO's plan once it holds ``effects[po]``'s writes, by PO number."""
    with anyio.fail_after(seconds):
        while True:
            by_po: dict[str, list[PlannedWrite]] = {}
            for plan in await store.plans():
                by_po.setdefault(plan.po_number, []).append(plan)
            if all(any(p.effect == e for p in by_po.get(n, [])) for n, e in effects.items()):
                return by_po
            await anyio.sleep(0.05)


async def syncctl_run(*args: str) -> Result:
    """``syncctl ARGS`` in a thread (it runs its own event loop)."""
    return await anyio.to_thread.run_sync(lambda: CliRunner().invoke(syncctl.main, list(args)))


def rows_of(body: dict[str, Any], skus: dict[int, str]) -> list[tuple[str, Decimal, Decimal]]:
    """An SO's rows as (SKU, quantity, price)."""
    return sorted(
        (
            skus[r["variant_id"]],
            Decimal(str(r["quantity"])),
            Decimal(str(r["price_per_unit"])),
        )
        for r in body["sales_order_rows"]
    )


async def test_a_shadow_run_plans_everything_writes_nothing_and_live_does_what_it_planned(
    sims: Sims, tmp_path: Path
) -> None:
    api = sims.katana_url + katana_sim.API_PREFIX
    katana_before, tradegecko_before = await sims.counters()
    live, shadow_db = tmp_path / "syncd.db", tmp_path / "syncd.shadow.db"
    async with sims.daemon(shadowed(sims.config(live))) as daemon, sims.factory():
        pos = [await sims.create_po(lines) for lines in ORDERS]
        # The other integration makes C's SO (by its order_no) before the PO is issued.
        other = await sims.create_po(OTHERS, status="draft")
        async with KatanaClient(api, KATANA_TOKEN) as katana:
            chair = (await katana.list_variants(skus=["CHAIR-OAK"]))[0]
            zapier = await katana.create_customer(name="Zapier")
            await katana.create_sales_order(
                NewSalesOrder(
                    customer_id=zapier.id,
                    order_no=f"TG-{other['order_number']}",
                    sales_order_rows=[
                        NewSalesOrderRow(
                            variant_id=chair.id, quantity=Decimal(4), price_per_unit=Decimal(140)
                        )
                    ],
                )
            )
        issued = await sims.control.patch(
            f"{sims.tradegecko_url}/_sim/purchase_orders/{other['id']}", json={"status": "active"}
        )
        assert issued.status_code == 200, issued.text
        numbers = [po["order_number"] for po in pos]
        daemon.poll_now()
        effects = {numbers[0]: "import_order", numbers[1]: "import_order"}
        effects[other["order_number"]] = "receive_order"
        plans = await plans_for(daemon.store, effects)
        # Decided as a live run would: A and B wait to be imported, C was followed to its
        # delivery and waits to be received.
        for number, effect in effects.items():
            link = await daemon.store.link_by_po_number(number)
            assert link is not None and link.last_error is None
            assert daemon.chart.state(link.state).effect == effect
        followed = await daemon.store.link_by_po_number(other["order_number"])
        assert followed is not None and followed.so_id is not None and followed.so_id > 0
        await anyio.sleep(0.5)  # more polls: the same plan, nothing written
        assert len(await daemon.store.plans()) == sum(len(p) for p in plans.values())
    katana_after, tradegecko_after = await sims.counters()
    # Zero writing requests from syncd: the only write is the other integration's.
    assert writes(katana_after) - writes(katana_before) == Counter(
        {"POST /customers": 1, "POST /sales_orders": 1}
    )
    assert writes(tradegecko_after) == writes(tradegecko_before) == Counter()
    assert any(k.startswith("GET ") for k in katana_after["requests"])  # it did read
    assert shadow_db.exists() and not live.exists()

    # A: the customer, then the SO with its rows and prices.
    a, b, c = (plans[n] for n in [*numbers, other["order_number"]])
    assert [(p.method, p.endpoint) for p in a] == [
        ("POST", "/customers"),
        ("POST", "/sales_orders"),
    ]
    customer_id = a[0].answer["id"]
    assert customer_id < 0 and a[1].body["customer_id"] == customer_id
    assert a[1].body["order_no"] == f"TG-{numbers[0]}"
    assert rows_of(a[1].body, {int(k): v for k, v in a[1].detail["skus"].items()}) == [
        ("CHAIR-OAK", Decimal(2), Decimal(150)),
        ("TABLE-OAK", Decimal(1), Decimal(520)),
    ]
    # B: the product for the new SKU, the customer, the SO naming its placeholder variant.
    assert [(p.method, p.endpoint) for p in b] == [
        ("POST", "/products"),
        ("POST", "/customers"),
        ("POST", "/sales_orders"),
    ]
    new_variant = b[0].answer["variants"][0]
    assert new_variant["sku"] == "SHELF-WALNUT" and new_variant["id"] < 0
    assert rows_of(b[2].body, {new_variant["id"]: "SHELF-WALNUT"}) == [
        ("SHELF-WALNUT", Decimal(3), Decimal(88))
    ]
    # A placeholder names no Katana variant: the SKU cache never keeps one.
    cache = await Store.open(str(shadow_db), readonly=True)
    try:
        cached = await cache.cached_variant_ids("katana", ["SHELF-WALNUT", "CHAIR-OAK"], since=0)
    finally:
        await cache.close()
    assert "SHELF-WALNUT" not in cached and all(i > 0 for i in cached.values()), cached
    # C: every line re-costed at Katana's average cost, then the receipt.
    assert [(p.method, p.endpoint) for p in c] == [
        ("PUT", "/purchase_order_line_items/{id}"),
        ("POST", "/purchase_orders/{id}/actions/receive"),
    ]
    price = c[0].body["purchase_order_line_item"]["price"]
    assert Decimal(price) == unit_cost("CHAIR-OAK")
    assert c[0].detail["sku"] == "CHAIR-OAK"
    assert Decimal(c[0].detail["before"]) == 140 and c[0].detail["after"] == price
    assert c[1].path == f"/purchase_orders/{other['id']}/actions/receive"

    # syncctl shows it, per order and in sum.
    shown = await syncctl_run("plan", "--db", str(shadow_db), "--json")
    assert shown.exit_code == 0, shown.output
    answer = json.loads(shown.output)
    assert [len(o["requests"]) for o in answer["orders"]] == [2, 3, 2]
    assert {k: v for k, v in answer["summary"].items() if v} == {
        "orders": 3,
        "customers": 2,
        "variants": 1,
        "sales_orders": 2,
        "recosted_lines": 1,
        "receipts": 1,
    }
    text = await syncctl_run("plan", "--db", str(shadow_db))
    assert "new variant SHELF-WALNUT: 3 at 88 USD" in text.output, text.output
    assert f"(CHAIR-OAK): 140 → {Decimal(price).normalize():f}" in text.output

    # Live now: adopt what the shadow run saw, then start (no factory: C's receipt and the
    # imports of A and B are all the plan foresaw).
    adopted = await syncctl_run("adopt", "--db", str(live), "--shadow-db", str(shadow_db), "--json")
    assert adopted.exit_code == 0, adopted.output
    report = json.loads(adopted.output)["factories"][0]
    assert [o["po_number"] for o in report["orders"]] == [other["order_number"]]
    assert report["left_to_import"] == 2
    async with sims.daemon(live) as daemon:
        daemon.poll_now()
        links = await wait_for(daemon, numbers, lambda link: link.so_id is not None)
        (received,) = await wait_for(daemon, [other["order_number"]], is_state("received"))
        history = await daemon.store.history(received.id)
        assert daemon.chart.valid_path([(h.from_state, h.to_state, h.trigger) for h in history])
        assert received.so_id == followed.so_id
    katana_live, tradegecko_live = await sims.counters()
    every = [p for ps in plans.values() for p in ps]
    # Exactly the plan's writes; the customer each plan needed is made once.
    assert writes(katana_live) - writes(katana_after) == planned_writes(every, "katana") - Counter(
        {"POST /customers": 1}
    )
    assert writes(tradegecko_live) - writes(tradegecko_after) == planned_writes(every, "tradegecko")
    assert tradegecko_live["receipts_per_po"] == {str(other["id"]): 1}
    async with (
        KatanaClient(api, KATANA_TOKEN) as katana,
        TradeGeckoClient(sims.tradegecko_url, TRADEGECKO_TOKEN) as tradegecko,
    ):
        (customer,) = await katana.list_customers(name=a[0].body["name"])
        for link, plan in zip(links, (a[-1], b[-1]), strict=True):
            so = await katana.get_sales_order(link.so_id or 0)
            assert (so.order_no, so.customer_id) == (plan.body["order_no"], customer.id)
            skus = {
                v.id: v.sku or ""
                for v in await katana.list_variants(skus=[line.sku for line in link.lines])
            }
            made = sorted(
                (skus[r.variant_id], r.quantity, r.price_per_unit or Decimal(0))
                for r in so.sales_order_rows
            )
            planned_skus = {int(k): v for k, v in plan.detail["skus"].items()}
            assert made == rows_of(plan.body, planned_skus)
        po, lines = await tradegecko.get_purchase_order(other["id"])
        assert po.status == "received"
        assert [line.price for line in lines] == [unit_cost("CHAIR-OAK")]


async def test_a_po_the_other_integration_receives_leaves_no_plan(
    sims: Sims, tmp_path: Path
) -> None:
    api = sims.katana_url + katana_sim.API_PREFIX
    shadow_db = tmp_path / "syncd.shadow.db"
    async with sims.daemon(shadowed(sims.config(tmp_path / "syncd.db"))) as daemon:
        other = await sims.create_po(OTHERS, status="draft")
        async with KatanaClient(api, KATANA_TOKEN) as katana:
            chair = (await katana.list_variants(skus=["CHAIR-OAK"]))[0]
            zapier = await katana.create_customer(name="Zapier")
            row = NewSalesOrderRow(variant_id=chair.id, quantity=Decimal(4))
            await katana.create_sales_order(
                NewSalesOrder(
                    customer_id=zapier.id,
                    order_no=f"TG-{other['order_number']}",
                    sales_order_rows=[row],
                )
            )
        po_url = f"{sims.tradegecko_url}/_sim/purchase_orders/{other['id']}"
        assert (await sims.control.patch(po_url, json={"status": "active"})).status_code == 200
        number = other["order_number"]
        async with sims.factory():
            daemon.poll_now()
            await plans_for(daemon.store, {number: "receive_order"})
    # Zapier receives it before syncd would. A linked PO's receipt moves nothing by itself:
    # the receive effect, run again (here at the next start), finds it received.
    assert (await sims.control.patch(po_url, json={"status": "received"})).status_code == 200
    async with sims.daemon(shadowed(sims.config(tmp_path / "syncd.db"))) as daemon:
        (link,) = await wait_for(daemon, [number], is_state("received"))
        assert await daemon.store.plans(number) == []
        last = (await daemon.store.history(link.id))[-1]
        assert last.cause == f"PO {number} is received in TradeGecko"
    _, tradegecko = await sims.counters()
    assert writes(tradegecko) == Counter()
    shown = await syncctl_run("plan", number, "--db", str(shadow_db))
    assert shown.exit_code == 5
    assert "(its order is received: nothing to send)" in shown.output


async def test_an_order_withdrawn_while_planned_loses_its_plan(sims: Sims, tmp_path: Path) -> None:
    async with sims.daemon(shadowed(sims.config(tmp_path / "syncd.db"))) as daemon:
        po = await sims.create_po(ORDERS[0])
        daemon.poll_now()
        await plans_for(daemon.store, {po["order_number"]: "import_order"})
        voided = await sims.control.patch(
            f"{sims.tradegecko_url}/_sim/purchase_orders/{po['id']}", json={"status": "void"}
        )
        assert voided.status_code == 200, voided.text
        daemon.poll_now()
        await wait_for(daemon, [po["order_number"]], is_state("cancelled"))
        assert await daemon.store.plans() == []


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
        product = PlannedRequest(
            "katana",
            "POST",
            "/products",
            "/products",
            {"name": "SHELF", "variants": [{"sku": "SHELF"}]},
            {"id": -1, "name": "SHELF", "variants": [{"id": -2, "sku": "SHELF"}]},
        )
        order = PlannedRequest(
            "katana",
            "POST",
            "/sales_orders",
            "/sales_orders",
            {
                "order_no": "TG-PO0007",
                "customer_id": 4,
                "sales_order_rows": [
                    {"variant_id": 3, "quantity": "2", "price_per_unit": "150.00"},
                    {"variant_id": -2, "quantity": "1", "price_per_unit": "80.00"},
                ],
            },
            {"id": -3},
            {"skus": {"3": "CHAIR", "-2": "SHELF"}},
        )
        await store.record_plan(7, "PO0007", "import_order", [product])
        await store.record_plan(7, "PO0007", "import_order", [product, order])  # replaced
    finally:
        await store.close()


def test_syncctl_plan_shows_each_order_and_the_sum(tmp_path: Path) -> None:
    database = tmp_path / "syncd.shadow.db"
    anyio.run(record_one_plan, database)
    runner = CliRunner()
    shown = runner.invoke(syncctl.main, ["plan", "--db", str(database), "--json"])
    assert shown.exit_code == 0, shown.output
    answer = json.loads(shown.output)
    summary = answer["summary"]
    assert (summary["orders"], summary["variants"], summary["sales_orders"]) == (1, 1, 1)
    (order,) = answer["orders"]
    assert [r["kind"] for r in order["requests"]] == ["variants", "sales_orders"]
    assert order["requests"][1]["body"]["order_no"] == "TG-PO0007"
    text = runner.invoke(syncctl.main, ["plan", "PO0007", "--db", str(database)])
    assert text.exit_code == 0, text.output
    assert "create product 'SHELF' with variant SHELF" in text.output
    assert "CHAIR (variant 3): 2 at 150" in text.output
    assert "new variant SHELF: 1 at 80" in text.output
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
    # PO0001: the customer, its SO; PO0002: a product for its new SKU, the customer, its SO.
    assert summary["planned_writes"] == 5
    assert "create SO TG-PO0001 for the new customer" in result.stderr
    assert "new variant SHELF-WALNUT: 1 at 88 USD" in result.stderr
    shadow = tmp_path / "demo.shadow.db"
    assert shadow.exists() and not db.exists()
    shown = CliRunner().invoke(syncctl.main, ["plan", "--db", str(shadow), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["summary"]["orders"] == 2


async def shadow_with_a_followed_order(database: Path) -> None:
    from syncd.domain.statechart import load_statechart
    from test_store import snapshot

    chart = load_statechart()
    store = await Store.open(str(database))
    try:
        await store.set_meta("activated_at", "2026-12-01T10:00:00+00:00")
        for po_id in (1, 2):
            link = await store.create_link(
                snapshot(po_id, f"PO{po_id}"),
                state=chart.initial,
                trigger="po_discovered",
                cause="seen",
                event_id=None,
            )
            assert link is not None
            if po_id == 1:
                decision = chart.decide(link.state, "so_created")
                assert decision is not None
                await store.apply(link, decision, cause="found", so_id=90, so_number="SO-90")
    finally:
        await store.close()


async def test_adopt_copies_the_followed_orders_and_the_activation_and_refuses_twice(
    tmp_path: Path,
) -> None:
    shadow, live = tmp_path / "syncd.shadow.db", tmp_path / "syncd.db"
    await shadow_with_a_followed_order(shadow)
    args = ("adopt", "--db", str(live), "--shadow-db", str(shadow))
    done = await syncctl_run(*args)
    assert done.exit_code == 0, done.output
    assert "adopted 1 order (PO1); 1 planned order left for the live run to import" in done.output
    store = await Store.open(str(live))
    try:
        assert await store.get_meta("activated_at") == "2026-12-01T10:00:00+00:00"
        link = await store.link_by_po_number("PO1")
        assert link is not None and link.so_id == 90
        assert [h.trigger for h in await store.history(link.id)] == ["po_discovered", "so_created"]
        assert await store.link_by_po_number("PO2") is None
    finally:
        await store.close()
    again = await syncctl_run(*args)
    assert again.exit_code == syncctl.EXIT_IN_USE == 9
    assert "the live database already has orders (factory default); nothing adopted" in again.output


async def test_adopt_refuses_a_live_database_a_daemon_has_open(tmp_path: Path) -> None:
    shadow, live = tmp_path / "syncd.shadow.db", tmp_path / "syncd.db"
    await shadow_with_a_followed_order(shadow)
    held = await Store.open(str(live), exclusive=True)
    try:
        refused = await syncctl_run("adopt", "--db", str(live), "--shadow-db", str(shadow))
    finally:
        await held.close()
    assert refused.exit_code == 9 and "a daemon runs on the live database" in refused.output
    missing = await syncctl_run(
        "adopt", "--db", str(live), "--shadow-db", str(tmp_path / "none.db")
    )
    assert missing.exit_code == 3 and "shadow database not found" in missing.output
    # Without --shadow-db: the live database's name with .shadow before its suffix.
    beside = await syncctl_run("adopt", "--db", str(tmp_path / "other.db"))
    assert beside.exit_code == 3
    assert f"shadow database not found: {tmp_path / 'other.shadow.db'}" in beside.output
