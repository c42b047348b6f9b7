"""Both simulators served together on loopback, for the demo, the tests and the benchmarks.

Each serves as many factories as asked (``running_simulators(accounts=N)``): a factory is one
Katana account and one TradeGecko account, each with its own token; the first is the
simulators' default accounts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from syncd.ops.asgi import bind_socket, serving
from syncd.sim import katana, tradegecko
from syncd.sim._frame import ACCOUNT_HEADER, Accounts, numbered_tokens
from syncd.sim._katana_world import KatanaWorld
from syncd.sim._tradegecko_world import TradeGeckoWorld
from syncd.sim.catalog import PRODUCTS
from syncd.sim.factory import play_factory
from syncd.sim.faults import Faults
from syncd.sim.webhooks import WebhookSender

__all__ = [
    "CHAIR_LINE",
    "FactoryTokens",
    "Simulators",
    "catalogue_lines",
    "free_port",
    "free_ports",
    "running_simulators",
]

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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different loopback ports nothing listens on right now: each is held until
    all are found (two calls of :func:`free_port` can give the same port, and two servers
    started on it made a crash test fail with "Address already in use")."""
    socks = [bind_socket() for _ in range(count)]
    try:
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass(frozen=True)
class FactoryTokens:
    """One factory's accounts in the simulators: what its daemon configuration needs."""

    katana_token: str
    tradegecko_token: str
    #: What signs the TradeGecko account's webhooks.
    tradegecko_webhook_secret: str


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
    #: Every factory served, the default accounts' first.
    factories: list[FactoryTokens]
    katana_accounts: Accounts[KatanaWorld]
    #: TradeGecko's accounts (their state's ``world`` is the :class:`TradeGeckoWorld`).
    tradegecko_accounts: Accounts[Any]

    @property
    def katana_api_url(self) -> str:
        return self.katana_url + katana.API_PREFIX

    def katana_world_of(self, factory: FactoryTokens) -> KatanaWorld:
        """The factory's Katana workshop (made now if it was idle)."""
        return self.katana_accounts[factory.katana_token].state

    def tradegecko_world_of(self, factory: FactoryTokens) -> TradeGeckoWorld:
        """The factory's TradeGecko account (made now if it was idle)."""
        world: TradeGeckoWorld = self.tradegecko_accounts[factory.tradegecko_token].state.world
        return world

    async def create_po(
        self,
        lines: list[dict[str, Any]] | int | None = None,
        *,
        factory: FactoryTokens | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A person raises a PO for the supplier "Katana": these ``lines``, or that many
        :func:`catalogue_lines`, or one chair; in ``factory``'s account (the default)."""
        if isinstance(lines, int):
            lines = catalogue_lines(lines)
        body = {"supplier": "Katana", "currency": "USD", "lines": lines or [CHAIR_LINE], **extra}
        response = await self.control.post(
            f"{self.tradegecko_url}/_sim/purchase_orders",
            json=body,
            headers=_naming(factory.tradegecko_token if factory else None),
        )
        if response.status_code != 201:
            raise AssertionError(f"creating a PO: {response.status_code} {response.text}")
        po: dict[str, Any] = response.json()["purchase_order"]
        return po

    async def counters(
        self, factory: FactoryTokens | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``/_sim/counters`` of Katana and of TradeGecko, for ``factory`` (the default)."""
        katana_counts = await self.control.get(
            f"{self.katana_url}/_sim/counters",
            headers=_naming(factory.katana_token if factory else None),
        )
        tradegecko_counts = await self.control.get(
            f"{self.tradegecko_url}/_sim/counters",
            headers=_naming(factory.tradegecko_token if factory else None),
        )
        return katana_counts.json(), tradegecko_counts.json()

    async def knobs(self, service: str, **values: float) -> None:
        """Set a webhook sender's knobs (``speed``, ``duplicate``, ``reorder``, ``drop``)."""
        base = self.katana_url if service == "katana" else self.tradegecko_url
        response = await self.control.post(f"{base}/_sim/webhooks", json=values)
        if response.status_code != 200:
            raise AssertionError(f"setting {service} knobs: {response.text}")

    @asynccontextmanager
    async def factory(
        self,
        step_delay: float = 0.05,
        *,
        only: list[FactoryTokens] | None = None,
        make_to_order: bool = True,
    ) -> AsyncIterator[None]:
        """The workshops work (make to order unless told not to, finish, deliver) while
        inside: every one in use, or ``only`` those factories'."""
        accounts = None if only is None else [f.katana_token for f in only]
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: play_factory(
                    self.katana_url,
                    step_delay=step_delay,
                    accounts=accounts,
                    make_to_order=make_to_order,
                )
            )
            yield
            tg.cancel_scope.cancel()


def _naming(token: str | None) -> dict[str, str]:
    """The control-panel header naming an account, none for the default one."""
    return {ACCOUNT_HEADER: token} if token else {}


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
    accounts: int = 1,
) -> AsyncIterator[Simulators]:
    """Serve both simulators on free loopback ports while inside.

    :param katana_rate_limit: ``(requests, seconds)`` per token; ``None`` (default) for no
        limit.
    :param tradegecko_rate_limit: likewise for TradeGecko.
    :param webhooks: run both webhook senders (deliveries otherwise wait in their queues).
    :param accounts: how many factories the simulators serve (their tokens are in
        :attr:`Simulators.factories`): the default accounts, then tokens ``<token>-1`` ...
        ``<token>-(N-1)``; their worlds are made on first use.
    """
    if accounts < 1:
        raise ValueError(f"accounts must be at least 1, not {accounts}")
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
    factories = [
        FactoryTokens(katana_token, tradegecko_token, tradegecko.DEFAULT_WEBHOOK_SECRET),
    ]
    for katana_extra, tradegecko_extra in zip(
        numbered_tokens(katana_token, accounts - 1),
        numbered_tokens(tradegecko_token, accounts - 1),
        strict=True,
    ):
        katana_app.state.frame.create_account(katana_extra)
        secret = tradegecko_app.state.frame.create_account(tradegecko_extra).webhook_secret
        factories.append(FactoryTokens(katana_extra, tradegecko_extra, secret))
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
                factories,
                katana_app.state.accounts,
                tradegecko_app.state.accounts,
            )
        finally:
            tg.cancel_scope.cancel()
