"""Figure 4: 100,000 links in a real SQLite file: daemon RSS and start-up, syncctl status,
and the cost of one transition (Statechart.decide alone; decide + Store.apply).

The data is shaped like a year of one shop's orders (see :data:`SHARES`, :func:`_plan`):
states spread as in real history, ``created_at``/``state_since`` spread over months (every
link its own), each link's transitions the steps of its path through the statechart, inbox
rows behind each transition processed and :data:`PENDING` still waiting. :func:`_shape`
reads the shape back and is part of the figures; a history that does not end in its link's
state makes the bench UNSOUND.
"""

from __future__ import annotations

import random
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

from bench.harness import Unsound, free_port, running_sims
from syncd.domain.orders import PurchaseOrderLine, PurchaseOrderSnapshot
from syncd.domain.statechart import load_statechart
from syncd.runtime import inbox
from syncd.store import Store

LINKS = 100_000
DAY = 86400.0
#: Months of history the links were created over.
HISTORY_DAYS = 365
#: How many links end (or sit) in each state, like a year of one shop's orders: most done,
#: a few hundred in flight, some waiting for a person, some cancelled.
SHARES = {
    "imported": 150,
    "in_production": 400,
    "delivered": 30,
    "needs_attention": 120,
    "cancelled": 1_900,
}
SHARES["received"] = LINKS - sum(SHARES.values())
#: Inbox events still waiting for the dispatcher when the daemon starts.
PENDING = 40

Step = tuple[str, str]  # (trigger, destination)

# Each end state's possible paths: the trigger of each step, after po_discovered.
_PATHS: dict[str, list[list[Step]]] = {
    "received": [
        [
            ("so_created", "imported"),
            ("production_started", "in_production"),
            ("so_delivered", "delivered"),
            ("po_received", "received"),
        ],
        # Made from stock: delivered without a manufacturing order.
        [("so_created", "imported"), ("so_delivered", "delivered"), ("po_received", "received")],
    ],
    "imported": [[("so_created", "imported")]],
    "in_production": [[("so_created", "imported"), ("production_started", "in_production")]],
    "delivered": [
        [
            ("so_created", "imported"),
            ("production_started", "in_production"),
            ("so_delivered", "delivered"),
        ]
    ],
    "needs_attention": [
        [("import_failed", "needs_attention")],
        [("so_created", "imported"), ("po_withdrawn", "needs_attention")],
        [
            ("so_created", "imported"),
            ("production_started", "in_production"),
            ("so_delivered", "delivered"),
            ("receive_failed", "needs_attention"),
        ],
    ],
    "cancelled": [
        [("po_withdrawn", "cancelled")],
        [("so_created", "imported"), ("so_deleted", "cancelled")],
        [
            ("so_created", "imported"),
            ("production_started", "in_production"),
            ("cancel", "cancelled"),
        ],
    ],
}
# Which service's event drove a trigger (the inbox row behind the transition).
_SOURCE = {
    "so_created": ("effects", "effect_outcome"),
    "production_started": ("katana", "sales_order_observed"),
    "so_delivered": ("katana", "sales_order_observed"),
    "po_received": ("effects", "effect_outcome"),
    "import_failed": ("effects", "effect_outcome"),
    "receive_failed": ("effects", "effect_outcome"),
    "po_withdrawn": ("tradegecko", "purchase_order_observed"),
    "so_deleted": ("katana", "sales_order_observed"),
    "cancel": ("operator", "operator"),
}


def _plan(rng: random.Random, now: float) -> list[tuple[str, float, list[Step], list[float]]]:
    """``(end state, created_at, path, time of each step)`` per link, oldest link first.

    Done orders spread over the year; orders in flight are recent (production takes days
    to weeks), so ``state_since`` and the oldest per state look like a real shop's.
    """
    plan = []
    for state, count in SHARES.items():
        for _ in range(count):
            if state in ("received", "cancelled"):
                created = now - rng.uniform(7, HISTORY_DAYS) * DAY
                span = rng.uniform(1, 30) * DAY  # discovery to the last step
            elif state == "needs_attention":
                created = now - rng.uniform(0.5, 60) * DAY
                span = rng.uniform(0.01, 0.4) * (now - created)
            else:  # in flight
                created = now - rng.uniform(0.02, 28) * DAY
                span = rng.uniform(0.05, 0.9) * (now - created)
            path = rng.choice(_PATHS[state])
            marks = sorted(rng.uniform(0, span) for _ in path)
            # The import follows discovery within seconds.
            if path[0][0] == "so_created":
                marks[0] = rng.uniform(1, 30)
                marks = [marks[0], *sorted(max(m, marks[0] + 1) for m in marks[1:])]
            plan.append((state, created, path, [created + m for m in marks]))
    plan.sort(key=lambda x: x[1])
    return plan


