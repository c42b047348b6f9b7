"""The long crash run: many kills, many orders; prints what survived.

    .venv/bin/python -m bench.crash [--kills 200] [--orders 50] [--seed 1] [--keep DIR]

Runs the harness of ``tests/crash_harness.py`` (simulators and daemon as real processes; the
daemon SIGKILLed at random moments or at crash points, and restarted) and prints kills
survived, orders, duplicates and losses. Exits 0 when nothing was lost or done twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import load_test_module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--orders", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=900.0, help="Chaos time limit.")
    parser.add_argument("--keep", default=None, help="Keep logs and the database here.")
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="syncd-crash-") as scratch:
        workdir = Path(args.keep or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        harness = load_test_module("crash_harness").CrashHarness(workdir, seed=args.seed)
        began = time.monotonic()
        with harness.running():
            report = harness.chaos(orders=args.orders, kills=args.kills, seconds=args.seconds)
            finished = harness.finish(orders=args.orders, seconds=120.0)
            verdict = harness.verdict()
        elapsed = time.monotonic() - began

    figures = {
        "kills_survived": report.kills if verdict.ok else 0,
        "kills": report.kills,
        "sigkills": report.sigkills,
        "crash_points": dict(sorted(report.crash_points.items())),
        "unexpected_exits": report.unexpected_exits,
        "orders": verdict.orders,
        "received": verdict.received,
        "duplicates": verdict.duplicates,
        "duplicate_sales_orders": verdict.duplicate_sales_orders,
        "duplicate_receipts": verdict.duplicate_receipts,
        "losses": len(verdict.lost),
        "lost": verdict.lost,
        "invalid_histories": len(verdict.invalid_histories),
        "customers_created": verdict.customers_created,
        "products_created": verdict.products_created,
        "finished": finished,
        "chaos_s": round(report.seconds, 1),
        "total_s": round(elapsed, 1),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:24} {value}")
        print("OK: nothing lost, nothing done twice" if verdict.ok else "FAILED")
    return 0 if verdict.ok and finished and not report.unexpected_exits else 1


if __name__ == "__main__":
    sys.exit(main())
