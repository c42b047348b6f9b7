from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import pytest

from katana_openapi import ValidatingTransport
from syncd.config import (
    Config,
    DaemonConfig,
    KatanaConfig,
    MetricsConfig,
    TradeGeckoConfig,
    WebhooksConfig,
)
from syncd.runtime.daemon import Daemon, running_daemon
from syncd.sim import TRADEGECKO_WEBHOOK_SECRET, Simulators, running_simulators
from syncd.sim.faults import Faults

ROOT = Path(__file__).resolve().parents[1]
# The API contracts the tests hold syncd and the simulators to (see apis/README.md).
APIS = ROOT / "apis"

KATANA_TOKEN = "katana-test-token"
TRADEGECKO_TOKEN = "tradegecko-test-token"


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn, which serves the simulators and webhooks, runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="session")
def apis() -> Path:
    """The recorded API contracts, kept in the repository's ``apis/`` folder."""
    return APIS


@dataclass
class Sims(Simulators):
    """Both simulators, and the daemon's side of a test: its config, the daemon itself, and
    the OpenAPI check every Katana request and answer of the daemon goes through."""

    katana_contract: ValidatingTransport = field(
        default_factory=lambda: ValidatingTransport(httpx.AsyncHTTPTransport(), strict=False)
    )

    def config(
        self,
        database: Path,
        webhook_port: int | None = None,
        *,
        poll: float | None = None,
        reconcile: float = 60.0,
    ) -> Config:
        """The daemon's config against these simulators; with ``webhook_port`` it listens
        for webhooks there, polls every ``poll`` (60 s) and has no metrics endpoint;
        without, it polls every 0.1 s and serves metrics on a free port."""
        retry = DaemonConfig(database=str(database), retry_initial=0.2, retry_max=1.0)
        if webhook_port is None:
            every = 0.1 if poll is None else poll
            return Config(
                daemon=retry,
                metrics=MetricsConfig(listen="127.0.0.1:0", refresh_interval=0.1),
                tradegecko=TradeGeckoConfig(
                    base_url=self.tradegecko_url, token=self.tradegecko_token, poll_interval=every
                ),
                katana=KatanaConfig(
                    base_url=self.katana_api_url,
                    token=self.katana_token,
                    poll_interval=every,
                    rate_limit=100_000,
                ),
            )
        every = 60.0 if poll is None else poll
        return Config(
            daemon=retry,
            metrics=MetricsConfig(enabled=False),
            tradegecko=TradeGeckoConfig(
                base_url=self.tradegecko_url,
                token=self.tradegecko_token,
                poll_interval=every,
                rate_limit=100_000,
            ),
            katana=KatanaConfig(
                base_url=self.katana_api_url,
                token=self.katana_token,
                poll_interval=every,
                rate_limit=100_000,
            ),
            webhooks=WebhooksConfig(
                enabled=True,
                listen=f"127.0.0.1:{webhook_port}",
                # Katana sends only to https; the simulators deliver it over plain http.
                public_base_url=f"https://127.0.0.1:{webhook_port}",
                tradegecko_secret=TRADEGECKO_WEBHOOK_SECRET,
                reconcile_interval=reconcile,
            ),
        )

    @asynccontextmanager
    async def daemon(self, config: Config | Path) -> AsyncIterator[Daemon]:
        """The daemon on ``config`` (or the default config on that database file)."""
        if isinstance(config, Path):
            config = self.config(config)
        async with running_daemon(config, katana_transport=self.katana_contract) as daemon:
            yield daemon


@asynccontextmanager
async def running_sims(
    *,
    katana_rate_limit: tuple[int, float] | None = None,
    tradegecko_rate_limit: tuple[int, float] | None = None,
    katana_faults: Faults | None = None,
    tradegecko_faults: Faults | None = None,
    webhooks: bool = False,
    accounts: int = 1,
) -> AsyncIterator[Sims]:
    """Both simulators (test tokens) for one test, serving ``accounts`` factories; fails it
    if the daemon's Katana traffic broke the OpenAPI contract."""
    async with running_simulators(
        katana_token=KATANA_TOKEN,
        tradegecko_token=TRADEGECKO_TOKEN,
        katana_rate_limit=katana_rate_limit,
        tradegecko_rate_limit=tradegecko_rate_limit,
        katana_faults=katana_faults,
        tradegecko_faults=tradegecko_faults,
        webhooks=webhooks,
        accounts=accounts,
    ) as simulators:
        sims = Sims(**{f.name: getattr(simulators, f.name) for f in fields(Simulators)})
        yield sims
    assert sims.katana_contract.violations == [], "Katana traffic broke the OpenAPI contract"


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    """Both simulators, no rate limits, webhooks not sent."""
    async with running_sims() as running:
        yield running
