"""Run every benchmark; print each figure and write them all to bench/results.json."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench import flows, intake, scale


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


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    seconds = float(os.environ.get("BENCH_SUSTAINED_S", "240"))
    out: dict[str, Any] = {"machine": machine()}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("1a_calls_per_order", lambda: anyio.run(flows.calls_per_order)),
        ("1b_6_polling_per_order", lambda: anyio.run(flows.polling_per_order)),
        ("6_baseline_flow", lambda: anyio.run(flows.baseline_flow)),
        ("5_webhook_latency", lambda: anyio.run(flows.webhook_latency)),
        ("3_webhook_intake", intake.measure),
        ("4_scale", scale.measure),
        ("2_sustained", lambda: anyio.run(flows.sustained, seconds)),
    ]
    started = time.monotonic()
    for name, step in steps:
        t = time.monotonic()
        out[name] = step()
        out[name + "_wall_s"] = round(time.monotonic() - t, 1)
        print(f"== {name} ({out[name + '_wall_s']} s)")
        print(json.dumps(out[name], indent=1, default=str), flush=True)
    out["total_wall_s"] = round(time.monotonic() - started, 1)
    Path(__file__).with_name("results.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"== total {out['total_wall_s']} s; written to bench/results.json")


main()
