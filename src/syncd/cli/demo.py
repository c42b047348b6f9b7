"""``syncd demo``: the whole flow on the simulators, on a machine with no account.

Starts both simulators (unless pointed at running ones), the daemon, and the factory player;
creates purchase orders in TradeGecko for the supplier "Katana"; shows each order move as it
happens; ends with a summary of this run's orders. Exit status 0 only when every order is
received; 130 when interrupted (Ctrl-C). A ``--db`` left by an earlier run is moved to
``<db>.previous`` first: the demo's own simulators start empty and would number this run's
orders like the earlier ones.
"""

from __future__ import annotations

import math
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx
import msgspec

from syncd.config import (
    Config,
    DaemonConfig,
    KatanaConfig,
    MetricsConfig,
    TradeGeckoConfig,
    WebhooksConfig,
)
from syncd.domain import triggers
from syncd.domain.statechart import Statechart, load_statechart
from syncd.errors import StoreError
from syncd.ops.asgi import bind_socket
from syncd.runtime.daemon import running_daemon
from syncd.runtime.effects import RECEIVE_ORDER
from syncd.runtime.observer import Observer, TransitionNotice
from syncd.sim import tradegecko as tradegecko_sim
from syncd.sim.factory import play_factory
from syncd.store import Store, ensure_not_in_use

__all__ = [
    "KATANA_TOKEN",
    "TRADEGECKO_TOKEN",
    "DemoOptions",
    "DemoSummary",
    "LineSummary",
    "OrderSummary",
    "render_summary",
    "run_demo",
]

KATANA_TOKEN = "katana-sim-token"
TRADEGECKO_TOKEN = "tradegecko-sim-token"

#: What the workshop orders: (sku, name, item cost). The last SKU is unknown to Katana, so
#: syncd creates it; having no recipe, its average cost stays 0 and the PO keeps its price.
_ITEMS: tuple[tuple[str, str, Decimal], ...] = (
    ("CHAIR-OAK", "Oak chair", Decimal("150.00")),
    ("TABLE-OAK", "Oak table", Decimal("520.00")),
    ("STOOL-PINE", "Pine stool", Decimal("30.00")),
    ("LAMP-BRASS", "Brass lamp", Decimal("70.00")),
    ("SHELF-WALNUT", "Walnut shelf", Decimal("88.00")),
)


class DemoOptions(msgspec.Struct, kw_only=True):
    orders: int = 5
    db: str | None = None
    katana_url: str | None = None
    tradegecko_url: str | None = None
    katana_sim_url: str | None = None
    tradegecko_sim_url: str | None = None
    timeout: float = 60.0
    poll_interval: float = 0.2
    factory_delay: float = 0.2
    #: Webhooks from the simulators; the pollers then only reconcile.
    webhooks: bool = False
    reconcile_interval: float = 5.0
    #: ``katana.make_to_order``: with ``auto`` syncd makes the manufacturing orders and the
    #: factory player only starts and finishes them.
    make_to_order: str = "manual"
    #: A shadow run (``daemon.mode = "shadow"``): nothing written, each order's plan shown.
    shadow: bool = False


class LineSummary(msgspec.Struct, kw_only=True):
    sku: str
    quantity: str
    cost_before: str | None
    cost_after: str | None


class OrderSummary(msgspec.Struct, kw_only=True):
    po_number: str
    so_number: str | None
    state: str
    reason: str | None
    lines: list[LineSummary]
    notes: list[str]


class DemoSummary(msgspec.Struct, kw_only=True):
    orders: int
    received: int
    sales_orders_created: int
    receipts: int
    elapsed_s: float
    database: str
    order_details: list[OrderSummary]
    #: PO created in TradeGecko → SO created in Katana, over the orders (seconds).
    import_latency_p50_s: float | None = None
    import_latency_p99_s: float | None = None
    #: Stopped by SIGINT or SIGTERM (Ctrl-C) before every order settled.
    interrupted: bool = False
    #: A shadow run: the writes it withheld (each order's plan; ``syncctl plan``).
    planned_writes: int | None = None


