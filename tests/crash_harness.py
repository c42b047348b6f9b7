"""The crash harness: the daemon as a real process, killed again and again, must lose nothing
and do nothing twice.

Both simulators run as their own processes (``syncd sim tradegecko``, ``syncd sim katana
--play-factory``: the workshop keeps working whatever happens to the daemon). Purchase orders
are created while ``syncd run`` runs; the daemon is killed with SIGKILL at random moments, or
made to die at a chosen crash point (``SYNCD_CRASH_AT``, see
:mod:`syncd.runtime.crashpoints`), and started again. At the end it runs until every order is
received, and the simulators' counters and the database's histories are checked.

Used by ``tests/test_crash.py`` (short) and ``bench/crash.py`` (long). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.domain.statechart import load_statechart
from syncd.runtime.crashpoints import CRASH_POINTS, ENV, EXIT_CODE
from syncd.sim import TRADEGECKO_WEBHOOK_SECRET, free_ports
from syncd.store import Store

__all__ = [
    "AUTO_POINTS",
    "CRASH_POINTS",
    "WEBHOOK_POINTS",
    "CrashHarness",
    "CrashReport",
    "Verdict",
]

BIN = Path(sys.executable).parent
#: SKUs Katana's simulator knows (re-costed from its average cost: a price PUT each) and one it
#: lacks (created as a product by the first import that needs it).
KNOWN_SKUS = ("CHAIR-OAK", "TABLE-OAK", "STOOL-PINE", "LAMP-BRASS")
NEW_SKU = "SHELF-WALNUT"
#: Crash points only a daemon with webhooks enabled reaches.
WEBHOOK_POINTS = frozenset({"webhook_acknowledged"})
#: Crash points only a daemon with ``katana.make_to_order = "auto"`` reaches.
AUTO_POINTS = frozenset({"mo_made"})


@dataclass
class CrashReport:
    """What the chaos did."""

    orders: int = 0
    sigkills: int = 0
    #: Deaths at a crash point, by point.
    crash_points: Counter[str] = field(default_factory=Counter)
    #: Runs that ended otherwise (an exit status other than SIGKILL's or a crash point's).
    unexpected_exits: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kills(self) -> int:
        return self.sigkills + sum(self.crash_points.values())


@dataclass
class Verdict:
    """What the end state shows; ``ok`` when nothing was lost or done twice."""

    orders: int
    received: int
    #: order_no → how many SOs carry it, where more than one.
    duplicate_sales_orders: dict[str, int]
    #: PO id → receipts, where more than one.
    duplicate_receipts: dict[str, int]
    #: PO numbers not received (no link, or a link in another state), with their state.
    lost: dict[str, str]
    #: PO numbers whose transition history is no path of the statechart.
    invalid_histories: dict[str, list[tuple[str | None, str, str]]]
    customers_created: int
    products_created: int
    #: Sales order row id → manufacturing orders made for it, where more than one.
    duplicate_mos: dict[str, int] = field(default_factory=dict)
    #: With make-to-order ``auto``: rows with a recipe that have no manufacturing order.
    rows_without_mo: list[int] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return (
            sum(n - 1 for n in self.duplicate_sales_orders.values())
            + sum(n - 1 for n in self.duplicate_receipts.values())
            + sum(n - 1 for n in self.duplicate_mos.values())
        )

    @property
    def ok(self) -> bool:
        return (
            not self.duplicate_sales_orders
            and not self.duplicate_receipts
            and not self.lost
            and not self.invalid_histories
            and not self.duplicate_mos
            and not self.rows_without_mo
            and self.received == self.orders
            and self.customers_created <= 1
            and self.products_created <= 1
        )


class CrashHarness:
    """Two simulator processes and a daemon process to kill; see the module's doc."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int = 0,
        factory: bool = True,
        webhooks: bool = False,
        poll_interval: float = 0.1,
        reconcile_interval: float = 300.0,
        make_to_order: str = "manual",
    ) -> None:
        """``webhooks``: the daemon listens (on a free port) and registers with both
        simulators; ``reconcile_interval`` is then the polls' interval once registered.
        ``make_to_order``: the daemon's ``katana.make_to_order``; with ``auto`` the factory
        never presses the button itself."""
        self.workdir = workdir
        self.make_to_order = make_to_order
        self.webhooks = webhooks
        self.poll_interval = poll_interval
        self.reconcile_interval = reconcile_interval
        self.webhooks_url = ""
        self.rng = random.Random(seed)
        self.factory = factory
        self.database = workdir / "syncd.db"
        self.config_path = workdir / "syncd.toml"
        self.log_path = workdir / "daemon.log"
        self.tradegecko_url = ""
        self.katana_url = ""
        self.http = httpx.Client(timeout=10.0)
        #: PO id → PO number, of every PO created.
        self.pos: dict[int, str] = {}
        self._sims: list[subprocess.Popen[bytes]] = []
        self.daemon: subprocess.Popen[bytes] | None = None

    # -- processes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[CrashHarness]:
        """Start both simulators and write the config; stop everything on the way out."""
        try:
            # The listener's port too: one the simulators are about to take is no use.
            tg_port, kt_port, hook_port = free_ports(3)
            self.tradegecko_url = f"http://127.0.0.1:{tg_port}"
            self.katana_url = f"http://127.0.0.1:{kt_port}"
            self._sims.append(self._spawn_sim("tradegecko", tg_port))
            floor = ["--play-factory"] if self.factory else []
            if self.factory and self.make_to_order == "auto":
                floor.append("--leave-make-to-order")
            self._sims.append(self._spawn_sim("katana", kt_port, *floor))
            for url in (self.tradegecko_url, self.katana_url):
                self._wait_up(url)
            if self.webhooks:
                self.webhooks_url = f"http://127.0.0.1:{hook_port}"
            self._write_config()
            yield self
        finally:
            self.stop_daemon(graceful=False)
            for proc in self._sims:
                _stop(proc)
            self.http.close()

    def _spawn_sim(self, name: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
        with (self.workdir / f"sim-{name}.log").open("ab") as log:
            return subprocess.Popen(
                [str(BIN / "syncd"), "sim", name, "--port", str(port), "--no-rate-limit", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
            )

    def _wait_up(self, url: str, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if any(p.poll() is not None for p in self._sims):
                raise RuntimeError(f"a simulator exited; see {self.workdir}/sim-*.log")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get(f"{url}/_sim/counters").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the simulator at {url} did not come up in {seconds} s")
            time.sleep(0.05)

    def _write_config(self) -> None:
        webhooks = ""
        if self.webhooks:
            listen = self.webhooks_url.removeprefix("http://")
            webhooks = (
                f'[webhooks]\nenabled = true\nlisten = "{listen}"\n'
                # Katana sends only to https; the simulators deliver it over plain http.
                f'public_base_url = "https://{listen}"\n'
                f'tradegecko_secret = "{TRADEGECKO_WEBHOOK_SECRET}"\n'
                f"reconcile_interval = {self.reconcile_interval}\n"
            )
        self.config_path.write_text(
            f'[daemon]\ndatabase = "{self.database}"\nlog_level = "warning"\n'
            # A create cut short by a kill waits katana.timeout + retry_settle after its
            # intent before the next look: short here, so a run ends within the test's time.
            "concurrency = 4\nretry_initial = 0.1\nretry_max = 0.5\nretry_settle = 0.5\n"
            "[metrics]\nenabled = false\n"
            f'[tradegecko]\nbase_url = "{self.tradegecko_url}"\ntoken = "tradegecko-sim-token"\n'
            f"poll_interval = {self.poll_interval}\nrate_limit = 100000\n"
            f'[katana]\nbase_url = "{self.katana_url}/v1"\ntoken = "katana-sim-token"\n'
            f"poll_interval = {self.poll_interval}\nrate_limit = 100000\ntimeout = 5\n"
            f'make_to_order = "{self.make_to_order}"\n' + webhooks
        )

    def start_daemon(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        assert self.daemon is None or self.daemon.poll() is not None, "a daemon is running"
        env = _env()
        env.pop(ENV, None)
        if crash_at:
            env[ENV] = crash_at
        with self.log_path.open("ab") as log:
            log.write(f"--- start (crash at {crash_at or 'nothing'})\n".encode())
            self.daemon = subprocess.Popen(
                [str(BIN / "syncd"), "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self.daemon

    def kill_daemon(self) -> int:
        """SIGKILL the daemon (if it still runs); its exit status."""
        proc = self.daemon
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=10)

    def stop_daemon(self, *, graceful: bool = True) -> int | None:
        proc, self.daemon = self.daemon, None
        if proc is None:
            return None
        if graceful and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        return _stop(proc)

    # -- the world ---------------------------------------------------------------------

    def create_po(self, *, new_sku: bool = False, known: int | None = None) -> tuple[int, str]:
        """A PO of ``known`` (else 1 to 3) SKUs Katana knows, plus the one it lacks."""
        skus = self.rng.sample(KNOWN_SKUS, known or self.rng.randint(1, 3))
        if new_sku:
            skus.append(NEW_SKU)
        lines = [
            {
                "sku": sku,
                "name": sku.title(),
                "quantity": str(self.rng.randint(1, 4)),
                "price": f"{self.rng.randint(20, 400)}.00",
            }
            for sku in skus
        ]
        response = self.http.post(
            f"{self.tradegecko_url}/_sim/purchase_orders",
            json={"supplier": "Katana", "currency": "USD", "lines": lines},
        )
        response.raise_for_status()
        po: dict[str, Any] = response.json()["purchase_order"]
        self.pos[int(po["id"])] = str(po["order_number"])
        return int(po["id"]), str(po["order_number"])

    def counters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        katana = self.http.get(f"{self.katana_url}/_sim/counters").json()
        tradegecko = self.http.get(f"{self.tradegecko_url}/_sim/counters").json()
        return katana, tradegecko

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.database.exists():
            return []
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)
            ) as db:
                return db.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            # Not created yet (a daemon killed while making it), or busy for too long.
            return []

    def webhooks_registered(self) -> bool:
        """Whether the daemon's listener answers and its webhooks are registered."""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = self.http.get(f"{self.webhooks_url}/healthz", timeout=2.0)
            return response.status_code == 200 and response.json().get("registered") is True
        return False

    def webhook_counters(self, service: str) -> dict[str, int]:
        """A simulator's webhook sender counters (``delivered``, ``failed_attempts``, ...)."""
        base = self.tradegecko_url if service == "tradegecko" else self.katana_url
        counters: dict[str, int] = self.http.get(f"{base}/_sim/webhooks").json()["counters"]
        return counters

    def inbox(self, kind: str) -> list[tuple[int, str | None, str | None, str | None]]:
        """``(id, dedup_key, processed_at, outcome)`` of the inbox rows of ``kind``."""
        rows = self._query(
            "SELECT id, dedup_key, processed_at, outcome FROM inbox WHERE kind = ? ORDER BY id",
            (kind,),
        )
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def activated(self) -> bool:
        return bool(self._query("SELECT value FROM meta WHERE key = 'activated_at'"))

    def states(self) -> dict[str, str]:
        """PO number → its order's state."""
        return {str(n): str(s) for n, s in self._query("SELECT po_number, state FROM links")}

    def all_received(self) -> bool:
        states = self.states()
        return all(states.get(n) == "received" for n in self.pos.values())

    # -- the runs ----------------------------------------------------------------------

    def chaos(
        self,
        *,
        orders: int,
        kills: int,
        seconds: float,
        aim_share: float = 0.4,
        life: tuple[float, float] = (0.15, 1.2),
    ) -> CrashReport:
        """Create ``orders`` POs while killing the daemon ``kills`` times (or until
        ``seconds`` pass): each run lives a random time, or (``aim_share`` of them) until a
        random crash point fires, then is killed and started again."""
        report = CrashReport()
        start = time.monotonic()
        deadline = start + seconds
        # Spread the POs over all but the last few runs, so that orders are always in flight.
        spread = max(1, kills - 4)
        runs = 0
        points = sorted(
            p
            for p in CRASH_POINTS
            if (self.webhooks or p not in WEBHOOK_POINTS)
            and (self.make_to_order == "auto" or p not in AUTO_POINTS)
        )
        # The customer and the new SKU's product are made once, by the first import.
        once = {"customer_created", "product_created"}
        while report.kills < kills and time.monotonic() < deadline:
            aimed = self.rng.random() < aim_share
            if self.states():
                points = [p for p in points if p not in once]
            crash_at = f"{self.rng.choice(points)}:{self.rng.randint(1, 2)}" if aimed else None
            proc = self.start_daemon(crash_at)
            lifetime = self.rng.uniform(*life) * (3 if aimed else 1)
            born = time.monotonic()
            runs += 1
            owed = min(orders, -(-orders * runs // spread))
            while time.monotonic() - born < lifetime and proc.poll() is None:
                if len(self.pos) < owed and self.activated():
                    self.create_po(new_sku=not self.pos)
                time.sleep(0.02)
            status = self.kill_daemon()
            if status == EXIT_CODE and crash_at:
                report.crash_points[crash_at.partition(":")[0]] += 1
            elif status == -signal.SIGKILL:
                report.sigkills += 1
            else:
                report.unexpected_exits.append(f"exit {status} (crash at {crash_at})")
                # Not a kill: a run that could not start does not count.
        report.orders = len(self.pos)
        report.seconds = time.monotonic() - start
        return report

    def aim(self, point: str, *, seconds: float = 20.0, known: int | None = None) -> int:
        """Run the daemon with ``point`` armed, create one PO (``known`` SKUs Katana knows,
        and one it lacks) once it is active, and wait for the crash; the exit status
        (``EXIT_CODE`` when it hit; SIGKILL's when ``seconds`` passed first)."""
        proc = self.start_daemon(point)
        deadline = time.monotonic() + seconds
        while proc.poll() is None and time.monotonic() < deadline:
            if not self.pos and self.activated():
                self.create_po(new_sku=True, known=known)
            time.sleep(0.02)
        return self.kill_daemon()

    def finish(self, *, orders: int, seconds: float = 60.0) -> bool:
        """Create any POs still owed, then run the daemon undisturbed until every PO is
        received (or ``seconds`` pass); stop it with SIGTERM. Whether all were received."""
        self.start_daemon()
        deadline = time.monotonic() + seconds
        done = False
        while time.monotonic() < deadline:
            if len(self.pos) < orders and self.activated():
                self.create_po(new_sku=not self.pos)
                continue
            if len(self.pos) >= orders and self.all_received():
                done = True
                break
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                break
            time.sleep(0.1)
        self.stop_daemon()
        return done

    def verdict(self) -> Verdict:
        katana, tradegecko = self.counters()
        by_no: dict[str, int] = katana["sales_orders_by_order_no"]
        receipts: dict[str, int] = tradegecko["receipts_per_po"]
        states = self.states()
        lost = {
            number: states.get(number, "never linked")
            for number in self.pos.values()
            if states.get(number) != "received"
        }
        # Every PO has its SO and its receipt, besides being received in syncd's eyes.
        for po_id, number in self.pos.items():
            if by_no.get(f"TG-{number}", 0) == 0:
                lost.setdefault(number, "no sales order in Katana")
            if receipts.get(str(po_id), 0) == 0:
                lost.setdefault(number, "not received in TradeGecko")
        per_row: dict[str, int] = katana["manufacturing_orders_per_row"]
        return Verdict(
            duplicate_mos={k: v for k, v in per_row.items() if v > 1},
            rows_without_mo=self._rows_without_mo(per_row) if self.make_to_order == "auto" else [],
            orders=len(self.pos),
            received=sum(1 for n in self.pos.values() if states.get(n) == "received"),
            duplicate_sales_orders={k: v for k, v in by_no.items() if v > 1},
            duplicate_receipts={k: v for k, v in receipts.items() if v > 1},
            lost=lost,
            invalid_histories=anyio.run(self._invalid_histories),
            customers_created=int(katana["customers_created"]),
            products_created=int(katana["products_created"]),
        )

    def _rows_without_mo(self, per_row: dict[str, int]) -> list[int]:
        """Rows of this run's SOs that syncd should have made to order and did not: all but
        the new SKU's (its product has no recipe)."""
        state = self.http.get(f"{self.katana_url}/_sim/state").json()
        shelf = self.http.get(
            f"{self.katana_url}/v1/variants",
            params={"sku": NEW_SKU},
            headers={"Authorization": "Bearer katana-sim-token"},
        ).json()["data"]
        no_recipe = {v["id"] for v in shelf}
        numbers = {f"TG-{n}" for n in self.pos.values()}
        return [
            row["id"]
            for so in state["sales_orders"]
            if so["order_no"] in numbers and so.get("deleted_at") is None
            for row in so["sales_order_rows"]
            if row["variant_id"] not in no_recipe and per_row.get(str(row["id"]), 0) == 0
        ]

    async def _invalid_histories(self) -> dict[str, list[tuple[str | None, str, str]]]:
        holding = {"make_to_order_auto"} if self.make_to_order == "auto" else set()
        chart = load_statechart(holding=holding)
        store = await Store.open(self.database, readonly=True)
        bad: dict[str, list[tuple[str | None, str, str]]] = {}
        try:
            for number in self.pos.values():
                link = await store.link_by_po_number(number)
                if link is None:
                    continue
                steps = [
                    (h.from_state, h.to_state, h.trigger) for h in await store.history(link.id)
                ]
                if not chart.valid_path(steps):
                    bad[number] = steps
        finally:
            await store.close()
        return bad

    def recorded_costs(self) -> dict[str, list[tuple[int, Any, Any, Any, Any]]]:
        """PO number → ``(line id, price as imported, cost before, cost after, TradeGecko's
        price now)`` of each line, as the database records the receipt."""
        return anyio.run(self._recorded_costs)

    async def _recorded_costs(self) -> dict[str, list[tuple[int, Any, Any, Any, Any]]]:
        store = await Store.open(self.database, readonly=True)
        costs: dict[str, list[tuple[int, Any, Any, Any, Any]]] = {}
        try:
            async with TradeGeckoClient(self.tradegecko_url, "tradegecko-sim-token") as client:
                for po_id, number in self.pos.items():
                    link = await store.link_by_po_number(number)
                    if link is None:
                        continue
                    _, lines = await client.get_purchase_order(po_id)
                    now = {line.id: line.price for line in lines}
                    costs[number] = [
                        (ln.line_id, ln.price, ln.cost_before, ln.cost_after, now.get(ln.line_id))
                        for ln in link.lines
                    ]
        finally:
            await store.close()
        return costs

    def daemon_log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SYNCD_TRADEGECKO_TOKEN", "SYNCD_KATANA_TOKEN"):
        env.pop(name, None)
    return env


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)