def _build(path: Path) -> float:
    started = time.monotonic()

    async def migrate() -> None:
        store = await Store.open(path)
        await store.setdefault_meta(
            "activated_at",
            datetime.fromtimestamp(time.time() - HISTORY_DAYS * DAY, UTC).isoformat(),
        )
        await store.close()

    anyio.run(migrate)
    encode = msgspec.json.Encoder().encode
    rng = random.Random(1)
    now = time.time()
    links: list[tuple[Any, ...]] = []
    transitions: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    plan = _plan(rng, now)
    pending_left = PENDING
    for i, (state, created_ts, path_, steps) in enumerate(plan, start=1):
        created = datetime.fromtimestamp(created_ts, UTC)
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
                    quantity=Decimal(rng.randint(1, 20)),
                    price=Decimal("10.00"),
                    freeform=False,
                    label=None,
                    landed_cost=None,
                    position=n,
                )
                for n in range(rng.choice((1, 1, 1, 2, 3, 5)))
            ),
        )
        imported = path_[0][0] == "so_created"
        events.append(
            (
                "tradegecko",
                "po_discovered",
                f"po:{i}",
                i,
                None,
                i,
                encode(snapshot),
                created_ts,
                created_ts + 0.05,
                "linked",
            )
        )
        transitions.append(
            (i, None, "discovered", "po_discovered", "tradegecko", len(events), created_ts)
        )
        previous = "discovered"
        for (trigger, dest), at in zip(path_, steps, strict=True):
            source, kind = _SOURCE[trigger]
            events.append(
                (
                    source,
                    kind,
                    f"b:{i}:{trigger}",
                    i,
                    i if imported else None,
                    i,
                    b"{}",
                    at - 0.05,
                    at,
                    "applied",
                )
            )
            transitions.append((i, previous, dest, trigger, source, len(events), at))
            previous = dest
        # Webhook deliveries seen for done orders, processed long ago.
        if state == "received" and rng.random() < 0.3:
            events.append(
                (
                    "tradegecko",
                    "webhook_received",
                    f"webhook:tradegecko:{i}",
                    i,
                    None,
                    None,
                    b"{}",
                    steps[-1],
                    steps[-1] + 0.01,
                    "consumed",
                )
            )
        reason = resume = None
        if state == "needs_attention":
            reason = f"bench: {path_[-1][0]}"
            resume = path_[-2][1] if len(path_) > 1 else "discovered"
        links.append(
            (
                i,
                i,
                f"PO{i:06d}",
                state,
                resume,
                reason,
                i if imported else None,
                f"TG-PO{i:06d}" if imported else None,
                "USD",
                encode(snapshot),
                created_ts,
                steps[-1],
                steps[-1],
            )
        )
        if state == "imported" and pending_left > 0:
            pending_left -= 1
            payload = inbox.encode(inbox.PurchaseOrderObserved(po_id=i, status="active"))
            events.append(
                (
                    "tradegecko",
                    "purchase_order_observed",
                    f"po:{i}:pending",
                    i,
                    None,
                    i,
                    payload,
                    now - 1,
                    None,
                    None,
                )
            )
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO inbox (source, kind, dedup_key, po_id, so_id, link_id, payload,"
            " received_at, processed_at, outcome) VALUES (?,?,?,?,?,?,?,?,?,?)",
            events,
        )
        db.executemany(
            "INSERT INTO links (id, po_id, po_number, state, resume_state, reason, so_id,"
            " so_number, currency, snapshot, created_at, updated_at, state_since)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            links,
        )
        db.executemany(
            "INSERT INTO transitions (link_id, from_state, to_state, trigger, cause, event_id, at)"
            " VALUES (?,?,?,?,?,?,?)",
            transitions,
        )
    return time.monotonic() - started


def _shape(path: Path) -> dict[str, Any]:
    """What was built, read back: the check that the data is as described."""
    with sqlite3.connect(path) as db:
        states = dict(db.execute("SELECT state, count(*) FROM links GROUP BY state").fetchall())
        oldest = db.execute(
            "SELECT state, (? - min(state_since)) / 86400.0 FROM links GROUP BY state",
            (time.time(),),
        ).fetchall()
        distinct_since = db.execute("SELECT count(DISTINCT state_since) FROM links").fetchone()[0]
        transitions = db.execute("SELECT count(*) FROM transitions").fetchone()[0]
        processed, pending = db.execute(
            "SELECT count(processed_at), count(*) - count(processed_at) FROM inbox"
        ).fetchone()
        bad_paths = db.execute(
            "SELECT count(*) FROM links l WHERE l.state != (SELECT to_state FROM transitions t"
            " WHERE t.link_id = l.id ORDER BY t.id DESC LIMIT 1)"
        ).fetchone()[0]
    return {
        "states": states,
        "oldest_days_by_state": {s: round(d, 1) for s, d in oldest},
        "distinct_state_since": distinct_since,
        "transitions": transitions,
        "inbox_processed": processed,
        "inbox_pending": pending,
        "links_whose_last_transition_is_not_their_state": bad_paths,
    }


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def _daemon(db: Path, tmp: Path) -> dict[str, Any]:
    bin_dir = Path(sys.executable).parent
    async with running_sims(limits=False) as sims:
        port = free_port()
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
            await anyio.sleep(5)  # the first polls and the pending events have run
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
    with sqlite3.connect(db) as conn:
        (pending,) = conn.execute(
            "SELECT count(*) FROM inbox WHERE processed_at IS NULL"
        ).fetchone()
    return {
        "inbox_pending_after_run": pending,
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
        with sqlite3.connect(db) as conn:
            (link_id,) = conn.execute(
                "SELECT id FROM links WHERE state = 'imported' ORDER BY id LIMIT 1"
            ).fetchone()
        link = await store.get_link(link_id)
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
        result["data"] = _shape(db)
        if result["data"]["links_whose_last_transition_is_not_their_state"]:
            raise Unsound("built links whose history does not end in their state", result)
        result.update(anyio.run(_daemon, db, Path(tmp)))
        result.update(anyio.run(_transitions, db))
    return result


if __name__ == "__main__":
    import json

    try:
        print(json.dumps(measure(), indent=1))
    except Unsound as exc:
        print(json.dumps(exc.figures, indent=1, default=str))
        print(f"UNSOUND: {exc.why}")
        sys.exit(1)
