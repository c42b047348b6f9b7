"""Throughput of 1, 2 and 3 daemons on one PostgreSQL (issue 14, "Many factories").

    .venv/bin/python -m bench.throughput [--daemons 1,2,3] [--rounds 3] [--factories 24]
                                         [--orders 480] [--modes webhooks,polling]
                                         [--poll 2] [--step 0.1] [--ttl 10] [--renew 3]

The world of ``tests/multidaemon_harness.py`` (its ``Cluster``: a factories.d file per
factory, ``syncd run`` processes as its ``DaemonProcess``, its lease audit trigger) on a
PostgreSQL server of ``tests/pg_server.py``, with the simulators as processes of their own
(``bench.harness.start_simulator``: ``syncd sim ... --accounts F --no-rate-limit``): the
simulators answer at once and every daemon's rate limits are set out of reach (100,000),
so the daemons (and the machine under them), not the APIs' limits, are the bound.

A trial: a fresh database and fresh simulators; ``n`` daemons started, the factories
spread over them (leases) and, with webhooks, every factory registered by its owner; the
workshop (``syncd.sim.factory.play_factory`` in this process, ``--step`` seconds between
its looks) works every account; then a burst of ``--orders`` one-line POs spread evenly
over the factories (32 created at a time). The figure is completed linked orders per
second: ``--orders`` / (first PO created → the last link ``received``, the link's own
``state_since``). Trials run interleaved (1, 2, 3, 1, 2, 3, ...), ``--rounds`` of each, per
mode; medians are quoted with the ratios 2/1 and 3/1.

Modes (what users run): ``webhooks``: deliveries on, polls at the defaults (30 s, reconcile
300 s); every daemon's ``public_base_url`` is daemon 0's listener (a load balancer sending
every delivery to one host: the others' are taken there, stored and their owner woken by
``NOTIFY``). ``polling``: no webhooks, polls every ``--poll`` seconds (short, so that the
poll interval does not bound the burst).

CPU over the measured interval, from ``/proc``: each daemon, each simulator, PostgreSQL
(the postmaster and every backend, with the reaped ones' CPU), this process (the load
generator and the workshop), and the whole machine (``/proc/stat``: what else ran).

Sound when, for every trial: every PO has exactly one SO in its Katana account and one
receipt in its TradeGecko account (the simulators' state), every history a statechart
path; per factory, service and endpoint the calls made from the first PO to the end, as
the daemons' ``syncd_api_requests_total`` summed over the daemons count them, equal those of
the simulator account's ``/_sim/counters`` (an endpoint called while they are read, a
poll, must lie between the daemons' readings before and after); every factory held by one
daemon, the same from the first PO to the last receipt (no lease taken meanwhile, by the
audit trigger), ``n`` distinct owners, ``sum(syncd_factory_running)`` 1 per factory. Else
``UNSOUND: ...`` and exit 1.

At the default lease settings (``--ttl 10 --renew 3``, the daemon's) a burst on a loaded
machine can make a daemon miss its own renewals (they queue on its one database connection
behind the orders' work): its factories stop and are taken again, and the lease check says
UNSOUND. ``--ttl 120 --renew 10`` keeps the leases still while the orders are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import (
    Unsound,
    _template,
    free_port,
    load_test_module,
    start_postgres,
    start_simulator,
)
from syncd.sim import FactoryTokens, Simulators
from syncd.sim.katana import API_PREFIX
from syncd.store import Store

__all__ = [
    "Calls",
    "CallsReading",
    "count_problems",
    "lease_problems",
    "main",
    "measure",
    "summarise",
]

#: factory → service → ``"METHOD /template"`` → calls.
Calls = dict[str, dict[str, Counter[str]]]
_MODES = ("webhooks", "polling")
#: Control calls at once while the burst is created.
_CREATE_AT_ONCE = 32
#: Idle control connections dropped before the simulators' 5 s keep-alive ends (a POST on a
#: connection the server is closing fails).
_LIMITS = httpx.Limits(keepalive_expiry=1.0)
_TICK = os.sysconf("SC_CLK_TCK")


# -- the checks (pure: tests/test_bench_throughput.py feeds them wrong counts) ------------


@dataclass(frozen=True)
class CallsReading:
    """The daemons' calls (summed over the daemons) read ``before`` the simulators'
    (``sims``): those answered; and ``after``: all, answered or not (``status="none"``: a
    request whose answer never came, which may never have reached the simulator)."""

    before: Calls
    sims: Calls
    after: Calls


def _minus(a: Calls, b: Calls, name: str, service: str) -> Counter[str]:
    out = Counter(a.get(name, {}).get(service, Counter()))
    out.subtract(b.get(name, {}).get(service, Counter()))
    return out


def count_problems(start: CallsReading, end: CallsReading) -> list[str]:
    """The calls made between two readings, the daemons' against the simulators', per
    factory, service and endpoint.

    A daemon counts a request once answered, after the simulator counted it, or once it
    gave up waiting (the simulator may or may not have seen it), so the simulators' calls
    lie between the daemons' readings on either side: the simulators' difference between
    the readings must lie between ``end.before - start.after`` and ``end.after -
    start.before`` (equal when nothing was called while reading and every call answered).
    Counts
    between the readings only: a factory stopped meanwhile would have its series dropped
    (:func:`lease_problems` flags that).
    """
    problems = []
    names = set(start.sims) | set(end.sims) | set(end.before) | set(end.after)
    for name in sorted(names):
        for service in ("katana", "tradegecko"):
            low = _minus(end.before, start.after, name, service)
            high = _minus(end.after, start.before, name, service)
            theirs = _minus(end.sims, start.sims, name, service)
            off = {
                endpoint: (low[endpoint], theirs[endpoint], high[endpoint])
                for endpoint in sorted(set(low) | set(theirs) | set(high))
                if not low[endpoint] <= theirs[endpoint] <= high[endpoint]
            }
            if off:
                problems.append(f"{name} {service} (daemons at least, sim, at most): {off}")
    return problems


def lease_problems(
    names: list[str],
    held_start: dict[str, str],
    held_end: dict[str, str],
    taken_during: list[tuple[str, str]],
    daemons: int,
    running: dict[str, int],
) -> list[str]:
    """Each factory on exactly one daemon, the same one, through the measured interval.

    :param held_start: factory → lease owner at the first PO; ``held_end``: at the last
        receipt.
    :param taken_during: (factory, owner) of every lease taken in between (audit trigger).
    :param running: factory → ``sum(syncd_factory_running)`` over the daemons at the end.
    """
    problems = []
    for label, held in (("at the first PO", held_start), ("at the last receipt", held_end)):
        missing = [n for n in names if n not in held]
        if missing:
            problems.append(f"not held {label}: {missing}")
    moved = {n: (held_start.get(n), held_end.get(n)) for n in names if n in held_start}
    moved = {n: pair for n, pair in moved.items() if pair[0] != pair[1]}
    if moved:
        problems.append(f"factories that changed owner while measured: {moved}")
    if taken_during:
        problems.append(f"leases taken while measured: {taken_during}")
    owners = set(held_start.values())
    if len(owners) != daemons:
        problems.append(f"{len(owners)} daemons held the factories, not {daemons}")
    wrong = {n: running.get(n, 0) for n in names if running.get(n, 0) != 1}
    if wrong:
        problems.append(f"sum(syncd_factory_running) is not 1 for {wrong}")
    return problems


# -- CPU from /proc ---------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds: its own and its reaped children's)."""
    after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(after[1]), sum(int(v) for v in after[11:15]) / _TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every process under it (PostgreSQL's backends)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)], cpu[int(entry.name)] = _stat(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of every core since boot (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuReading:
    """CPU seconds of every part at one moment."""

    at: float
    parts: dict[str, float]
    machine: tuple[float, float]

    @classmethod
    def now(cls, pids: dict[str, int]) -> CpuReading:
        parts = {name: tree_cpu(pid) for name, pid in pids.items()}
        parts["bench"] = _own_cpu()
        return cls(time.monotonic(), parts, machine_busy())


def cpu_between(start: CpuReading, end: CpuReading) -> dict[str, Any]:
    wall = end.at - start.at
    used = {k: end.parts[k] - start.parts[k] for k in start.parts}
    busy = end.machine[0] - start.machine[0]
    cores = (end.machine[1] - start.machine[1]) / wall if wall else 0.0
    ours = sum(used.values())
    # A part at ~one core is the bound (each is one Python process, one event loop), so is
    # a machine with every core busy (with others' work: ``others_cores``).
    bound = [f"{k} at {v / wall:.2f} of a core" for k, v in used.items() if v / wall >= 0.9]
    if busy / wall >= 0.95 * cores:
        bound.append(f"the machine: {busy / wall:.2f} of {cores:.2f} cores busy")
    return {
        "bound_suspects": bound,
        "cpu_s": {k: round(v, 2) for k, v in used.items()},
        "core_share": {k: round(v / wall, 3) for k, v in used.items()},
        "machine_busy_cores": round(busy / wall, 2),
        "machine_cores": round(cores, 2),
        # What the machine spent on anything not this bench's: the other engineers' work.
        "others_cores": round(max(0.0, busy - ours) / wall, 2),
        # What the bench's processes got of the machine: on a shared, saturated machine more
        # processes get more of it (the scheduler shares by runnable task), so a higher rate
        # may be a bigger slice, not a better design: compare ``orders_per_cpu_s`` too.
        "ours_cores": round(ours / wall, 2),
    }


# -- one trial ----------------------------------------------------------------------------


def _remote_simulators(
    katana_url: str, tradegecko_url: str, control: httpx.AsyncClient, tokens: list[FactoryTokens]
) -> Simulators:
    """The simulators' processes as the harness's :class:`Simulators`: their URLs, the
    control client and the accounts' tokens (what ``Cluster`` and ``create_po``,
    ``counters`` and ``factory`` use); their worlds live in the processes, not here (an
    ``AttributeError`` if reached for)."""
    sims = object.__new__(Simulators)
    sims.katana_url = katana_url
    sims.tradegecko_url = tradegecko_url
    sims.control = control
    sims.factories = tokens
    return sims


async def _tokens(client: httpx.AsyncClient, katana: str, tradegecko: str) -> list[FactoryTokens]:
    k = (await client.get(f"{katana}/_sim/accounts")).json()["accounts"]
    t = (await client.get(f"{tradegecko}/_sim/accounts")).json()["accounts"]
    return [
        FactoryTokens(a["token"], b["token"], b["webhook_secret"])
        for a, b in zip(k, t, strict=True)
    ]


@dataclass
class _Parts:
    """One trial's processes and addresses."""

    run: Any  # multidaemon_harness.Cluster (loaded from tests/ at run time)
    sim_pids: dict[str, int]
    names: list[str]
    metrics: dict[int, str] = field(default_factory=dict)
    healthz: dict[int, str] = field(default_factory=dict)


def _config(
    run: Any, slot: int, mode: str, poll: float, metrics_port: int, hook_ports: list[int]
) -> str:
    """Daemon ``slot``'s configuration: as the harness's, with metrics, no proxy, and the
    mode's polls and webhooks."""
    k, t = run.sims.katana_url, run.sims.tradegecko_url
    text = (
        f'[daemon]\ndatabase = "{run.url}?application_name=d{slot}"\n'
        f'log_level = "info"\nfactories_dir = "{run.folder}"\n'
        f"lease_ttl = {run.ttl}\nlease_renew = {run.renew}\n"
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'[tradegecko]\nbase_url = "{t}"\nrate_limit = 100000\n'
        f'[katana]\nbase_url = "{k}{API_PREFIX}"\nrate_limit = 100000\n'
    )
    if mode == "polling":
        text = text.replace(
            "rate_limit = 100000\n", f"rate_limit = 100000\npoll_interval = {poll}\n"
        )
    else:
        # Katana registers only https:// addresses; the simulator delivers over http.
        text += (
            f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{hook_ports[slot]}"\n'
            f'public_base_url = "https://127.0.0.1:{hook_ports[0]}"\n'
        )
    return text


@asynccontextmanager
async def _world(
    harness: Any, server: Any, workdir: Path, factories: int, ttl: float, renew: float
) -> AsyncIterator[_Parts]:
    """Fresh simulators and database, the factories written; no daemon yet."""
    procs = []
    url = server.create_database()
    try:
        katana, katana_url = start_simulator("katana", factories)
        procs.append(katana)
        tradegecko, tradegecko_url = start_simulator("tradegecko", factories)
        procs.append(tradegecko)
        async with httpx.AsyncClient(timeout=60, limits=_LIMITS) as control:
            tokens = await _tokens(control, katana_url, tradegecko_url)
            sims = _remote_simulators(katana_url, tradegecko_url, control, tokens)
            run = harness.Cluster(sims, url, workdir, ttl=ttl, renew=renew)
            try:
                # The schema as a daemon makes it; the audit of leases taken (not of every
                # row, as the harness's: that would cost PostgreSQL what it measures).
                store = await Store.open(url)
                await store.close()
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
                    await db.execute(harness._AUDIT)
                    await db.execute(
                        "CREATE TRIGGER audit_leases AFTER INSERT OR UPDATE ON leases "
                        "FOR EACH ROW EXECUTE FUNCTION audit.note()"
                    )
                names = []
                for i, factory in enumerate(tokens):
                    name = f"f{i:02d}"
                    run.add_factory(name, factory)
                    with (run.folder / f"{name}.toml").open("a") as file:
                        secret = factory.tradegecko_webhook_secret
                        file.write(f'[webhooks]\ntradegecko_secret = "{secret}"\n')
                    names.append(name)
                yield _Parts(run, {"katana": katana.pid, "tradegecko": tradegecko.pid}, names)
            finally:
                await run.aclose()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
        server.drop_database(url)


async def _start_daemons(harness: Any, parts: _Parts, n: int, mode: str, poll: float) -> None:
    run = parts.run
    hook_ports = [free_port() for _ in range(n)]
    for slot in range(n):
        port = free_port()
        config = run.workdir / f"d{slot}.toml"
        config.write_text(_config(run, slot, mode, poll, port, hook_ports))
        daemon = harness.DaemonProcess(slot, config, run.workdir / f"d{slot}.log")
        run.daemons[slot] = daemon
        run.processes.append(daemon)
        parts.metrics[slot] = f"http://127.0.0.1:{port}/metrics"
        if mode == "webhooks":
            parts.healthz[slot] = f"http://127.0.0.1:{hook_ports[slot]}/healthz"
    for daemon in run.running():
        await run.wait_running(daemon, 120)
    await run.spread(120)
    if mode == "webhooks":
        await _registered(parts, 120)


async def _registered(parts: _Parts, seconds: float) -> None:
    """Until every factory is registered by the one daemon running it."""
    with anyio.fail_after(seconds):
        while True:
            here: Counter[str] = Counter()
            for url in parts.healthz.values():
                health = (await parts.run.sims.control.get(url)).json()
                for name, hook in health.get("factories", {}).items():
                    if hook.get("here") and hook.get("registered"):
                        here[name] += 1
            if all(here[n] == 1 for n in parts.names):
                return
            await anyio.sleep(0.2)


async def _scrape_all(parts: _Parts, *, answered: bool) -> tuple[Calls, dict[str, int]]:
    """The daemons' calls summed (``answered``: only those answered), and
    ``sum(syncd_factory_running)`` per factory."""
    calls: Calls = {}
    running: Counter[str] = Counter()
    for url in parts.metrics.values():
        text = (await parts.run.sims.control.get(url)).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "syncd_factory_running":
                    running[labels["factory"]] += int(sample.value)
                elif sample.name == "syncd_api_requests_total" and not (
                    answered and labels["status"] == "none"
                ):
                    endpoint = f"{labels['method']} {_template(labels['endpoint'])}"
                    per = calls.setdefault(labels["factory"], {})
                    per.setdefault(labels["service"], Counter())[endpoint] += int(sample.value)
    return calls, dict(running)


async def _sim_calls(parts: _Parts) -> Calls:
    out: Calls = {}
    for name, tokens in zip(parts.names, parts.run.sims.factories, strict=True):
        katana, tradegecko = await parts.run.sims.counters(tokens)
        out[name] = {
            service: Counter({_template(k): v for k, v in counts["requests"].items() if v})
            for service, counts in (("katana", katana), ("tradegecko", tradegecko))
        }
    return out


async def _burst(parts: _Parts, orders: int) -> float:
    """``orders`` POs over the factories, evenly, 32 at a time; the time of the first."""
    run = parts.run
    limit = anyio.Semaphore(_CREATE_AT_ONCE)
    first: list[float] = []

    async def create(i: int) -> None:
        name = parts.names[i % len(parts.names)]
        async with limit:
            if not first:
                first.append(time.time())
            po = await run.sims.create_po(factory=run.tokens[name])
            run.pos[(name, int(po["id"]))] = str(po["order_number"])

    async with anyio.create_task_group() as tg:
        for i in range(orders):
            tg.start_soon(create, i)
    return first[0]


async def _received(parts: _Parts, orders: int, seconds: float) -> float:
    """Until ``orders`` links are received; the last one's ``state_since``."""
    deadline = time.monotonic() + seconds
    while True:
        ((count, last),) = await parts.run.query(
            "SELECT count(*), max(state_since) FROM links WHERE state = 'received'"
        )
        if count >= orders:
            return float(last)
        if time.monotonic() > deadline:
            states = await parts.run.query("SELECT state, count(*) FROM links GROUP BY state")
            raise Unsound(f"not every PO received within {seconds} s: {dict(states)}")
        await anyio.sleep(0.2)


async def _read_calls(parts: _Parts) -> CallsReading:
    before, _ = await _scrape_all(parts, answered=True)
    sims = await _sim_calls(parts)
    after, _ = await _scrape_all(parts, answered=False)
    return CallsReading(before, sims, after)


def _totals(start: CallsReading, end: CallsReading) -> dict[str, int]:
    """The simulators' calls between the readings, by service."""
    totals: Counter[str] = Counter()
    for name in end.sims:
        for service in ("katana", "tradegecko"):
            totals[service] += sum(_minus(end.sims, start.sims, name, service).values())
    return dict(totals)


def _keep_logs(workdir: Path, kept: Path) -> None:
    kept.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("d*.log"):
        shutil.copy(log, kept)


async def trial(
    harness: Any,
    server: Any,
    *,
    mode: str,
    daemons: int,
    factories: int,
    orders: int,
    poll: float,
    step: float,
    ttl: float,
    renew: float,
    within: float,
    logs: Path | None = None,
) -> dict[str, Any]:
    """One measured burst with ``daemons`` daemons; its figures and ``problems``.

    :param logs: a folder to copy the daemons' logs into (one folder per trial).
    """
    out: dict[str, Any] = {"mode": mode, "daemons": daemons, "load_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="syncd-throughput-") as tmp:
        async with _world(harness, server, Path(tmp), factories, ttl, renew) as parts:
            run = parts.run
            started = time.monotonic()
            await _start_daemons(harness, parts, daemons, mode, poll)
            out["ready_s"] = round(time.monotonic() - started, 1)
            pids = {f"d{d.slot}": d.pid for d in run.running()}
            pids |= {f"sim_{k}": v for k, v in parts.sim_pids.items()}
            pids["postgres"] = int((server.data / "postmaster.pid").read_text().split()[0])
            async with run.sims.factory(step_delay=step):
                held_start = await run.holders()
                calls_start = await _read_calls(parts)
                cpu_start = CpuReading.now(pids)
                first = await _burst(parts, orders)
                out["burst_created_s"] = round(time.time() - first, 2)
                last = await _received(parts, orders, within)
                cpu_end = CpuReading.now(pids)
                held_end = await run.holders()
                # Once every order is in, the calls stand still (but for polls): read until
                # they agree, up to 5 times.
                for _ in range(5):
                    calls_end = await _read_calls(parts)
                    problems = count_problems(calls_start, calls_end)
                    if not problems:
                        break
                    await anyio.sleep(1.0)
            taken = await run.query(
                "SELECT factory, owner FROM audit.rows WHERE tbl = 'leases' AND at BETWEEN %s "
                "AND %s",
                first,
                last,
            )
            calls = _totals(calls_start, calls_end)
            _, running = await _scrape_all(parts, answered=False)
            problems += lease_problems(
                parts.names,
                held_start,
                held_end,
                [(str(f), str(o)) for f, o in taken],
                daemons,
                running,
            )
            verdict = await run.verdict()
            if not verdict.ok or verdict.received != orders or verdict.orders != orders:
                problems.append(
                    f"not every PO once: {verdict.orders} POs, {verdict.received} received, "
                    f"duplicate SOs {verdict.duplicate_sales_orders}, duplicate receipts "
                    f"{verdict.duplicate_receipts}, lost {dict(list(verdict.lost.items())[:5])}, "
                    f"{len(verdict.invalid_histories)} invalid histories"
                )
            dead = [f"d{d.slot}" for d in run.processes if not d.alive]
            if dead:
                problems.append(f"daemons exited: {dead}")
            if logs is not None:
                _keep_logs(Path(tmp), logs / f"{mode}-{daemons}d-{time.strftime('%H%M%S')}")
    wall = last - first
    cpu = cpu_between(cpu_start, cpu_end)
    daemon_cpu = sum(v for k, v in cpu["cpu_s"].items() if k.startswith("d"))
    out |= {
        "orders": orders,
        "seconds": round(wall, 2),
        "orders_per_s": round(orders / wall, 2),
        "daemons_cpu_ms_per_order": round(daemon_cpu * 1000 / orders, 1),
        "postgres_cpu_ms_per_order": round(cpu["cpu_s"]["postgres"] * 1000 / orders, 1),
        # Orders per CPU second of every part (daemons, simulators, PostgreSQL, this process).
        "orders_per_cpu_s": round(orders / sum(cpu["cpu_s"].values()), 2),
        "api_calls_per_order": {s: round(v / orders, 2) for s, v in calls.items()},
        **cpu,
        "load_at_end": os.getloadavg(),
        "problems": problems,
    }
    return out


# -- the rounds ---------------------------------------------------------------------------


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode and daemon count, and the ratios of the medians to 1 daemon's."""
    out: dict[str, Any] = {}
    for mode in sorted({t["mode"] for t in trials}):
        mine = [t for t in trials if t["mode"] == mode]
        rows: dict[str, Any] = {}
        for n in sorted({t["daemons"] for t in mine}):
            these = [t for t in mine if t["daemons"] == n]

            def median(key: Callable[[dict[str, Any]], float], these: list[Any] = these) -> float:
                return round(statistics.median(key(t) for t in these), 3)

            rows[str(n)] = {
                "runs": len(these),
                "orders_per_s": median(lambda t: t["orders_per_s"]),
                "orders_per_s_each": [t["orders_per_s"] for t in these],
                "daemons_cpu_ms_per_order": median(lambda t: t["daemons_cpu_ms_per_order"]),
                "postgres_cpu_ms_per_order": median(lambda t: t["postgres_cpu_ms_per_order"]),
                "machine_busy_cores": median(lambda t: t["machine_busy_cores"]),
                "others_cores": median(lambda t: t["others_cores"]),
                "sim_katana_core_share": median(lambda t: t["core_share"]["sim_katana"]),
                "sim_tradegecko_core_share": median(lambda t: t["core_share"]["sim_tradegecko"]),
                "bench_core_share": median(lambda t: t["core_share"]["bench"]),
                "postgres_core_share": median(lambda t: t["core_share"]["postgres"]),
                "ours_cores": median(lambda t: t["ours_cores"]),
                "orders_per_cpu_s": median(lambda t: t["orders_per_cpu_s"]),
            }
        if "1" in rows:
            for n in rows:
                if n != "1":
                    rows[n]["ratio_to_1"] = round(
                        rows[n]["orders_per_s"] / rows["1"]["orders_per_s"], 2
                    )
        out[mode] = rows
    return out


async def measure(
    *,
    daemons: list[int],
    rounds: int = 3,
    factories: int = 24,
    orders: int = 480,
    modes: list[str] | None = None,
    poll: float = 2.0,
    step: float = 0.1,
    ttl: float = 10.0,
    renew: float = 3.0,
    within: float = 600.0,
    logs: Path | None = None,
) -> dict[str, Any]:
    """Every trial, interleaved; the summary.

    :raises Unsound: a trial failed a check (every trial still runs first).
    """
    harness = load_test_module("multidaemon_harness")
    server = start_postgres()
    out: dict[str, Any] = {
        "factories": factories,
        "orders": orders,
        "poll_s": poll,
        "workshop_step_s": step,
        "ttl": ttl,
        "renew": renew,
        "nproc": os.cpu_count(),
        "load_at_start": os.getloadavg(),
    }
    trials: list[dict[str, Any]] = []
    try:
        for mode in modes or list(_MODES):
            for number in range(1, rounds + 1):
                for n in daemons:
                    try:
                        result = await trial(
                            harness,
                            server,
                            mode=mode,
                            daemons=n,
                            factories=factories,
                            orders=orders,
                            poll=poll,
                            step=step,
                            ttl=ttl,
                            renew=renew,
                            within=within,
                            logs=logs,
                        )
                    except Unsound as exc:
                        result = {"mode": mode, "daemons": n, "problems": [exc.why]}
                    except Exception as exc:  # the apparatus failed: no figure, the rest runs
                        why = f"{type(exc).__name__}: {exc}"
                        result = {"mode": mode, "daemons": n, "problems": [why]}
                    result["round"] = number
                    trials.append(result)
                    print(json.dumps(result, default=str), flush=True)  # the bench's output
    finally:
        server.stop()
    out["load_at_end"] = os.getloadavg()
    out["trials"] = trials
    bad = [
        f"{t['mode']} {t['daemons']} daemons round {t['round']}: {'; '.join(t['problems'])}"
        for t in trials
        if t["problems"]
    ]
    if bad:
        raise Unsound(" | ".join(bad), out)
    out["summary"] = summarise(trials)
    return out


def _numbers(text: str) -> list[int]:
    """``1,2,3`` as numbers, each at least 1.

    :raises ValueError: naming what is wrong.
    """
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"each must be at least 1: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--daemons", default="1,2,3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--factories", type=int, default=24)
    parser.add_argument("--orders", type=int, default=480)
    parser.add_argument("--modes", default=",".join(_MODES))
    parser.add_argument("--poll", type=float, default=2.0)
    parser.add_argument("--step", type=float, default=0.1)
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--renew", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--logs", type=Path, help="copy each trial's daemon logs here")
    args = parser.parse_args(argv)
    try:
        daemons = _numbers(args.daemons)
    except ValueError as exc:
        parser.error(f"--daemons: {exc}")
    modes = args.modes.split(",")
    if set(modes) - set(_MODES):
        parser.error(f"--modes: each one of {', '.join(_MODES)}, got {args.modes!r}")
    if args.rounds < 1 or args.factories < 1 or args.orders < args.factories:
        parser.error("--rounds and --factories at least 1, --orders at least --factories")
    try:
        result = anyio.run(
            lambda: measure(
                daemons=daemons,
                rounds=args.rounds,
                factories=args.factories,
                orders=args.orders,
                modes=modes,
                poll=args.poll,
                step=args.step,
                ttl=args.ttl,
                renew=args.renew,
                within=args.timeout,
                logs=args.logs,
            )
        )
    except Unsound as exc:
        print(json.dumps(exc.figures, indent=1, default=str))  # the bench's output
        print(f"UNSOUND: {exc.why}")  # the bench's output
        return 1
    print(json.dumps(result, indent=1, default=str))  # the bench's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
