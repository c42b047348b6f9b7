"""Figure 5: PO created → SO created, webhooks on, every part in its own process.

Both simulators (``syncd sim katana`` / ``syncd sim tradegecko``, rate limits off) and the
daemon (``syncd run``, webhooks on, polls every 60 s so that only webhooks move an order,
budgets raised so that the key's limit is not what is measured) run as separate processes;
this process only creates the POs and reads the times back.

A PO's latency runs from just before its create call (this process's wall clock) to its
link's ``imported`` transition (the daemon's wall clock, as stored: the same machine's
clock). Two kinds of round, interleaved (isolated, burst, isolated, burst, ...):

- ``isolated``: POs one at a time, each after the previous one's SO was made: what one
  order waits when nothing else is going on; the comparison for the burst.
- ``burst``: POs at ``--rate`` per second (20 by default), not waiting for each other.

Medians of the rounds' p50 and p99 are quoted. Sound when every PO created became exactly
one link with one SO, and the Katana simulator's ``POST /sales_orders`` count equals the
links imported (the daemon made no SO twice and none for nothing).

    python -m bench.latency [--rounds 3] [--orders 100] [--rate 20] [--isolated 10]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.harness import Unsound, free_ports, percentile, start_simulator
from syncd.sim import CHAIR_LINE, TRADEGECKO_WEBHOOK_SECRET

__all__ = ["measure"]

_KATANA_TOKEN = "katana-sim-token"
_TRADEGECKO_TOKEN = "tradegecko-sim-token"


@contextmanager
def _processes(tmp: Path) -> Iterator[dict[str, Any]]:
    """Both simulators and the daemon running; what the rounds need to reach them."""
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen[str]] = []
    try:
        katana, katana_url = start_simulator("katana")
        procs.append(katana)
        tradegecko, tradegecko_url = start_simulator("tradegecko")
        procs.append(tradegecko)
        hook_port, metrics_port = free_ports(2)
        db = tmp / "syncd.db"
        config = tmp / "syncd.toml"
        config.write_text(
            f'[daemon]\ndatabase = "{db}"\nlog_level = "warning"\nretry_initial = 0.2\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
            f'[tradegecko]\nbase_url = "{tradegecko_url}"\ntoken = "{_TRADEGECKO_TOKEN}"\n'
            "poll_interval = 60.0\nrate_limit = 100000\n"
            f'[katana]\nbase_url = "{katana_url}/v1"\ntoken = "{_KATANA_TOKEN}"\n'
            "poll_interval = 60.0\nrate_limit = 100000\n"
            f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{hook_port}"\n'
            # Katana registers only https:// addresses; the simulator delivers over http.
            f'public_base_url = "https://127.0.0.1:{hook_port}"\n'
            f'tradegecko_secret = "{TRADEGECKO_WEBHOOK_SECRET}"\nreconcile_interval = 3600.0\n'
        )
        daemon = subprocess.Popen(
            [str(bin_dir / "syncd"), "run", "--config", str(config)], text=True
        )
        procs.append(daemon)
        deadline = time.monotonic() + 60
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"syncd run exited with {daemon.returncode}")
            try:
                health = httpx.get(f"http://127.0.0.1:{hook_port}/healthz", timeout=1).json()
                if health.get("registered"):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not register its webhooks within 60 s")
            time.sleep(0.05)
        yield {"db": db, "katana": katana_url, "tradegecko": tradegecko_url}
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(20)


def _imported(db: Path) -> dict[str, float]:
    """PO number → when its link reached ``imported`` (the daemon's clock)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT l.po_number, min(t.at) FROM transitions t JOIN links l ON l.id = t.link_id"
            " WHERE t.to_state = 'imported' GROUP BY l.po_number"
        ).fetchall()
    return {str(number): float(at) for number, at in rows}


def _create(client: httpx.Client, url: str) -> tuple[str, float]:
    before = time.time()
    response = client.post(
        f"{url}/_sim/purchase_orders",
        json={"supplier": "Katana", "currency": "USD", "lines": [CHAIR_LINE]},
    )
    if response.status_code != 201:
        raise RuntimeError(f"creating a PO: {response.status_code} {response.text}")
    return str(response.json()["purchase_order"]["order_number"]), before


def _wait_imported(db: Path, numbers: set[str], seconds: float) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while True:
        done = _imported(db)
        if numbers <= done.keys():
            return done
        if time.monotonic() > deadline:
            raise Unsound(f"{len(numbers - done.keys())} POs not imported within {seconds} s")
        time.sleep(0.02)


def _round(
    client: httpx.Client, parts: dict[str, Any], kind: str, orders: int, rate: float
) -> dict[str, Any]:
    created: dict[str, float] = {}
    if kind == "isolated":
        for _ in range(orders):
            number, at = _create(client, parts["tradegecko"])
            created[number] = at
            _wait_imported(parts["db"], {number}, 30)
    else:
        start = time.monotonic()
        for i in range(orders):
            # On schedule, not after the previous create: an open loop at ``rate``.
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            number, at = _create(client, parts["tradegecko"])
            created[number] = at
    done = _wait_imported(parts["db"], set(created), 120)
    ms = [(done[n] - created[n]) * 1000 for n in created]
    return {
        "kind": kind,
        "orders": orders,
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
    }


def measure(
    rounds: int = 3, orders: int = 100, rate: float = 20.0, isolated: int = 10
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, _processes(Path(tmp)) as parts:
        results: list[dict[str, Any]] = []
        with httpx.Client(timeout=30) as client:
            for _ in range(rounds):
                results.append(_round(client, parts, "isolated", isolated, rate))
                results.append(_round(client, parts, "burst", orders, rate))
            counters = client.get(f"{parts['katana']}/_sim/counters").json()
        links = _imported(parts["db"])
        with sqlite3.connect(f"file:{parts['db']}?mode=ro", uri=True) as conn:
            (so_links,) = conn.execute("SELECT count(so_id) FROM links").fetchone()
    expected = rounds * (orders + isolated)
    creates = _count(counters, "POST /sales_orders")
    problems: list[str] = []
    if len(links) != expected or so_links != expected:
        problems.append(f"{expected} POs created, {len(links)} imported, {so_links} with an SO")
    if creates != expected:
        problems.append(f"Katana simulator counted {creates} POST /sales_orders for {expected}")

    def median(kind: str, key: str) -> float:
        return round(float(statistics.median(r[key] for r in results if r["kind"] == kind)), 1)

    out: dict[str, Any] = {
        "rounds": results,
        "rate_per_s": rate,
        "burst_p50_ms": median("burst", "p50_ms"),
        "burst_p99_ms": median("burst", "p99_ms"),
        "isolated_p50_ms": median("isolated", "p50_ms"),
        "isolated_p99_ms": median("isolated", "p99_ms"),
        "katana_so_creates": creates,
        "soundness": problems or "sound",
    }
    if problems:
        raise Unsound("; ".join(problems), out)
    return out


def _count(counters: dict[str, Any], endpoint: str) -> int:
    """One endpoint's count in the simulator's ``/_sim/counters`` answer."""
    found = counters.get("requests", counters)
    value = found.get(endpoint, 0) if isinstance(found, dict) else 0
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--isolated", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        result = measure(args.rounds, args.orders, args.rate, args.isolated)
    except Unsound as exc:
        print(json.dumps(exc.figures, indent=1))
        print(f"UNSOUND: {exc}")
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
