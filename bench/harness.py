"""Shared harness: both simulators in-process, a recording transport, the daemon's config."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
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
from syncd.sim import (
    KATANA_API_PREFIX,
    TRADEGECKO_WEBHOOK_SECRET,
    Simulators,
    free_port,
    running_simulators,
)

__all__ = [
    "Recorder",
    "Sims",
    "Unsound",
    "delta",
    "free_port",
    "percentile",
    "running_sims",
    "wait_until",
]

KATANA_TOKEN = "katana-bench-token"
TRADEGECKO_TOKEN = "tradegecko-bench-token"
SECRET = TRADEGECKO_WEBHOOK_SECRET
_ID = re.compile(r"/\d+")
_IGNORED_QUERY = {"limit", "page"}


class Unsound(Exception):
    """A comparison failed its soundness check: the figure it would give is not to be trusted.

    ``python -m bench`` and each bench's own ``__main__`` print ``UNSOUND: <why>`` and exit 1.
    ``figures`` keeps what was measured, for the reader to see why.
    """

    def __init__(self, why: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.figures = figures or {}


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
        shown = _ID.sub("/{id}", path.removeprefix(KATANA_API_PREFIX))
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
class Sims(Simulators):
    """Both simulators, with a recorder of the daemon's requests to each."""

    katana_rec: Recorder = field(default_factory=lambda: Recorder("katana"))
    tradegecko_rec: Recorder = field(default_factory=lambda: Recorder("tradegecko"))

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
                base_url=self.katana_api_url,
                token=KATANA_TOKEN,
                poll_interval=poll,
                rate_limit=katana_budget,
            ),
            webhooks=webhooks,
        )


@asynccontextmanager
async def running_sims(*, limits: bool, webhooks: bool = False) -> AsyncIterator[Sims]:
    """Both simulators, at their real rate limits when ``limits``."""
    async with running_simulators(
        katana_token=KATANA_TOKEN,
        tradegecko_token=TRADEGECKO_TOKEN,
        katana_rate_limit=(60, 60.0) if limits else None,
        tradegecko_rate_limit=(300, 300.0) if limits else None,
        webhooks=webhooks,
        control_timeout=30.0,
    ) as simulators:
        sims = Sims(**{f.name: getattr(simulators, f.name) for f in fields(Simulators)})
        try:
            yield sims
        finally:
            await sims.katana_rec.aclose()
            await sims.tradegecko_rec.aclose()


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
