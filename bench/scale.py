"""Figure 4: 100,000 links in a real SQLite file: daemon RSS and start-up, syncctl status,
and the cost of one transition (Statechart.decide alone; decide + Store.apply)."""

from __future__ import annotations

import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec

from bench.harness import running_sims
from syncd.domain.orders import PurchaseOrderLine, PurchaseOrderSnapshot
from syncd.domain.statechart import load_statechart
from syncd.store import Store

LINKS = 100_000
FOLLOWED = 2_000  # half imported, half in_production; the rest received


def _build(path: Path) -> float:
    started = time.monotonic()

    async def migrate() -> None:
        store = await Store.open(path)
        await store.setdefault_meta("activated_at", datetime.now(UTC).isoformat())
        await store.close()

    anyio.run(migrate)
    encode = msgspec.json.Encoder().encode
    now = time.time()
    created = datetime.now(UTC)
    links, transitions, events = [], [], []
    for i in range(1, LINKS + 1):
        snapshot = PurchaseOrderSnapshot(
            po_id=i,
            po_number=f"PO{i:06d}",
            status="active",
            company_id=1,
            currency_id=1,
            created_at=created,
            updated_at=created,
            lines=tuple(
                PurchaseOrderLine(
                    line_id=i * 10 + n,
                    variant_id=n + 1,
                    quantity=Decimal(1),
                    price=Decimal("10.00"),
                    freeform=False,
                    label=None,
                    landed_cost=None,
                    position=n,
                )
                for n in range(2)
            ),
        )
        state = (
            "imported" if i <= FOLLOWED // 2 else "in_production" if i <= FOLLOWED else "received"
        )
        links.append(
            (i, i, f"PO{i:06d}", state, i, f"TG-PO{i:06d}", "USD", encode(snapshot), now, now, now)
        )
        path_states = ["discovered", "imported", "in_production", "delivered", "received"]
        for n, (a, b) in enumerate(zip([None, *path_states], path_states, strict=False)):
            transitions.append((i, a, b, "t", "bench", None, now))
            if n < 2:
                events.append(("bench", "so_observed", f"b:{i}:{n}", i, b"{}", now, now, "ok"))
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO links (id, po_id, po_number, state, so_id, so_number, currency, snapshot,"
            " created_at, updated_at, state_since) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            links,
        )
        db.executemany(
            "INSERT INTO transitions (link_id, from_state, to_state, trigger, cause, event_id, at)"
            " VALUES (?,?,?,?,?,?,?)",
            transitions,
        )
        db.executemany(
            "INSERT INTO inbox (source, kind, dedup_key, link_id, payload, received_at,"
            " processed_at, outcome) VALUES (?,?,?,?,?,?,?,?)",
            events,
        )
    return time.monotonic() - started


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def _daemon(db: Path, tmp: Path) -> dict[str, Any]:
    bin_dir = Path(sys.executable).parent
    async with running_sims(limits=False) as sims:
        port = 19000 + os.getpid() % 1000
        config = tmp / "syncd.toml"
        config.write_text(
            f'[daemon]\ndatabase = "{db}"\nlog_level = "warning"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
            f'[tradegecko]\nbase_url = "{sims.tradegecko_url}"\ntoken = "tradegecko-bench-token"\n'
            f'[katana]\nbase_url = "{sims.katana_url}/v1"\ntoken = "katana-bench-token"\n'
        )
        started = time.monotonic()
        proc = subprocess.Popen([str(bin_dir / "syncd"), "run", "--config", str(config)])  # noqa: ASYNC220
        try:
            async with httpx.AsyncClient() as client:
                while True:
                    try:
                        if (
                            await client.get(f"http://127.0.0.1:{port}/metrics")
                        ).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if proc.poll() is not None:
                        raise RuntimeError(f"syncd exited with {proc.returncode}")
                    await anyio.sleep(0.02)
            startup = time.monotonic() - started
            rss_start, _ = _rss_mb(proc.pid)
            await anyio.sleep(5)  # the first polls (2,000 followed SOs) have run
            rss_5s, hwm = _rss_mb(proc.pid)
            times = []
            for _ in range(3):
                t0 = time.monotonic()
                out = await anyio.run_process(
                    [str(bin_dir / "syncctl"), "--db", str(db), "status"], check=True
                )
                times.append(time.monotonic() - t0)
            status_head = out.stdout.decode().splitlines()[:3]
        finally:
            proc.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(proc.wait, 15)
    return {
        "startup_s": round(startup, 3),
        "rss_at_start_mb": round(rss_start, 1),
        "rss_after_5s_mb": round(rss_5s, 1),
        "peak_rss_mb": round(hwm, 1),
        "syncctl_status_s": [round(t, 3) for t in times],
        "status_head": status_head,
    }


async def _transitions(db: Path, rounds: int = 500) -> dict[str, Any]:
    chart = load_statechart()
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        chart.decide("imported", "production_started")
    decide_us = (time.perf_counter() - t0) / n * 1e6
    store = await Store.open(db)
    try:
        link = await store.get_link(1)
        assert link is not None and link.state == "imported"
        samples = []
        for _ in range(rounds):
            for trigger, resume in (("po_withdrawn", None), ("retry", "imported")):
                t = time.perf_counter()
                decision = chart.decide(
                    link.state, trigger, resume_state=link.resume_state if resume else None
                )
                assert decision is not None
                link = await store.apply(link, decision, cause="bench")
                samples.append((time.perf_counter() - t) * 1e6)
    finally:
        await store.close()
    return {
        "decide_us": round(decide_us, 2),
        "decide_apply_us_median": round(statistics.median(samples), 1),
        "decide_apply_us_p99": round(sorted(samples)[int(len(samples) * 0.99)], 1),
        "transitions_timed": len(samples),
    }


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "syncd.db"
        build_s = _build(db)
        size_mb = db.stat().st_size / 1e6
        result: dict[str, Any] = {"links": LINKS, "build_s": round(build_s, 1)}
        result["db_mb"] = round(size_mb, 1)
        result.update(anyio.run(_daemon, db, Path(tmp)))
        result.update(anyio.run(_transitions, db))
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=1))
