"""Both simulators served together on loopback, for the demo, the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from syncd.ops.asgi import bind_socket, serving
from syncd.sim import katana, tradegecko
from syncd.sim._katana_world import KatanaWorld
from syncd.sim._tradegecko_world import TradeGeckoWorld
from syncd.sim.catalog import PRODUCTS
from syncd.sim.factory import play_factory
from syncd.sim.faults import Faults
from syncd.sim.webhooks import WebhookSender

__all__ = ["CHAIR_LINE", "Simulators", "catalogue_lines", "free_port", "running_simulators"]

#: One PO line of a product both simulators know.
CHAIR_LINE: dict[str, Any] = {
    "sku": "CHAIR-OAK",
    "name": "Oak chair",
    "quantity": "1",
    "price": "150.00",
}


def catalogue_lines(count: int) -> list[dict[str, Any]]:
    """``count`` PO lines (one unit at 10.00 each) cycling over the catalogue's products."""
    skus = [product.sku for product in PRODUCTS]
    return [
        {"sku": skus[i % len(skus)], "name": skus[i % len(skus)], "quantity": "1", "price": "10.00"}
        for i in range(count)
    ]


def free_port() -> int:
    """A loopback port nothing listens on right now (for a server started later)."""
    sock = bind_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@dataclass
class Simulators:
    """Both simulators, running; ``*_url`` are their roots (the control panel is ``/_sim``
    there; Katana's API is under :attr:`katana_api_url`)."""

    katana_url: str
    tradegecko_url: str
    katana_token: str
    tradegecko_token: str
    katana_world: KatanaWorld
    tradegecko_world: TradeGeckoWorld
    katana_webhooks: WebhookSender
    tradegecko_webhooks: WebhookSender
    #: A client for the control panels (no auth).
    control: httpx.AsyncClient

    @property
    def katana_api_url(self) -> str:
        return self.katana_url + katana.API_PREFIX

    async def create_po(
        self, lines: list[dict[str, Any]] | int | None = None, **extra: Any
    ) -> dict[str, Any]:
        """A person raises a PO for the supplier "Katana": these ``lines``, or that many
        :func:`catalogue_lines`, or one chair."""
        if isinstance(lines, int):
            lines = catalogue_lines(lines)
        body = {"supplier": "Katana", "currency": "USD", "lines": lines or [CHAIR_LINE], **extra}
        response = await self.control.post(f"{self.tradegecko_url}/_sim/purchase_orders", json=body)
        if response.status_code != 201:
            raise AssertionError(f"creating a PO: {response.status_code} {response.text}")
        po: dict[str, Any] = response.json()["purchase_order"]
        return po

    async def counters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``/_sim/counters`` of Katana and of TradeGecko."""
        katana_counts = (await self.control.get(f"{self.katana_url}/_sim/counters")).json()
        tradegecko_counts = (await self.control.get(f"{self.tradegecko_url}/_sim/counters")).json()
        return katana_counts, tradegecko_counts

    async def knobs(self, service: str, **values: float) -> None:
        """Set a webhook sender's knobs (``speed``, ``duplicate``, ``reorder``, ``drop``)."""
        base = self.katana_url if service == "katana" else self.tradegecko_url
        response = await self.control.post(f"{base}/_sim/webhooks", json=values)
        if response.status_code != 200:
            raise AssertionError(f"setting {service} knobs: {response.text}")

    @asynccontextmanager
    async def factory(
        self, step_delay: float = 0.05, *, make_to_order: bool = True
    ) -> AsyncIterator[None]:
        """The workshop works (make to order unless told not to, finish, deliver) while
        inside."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: play_factory(
                    self.katana_url, step_delay=step_delay, make_to_order=make_to_order
                )
            )
            yield
            tg.cancel_scope.cancel()


@asynccontextmanager
async def running_simulators(
    *,
    katana_token: str = "katana-sim-token",
    tradegecko_token: str = tradegecko.DEFAULT_TOKEN,
    katana_rate_limit: tuple[int, float] | None = None,
    tradegecko_rate_limit: tuple[int, float] | None = None,
    katana_faults: Faults | None = None,
    tradegecko_faults: Faults | None = None,
    webhooks: bool = False,
    control_timeout: float = 10.0,
) -> AsyncIterator[Simulators]:
    """Serve both simulators on free loopback ports while inside.

    :param katana_rate_limit: ``(requests, seconds)``; ``None`` (default) for no limit.
    :param tradegecko_rate_limit: likewise for TradeGecko.
    :param webhooks: run both webhook senders (deliveries otherwise wait in their queues).
    """
    katana_world = KatanaWorld()
    tradegecko_world = TradeGeckoWorld()
    katana_app = katana.create_app(
        katana_world, token=katana_token, rate_limit=katana_rate_limit, faults=katana_faults
    )
    tradegecko_app = tradegecko.create_app(
        tradegecko_world,
        token=tradegecko_token,
        rate_limit=tradegecko_rate_limit,
        faults=tradegecko_faults,
    )
    async with (
        serving(katana_app) as katana_url,
        serving(tradegecko_app) as tradegecko_url,
        httpx.AsyncClient(timeout=control_timeout) as control,
        anyio.create_task_group() as tg,
    ):
        if webhooks:
            tg.start_soon(katana_app.state.webhooks.run)
            tg.start_soon(tradegecko_app.state.webhooks.run)
        try:
            yield Simulators(
                katana_url,
                tradegecko_url,
                katana_token,
                tradegecko_token,
                katana_world,
                tradegecko_world,
                katana_app.state.webhooks,
                tradegecko_app.state.webhooks,
                control,
            )
        finally:
            tg.cancel_scope.cancel()
