"""The workshop's people, played against the Katana simulator's control panel.

:func:`play_factory` polls ``/_sim/state`` and does what the floor would: press "Make to
order" on open sales orders whose rows have no manufacturing order (unless syncd does that,
``katana.make_to_order = "auto"``), start every order not yet started, finish an order once
it has been in progress for a while, and deliver a sales order whose production is done. It
talks only to ``/_sim``, so it never touches the API budget the daemon under test draws
from, and it logs and carries on after any error.

It works in every account of the simulator (those in use: an idle account has no orders),
or in the accounts it is given, each with its own memory; one account's error does not
stop the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import anyio
import httpx

from syncd.sim._frame import ACCOUNT_HEADER

__all__ = ["play_factory"]

log = logging.getLogger(__name__)

_OPEN = frozenset({"NOT_SHIPPED", "PENDING"})


class _Floor:
    """What the player remembers between polls."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        step_delay: float,
        customer: str | None,
        account: str,
        make_to_order: bool = True,
    ) -> None:
        self.client = client
        self.headers = {ACCOUNT_HEADER: account}
        self.make_to_order = make_to_order
        self.step_delay = step_delay
        self.customer = customer
        self.seen_in_progress: dict[int, float] = {}
        self.pressed_rows: set[int] = set()

    async def post(self, path: str) -> None:
        response = await self.client.post(path, headers=self.headers)
        response.raise_for_status()

    async def step(self) -> None:
        response = await self.client.get("/_sim/state", headers=self.headers)
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        customers = {c["id"]: c["name"] for c in state.get("customers", [])}
        orders = {
            so["id"]: so
            for so in state["sales_orders"]
            if so.get("deleted_at") is None
            and (self.customer is None or customers.get(so["customer_id"]) == self.customer)
        }
        for so in orders.values() if self.make_to_order else ():
            waiting = [
                row["id"]
                for row in so["sales_order_rows"]
                if row.get("linked_manufacturing_order_id") is None
                and row["id"] not in self.pressed_rows
            ]
            if so["status"] in _OPEN and waiting:
                self.pressed_rows.update(waiting)
                await self.post(f"/_sim/sales_orders/{so['id']}/make_to_order")
        now = time.monotonic()
        for mo in state["manufacturing_orders"]:
            if mo.get("deleted_at") is not None or mo.get("sales_order_id") not in orders:
                continue
            if mo["status"] == "NOT_STARTED":
                await self.post(f"/_sim/manufacturing_orders/{mo['id']}/start")
                self.seen_in_progress[mo["id"]] = now
            elif mo["status"] == "IN_PROGRESS":
                since = self.seen_in_progress.setdefault(mo["id"], now)
                if now - since >= self.step_delay:
                    await self.post(f"/_sim/manufacturing_orders/{mo['id']}/finish")
        for so in orders.values():
            if so["status"] == "NOT_SHIPPED" and so.get("production_status") == "DONE":
                await self.post(f"/_sim/sales_orders/{so['id']}/deliver")


async def play_factory(
    control_url: str,
    *,
    step_delay: float = 0.2,
    customer_name: str | None = None,
    accounts: Sequence[str] | None = None,
    make_to_order: bool = True,
) -> None:
    """Run the workshop against the simulator at ``control_url`` until cancelled.

    :param control_url: the simulator's root URL (the control panel is under ``/_sim``).
    :param step_delay: seconds between polls, and the least time an order stays in progress.
    :param customer_name: only work on this customer's orders; ``None`` for all.
    :param accounts: the accounts (tokens) to work in; ``None`` for every account in use.
    :param make_to_order: press "Make to order"; ``False`` when syncd makes the
        manufacturing orders, so that the floor only starts and finishes them.
    """
    floors: dict[str, _Floor] = {}
    async with httpx.AsyncClient(base_url=control_url.rstrip("/"), timeout=10.0) as client:
        while True:
            try:
                names = list(accounts) if accounts is not None else await _in_use(client)
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                log.warning("factory player: %s; carrying on", exc)
                names = list(floors)
            for name in names:
                floor = floors.get(name)
                if floor is None:
                    floor = floors[name] = _Floor(
                        client, step_delay, customer_name, name, make_to_order
                    )
                try:
                    await floor.step()
                except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                    log.warning("factory player (%s): %s; carrying on", name, exc)
            await anyio.sleep(step_delay)


async def _in_use(client: httpx.AsyncClient) -> list[str]:
    """The accounts whose workshop exists (asking an idle one for its state would make it)."""
    response = await client.get("/_sim/accounts")
    response.raise_for_status()
    return [a["token"] for a in response.json()["accounts"] if a["started"]]
