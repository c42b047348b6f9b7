"""Run every benchmark; print each figure and write them all to bench/results.json.

A bench whose soundness check fails is reported as ``UNSOUND: <why>`` (its figures kept in
results.json for the reader) and the run exits 1 after the others have run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench import compete, factories, flows, intake, latency, multidaemon, scale, throughput
from bench.harness import find_unsound


def machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": round(int(mem) / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


def failover() -> Any:
    """bench/failover.py in its own process (it starts its own PostgreSQL): its summary."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.failover"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.failover exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    seconds = float(os.environ.get("BENCH_SUSTAINED_S", "660"))
    out: dict[str, Any] = {"machine": machine(), "load_at_start": os.getloadavg()}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("1a_calls_per_order", lambda: anyio.run(flows.calls_per_order)),
        ("1b_6_polling_per_order", lambda: anyio.run(flows.polling_per_order)),
        ("1c_production_calls_per_min", lambda: anyio.run(flows.production_calls_per_minute)),
        ("6_baseline_flow", lambda: anyio.run(flows.baseline_flow)),
        ("5_webhook_latency", latency.measure),
        ("3_webhook_intake", intake.measure),
        ("4_scale", scale.measure),
        ("2_sustained", lambda: anyio.run(flows.sustained, seconds)),
        ("2b_sustained_webhooks", lambda: anyio.run(flows.sustained_webhooks, seconds)),
        ("7_competing_client", lambda: anyio.run(compete.measure)),
        ("8_failover", failover),
        ("9_multidaemon", lambda: anyio.run(multidaemon.measure)),
        ("10_factories", lambda: factories.measure([1, 10, 100, 1000])),
        # 12 factories, 120 POs, 2 rounds: the measured size of BENCHMARKS §9 (the module's
        # defaults, 24 and 480 over 3 rounds, take hours on 2 cores).
        (
            "11_throughput",
            lambda: anyio.run(
                lambda: throughput.measure(daemons=[1, 2, 3], rounds=2, factories=12, orders=120)
            ),
        ),
    ]
    unsound: list[str] = []
    started = time.monotonic()
    for name, step in steps:
        t = time.monotonic()
        try:
            out[name] = step()
        except BaseException as exc:  # an unsound figure is reported; anything else re-raised
            found = find_unsound(exc)
            if found is None:
                raise
            out[name] = {"UNSOUND": found.why, "figures": found.figures}
            unsound.append(f"{name}: {found.why}")
        out[name + "_wall_s"] = round(time.monotonic() - t, 1)
        print(f"== {name} ({out[name + '_wall_s']} s)")
        print(json.dumps(out[name], indent=1, default=str), flush=True)
    out["total_wall_s"] = round(time.monotonic() - started, 1)
    out["load_at_end"] = os.getloadavg()
    Path(__file__).with_name("results.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"== total {out['total_wall_s']} s; written to bench/results.json")
    for line in unsound:
        print(f"UNSOUND: {line}")
    return 1 if unsound else 0


sys.exit(main())
