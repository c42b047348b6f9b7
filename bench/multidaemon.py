"""Several ``syncd run`` processes on one PostgreSQL, under random kills: nothing lost,
nothing done twice, and how long each failover took.

    .venv/bin/python -m bench.multidaemon [--daemons 3] [--factories 12] [--rounds 8]
                                          [--ttl 3] [--renew 0.5] [--seed 0]

The end-to-end test's world (``tests/multidaemon_harness.py``: simulators in this process,
each daemon behind its own recording proxy, audit triggers in the database), for
``--rounds`` random rounds. Each round makes a PO in every factory, then one of: SIGKILL a
daemon and start it again; SIGSTOP one past its leases and SIGCONT it (checked: nothing
sent, nothing written for what it lost until it took it back); SIGTERM one and start a new
one; a factory added or removed by SIGHUP. Then every PO of every active factory must end
with exactly one SO and one receipt, every history a statechart path. Prints each round,
then a JSON summary: duplicates and losses (both must be 0) and the failover times seen
(from a kill or a freeze to every one of its factories held by another daemon).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.harness import Unsound, load_test_module, start_postgres


async def _taken_over(run: Any, owner: str, factories: list[str], within: float) -> float:
    """Seconds until no factory of ``factories`` is held by ``owner``."""
    started = time.monotonic()
    with anyio.fail_after(within):
        while True:
            held = await run.holders()
            if all(held.get(f, owner) != owner for f in factories):
                return time.monotonic() - started
            await anyio.sleep(0.05)


async def measure(
    *,
    daemons: int = 3,
    factories: int = 12,
    rounds: int = 8,
    ttl: float = 3.0,
    renew: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the rounds; the summary.

    :raises Unsound: a PO lost or done twice, a history off the chart, or a frozen daemon
        that acted for a factory it had lost.
    """
    harness = load_test_module("multidaemon_harness")
    rng = random.Random(seed)
    server = start_postgres()
    failovers: list[float] = []
    frozen_checks: list[dict[str, Any]] = []
    events: list[str] = []
    started = time.monotonic()
    try:
        url = server.create_database()
        with tempfile.TemporaryDirectory(prefix="syncd-multidaemon-") as workdir:
            async with harness.cluster(
                url, Path(workdir), factories=factories, spare=rounds, ttl=ttl, renew=renew
            ) as run:
                for slot in range(daemons):
                    await run.start(slot)
                for daemon in run.running():
                    await run.wait_running(daemon)
                await run.spread()
                spare = list(run.sims.factories[factories:])
                next_slot = daemons
                for number in range(1, rounds + 1):
                    await run.create_pos()
                    action = rng.choice(["kill", "kill", "freeze", "replace", "reload"])
                    victim = rng.choice(run.running())
                    if action == "kill":
                        owner = await run.owner_of(victim)
                        held = [f for f, o in (await run.holders()).items() if o == owner]
                        victim.signal(signal.SIGKILL)
                        victim.proc.wait(timeout=10)
                        failovers.append(await _taken_over(run, owner, held, 4 * ttl + 10))
                        await run.wait_running(await run.start(victim.slot))
                        what = (
                            f"SIGKILL d{victim.slot}: {len(held)} taken over after "
                            f"{failovers[-1]:.2f} s"
                        )
                    elif action == "freeze":
                        check = await run.freeze(victim)
                        failovers.append(check.taken_over_after)
                        frozen_checks.append(
                            {
                                "lost": check.lost,
                                "requests_after_resume": check.requests,
                                "writes_after_resume": check.writes,
                            }
                        )
                        if not check.ok:
                            raise Unsound(f"a frozen daemon acted after resuming: {check}")
                        what = (
                            f"SIGSTOP d{victim.slot} {check.frozen_for:.1f} s: "
                            f"{len(check.lost)} taken over after {check.taken_over_after:.2f} s, "
                            "nothing sent or written for them after SIGCONT"
                        )
                    elif action == "replace":
                        victim.signal(signal.SIGTERM)
                        victim.proc.wait(timeout=30)
                        await run.wait_running(await run.start(next_slot))
                        what = f"SIGTERM d{victim.slot}, d{next_slot} started"
                        next_slot += 1
                    else:
                        added = f"f{factories + number:02d}"
                        run.add_factory(added, spare.pop(0))
                        removed = rng.choice(sorted(run.active - {added}))
                        run.remove_factory(removed)
                        run.reload_all()
                        what = f"SIGHUP: {added} added, {removed} removed"
                    await run.spread()
                    events.append(what)
                    print(f"round {number}: {what}", flush=True)  # the bench's output
                await run.create_pos()
                finished = await run.finish(seconds=120)
                verdict = await run.verdict()
    finally:
        server.stop()
    summary: dict[str, Any] = {
        "daemons": daemons,
        "factories": factories,
        "rounds": rounds,
        "ttl": ttl,
        "renew": renew,
        "seed": seed,
        "orders": verdict.orders,
        "received": verdict.received,
        "duplicates": len(verdict.duplicate_sales_orders) + len(verdict.duplicate_receipts),
        "losses": len(verdict.lost),
        "invalid_histories": len(verdict.invalid_histories),
        "failover_s": {
            "count": len(failovers),
            "min": round(min(failovers), 3) if failovers else None,
            "median": round(statistics.median(failovers), 3) if failovers else None,
            "max": round(max(failovers), 3) if failovers else None,
            "bound": ttl + renew,
        },
        "frozen": frozen_checks,
        "events": events,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if not finished or not verdict.ok:
        raise Unsound(f"not every PO once: {verdict}", summary)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--factories", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--renew", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        summary = anyio.run(lambda: measure(**vars(args)))
    except Unsound as exc:
        print(f"UNSOUND: {exc.why}")  # the bench's output
        print(json.dumps(exc.figures, default=str))  # the bench's output
        return 1
    print(json.dumps(summary, default=str))  # the bench's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
