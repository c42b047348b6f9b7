"""Failover time: SIGKILL a daemon owning factories, time until the others run them.

    .venv/bin/python -m bench.failover [--daemons 3] [--factories 12] [--kills 5]
                                       [--ttl 3] [--renew 0.5]

Starts a PostgreSQL server (``tests/pg_server.py``, as the tests do) and ``--daemons``
coordinators, each a process of its own (``tests/coordinator_child.py``: a Coordinator
whose factories do a guarded, fenced write every 50 ms). Once the factories are spread,
it SIGKILLs the daemon holding the most, and measures, for each factory it held, the time
from the kill to the first start by another daemon, and to that daemon's first effect
(both read from the children's ``time.monotonic()``, one clock on the host). A new daemon
replaces the killed one before the next kill. Prints each kill and a summary, as JSON on
the last line. The bound to compare with: a lease expires ``ttl`` after its last renewal
(at most ``renew`` before the kill), then the next round of a survivor (``renew``) takes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.harness import TESTS, start_postgres


class Daemon:
    """A child coordinator; its JSON lines collected by a thread."""

    def __init__(self, url: str, ttl: float, renew: float, factories: list[str]) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "coordinator_child.py"),
                url,
                str(ttl),
                str(renew),
                *factories,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def running(self) -> set[str]:
        now: set[str] = set()
        for line in list(self.lines):
            if line["event"] == "start":
                now.add(line["factory"])
            elif line["event"] == "stop":
                now.discard(line["factory"])
        return now

    def first(self, event: str, factory: str, after: float) -> float | None:
        times = [
            e["t"]
            for e in list(self.lines)
            if e["event"] == event and e["factory"] == factory and e["t"] > after
        ]
        return min(times) if times else None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _wait(condition: Any, within: float, what: str) -> None:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > within:
            raise SystemExit(f"not within {within} s: {what}")
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--factories", type=int, default=12)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--renew", type=float, default=0.5)
    args = parser.parse_args()
    server = start_postgres()
    names = [f"f{i:02d}" for i in range(args.factories)]
    daemons: list[Daemon] = []
    total: int = args.factories
    to_start: list[float] = []
    to_effect: list[float] = []
    try:
        url = server.create_database()

        def spread() -> bool:
            held = [d.running() for d in daemons]
            share = total // len(daemons)
            return sum(map(len, held)) == total and min(map(len, held)) >= share

        daemons = [Daemon(url, args.ttl, args.renew, names) for _ in range(args.daemons)]
        for kill in range(args.kills):
            _wait(spread, 30 + 10 * args.renew, "the factories spread")
            victim = max(daemons, key=lambda d: len(d.running()))
            held = victim.running()
            killed_at = time.monotonic()
            victim.kill()
            daemons.remove(victim)

            def taken(held: set[str] = held) -> bool:
                running: set[str] = set()
                for daemon in daemons:
                    running |= daemon.running()
                return held <= running

            _wait(taken, 3 * args.ttl + 10 * args.renew, "the killed one's factories taken")
            time.sleep(0.2)  # their first effects
            starts, effects = [], []
            for name in held:
                start = min(
                    t for d in daemons if (t := d.first("start", name, killed_at)) is not None
                )
                effect = min(
                    (t for d in daemons if (t := d.first("effect", name, killed_at)) is not None),
                    default=start,
                )
                starts.append(start - killed_at)
                effects.append(effect - killed_at)
            to_start += starts
            to_effect += effects
            print(  # the bench's output
                f"kill {kill + 1}: {len(held)} factories, started elsewhere after "
                f"{min(starts):.2f}-{max(starts):.2f} s, first effect {max(effects):.2f} s"
            )
            daemons.append(Daemon(url, args.ttl, args.renew, names))
    finally:
        for daemon in daemons:
            daemon.kill()
        server.stop()
    summary = {
        "daemons": args.daemons,
        "factories": args.factories,
        "kills": args.kills,
        "ttl": args.ttl,
        "renew": args.renew,
        "bound": args.ttl + args.renew,
        "to_start": {
            "min": round(min(to_start), 3),
            "median": round(statistics.median(to_start), 3),
            "max": round(max(to_start), 3),
        },
        "to_first_effect_max": round(max(to_effect), 3),
    }
    print(json.dumps(summary))  # the bench's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
