"""Share of the Katana key left to others at saturation: syncd works through a backlog while
another client (its own process) spends the same key at a fixed rate.

    python -m bench.compete [--seconds 120] [--backlog 150] [--rate 15] [--warm 60] [--reserve N]

Simulators at the real limits (Katana 60/60 s, TradeGecko 300/300 s) and the daemon's real
budgets; ``--rate`` is the competitor's calls per minute (``GET /factory``, which syncd does
not call once started). Reported: syncd's Katana calls and 429s (its own metrics), the
competitor's successful calls and 429s (its own count), and the check that the simulator's
counters equal the two added up. When the daemon's config has a Katana reserve for other
clients (a ``*reserve*`` field of ``[katana]``), it is reported and ``--reserve`` sets it;
without one the scenario runs the same and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bench.harness import (
    KATANA_TOKEN,
    Unsound,
    find_unsound,
    running_sims,
    tally,
)
from syncd.config import Config, KatanaConfig
from syncd.runtime.daemon import running_daemon
from syncd.runtime.observer import Observer, TransitionNotice

__all__ = ["katana_reserve", "measure"]

#: Calls the daemon may have in flight when a tally is taken (sent, not yet answered):
#: effects (``daemon.concurrency``) and both pollers. The simulator counts on arrival, the
#: daemon on answer, so under continuous load the two may differ by this much.
IN_FLIGHT = 8


def katana_reserve(config: KatanaConfig) -> tuple[str, Any] | None:
    """``(field, value)`` of the Katana reserve for other clients, if this syncd has one."""
    for name in KatanaConfig.__struct_fields__:
        if "reserve" in name:
            return name, getattr(config, name)
    return None


def _competitor(url: str, token: str, per_minute: float, seconds: float) -> None:
    """The other client: one ``GET /factory`` every ``60 / per_minute`` s, on schedule."""
    import httpx

    counts = {"sent": 0, "ok": 0, "429": 0, "other": 0}
    start = time.monotonic()
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        k = 0
        while (due := start + k * 60 / per_minute) < start + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            k += 1
            counts["sent"] += 1
            try:
                status = client.get(url + "/factory").status_code
            except httpx.HTTPError:
                counts["other"] += 1
                continue
            key = "ok" if status == 200 else "429" if status == 429 else "other"
            counts[key] += 1
    sys.stdout.write(json.dumps(counts) + "\n")


async def measure(
    seconds: float = 120.0,
    backlog: int = 150,
    rate: float = 15.0,
    reserve: int | None = None,
    warm: float = 60.0,
) -> dict[str, Any]:
    """:param warm: seconds syncd saturates the key before the competitor starts (one Katana
    window: the first burst of the backlog is not the steady state)."""
    received: list[float] = []

    class Seen(Observer):
        def transitioned(self, notice: TransitionNotice) -> None:
            if notice.dest == "received":
                received.append(time.monotonic())

    with tempfile.TemporaryDirectory() as tmp:
        async with running_sims(limits=True) as sims:
            config: Config = sims.config(Path(tmp) / "syncd.db")  # real budgets and polls
            found = katana_reserve(config.katana)
            if reserve is not None:
                if found is None:
                    raise SystemExit("--reserve: this syncd has no Katana reserve setting")
                katana = msgspec.structs.replace(config.katana, **{found[0]: reserve})
                config = msgspec.structs.replace(config, katana=katana)
                found = katana_reserve(config.katana)
            async with (
                running_daemon(
                    config,
                    observer=Seen(),
                    katana_transport=sims.katana_rec,
                    tradegecko_transport=sims.tradegecko_rec,
                ) as daemon,
                sims.factory(step_delay=0.2),
            ):
                assert daemon.metrics is not None
                for _ in range(backlog):
                    await sims.create_po(1)
                daemon.poll_now()
                await anyio.sleep(warm)
                before = await tally(sims, daemon.metrics)
                started = time.monotonic()
                cmd = [sys.executable, "-m", "bench.compete", "client", sims.katana_api_url]
                cmd += [KATANA_TOKEN, str(rate), str(seconds)]
                done = await anyio.run_process(cmd, check=True)
                elapsed = time.monotonic() - started
                after = await tally(sims, daemon.metrics)
                open_orders = backlog - len(received)
    other: dict[str, int] = json.loads(done.stdout.decode().splitlines()[-1])
    mine = sum(after.daemon["katana"].values()) - sum(before.daemon["katana"].values())
    sim_total = sum(after.sims["katana"].values()) - sum(before.sims["katana"].values())
    sim_429 = after.responses_429["katana"] - before.responses_429["katana"]
    mine_429 = after.daemon_statuses["katana"]["429"] - before.daemon_statuses["katana"]["429"]
    result: dict[str, Any] = {
        "seconds": round(elapsed, 1),
        "backlog": backlog,
        "warm_s": warm,
        "katana_limit_per_min": 60,
        "reserve": dict([found]) if found else "none in this syncd's config",
        "syncd_katana_calls": mine,
        "syncd_katana_per_min": round(mine * 60 / elapsed, 1),
        "syncd_katana_429": mine_429,
        "competitor_rate_per_min": rate,
        "competitor": other,
        "competitor_ok_per_min": round(other["ok"] * 60 / elapsed, 1),
        "share_left_to_others": round(other["ok"] * 60 / elapsed / 60, 3),
        "competitor_served": round(other["ok"] / other["sent"], 3) if other["sent"] else None,
        "orders_received_in_run": len(received),
        "orders_still_open": open_orders,
        "simulator": {"katana_requests": sim_total, "katana_429": sim_429},
    }
    problems = []
    answered = other["ok"] + other["429"]
    if not 0 <= sim_total - (mine + answered) <= IN_FLIGHT:
        problems.append(
            f"simulator counted {sim_total} Katana requests, syncd {mine} + competitor "
            f"{answered} (within {IN_FLIGHT} in flight expected)"
        )
    if sim_429 != mine_429 + other["429"]:
        problems.append(
            f"simulator answered {sim_429} 429s, syncd saw {mine_429}, competitor {other['429']}"
        )
    if open_orders <= 0:
        problems.append("the backlog ran out during the run: syncd was not saturating")
    result["soundness"] = problems or "sound"
    if problems:
        raise Unsound("; ".join(problems), result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Share of the Katana key left to others.")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--backlog", type=int, default=150)
    parser.add_argument("--warm", type=float, default=60.0, help="Saturate first, seconds.")
    parser.add_argument("--rate", type=float, default=15.0, help="Competitor calls/min.")
    parser.add_argument("--reserve", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        result = anyio.run(measure, args.seconds, args.backlog, args.rate, args.reserve, args.warm)
    except BaseException as exc:
        unsound = find_unsound(exc)
        if unsound is None:
            raise
        print(json.dumps(unsound.figures, indent=1))
        print(f"UNSOUND: {unsound.why}")
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        _competitor(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit(main())