def _lines_for(index: int) -> list[dict[str, Any]]:
    first = _ITEMS[index % 4]
    lines = [
        {"sku": first[0], "name": first[1], "quantity": str(1 + index % 3), "price": str(first[2])}
    ]
    if index % 2 == 0:
        second = _ITEMS[(index + 1) % 4]
        lines.append(
            {"sku": second[0], "name": second[1], "quantity": "2", "price": str(second[2])}
        )
    if index == 1:
        extra = _ITEMS[4]
        lines.append({"sku": extra[0], "name": extra[1], "quantity": "1", "price": str(extra[2])})
    return lines


@asynccontextmanager
async def _simulators(options: DemoOptions) -> AsyncIterator[tuple[str, str, str, str]]:
    from syncd.sim import KATANA_API_PREFIX, running_simulators

    if options.katana_url is not None and options.tradegecko_url is not None:
        yield (
            options.katana_url,
            options.tradegecko_url,
            options.katana_sim_url or options.katana_url.removesuffix(KATANA_API_PREFIX),
            options.tradegecko_sim_url or options.tradegecko_url,
        )
        return
    # A service not given by URL is the built-in simulator (the other one then idles).
    async with running_simulators(
        katana_token=KATANA_TOKEN, tradegecko_token=TRADEGECKO_TOKEN, webhooks=True
    ) as sims:
        katana_url = options.katana_url or sims.katana_api_url
        katana_ctl = (
            sims.katana_url
            if options.katana_url is None
            else options.katana_sim_url or options.katana_url.removesuffix(KATANA_API_PREFIX)
        )
        tradegecko_url = options.tradegecko_url or sims.tradegecko_url
        tradegecko_ctl = (
            sims.tradegecko_url
            if options.tradegecko_url is None
            else options.tradegecko_sim_url or options.tradegecko_url
        )
        yield katana_url, tradegecko_url, katana_ctl, tradegecko_ctl


class _LiveView(Observer):
    """The demo's live view: a line per transition as it happens, and when each order's SO
    was made (for the summary's import latency)."""

    def __init__(self, out: TextIO, started: float) -> None:
        self.out = out
        self.started = started
        #: PO number → when its Katana SO was made (Unix time).
        self.imported_at: dict[str, float] = {}

    def transitioned(self, notice: TransitionNotice) -> None:
        if notice.trigger == triggers.SO_CREATED:
            self.imported_at.setdefault(notice.link.po_number, time.time())
        source = notice.source or "·"
        print(
            f"{time.monotonic() - self.started:6.2f}s  {notice.link.po_number:<10} "
            f"{source:>15} → {notice.dest:<15} {notice.cause}",
            file=self.out,
            flush=True,
        )


async def run_demo(options: DemoOptions, *, out: TextIO | None = None) -> DemoSummary:
    """Run the whole flow for ``options.orders`` purchase orders and summarise it.

    SIGINT or SIGTERM (Ctrl-C) stops the wait for the orders: the summary then says how far
    they got, with ``interrupted`` set. Before that (while starting) nothing is summarised.
    """
    out = out or sys.stdout
    interrupt = _Interrupt()
    summary: DemoSummary | None = None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                async for _ in signals:
                    interrupt.happened = True
                    print("interrupted: stopping", file=out, flush=True)
                    if interrupt.wait is not None:
                        interrupt.wait.cancel()  # summarise what happened so far
                    else:
                        tg.cancel_scope.cancel()
                    return

            async def demo() -> None:
                nonlocal summary
                summary = await _run_demo(options, out, interrupt)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            tg.start_soon(demo)
    if summary is None:
        return DemoSummary(
            orders=0,
            received=0,
            sales_orders_created=0,
            receipts=0,
            elapsed_s=0.0,
            database=options.db or "(temporary)",
            order_details=[],
            interrupted=True,
        )
    summary.interrupted = interrupt.happened
    return summary


