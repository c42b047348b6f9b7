"""Figure 3: webhook intake, syncd's listener against a bare endpoint on the same server.

The server runs in its own process (``python -m bench.intake serve KIND DB``); the load
generator is a minimal HTTP/1.1 client on raw asyncio streams in this process.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import SECRET, percentile

PATH = "/webhooks/tradegecko"


def _request(host: str, i: int) -> bytes:
    from syncd.runtime.webhooks import tradegecko_signature

    body = json.dumps(
        {
            "object_id": i,
            "event": "purchase_order.create",
            "timestamp": 1700000000,
            "resource_url": f"https://api.tradegecko.com/purchase_orders/{i}",
        }
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Gecko-Delivery: bench-{i}-{time.time_ns()}\r\n"
        f"X-Gecko-Signature: {tradegecko_signature(SECRET, body)}\r\n\r\n"
    )
    return head.encode() + body


async def _roundtrip(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes) -> int:
    reader, writer = conn
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _closed_loop(host: str, port: int, conns: int, seconds: float) -> dict[str, Any]:
    done = 0
    ok = 0
    deadline = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done, ok
        conn = await asyncio.open_connection(host, port)
        i = 0
        while time.monotonic() < deadline:
            status = await _roundtrip(conn, _request(host, w * 10_000_000 + i))
            i += 1
            done += 1
            ok += status == 200
        conn[1].close()

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(conns)))
    elapsed = time.monotonic() - started
    return {"requests": done, "ok": ok, "rps": round(ok / elapsed, 1)}


async def _open_loop(host: str, port: int, rate: float, seconds: float) -> dict[str, Any]:
    """Send at a fixed rate; latency counts from the scheduled send time."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    total = int(rate * seconds)
    start = time.monotonic() + 0.2
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, due: float) -> None:
        conn = idle.pop() if idle else await asyncio.open_connection(host, port)
        data = _request(host, 50_000_000 + i)
        try:
            status = await _roundtrip(conn, data)
        except (asyncio.IncompleteReadError, ConnectionError):
            # The server closed a keep-alive connection that sat idle: open a new one.
            conn[1].close()
            conn = await asyncio.open_connection(host, port)
            status = await _roundtrip(conn, data)
        latencies.append(time.monotonic() - due)
        statuses[status] = statuses.get(status, 0) + 1
        idle.append(conn)

    for i in range(total):
        due = start + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    achieved = total / (time.monotonic() - start)
    for _, writer in idle:
        writer.close()
    ms = [x * 1000 for x in latencies]
    return {
        "rate": rate,
        "requests": total,
        "statuses": statuses,
        "achieved_rps": round(achieved, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "connections": len(idle),
    }


def _serve(kind: str, db: str) -> None:
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from syncd.ops.asgi import serving
    from syncd.runtime.webhooks import WebhookKeys, create_webhook_app
    from syncd.store import Store

    async def main() -> None:
        store = None
        if kind == "syncd":
            store = await Store.open(db)
            app = create_webhook_app(
                store,
                WebhookKeys(SECRET, "path-token"),
                max_body_bytes=65536,
                on_received=lambda: None,
            )
        else:

            async def bare(request: Request) -> Response:
                return JSONResponse({"status": "accepted"})

            app = Starlette(routes=[Route(PATH, bare, methods=["POST"])])
        async with serving(app) as url:
            print(url, flush=True)
            await anyio.sleep_forever()

    anyio.run(main)


def measure(closed_seconds: float = 5.0, open_seconds: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("bare", "syncd"):
            db = str(Path(tmp) / f"{kind}.db")
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.intake", "serve", kind, db],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None
                url = proc.stdout.readline().strip()
                host, port = url.removeprefix("http://").split(":")
                row: dict[str, Any] = {}
                row["max"] = asyncio.run(_closed_loop(host, int(port), 16, closed_seconds))
                row["at_500"] = asyncio.run(_open_loop(host, int(port), 500, open_seconds))
            finally:
                proc.terminate()
                proc.wait(10)
            if kind == "syncd":
                with sqlite3.connect(db) as conn:
                    row["persisted"] = conn.execute(
                        "SELECT count(*) FROM inbox WHERE kind = 'webhook_received'"
                    ).fetchone()[0]
            result[kind] = row
    result["ratio"] = round(result["syncd"]["max"]["rps"] / result["bare"]["max"]["rps"], 3)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(measure(), indent=1))
