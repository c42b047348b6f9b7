"""Figure 3: webhook intake, syncd's listener against a bare endpoint on the same server code.

Four servers, each in its own process, and the load generator in another:

- ``plain``: the ``uvicorn`` command serving the bare endpoint's own trivial app
  (:mod:`bench.bare_app`, one Starlette route); the soundness reference: what plain uvicorn
  does with that app on this machine, nothing of syncd's.
- ``plain-asgi``: the ``uvicorn`` command serving a raw ASGI callable
  (:mod:`bench.plain_asgi`); not a gate: ``plain / plain-asgi`` is Starlette's own cost
  (~0.83 here), which is not a fault of the bench.
- ``bare``: the same app on syncd's ``serving()`` (the socket and uvicorn set-up the
  listener uses). It stands for "the server without syncd's work", so it must match
  ``plain``: within :data:`SOUND_WITHIN`, or the bench prints UNSOUND and exits 1 (a 44 ms
  Nagle stall in that set-up once capped both sides of this ratio).
- ``syncd``: :func:`create_webhook_app` over a real SQLite file (WAL, synchronous=FULL),
  every delivery signed and with its own ``X-Gecko-Delivery``, so each one is a new row.

The load generator is ``wrk`` (closed loop, :data:`CONNECTIONS` keep-alive connections,
one thread), else :mod:`bench.loadgen` (httpx). Rounds are interleaved (plain,
plain-asgi, bare, syncd, plain, ...) and medians quoted. The rows the syncd server
persisted must agree with the 2xx answers the generator counted.

    python -m bench.intake [--rounds 5] [--seconds 5] [--stall-bare]

``--stall-bare`` is the check's self-test: the bare endpoint is served on a socket with the
Nagle stall syncd once had; the bench must then say UNSOUND.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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

from bench.bare_app import PATH
from bench.harness import SECRET, Unsound, free_port

__all__ = ["CONNECTIONS", "SOUND_WITHIN", "measure"]

CONNECTIONS = 16
#: The bare endpoint's median rate must be within this share of plain uvicorn's.
SOUND_WITHIN = 0.20
KINDS = ("plain", "plain-asgi", "bare", "syncd")

# Each wrk thread numbers its requests; the round's prefix and the thread's number keep every
# X-Gecko-Delivery unique. done() prints one JSON line (microseconds).
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Gecko-Signature"] = "%(signature)s"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local prefix = "x"
local counter = 0
function init(args)
  prefix = args[1] .. "-" .. tostring(tid) .. "-"
end
function request()
  counter = counter + 1
  wrk.headers["X-Gecko-Delivery"] = prefix .. counter
  return wrk.format()
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"errors_status":%%d,"errors_connect":%%d,' ..
    '"errors_read":%%d,"errors_write":%%d,"errors_timeout":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _body() -> bytes:
    # Constant body (so one signature serves every request); the delivery id makes it new.
    return json.dumps(
        {
            "object_id": 1,
            "event": "purchase_order.create",
            "timestamp": int(time.time()),
            "resource_url": "https://api.tradegecko.com/purchase_orders/1",
        }
    ).encode()


def _nagle_socket() -> socket.socket:
    """A listening socket as syncd bound them before the fix (``proto`` 0): asyncio then
    leaves Nagle on, and every keep-alive answer waits ~40 ms for the client's delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _serve(kind: str, db: str) -> None:
    """The ``bare``, ``bare-nagle`` or ``syncd`` server (this module run as ``serve KIND DB``).

    ``bare-nagle`` is the bare endpoint on a socket with the old Nagle stall: the bench's
    self-test (``--stall-bare``), which must come out UNSOUND."""
    import anyio

    from bench import bare_app
    from syncd.config import WebhooksConfig
    from syncd.ops.asgi import serving, serving_socket
    from syncd.runtime.webhooks import WebhookKeys, create_webhook_app
    from syncd.store import Store

    async def main() -> None:
        if kind == "syncd":
            store = await Store.open(db)
            app = create_webhook_app(
                store,
                WebhookKeys(SECRET, "path-token"),
                max_body_bytes=WebhooksConfig().max_body_bytes,
                on_received=lambda: None,
                replay_window=WebhooksConfig().replay_window,
            )
        else:
            app = bare_app.app
        if kind == "bare-nagle":
            with _nagle_socket() as sock:
                async with serving_socket(app, sock) as url:
                    print(url, flush=True)
                    await anyio.sleep_forever()
        async with serving(app) as url:
            print(url, flush=True)
            await anyio.sleep_forever()

    anyio.run(main)