class _Interrupt:
    """Whether a signal came, and the wait it ends (``None`` before the wait began)."""

    def __init__(self) -> None:
        self.happened = False
        self.wait: anyio.CancelScope | None = None


#: The meta key the demo stamps on its database: the only kind it moves out of the way.
_MADE_BY = ("made_by", "syncd demo")


def _made_by_demo(path: Path) -> bool:
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (_MADE_BY[0],)).fetchone()
    except sqlite3.Error:
        return False  # not SQLite, or not syncd's
    return row is not None and row[0] == _MADE_BY[1]


def _set_aside(database: str, out: TextIO) -> None:
    """Move an earlier run's database (and its WAL files) to ``<database>.previous``.

    The demo's simulators start empty every run and number their orders from 1 again: the
    earlier orders would collide with this run's and be reported as its own. Only a database
    an earlier demo made, and no daemon holds, is moved: anything else at the path is refused.

    :raises StoreError: the path holds something else, or a running syncd uses it.
    """
    path = Path(database)
    if not path.exists():
        return
    ensure_not_in_use(database)
    if not path.is_file() or not _made_by_demo(path):
        raise StoreError(
            f"--db {database} holds something an earlier demo did not make; the demo only "
            "replaces its own databases: give another path"
        )
    previous = Path(f"{database}.previous")
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{path}{suffix}")
        target = Path(f"{previous}{suffix}")
        target.unlink(missing_ok=True)
        if old.exists():
            old.rename(target)
    print(f"moved the previous run's database to {previous}", file=out)


