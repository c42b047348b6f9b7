"""Many factories in one daemon (issue 14): start-up, RSS, idle CPU, ``syncctl status``, and
one PO per factory through to ``received``, for 1, 10, 100 and 1,000 factories.

Every part is its own process: ``syncd sim katana --accounts N --no-rate-limit``,
``syncd sim tradegecko --accounts N --no-rate-limit`` (one world per token: the default
token, then ``<token>-1`` ...), and ``syncd run`` on a generated config with N
``[factories.fI]`` tables (each its own tokens and TradeGecko webhook secret,
``<token>-webhook-secret`` as the simulator signs), webhooks on, the default reconcile
interval (polls every 300 s while webhooks are healthy), default metrics refresh.

What each figure is:

- ``startup_s``: ``syncd run`` spawned → ``/metrics`` answers *and* has an
  ``syncd_inbox_backlog_events{factory=...}`` series for every factory *and* ``/healthz``
  lists every factory: each one's routes take webhooks and its tasks are scheduled.
  (``running_daemon`` serves ``/metrics`` only after every factory's start returned.)
- ``registered_s``: spawned → ``/healthz`` also says every factory's webhooks are
  registered (beside others, a factory registers after its start; a restart finds them
  recorded in the database and counts them registered at once).
- ``start_requests_per_factory`` / ``restart_requests_per_factory``: the simulators'
  ``/_sim/counters`` over every account, by endpoint, divided by the factories: read once
  every factory is registered (first start), and that reading's difference after the
  restart. First polls are spread over one poll interval, so a poll may come after it.
- ``rss_start_mb`` / ``rss_idle_mb``: the daemon's VmRSS right after start-up / after idling.
- ``idle_cpu_core_share``: (utime + stime) of the daemon from ``/proc/PID/stat`` over
  ``--idle-seconds`` (measured in 3 equal windows; the median window is quoted, each is kept),
  divided by the wall time: 1.0 is one core busy.
- ``syncctl_status_s``: wall time of ``syncctl --config ... status`` (every factory), median
  of 3.
- ``po_to_received_s``: one PO created in each factory's TradeGecko account at once; its
  SO delivered in Katana (a person's step, through the simulator's control panel) as soon as
  the daemon made it; until every factory's PO is ``received``.
- ``webhook_deliveries``: per service, the simulator's webhook counters over every account
  once the POs were received (or the wait ran out): ``published``, ``delivered``,
  ``failed_attempts`` (each waits for the service's retry schedule), ``waiting``.

Sound when: every factory answered (``/healthz`` registered, a series each); every factory's
PO was imported exactly once (the Katana simulator's ``POST /sales_orders`` per account is
1) and received; and, per factory and service, the daemon's ``syncd_api_requests_total``
(the start's service check included) equals the simulator's count for that account,
endpoint by endpoint. Otherwise ``UNSOUND``
and exit 1. The load average at start and end is recorded (the machine may be shared).

    python -m bench.factories [--counts 1,10,100,1000] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import Unsound, _template, free_ports, start_simulator
from syncd.sim import CHAIR_LINE, TRADEGECKO_WEBHOOK_SECRET

__all__ = ["measure"]

_KATANA_TOKEN = "katana-sim-token"
_TRADEGECKO_TOKEN = "tradegecko-sim-token"
_BIN = Path(sys.executable).parent
#: Seconds from spawning the daemon until every factory is registered, at most.
_START_WAIT = 600.0
#: Control calls to the simulators at once (one per factory otherwise: 1,000 sockets).
_CONTROL_CONCURRENCY = 32
#: Idle connections dropped before the simulators' (uvicorn's 5 s) keep-alive ends: a call
#: on a connection the server is closing fails (a PO created twice if it were retried).
_LIMITS = httpx.Limits(keepalive_expiry=1.0)


def _token(base: str, index: int) -> str:
    """The simulator's token of account ``index``: the default one, then ``<base>-1`` ..."""
    return base if index == 0 else f"{base}-{index}"


