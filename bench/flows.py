"""Figures 1, 2, 5 and 6: API calls per order, sustained flow, end-to-end latency, baseline."""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from bench.harness import Sims, delta, free_port, percentile, running_sims, wait_until
from syncd.runtime.daemon import Daemon, running_daemon
from syncd.runtime.observer import Observer, TransitionNotice

MANUAL = 3600.0  # poll interval when the bench kicks the pollers itself


def _split(counts: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (kind, endpoint), n in sorted(counts.items()):
        out.setdefault(kind, {})[endpoint] = n
    return out


def _both(sims: Sims) -> tuple[Counter[Any], Counter[Any]]:
    return sims.katana_rec.snapshot(), sims.tradegecko_rec.snapshot()


def _phase(sims: Sims, before: tuple[Counter[Any], Counter[Any]]) -> dict[str, Any]:
    k, t = _both(sims)
    return {"katana": _split(delta(k, before[0])), "tradegecko": _split(delta(t, before[1]))}


async def _state(daemon: Daemon, number: str) -> str | None:
    link = await daemon.store.link_by_po_number(number)
    return link.state if link else None


async def _drive(daemon: Daemon, number: str, states: set[str], *, katana: bool) -> None:
    """Kick the pollers every 0.25 s until the order is in one of ``states``."""

    async def done() -> bool:
        if await _state(daemon, number) in states:
            return True
        (daemon.katana_poller if katana else daemon.tradegecko_poller).kick.set()
        return False

    await wait_until(done, 60, step=0.25)


async def calls_per_order() -> dict[str, Any]:
    """Figure 1a: calls per linked order for POs of 1, 5, 50 lines (real budgets, limits off)."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with running_sims(limits=False) as sims:
            config = sims.config(Path(tmp) / "syncd.db", poll=MANUAL, retry_initial=0.2)
            async with (
                running_daemon(
                    config,
                    katana_transport=sims.katana_rec,
                    tradegecko_transport=sims.tradegecko_rec,
                ) as daemon,
                sims.factory(),
            ):
                for label, lines in (("warm-up (1 line)", 1), ("1", 1), ("5", 5), ("50", 50)):
                    sim_before = await sims.counters()
                    before = _both(sims)
                    po = await sims.create_po(lines)
                    number = po["order_number"]
                    await _drive(daemon, number, {"imported", "in_production"}, katana=False)
                    imported = _phase(sims, before)
                    before = _both(sims)
                    await _drive(daemon, number, {"received"}, katana=True)
                    completed = _phase(sims, before)
                    sim_after = await sims.counters()
                    result[label] = {
                        "import": imported,
                        "completion": completed,
                        "sim_counters_delta": {
                            svc: delta(Counter(a["requests"]), Counter(b["requests"]))
                            for svc, a, b in zip(
                                ("katana", "tradegecko"), sim_after, sim_before, strict=True
                            )
                        },
                    }
            k, t = await sims.counters()
            result["responses_429"] = {
                "katana": k["responses_429"],
                "tradegecko": t["responses_429"],
            }
    return result


async def _poll_cycle(daemon: Daemon) -> None:
    tg, kt = daemon.tradegecko_poller, daemon.katana_poller
    before = (tg.last_success, kt.last_success)
    tg.kick.set()
    kt.kick.set()

    async def done() -> bool:
        return tg.last_success != before[0] and kt.last_success != before[1]

    await wait_until(done, 30, step=0.005)


def naive_katana_poll(daemon: Daemon) -> Any:
    """The baseline: every cycle, GET every open (followed) SO by id."""
    poller = daemon.katana_poller

    async def poll_once() -> int:
        followed = await daemon.store.so_ids_in_states(poller.followed_states)
        added = 0
        for so_id in followed:
            so = await poller.client.get_sales_order(so_id)
            added += await poller.report([so], followed)
        return added

    return poll_once


async def polling_per_order(cycles: int = 10) -> dict[str, Any]:
    """Figures 1b and 6: polling calls per cycle per order in flight, syncd and naive."""
    result: dict[str, Any] = {}
    for n in (1, 10, 50):
        with tempfile.TemporaryDirectory() as tmp:
            async with running_sims(limits=False) as sims:
                # Budgets raised only so that importing 50 orders does not take 2.5 minutes;
                # the count of calls per poll does not depend on the budget.
                config = sims.config(
                    Path(tmp) / "syncd.db",
                    poll=MANUAL,
                    katana_budget=100_000,
                    tradegecko_budget=100_000,
                    retry_initial=0.2,
                )
                async with running_daemon(
                    config,
                    katana_transport=sims.katana_rec,
                    tradegecko_transport=sims.tradegecko_rec,
                ) as daemon:
                    numbers = [(await sims.create_po(1))["order_number"] for _ in range(n)]

                    async def all_imported(numbers: list[str] = numbers) -> bool:
                        daemon.tradegecko_poller.kick.set()
                        states = [await _state(daemon, x) for x in numbers]
                        return all(s == "imported" for s in states)

                    await wait_until(all_imported, 120, step=0.2)
                    await _poll_cycle(daemon)  # settle cursors
                    row: dict[str, Any] = {}
                    for name in ("syncd", "naive"):
                        if name == "naive":
                            daemon.katana_poller.poll_once = naive_katana_poll(daemon)  # type: ignore[method-assign]
                        before = _both(sims)
                        for _ in range(cycles):
                            await _poll_cycle(daemon)
                        calls = _phase(sims, before)
                        k = sum(calls["katana"].get("poll", {}).values()) + sum(
                            calls["katana"].get("effect", {}).values()
                        )
                        t = sum(calls["tradegecko"].get("poll", {}).values())
                        row[name] = {
                            "katana_per_cycle": k / cycles,
                            "tradegecko_per_cycle": t / cycles,
                            "per_order_per_cycle": (k + t) / cycles / n,
                            "endpoints": calls,
                        }
                    result[str(n)] = row
    return result


async def baseline_flow(orders: int = 10, poll: float = 1.0) -> dict[str, Any]:
    """Figure 6: the same workload end to end, syncd's poller against the naive one."""
    result: dict[str, Any] = {}
    for name in ("syncd", "naive"):
        with tempfile.TemporaryDirectory() as tmp:
            async with running_sims(limits=False) as sims:
                config = sims.config(
                    Path(tmp) / "syncd.db",
                    poll=poll,
                    katana_budget=100_000,
                    tradegecko_budget=100_000,
                    retry_initial=0.2,
                )
                async with (
                    running_daemon(
                        config,
                        katana_transport=sims.katana_rec,
                        tradegecko_transport=sims.tradegecko_rec,
                    ) as daemon,
                    sims.factory(step_delay=1.0),
                ):
                    if name == "naive":
                        daemon.katana_poller.poll_once = naive_katana_poll(daemon)  # type: ignore[method-assign]
                    started = time.monotonic()
                    numbers = [(await sims.create_po(1))["order_number"] for _ in range(orders)]

                    async def received(numbers: list[str] = numbers) -> bool:
                        states = [await _state(daemon, x) for x in numbers]
                        return all(s == "received" for s in states)

                    await wait_until(received, 180, step=0.1)
                    elapsed = time.monotonic() - started
                k, t = _both(sims)
                result[name] = {
                    "seconds": round(elapsed, 1),
                    "katana_total": sum(k.values()),
                    "tradegecko_total": sum(t.values()),
                    "katana": _split(dict(k)),
                }
    return result


async def sustained(seconds: float = 240.0, in_flight: int = 30) -> dict[str, Any]:
    """Figure 2: simulators at the real limits, the daemon's default budgets and intervals."""
    completions: list[float] = []
    created = 0
    with tempfile.TemporaryDirectory() as tmp:
        async with running_sims(limits=True) as sims:
            config = sims.config(Path(tmp) / "syncd.db")  # defaults: 30 s polls, 60/60, 300/300

            class Seen(Observer):
                def transitioned(self, notice: TransitionNotice) -> None:
                    if notice.dest == "received":
                        completions.append(time.monotonic())

            async with (
                running_daemon(
                    config,
                    observer=Seen(),
                    katana_transport=sims.katana_rec,
                    tradegecko_transport=sims.tradegecko_rec,
                ),
                sims.factory(step_delay=0.2),
            ):
                started = time.monotonic()
                while time.monotonic() - started < seconds:
                    while created - len(completions) < in_flight:
                        await sims.create_po(1)
                        created += 1
                    await anyio.sleep(0.5)
                ended = time.monotonic()
            k, t = await sims.counters()
            kc, tc = _both(sims)
    rel = [c - started for c in completions if c <= ended]
    window = 120.0
    late = [c for c in rel if c >= seconds - window]
    return {
        "seconds": seconds,
        "in_flight": in_flight,
        "created": created,
        "completed": len(rel),
        "first_completion_s": round(rel[0], 1) if rel else None,
        "completed_last_window": len(late),
        "window_s": window,
        "per_hour_last_window": len(late) * 3600 / window,
        "per_hour_whole_run": len(rel) * 3600 / seconds,
        "responses_429": {"katana": k["responses_429"], "tradegecko": t["responses_429"]},
        "daemon_saw_429": {
            "katana": sims.katana_rec.statuses[429],
            "tradegecko": sims.tradegecko_rec.statuses[429],
        },
        "katana_calls": _split(dict(kc)),
        "tradegecko_calls": _split(dict(tc)),
    }


async def webhook_latency(orders: int = 100, spacing: float = 0.05) -> dict[str, Any]:
    """Figure 5: PO created -> SO created (link imported), webhooks on, limits off."""
    created_at: dict[str, float] = {}
    imported_at: dict[str, float] = {}

    class Seen(Observer):
        def transitioned(self, notice: TransitionNotice) -> None:
            if notice.dest == "imported":
                imported_at.setdefault(notice.link.po_number, time.monotonic())

    with tempfile.TemporaryDirectory() as tmp:
        async with running_sims(limits=False, webhooks=True) as sims:
            config = sims.config(
                Path(tmp) / "syncd.db",
                poll=60.0,
                katana_budget=100_000,
                tradegecko_budget=100_000,
                retry_initial=0.2,
                webhook_port=free_port(),
            )
            async with running_daemon(config, observer=Seen()) as daemon:
                assert daemon.webhooks is not None and daemon.webhooks.registered
                for _ in range(orders):
                    before = time.monotonic()
                    po = await sims.create_po(1)
                    created_at[po["order_number"]] = before
                    await anyio.sleep(spacing)

                async def done() -> bool:
                    return len(imported_at) >= orders

                await wait_until(done, 60)
    ms = [(imported_at[n] - created_at[n]) * 1000 for n in created_at]
    return {
        "orders": orders,
        "spacing_s": spacing,
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
    }