async def _run_demo(options: DemoOptions, out: TextIO, interrupt: _Interrupt) -> DemoSummary:
    katana_config = KatanaConfig(make_to_order=options.make_to_order)
    chart = load_statechart(holding=Config(katana=katana_config).statechart_conditions())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="syncd-demo-") as scratch:
        database = options.db or str(Path(scratch) / "demo.db")
        if options.db:
            _set_aside(options.db, out)
        print("starting the simulators and the daemon", file=out, flush=True)
        async with _simulators(options) as (katana_url, tradegecko_url, katana_ctl, tg_ctl):
            hooks = WebhooksConfig()
            if options.webhooks:
                # Katana sends only to https: the simulators deliver https over plain http,
                # as to a TLS proxy, so the public address is https on the listener's port.
                probe = bind_socket()
                port = probe.getsockname()[1]
                probe.close()
                hooks = WebhooksConfig(
                    enabled=True,
                    listen=f"127.0.0.1:{port}",
                    public_base_url=f"https://127.0.0.1:{port}",
                    tradegecko_secret=tradegecko_sim.DEFAULT_WEBHOOK_SECRET,
                    reconcile_interval=options.reconcile_interval,
                )
            config = Config(
                daemon=DaemonConfig(
                    database=database,
                    retry_initial=0.5,
                    retry_max=5.0,
                    mode="shadow" if options.shadow else "live",
                ),
                # Any free port: a demo must not collide with a real daemon's endpoint.
                metrics=MetricsConfig(listen="127.0.0.1:0"),
                webhooks=hooks,
                tradegecko=TradeGeckoConfig(
                    base_url=tradegecko_url,
                    token=TRADEGECKO_TOKEN,
                    poll_interval=options.poll_interval,
                    # The simulators' limits are off for the demo; so is the daemon's budget.
                    rate_limit=100_000,
                ),
                katana=msgspec.structs.replace(
                    katana_config,
                    base_url=katana_url,
                    token=KATANA_TOKEN,
                    poll_interval=options.poll_interval,
                    rate_limit=100_000,
                ),
            )
            view = _LiveView(out, started)
            imported_at = view.imported_at

            async with (
                httpx.AsyncClient(timeout=10) as control,
                running_daemon(config, chart=chart, observer=view) as daemon,
            ):
                await daemon.store.set_meta(*_MADE_BY)
                if daemon.metrics_url is not None:
                    print(f"status page: {daemon.metrics_url}/", file=out, flush=True)
                po_numbers: list[str] = []
                created_at: dict[str, float] = {}
                # Simulators the demo did not start may have counted earlier runs.
                katana_before, tg_before = await _counters(control, katana_ctl, tg_ctl)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        lambda: play_factory(
                            katana_ctl,
                            step_delay=options.factory_delay,
                            customer_name=None,
                            make_to_order=options.make_to_order != "auto",
                        )
                    )
                    for index in range(options.orders):
                        response = await control.post(
                            f"{tg_ctl}/_sim/purchase_orders",
                            json={
                                "supplier": "Katana",
                                "currency": "USD",
                                "lines": _lines_for(index),
                            },
                        )
                        response.raise_for_status()
                        po = response.json()["purchase_order"]
                        po_numbers.append(po["order_number"])
                        created_at[po["order_number"]] = datetime.fromisoformat(
                            po["created_at"]
                        ).timestamp()
                    print(f"created {len(po_numbers)} purchase orders in TradeGecko", file=out)
                    if not options.webhooks:
                        daemon.poll_now()
                    with anyio.CancelScope() as interrupt.wait:
                        if interrupt.happened:
                            interrupt.wait.cancel()
                        with anyio.move_on_after(options.timeout):
                            if options.shadow:
                                await _wait_until_planned(daemon.store, po_numbers, out)
                            else:
                                await _wait_until_settled(daemon.store, chart, po_numbers)
                                # The services' last deliveries (echoes of the receipts)
                                # are handled, not left waiting in the inbox.
                                await _wait_until_quiet(
                                    daemon.store,
                                    control,
                                    [katana_ctl, tg_ctl] if options.webhooks else [],
                                )
                    tg.cancel_scope.cancel()

                with anyio.CancelScope(shield=True):
                    katana_after, tg_after = await _counters(control, katana_ctl, tg_ctl)
                    planned = len(await daemon.store.plans()) if options.shadow else None
                latencies = sorted(
                    max(0.0, imported_at[n] - created_at[n])
                    for n in po_numbers
                    if n in imported_at and n in created_at
                )
                details: list[OrderSummary] = []
                received = 0
                # Where the receipt's outcome takes an order: no state name in the code.
                received_states = {
                    decision.dest
                    for state, effect in chart.effect_states().items()
                    if effect == RECEIVE_ORDER.name
                    and (decision := chart.decide(state, RECEIVE_ORDER.done)) is not None
                }
                for number in po_numbers:
                    link = await daemon.store.link_by_po_number(number)
                    if link is None:
                        details.append(
                            OrderSummary(
                                po_number=number,
                                so_number=None,
                                state="not seen",
                                reason=None,
                                lines=[],
                                notes=[],
                            )
                        )
                        continue
                    received += link.state in received_states
                    details.append(
                        OrderSummary(
                            po_number=number,
                            so_number=link.so_number,
                            state=link.state,
                            reason=link.reason,
                            lines=[
                                LineSummary(
                                    sku=line.sku,
                                    quantity=str(line.quantity),
                                    cost_before=_money(line.cost_before),
                                    cost_after=_money(line.cost_after),
                                )
                                for line in link.lines
                            ],
                            notes=list(link.notes),
                        )
                    )
        return DemoSummary(
            orders=len(po_numbers),
            received=received,
            sales_orders_created=katana_after["sales_orders_created"]
            - katana_before["sales_orders_created"],
            receipts=tg_after["receipts"] - tg_before["receipts"],
            elapsed_s=round(time.monotonic() - started, 2),
            database=database if options.db else "(temporary)",
            order_details=details,
            import_latency_p50_s=_percentile(latencies, 50),
            import_latency_p99_s=_percentile(latencies, 99),
            planned_writes=planned,
        )


async def _counters(
    control: httpx.AsyncClient, katana_ctl: str, tg_ctl: str
) -> tuple[dict[str, int], dict[str, int]]:
    """What the simulators counted so far: Katana's SOs created, TradeGecko's receipts."""
    katana = (await control.get(f"{katana_ctl}/_sim/counters")).json()
    tradegecko = (await control.get(f"{tg_ctl}/_sim/counters")).json()
    return (
        {"sales_orders_created": int(katana.get("sales_orders_created", 0))},
        {"receipts": int(tradegecko.get("receipts", 0))},
    )