def _names(count: int) -> list[str]:
    return [f"f{i}" for i in range(count)]


def _config(
    tmp: Path, count: int, katana: str, tradegecko: str, *, register: bool = True
) -> tuple[Path, int, int]:
    hook_port, metrics_port = free_ports(2)
    lines = [
        f'[daemon]\ndatabase = "{tmp / "syncd.db"}"\nlog_level = "warning"\nretry_initial = 0.2',
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"',
        f'[tradegecko]\nbase_url = "{tradegecko}"\nrate_limit = 100000',
        f'[katana]\nbase_url = "{katana}/v1"\nrate_limit = 100000',
        # Katana registers only https:// addresses; the simulator delivers over http.
        f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{hook_port}"\n'
        f'public_base_url = "https://127.0.0.1:{hook_port}"'
        + ("" if register else "\nregister = false"),
    ]
    for i, name in enumerate(_names(count)):
        tg_token = _token(_TRADEGECKO_TOKEN, i)
        secret = TRADEGECKO_WEBHOOK_SECRET if i == 0 else f"{tg_token}-webhook-secret"
        lines.append(
            f'[factories.{name}.tradegecko]\ntoken = "{tg_token}"\n'
            f'[factories.{name}.katana]\ntoken = "{_token(_KATANA_TOKEN, i)}"\n'
            f'[factories.{name}.webhooks]\ntradegecko_secret = "{secret}"'
        )
    path = tmp / "syncd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, hook_port, metrics_port


