"""Shared harness: both simulators in-process, a recording transport, the daemon's config."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from syncd.config import (
    Config,
    DaemonConfig,
    KatanaConfig,
    MetricsConfig,
    TradeGeckoConfig,
    WebhooksConfig,
)
from syncd.ops.asgi import bind_socket, serving
from syncd.sim import katana as katana_sim
from syncd.sim import tradegecko as tradegecko_sim
from syncd.sim._katana_world import KatanaWorld
from syncd.sim._tradegecko_world import TradeGeckoWorld
from syncd.sim.factory import play_factory

KATANA_TOKEN = "katana-bench-token"
TRADEGECKO_TOKEN = "tradegecko-bench-token"
SECRET = tradegecko_sim.DEFAULT_WEBHOOK_SECRET
SKUS = ("CHAIR-OAK", "TABLE-OAK", "STOOL-PINE", "LAMP-BRASS")
_ID = re.compile(r"/\d+")
_IGNORED_QUERY = {"limit", "page"}


def po_lines(count: int) -> list[dict[str, Any]]:
    """``count`` PO lines cycling over the catalogue's four Katana-known SKUs."""
    return [
        {"sku": SKUS[i % len(SKUS)], "name": SKUS[i % len(SKUS)], "quantity": "1", "price": "10.00"}
        for i in range(count)
    ]


def classify(service: str, method: str, path: str, query: set[str]) -> str:
    """``poll``, ``effect`` or ``setup`` for one request the daemon made."""
    if path.endswith("/webhooks"):
        return "setup"
    if service == "katana":
        if method == "GET" and path.endswith("/sales_orders"):
            return "effect" if "order_no" in query else "poll"
        if method == "GET" and path.endswith("/manufacturing_orders"):
            return "poll"
        return "effect"
    if method == "GET" and (path.endswith("/purchase_orders") or path.endswith("/companies")):
        return "poll"
    return "effect"


class Recorder(httpx.AsyncBaseTransport):
    """Counts each request the daemon sends, by ``kind`` and endpoint (query keys kept)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.inner = httpx.AsyncHTTPTransport()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[int] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        query = {k.rstrip("[]") for k in request.url.params} - _IGNORED_QUERY
        kind = classify(self.service, request.method, path, query)
        shown = _ID.sub("/{id}", path.removeprefix(katana_sim.API_PREFIX))
        if query:
            shown += "?" + "&".join(sorted(query))
        self.counts[(kind, f"{request.method} {shown}")] += 1
        response = await self.inner.handle_async_request(request)
        self.statuses[response.status_code] += 1
        return response

    def snapshot(self) -> Counter[tuple[str, str]]:
        return Counter(self.counts)

    async def aclose(self) -> None:
        await self.inner.aclose()


def delta(after: Counter[Any], before: Counter[Any]) -> dict[Any, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@dataclass
class Sims:
    katana_url: str
    tradegecko_url: str
    katana_world: KatanaWorld
    tradegecko_world: TradeGeckoWorld
    control: httpx.AsyncClient
    katana_rec: Recorder = field(default_factory=lambda: Recorder("katana"))
    tradegecko_rec: Recorder = field(default_factory=lambda: Recorder("tradegecko"))

    async def create_po(self, lines: int) -> dict[str, Any]:
        body = {"supplier": "Katana", "currency": "USD", "lines": po_lines(lines)}
        response = await self.control.post(f"{self.tradegecko_url}/_sim/purchase_orders", json=body)
        response.raise_for_status()
        po: dict[str, Any] = response.json()["purchase_order"]
        return po

    async def counters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        katana = (await self.control.get(f"{self.katana_url}/_sim/counters")).json()
        tradegecko = (await self.control.get(f"{self.tradegecko_url}/_sim/counters")).json()
        return katana, tradegecko

    def config(
        self,
        database: Path,
        *,
        poll: float = 30.0,
        katana_budget: int = 60,
        tradegecko_budget: int = 300,
        retry_initial: float = 5.0,
        webhook_port: int | None = None,
    ) -> Config:
        webhooks = WebhooksConfig()
        if webhook_port is not None:
            webhooks = WebhooksConfig(
                enabled=True,
                listen=f"127.0.0.1:{webhook_port}",
                public_base_url=f"https://127.0.0.1:{webhook_port}",
                tradegecko_secret=SECRET,
                reconcile_interval=max(poll, 60.0),
            )
        return Config(
            daemon=DaemonConfig(
                database=str(database), retry_initial=retry_initial, log_level="warning"
            ),
            metrics=MetricsConfig(enabled=False),
            tradegecko=TradeGeckoConfig(
                base_url=self.tradegecko_url,
                token=TRADEGECKO_TOKEN,
                poll_interval=poll,
                rate_limit=tradegecko_budget,
            ),
            katana=KatanaConfig(
                base_url=self.katana_url + katana_sim.API_PREFIX,
                token=KATANA_TOKEN,
                poll_interval=poll,
                rate_limit=katana_budget,
            ),
            webhooks=webhooks,
        )

    @asynccontextmanager
    async def factory(self, step_delay: float = 0.05) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: play_factory(self.katana_url, step_delay=step_delay))
            yield
            tg.cancel_scope.cancel()


@asynccontextmanager
async def running_sims(*, limits: bool, webhooks: bool = False) -> AsyncIterator[Sims]:
    katana_world = KatanaWorld()
    tradegecko_world = TradeGeckoWorld()
    katana_app = katana_sim.create_app(
        katana_world, token=KATANA_TOKEN, rate_limit=(60, 60.0) if limits else None
    )
    tg_app = tradegecko_sim.create_app(
        tradegecko_world, token=TRADEGECKO_TOKEN, rate_limit=(300, 300.0) if limits else None
    )
    async with (
        serving(katana_app) as katana_url,
        serving(tg_app) as tradegecko_url,
        httpx.AsyncClient(timeout=30) as control,
        anyio.create_task_group() as tg,
    ):
        if webhooks:
            tg.start_soon(katana_app.state.webhooks.run)
            tg.start_soon(tg_app.state.webhooks.run)
        sims = Sims(katana_url, tradegecko_url, katana_world, tradegecko_world, control)
        try:
            yield sims
        finally:
            tg.cancel_scope.cancel()
            await sims.katana_rec.aclose()
            await sims.tradegecko_rec.aclose()


def free_port() -> int:
    sock = bind_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


async def wait_until(check: Any, seconds: float, step: float = 0.02) -> float:
    """Await ``check()`` until true; returns the seconds it took."""
    started = time.monotonic()
    with anyio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110 - polls state owned elsewhere
            await anyio.sleep(step)
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