async def _wait_until_settled(store: Store, chart: Statechart, po_numbers: list[str]) -> None:
    settled = set(chart.terminal_states()) | set(chart.attention_states())
    while True:
        links = [await store.link_by_po_number(number) for number in po_numbers]
        if all(link is not None and link.state in settled for link in links):
            return
        await anyio.sleep(0.1)


#: How long the demo waits, once every order settled, for the last deliveries.
_QUIET_WAIT = 5.0


async def _wait_until_quiet(
    store: Store, control: httpx.AsyncClient, senders: list[str], *, limit: float = _QUIET_WAIT
) -> None:
    """Wait (at most ``limit`` seconds) until the simulators at ``senders`` have no webhook
    queued or in flight and the daemon's inbox has nothing waiting."""
    with anyio.move_on_after(limit):
        while True:
            pending = 0
            for base in senders:
                try:
                    knobs = (await control.get(f"{base}/_sim/webhooks")).json()
                    pending += int(knobs.get("queued", 0)) + int(knobs.get("in_flight", 0))
                except (httpx.HTTPError, ValueError, TypeError, AttributeError):
                    pass  # a simulator that cannot say: only the inbox is waited for
            waiting, _ = await store.inbox_backlog()
            if pending == 0 and waiting == 0:
                return
            await anyio.sleep(0.05)


async def _wait_until_planned(store: Store, po_numbers: list[str], out: TextIO) -> None:
    """A shadow run: wait until each order has a plan, then show them."""
    while True:
        plans = await store.plans()
        if {plan.po_number for plan in plans} >= set(po_numbers):
            break
        await anyio.sleep(0.1)
    # Imported here: the demo's live path never needs syncctl.
    from syncd.cli.syncctl import describe_plan

    print("the plan (nothing sent):", file=out)
    for line in describe_plan(plans):
        print(line, file=out, flush=True)


def _percentile(values: list[float], percent: float) -> float | None:
    """The nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(values)))
    return round(values[rank - 1], 3)


def _money(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def _line_costs(line: LineSummary) -> str:
    # A line not received yet has no cost after; say so rather than print None.
    before = line.cost_before if line.cost_before is not None else "no cost"
    after = line.cost_after if line.cost_after is not None else "not received"
    return f"{line.sku}x{line.quantity} {before} → {after}"


def render_summary(summary: DemoSummary, out: TextIO) -> None:
    """The human summary table."""
    print("", file=out)
    print(f"{'PO':<10} {'SO':<14} {'state':<16} lines (cost before → after)", file=out)
    for order in summary.order_details:
        costs = ", ".join(_line_costs(line) for line in order.lines)
        so = order.so_number or "-"
        print(f"{order.po_number:<10} {so:<14} {order.state:<16} {costs}", file=out)
        for note in order.notes:
            print(f"{'':<42}note: {note}", file=out)
        if order.reason:
            print(f"{'':<42}reason: {order.reason}", file=out)
    print(
        f"\n{summary.received}/{summary.orders} received · "
        f"{summary.sales_orders_created} sales orders created in Katana · "
        f"{summary.receipts} receipts in TradeGecko · {summary.elapsed_s:.1f} s",
        file=out,
    )
    if summary.planned_writes is not None:
        print(
            f"shadow run: {summary.planned_writes} writes planned, nothing sent "
            "(syncctl plan --db <the .shadow database> shows them)",
            file=out,
        )
    if summary.interrupted:
        print("interrupted (Ctrl-C or SIGTERM): the orders above are where they got to", file=out)
    if summary.import_latency_p50_s is not None:
        print(
            f"import latency (PO created → SO created): p50 {summary.import_latency_p50_s:.3f} s"
            f" · p99 {summary.import_latency_p99_s:.3f} s",
            file=out,
        )
