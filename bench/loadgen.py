"""The fallback load generator of figure 3 (used only when ``wrk`` is not installed).

    python -m bench.loadgen URL SECONDS CONNECTIONS PREFIX HEADERS_JSON BODY_FILE

A closed loop on httpx over ``CONNECTIONS`` keep-alive connections, in its own process, each
request with a unique ``X-Gecko-Delivery`` (``PREFIX-n``). Prints one JSON line in the shape
the ``wrk`` script of :mod:`bench.intake` prints (microseconds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import httpx

from bench.harness import percentile

__all__ = ["main"]


async def _run(
    url: str, seconds: float, conns: int, prefix: str, headers: dict[str, str], body: bytes
) -> dict[str, int]:
    latencies: list[float] = []
    errors = {"status": 0, "connect": 0, "read": 0}
    counter = 0
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    started = time.monotonic()
    deadline = started + seconds
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal counter
            while time.monotonic() < deadline:
                counter += 1
                sent = time.perf_counter()
                try:
                    response = await client.post(
                        url,
                        content=body,
                        headers={**headers, "X-Gecko-Delivery": f"{prefix}-{counter}"},
                    )
                except httpx.ConnectError:
                    errors["connect"] += 1
                    continue
                except httpx.HTTPError:
                    errors["read"] += 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1e6)
                errors["status"] += not 200 <= response.status_code < 400

        async with anyio.create_task_group() as tg:
            for _ in range(conns):
                tg.start_soon(worker)
    elapsed = time.monotonic() - started
    return {
        "requests": len(latencies),
        "duration_us": round(elapsed * 1e6),
        "errors_status": errors["status"],
        "errors_connect": errors["connect"],
        "errors_read": errors["read"],
        "errors_write": 0,
        "errors_timeout": 0,
        "p50_us": round(percentile(latencies, 50)),
        "p90_us": round(percentile(latencies, 90)),
        "p99_us": round(percentile(latencies, 99)),
        "max_us": round(max(latencies, default=0)),
    }


def main(argv: list[str]) -> None:
    url, seconds, conns, prefix, headers, body_file = argv
    result = anyio.run(
        _run,
        url,
        float(seconds),
        int(conns),
        prefix,
        json.loads(headers),
        Path(body_file).read_bytes(),
    )
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