def _cpu_seconds(pid: int) -> float:
    # Fields after the ")" of the command name: utime is the 12th, stime the 13th (0-based).
    after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _scrape(text: str) -> dict[str, Any]:
    """From ``/metrics``: the factories with a backlog series, and the API calls per
    factory → service → ``"METHOD /template"``."""
    factories: set[str] = set()
    calls: dict[str, dict[str, Counter[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "syncd_inbox_backlog_events":
                factories.add(labels["factory"])
            elif sample.name == "syncd_api_requests_total":
                per = calls.setdefault(labels["factory"], {})
                endpoint = f"{labels['method']} {_template(labels['endpoint'])}"
                per.setdefault(labels["service"], Counter())[endpoint] += int(sample.value)
    return {"factories": factories, "calls": calls}


@contextmanager
def _processes(tmp: Path, count: int, *, register: bool = True) -> Iterator[dict[str, Any]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        katana, katana_url = start_simulator("katana", count)
        procs.append(katana)
        tradegecko, tradegecko_url = start_simulator("tradegecko", count)
        procs.append(tradegecko)
        config, hook_port, metrics_port = _config(
            tmp, count, katana_url, tradegecko_url, register=register
        )
        log = (tmp / "syncd.log").open("w")

        def spawn() -> subprocess.Popen[str]:
            daemon = subprocess.Popen(
                [str(_BIN / "syncd"), "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append(daemon)
            return daemon

        spawned = time.monotonic()
        daemon = spawn()
        yield {
            "spawn": spawn,
            "daemon": daemon,
            "spawned": spawned,
            "config": config,
            "db": tmp / "syncd.db",
            "log": tmp / "syncd.log",
            "katana": katana_url,
            "tradegecko": tradegecko_url,
            "healthz": f"http://127.0.0.1:{hook_port}/healthz",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        }
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_started(parts: dict[str, Any], names: list[str], seconds: float) -> dict[str, Any]:
    """Until every factory runs and then until every factory's webhooks are registered (see
    the module's ``startup_s`` and ``registered_s``); what was seen then."""
    daemon: subprocess.Popen[str] = parts["daemon"]
    deadline = parts["spawned"] + seconds
    seen: dict[str, Any] = {}
    with httpx.Client(timeout=10) as client:
        while True:
            if daemon.poll() is not None:
                raise Unsound(
                    f"syncd run exited with {daemon.returncode}: "
                    + parts["log"].read_text()[-2000:]
                )
            try:
                # /healthz first, /metrics only once it lists every factory: scraping the
                # metrics of 1,000 factories 20 times a second took a fifth of the daemon's
                # CPU during its start (py-spy), slowing the start it measured.
                health = client.get(parts["healthz"]).json()
                hooks = health.get("factories", {names[0]: health})
                if set(names) <= set(hooks):
                    if "startup_s" not in seen:
                        scraped = _scrape(client.get(parts["metrics"]).text)
                        if set(names) <= scraped["factories"]:
                            seen["startup_s"] = time.monotonic() - parts["spawned"]
                            seen["scraped"] = scraped
                    seen["health"] = health
                    if (
                        "startup_s" in seen
                        and health.get("registered")
                        and all(hooks.get(n, {}).get("registered") for n in names)
                    ):
                        seen["registered_s"] = time.monotonic() - parts["spawned"]
                        seen["scraped"] = _scrape(client.get(parts["metrics"]).text)
                        return seen
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                hooks = seen.get("health", {}).get("factories", {})
                figures = {
                    "startup_s": seen.get("startup_s"),
                    "registered_factories": sum(1 for h in hooks.values() if h.get("registered")),
                }
                what = "registered" if "startup_s" in seen else "running"
                raise Unsound(f"not every factory {what} within {seconds} s", figures)
            # Resolution enough for seconds; each look at 1,000 factories costs the daemon.
            time.sleep(0.1)


def _restart(parts: dict[str, Any], names: list[str], out: dict[str, Any]) -> None:
    """Stop the daemon (SIGTERM) and start it again on the same database: a restart finds
    its webhooks registered (a list call each, nothing created)."""
    daemon: subprocess.Popen[str] = parts["daemon"]
    # What this daemon called, for the soundness check: the next one's metrics start at 0.
    parts["earlier_calls"] = _scrape(httpx.get(parts["metrics"], timeout=60).text)["calls"]
    stopping = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(120)
    out["stop_s"] = round(time.monotonic() - stopping, 2)
    if code != 0:
        raise Unsound(f"syncd run exited with {code} at SIGTERM")
    # Calls the simulators saw after the last scrape: cut off by the stop, or answered
    # between the scrape and the exit (the daemon is gone: this reading is exact).
    stopped = _sim_requests(parts, len(names))
    parts["calls_at_stop"] = {
        service: [
            per - parts["earlier_calls"].get(name, {}).get(service, Counter())
            for name, per in zip(names, stopped[service], strict=True)
        ]
        for service in stopped
    }
    parts["spawned"] = time.monotonic()
    parts["daemon"] = parts["spawn"]()
    seen = _wait_started(parts, names, _START_WAIT)
    out["restart_s"] = round(seen["startup_s"], 2)
    out["restart_registered_s"] = round(seen["registered_s"], 2)
    out["restart_cpu_s"] = round(_cpu_seconds(parts["daemon"].pid), 2)
    out["rss_restart_mb"] = round(_rss_mb(parts["daemon"].pid), 1)


def _idle(pid: int, seconds: float) -> list[float]:
    """The daemon's share of one core in 3 windows of ``seconds / 3``."""
    shares = []
    for _ in range(3):
        cpu, wall = _cpu_seconds(pid), time.monotonic()
        time.sleep(seconds / 3)
        shares.append((_cpu_seconds(pid) - cpu) / (time.monotonic() - wall))
    return shares


def _status(config: Path) -> list[float]:
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run(
            [str(_BIN / "syncctl"), "--config", str(config), "status"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times.append(time.monotonic() - t0)
    return times


def _links(db: Path) -> dict[str, tuple[str, int | None]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT factory, state, so_id FROM links").fetchall()
    return {str(f): (str(s), so) for f, s, so in rows}


async def _orders(parts: dict[str, Any], names: list[str], seconds: float) -> float:
    """One PO per factory, each SO delivered once made; seconds until all are received."""
    limit = anyio.Semaphore(_CONTROL_CONCURRENCY)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=_LIMITS) as client:

        async def create(i: int) -> None:
            async with limit:
                response = await client.post(
                    f"{parts['tradegecko']}/_sim/purchase_orders",
                    json={"supplier": "Katana", "currency": "USD", "lines": [CHAIR_LINE]},
                    headers={"X-Sim-Account": _token(_TRADEGECKO_TOKEN, i)},
                )
                if response.status_code != 201:
                    raise RuntimeError(f"creating a PO: {response.status_code} {response.text}")

        async def deliver(i: int, so_id: int) -> None:
            async with limit:
                response = await client.post(
                    f"{parts['katana']}/_sim/sales_orders/{so_id}/deliver",
                    headers={"X-Sim-Account": _token(_KATANA_TOKEN, i)},
                )
                response.raise_for_status()

        async with anyio.create_task_group() as tg:
            for i in range(len(names)):
                tg.start_soon(create, i)
        delivered: set[str] = set()
        index = {name: i for i, name in enumerate(names)}
        while True:
            links = await anyio.to_thread.run_sync(_links, parts["db"])
            ready = [
                (name, so)
                for name, (state, so) in links.items()
                if so is not None and state == "imported" and name not in delivered
            ]
            async with anyio.create_task_group() as tg:
                for name, so in ready:
                    delivered.add(name)
                    tg.start_soon(deliver, index[name], so)
            if sum(1 for state, _ in links.values() if state == "received") == len(names):
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                states = Counter(state for state, _ in links.values())
                raise Unsound(
                    f"not every factory's PO received within {seconds} s: {dict(states)}, "
                    f"{len(names) - len(links)} never linked"
                )
            await anyio.sleep(0.2)


async def _sim_counts(
    base: str, tokens: list[str], path: str = "/_sim/counters"
) -> list[dict[str, Any]]:
    limit = anyio.Semaphore(_CONTROL_CONCURRENCY)
    out: list[dict[str, Any]] = [{} for _ in tokens]
    async with httpx.AsyncClient(timeout=60, limits=_LIMITS) as client:

        async def one(i: int) -> None:
            async with limit:
                response = await client.get(f"{base}{path}", headers={"X-Sim-Account": tokens[i]})
                response.raise_for_status()
                out[i] = response.json()

        async with anyio.create_task_group() as tg:
            for i in range(len(tokens)):
                tg.start_soon(one, i)
    return out


async def _deliveries(parts: dict[str, Any], count: int) -> dict[str, dict[str, int]]:
    """Per service, the simulator's webhook counters summed over every account
    (``published``, ``delivered``, ``failed_attempts``, ...) and how many still wait
    (``queued`` + ``in_flight``: a failed one waits for its retry)."""
    out: dict[str, dict[str, int]] = {}
    for service, base in (("katana", _KATANA_TOKEN), ("tradegecko", _TRADEGECKO_TOKEN)):
        tokens = [_token(base, i) for i in range(count)]
        total: Counter[str] = Counter()
        for knobs in await _sim_counts(parts[service], tokens, "/_sim/webhooks"):
            total.update(knobs.get("counters", {}))
            total["waiting"] += int(knobs.get("queued", 0)) + int(knobs.get("in_flight", 0))
        out[service] = dict(total)
    return out


def _agreement(parts: dict[str, Any], names: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Per factory and service, the daemon's calls vs the simulator account's, endpoint by
    endpoint. The simulators' counts are read between two scrapes of the daemon, and each
    endpoint's count is bracketed: a simulator counts a request before the daemon counts its
    answer, so scrape before <= simulator <= scrape after (equal when the daemon's counts
    stood still; at 1,000 factories the periodic calls never stop for the seconds a reading
    takes). The first daemon's
    calls between its last scrape and its exit (a poll cut off by the SIGTERM: the simulator
    counted it, the daemon never saw its answer) are read from the simulators once it has
    exited, allowed in the upper bound and reported (``calls_at_stop``)."""
    problems: list[str] = []
    before = _scrape(httpx.get(parts["metrics"], timeout=30).text)["calls"]
    sims = _sim_requests(parts, len(names))
    after = _scrape(httpx.get(parts["metrics"], timeout=30).text)["calls"]
    totals: Counter[str] = Counter()
    creates = []
    for i, name in enumerate(names):
        for service in ("katana", "tradegecko"):
            theirs = sims[service][i]
            earlier = parts.get("earlier_calls", {}).get(name, {}).get(service, Counter())
            low, mine = (
                Counter({k: v for k, v in scrape.get(name, {}).get(service, {}).items() if v})
                + earlier
                for scrape in (before, after)
            )
            totals[service] += sum(mine.values())
            cut_off = parts.get("calls_at_stop", {}).get(service, [Counter()] * len(names))[i]
            high = mine + cut_off
            diff = {
                k: (low.get(k, 0), theirs.get(k, 0), high.get(k, 0))
                for k in sorted(set(high) | set(theirs))
                if not low.get(k, 0) <= theirs.get(k, 0) <= high.get(k, 0)
            }
            if diff:
                problems.append(
                    f"{name} {service} (daemon before, sim, daemon after) disagree: {diff}"
                )
        creates.append(sims["katana"][i]["POST /sales_orders"])
    wrong = [names[i] for i, n in enumerate(creates) if n != 1]
    if wrong:
        problems.append(f"factories whose Katana account saw other than 1 SO create: {wrong[:10]}")
    at_stop = parts.get("calls_at_stop", {})
    return problems[:20], {
        "calls_at_stop": {s: sum(sum(c.values()) for c in per) for s, per in at_stop.items()},
        "api_calls_total": dict(totals),
        "api_calls_per_factory": {s: round(n / len(names), 1) for s, n in totals.items()},
    }


def _sim_requests(parts: dict[str, Any], count: int) -> dict[str, list[Counter[str]]]:
    """Each simulator account's requests so far: service -> per factory, endpoint template
    -> calls."""
    out: dict[str, list[Counter[str]]] = {}
    for service, base in (("katana", _KATANA_TOKEN), ("tradegecko", _TRADEGECKO_TOKEN)):
        tokens = [_token(base, i) for i in range(count)]
        out[service] = []
        for answer in anyio.run(_sim_counts, parts[service], tokens):
            calls: Counter[str] = Counter()
            for endpoint, n in answer["requests"].items():
                calls[_template(endpoint)] += n
            out[service].append(+calls)
    return out


def _sim_totals(parts: dict[str, Any], count: int) -> dict[str, Counter[str]]:
    """Every simulator account's requests so far, summed: service -> endpoint -> calls."""
    return {service: sum(per, Counter()) for service, per in _sim_requests(parts, count).items()}


def _per_factory(
    now: dict[str, Counter[str]], before: dict[str, Counter[str]] | None, count: int
) -> dict[str, dict[str, float]]:
    """The requests per factory by endpoint between two :func:`_sim_totals`."""
    out: dict[str, dict[str, float]] = {}
    for service, total in now.items():
        made = total - (before or {}).get(service, Counter())
        out[service] = {k: round(v / count, 2) for k, v in sorted(made.items()) if v}
    return out


def _one(
    count: int, idle_seconds: float, start_only: bool = False, register: bool = True
) -> dict[str, Any]:
    names = _names(count)
    out: dict[str, Any] = {"factories": count}
    with (
        tempfile.TemporaryDirectory() as tmp,
        _processes(Path(tmp), count, register=register) as parts,
    ):
        try:
            _measure_one(parts, names, idle_seconds, out, start_only=start_only)
        except Unsound as exc:
            raise Unsound(f"{count} factories: {exc.why}", {**out, **exc.figures}) from None
        except Exception as exc:  # the figures so far, for the reader
            raise Unsound(f"{count} factories: {type(exc).__name__}: {exc}", out) from exc
    return out


def _measure_one(
    parts: dict[str, Any],
    names: list[str],
    idle_seconds: float,
    out: dict[str, Any],
    *,
    start_only: bool = False,
) -> None:
    pid = parts["daemon"].pid
    seen = _wait_started(parts, names, _START_WAIT)
    out["startup_s"] = round(seen["startup_s"], 2)
    out["registered_s"] = round(seen["registered_s"], 2)
    out["startup_cpu_s"] = round(_cpu_seconds(pid), 2)
    out["rss_start_mb"] = round(_rss_mb(pid), 1)
    at_start = _sim_totals(parts, len(names))
    out["start_requests_per_factory"] = _per_factory(at_start, None, len(names))
    print(json.dumps(out), file=sys.stderr, flush=True)  # so far, in case of a later failure
    if start_only:
        before_restart = _sim_totals(parts, len(names))
        _restart(parts, names, out)
        out["restart_requests_per_factory"] = _per_factory(
            _sim_totals(parts, len(names)), before_restart, len(names)
        )
        out["soundness"] = "sound (start only)"
        return
    shares = _idle(pid, idle_seconds)
    out["idle_cpu_core_share"] = round(statistics.median(shares), 4)
    out["idle_cpu_windows"] = [round(s, 4) for s in shares]
    out["rss_idle_mb"] = round(_rss_mb(pid), 1)
    status = _status(parts["config"])
    out["syncctl_status_s"] = round(statistics.median(status), 3)
    out["syncctl_status_runs_s"] = [round(t, 3) for t in status]
    print(json.dumps(out), file=sys.stderr, flush=True)
    before_restart = _sim_totals(parts, len(names))
    _restart(parts, names, out)
    out["restart_requests_per_factory"] = _per_factory(
        _sim_totals(parts, len(names)), before_restart, len(names)
    )
    pid = parts["daemon"].pid
    try:
        out["po_to_received_s"] = round(anyio.run(_orders, parts, names, 300.0), 2)
    finally:
        # What became of the services' webhook deliveries (a failed attempt waits for the
        # service's retry schedule): said whether or not every PO arrived.
        out["webhook_deliveries"] = anyio.run(_deliveries, parts, len(names))
    problems, calls = _agreement(parts, names)
    out.update(calls)
    out["rss_end_mb"] = round(_rss_mb(pid), 1)
    if parts["daemon"].poll() is not None:
        problems.append(f"syncd run exited with {parts['daemon'].returncode}")
    out["soundness"] = problems or "sound"


def measure(
    counts: list[int],
    idle_seconds: float = 30.0,
    *,
    start_only: bool = False,
    register: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {"load_at_start": os.getloadavg(), "idle_seconds": idle_seconds}
    runs = []
    for count in counts:
        try:
            runs.append(_one(count, idle_seconds, start_only, register))
        except Unsound as exc:  # the other counts still run
            runs.append({**exc.figures, "soundness": exc.why})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    out["runs"] = runs
    out["load_at_end"] = os.getloadavg()
    bad = [
        f"{r['factories']}: {r['soundness']}"
        for r in runs
        if not str(r["soundness"]).startswith("sound")
    ]
    if bad:
        raise Unsound("; ".join(bad), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.factories", description=__doc__)
    parser.add_argument("--counts", default="1,10,100,1000")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--start-only",
        action="store_true",
        help="measure the start, the restart and their requests only (no idle, status, POs)",
    )
    parser.add_argument(
        "--no-register",
        action="store_true",
        help="webhooks.register = false (as registered by hand): the start without the "
        "first registration, as a restart finds them recorded; with --start-only",
    )
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        parser.error(f"--counts: not a list of numbers: {args.counts!r}")
    if not counts or min(counts) < 1:
        parser.error("--counts: each count must be at least 1")
    try:
        result = measure(
            counts, args.idle_seconds, start_only=args.start_only, register=not args.no_register
        )
    except Unsound as exc:
        print(json.dumps(exc.figures, indent=1, default=str))
        print(f"UNSOUND: {exc.why}")
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