@contextmanager
def _servers(
    tmp: Path, *, stall_bare: bool = False
) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    """The four servers running, each in its own process: kind -> base URL, kind -> pid."""
    procs: list[subprocess.Popen[str]] = []
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        for kind, app in (
            ("plain", "bench.bare_app:app"),
            ("plain-asgi", "bench.plain_asgi:app"),
        ):
            port = free_port()
            plain = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
            plain += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
            procs.append(subprocess.Popen(plain, text=True))
            urls[kind] = f"http://127.0.0.1:{port}"
            pids[kind] = procs[-1].pid
        for kind in ("bare", "syncd"):
            served = "bare-nagle" if kind == "bare" and stall_bare else kind
            cmd = [sys.executable, "-m", "bench.intake", "serve", served, str(tmp / f"{kind}.db")]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            pids[kind] = proc.pid
            assert proc.stdout is not None
            urls[kind] = proc.stdout.readline().strip()
            if not urls[kind]:
                raise RuntimeError(f"the {kind} server did not start (exit {proc.poll()})")
        _wait_listening(urls["plain"], procs[0])
        _wait_listening(urls["plain-asgi"], procs[1])
        yield urls, pids
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15)


def _wait_listening(url: str, proc: subprocess.Popen[str]) -> None:
    import httpx

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"plain uvicorn exited with {proc.returncode}")
        try:
            httpx.post(url + PATH, content=b"{}", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("plain uvicorn did not answer within 20 s")


def _load(
    generator: str, script: Path, body: Path, url: str, seconds: float, prefix: str
) -> dict[str, Any]:
    """One closed-loop round against ``url`` by the generator's own process."""
    if generator == "wrk":
        cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
        cmd += ["-s", str(script), url + PATH, "--", prefix]
    else:
        headers = {
            "Content-Type": "application/json",
            "X-Gecko-Signature": _signature(body.read_bytes()),
        }
        cmd = [sys.executable, "-m", "bench.loadgen", url + PATH, str(seconds)]
        cmd += [str(CONNECTIONS), prefix, json.dumps(headers), str(body)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()}")
    out = done.stdout
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("{"))
    raw: dict[str, int] = json.loads(line)
    bad = sum(raw[k] for k in raw if k.startswith("errors_"))
    ok = raw["requests"] - raw["errors_status"]
    return {
        "ok": ok,
        "errors": bad,
        "rps": round(ok / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
    }


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of the process so far, all its threads (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(
    gen: str, script: Path, body: Path, url: str, pid: int, seconds: float, prefix: str
) -> dict[str, Any]:
    """:func:`_load`, and the CPU time the server spent per answer meanwhile: a cost that
    other processes on a shared machine slow down but do not change."""
    before = _cpu_seconds(pid)
    result = _load(gen, script, body, url, seconds, prefix)
    after = _cpu_seconds(pid)
    if before is not None and after is not None and result["ok"]:
        result["cpu_us_per_answer"] = round((after - before) / result["ok"] * 1e6, 1)
    return result


def _signature(body: bytes) -> str:
    from syncd.runtime.webhooks import tradegecko_signature

    return tradegecko_signature(SECRET, body)


def measure(rounds: int = 5, seconds: float = 5.0, *, stall_bare: bool = False) -> dict[str, Any]:
    """Interleaved rounds plain, bare, syncd; medians; raises :class:`Unsound`.

    :param stall_bare: serve the bare endpoint with the old Nagle stall (a self-test of the
        soundness check: the result must be UNSOUND).
    """
    generator = "wrk" if shutil.which("wrk") else "httpx (bench.loadgen)"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        body = _body()
        (tmp / "body.json").write_bytes(body)
        script = tmp / "deliveries.lua"
        script.write_text(_WRK_SCRIPT % {"body": body.decode(), "signature": _signature(body)})
        gen = "wrk" if generator == "wrk" else "httpx"
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        with _servers(tmp, stall_bare=stall_bare) as (urls, pids):
            warm = {  # not in the figures; syncd's rows are counted below
                kind: _load(gen, script, tmp / "body.json", urls[kind], 1.0, f"warm-{kind}")
                for kind in KINDS
            }
            for r in range(rounds):
                for kind in KINDS:
                    runs[kind].append(
                        _round(
                            gen,
                            script,
                            tmp / "body.json",
                            urls[kind],
                            pids[kind],
                            seconds,
                            f"r{r}-{kind}",
                        )
                    )
            time.sleep(0.5)  # the last answers' rows are committed before we count
            with sqlite3.connect(tmp / "syncd.db") as conn:
                # A group commit stamps its rows with one received_at: distinct stamps are
                # commits (fsyncs).
                persisted, commits = conn.execute(
                    "SELECT count(*), count(DISTINCT received_at) FROM inbox "
                    "WHERE kind = 'webhook_received'"
                ).fetchone()
    result: dict[str, Any] = {
        "generator": generator,
        "connections": CONNECTIONS,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "order": "interleaved " + " ".join(KINDS) + " per round",
        "bare_with_nagle_stall": stall_bare,
    }
    for kind in KINDS:
        result[kind] = {
            "median_rps": round(statistics.median(x["rps"] for x in runs[kind]), 1),
            "median_p50_ms": round(statistics.median(x["p50_ms"] for x in runs[kind]), 2),
            "median_p99_ms": round(statistics.median(x["p99_ms"] for x in runs[kind]), 2),
            "rounds": runs[kind],
        }
        cpu = [x["cpu_us_per_answer"] for x in runs[kind] if "cpu_us_per_answer" in x]
        if cpu:
            result[kind]["median_cpu_us_per_answer"] = round(statistics.median(cpu), 1)
    plain, plain_asgi, bare, syncd = (result[k]["median_rps"] for k in KINDS)
    result["bare_vs_plain"] = round(bare / plain, 3)
    # Not a gate: Starlette's own cost against a raw ASGI callable on the same uvicorn.
    result["plain_vs_plain_asgi"] = round(plain / plain_asgi, 3)
    result["bare_vs_plain_asgi"] = round(bare / plain_asgi, 3)
    result["ratio_syncd_bare"] = round(syncd / bare, 3)
    # Reported, not a gate: the bare endpoint's CPU per answer over syncd's. Other processes
    # on the machine move it less than the rates (on a shared machine, 0.39-0.55 where the
    # rate ratio ran 0.13-0.56), but they still move it: syncd's batches, and so its cost
    # per answer, depend on how fast its commits come back.
    if (
        "median_cpu_us_per_answer" in result["syncd"]
        and "median_cpu_us_per_answer" in result["bare"]
    ):
        result["cpu_ratio_bare_syncd"] = round(
            result["bare"]["median_cpu_us_per_answer"]
            / result["syncd"]["median_cpu_us_per_answer"],
            3,
        )
    result["syncd_persisted"] = persisted
    result["syncd_rows_per_commit"] = round(persisted / max(commits, 1), 1)
    # wrk counts answers it read; up to one request per connection per round is cut off at
    # the end of a round, answered and persisted after wrk stopped counting.
    answered = warm["syncd"]["ok"] + sum(x["ok"] for x in runs["syncd"])
    result["syncd_answered_2xx"] = answered
    problems = []
    if abs(bare / plain - 1) > SOUND_WITHIN:
        problems.append(
            f"bare endpoint {bare} req/s vs plain uvicorn {plain} req/s: "
            f"{bare / plain:.2f}, not within {SOUND_WITHIN:.0%}"
        )
    if not answered <= persisted <= answered + CONNECTIONS * (rounds + 1):
        problems.append(
            f"syncd persisted {persisted} rows but answered {answered} with 2xx "
            f"(at most {CONNECTIONS} per round may be cut off after the count)"
        )
    errors = {kind: sum(x["errors"] for x in runs[kind]) for kind in KINDS}
    if any(errors.values()):
        problems.append(f"load generator errors (non-2xx, connect, read, timeout): {errors}")
    result["soundness"] = problems or "sound"
    if problems:
        raise Unsound("; ".join(problems), result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Figure 3: webhook intake, syncd vs bare.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="Seconds per round (whole).")
    parser.add_argument(
        "--stall-bare",
        action="store_true",
        help="Self-test: serve the bare endpoint with the old Nagle stall; must be UNSOUND.",
    )
    args = parser.parse_args(argv)
    try:
        result = measure(args.rounds, args.seconds, stall_bare=args.stall_bare)
    except Unsound as exc:
        print(json.dumps(exc.figures, indent=1))
        print(f"UNSOUND: {exc.why}")
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
