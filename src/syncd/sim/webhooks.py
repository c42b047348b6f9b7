"""Webhook senders for both simulators: signed, retried on the real schedule, with faults.

A world change publishes an event; :class:`WebhookSender` delivers it to every subscription
of that event the way the real service does: TradeGecko signs with Base64 HMAC-SHA256 of the
body keyed with the OAuth application secret (``X-Gecko-Signature``) and names each delivery
(``X-Gecko-Delivery``); Katana signs with hex HMAC-SHA256 keyed by the webhook's token
(``X-Sha2-Signature``) and counts retries (``X-Katana-Retry-Num``). A delivery not answered
2xx (TradeGecko: 2xx-3xx) within 10 s is retried on the service's schedule, divided by
``speed``. Fault knobs (probabilities, ``0`` to ``1``): ``duplicate`` sends a delivery twice,
``reorder`` shuffles what is waiting, ``drop`` loses a delivery without a trace.

The simulator has no TLS: an ``https://`` address is delivered over plain http, as to a
TLS-terminating proxy in front of the listener.

One sender serves every account of a simulator: each subscription belongs to one account
(its token), an account's events go only to its own subscriptions, and TradeGecko signs with
the account's own secret. The knobs are the sender's (all accounts); its counters are kept
in all and per account.

Run :meth:`WebhookSender.run` in a task group next to the served app; until then deliveries
wait in the queue.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import random
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import httpx

__all__ = [
    "KATANA_SCHEDULE",
    "TIMEOUT",
    "TRADEGECKO_SCHEDULE",
    "BodyFor",
    "Delivery",
    "Signer",
    "Subscription",
    "WebhookSender",
    "katana_sender",
    "new_token",
    "tradegecko_sender",
]

log = logging.getLogger("syncd.sim.webhooks")

#: Katana retries after at least 30 s, then 2 min, then 15 min.
KATANA_SCHEDULE: tuple[float, ...] = (30.0, 120.0, 900.0)
#: TradeGecko retries "with exponential backoff for up to 3 days" (exact steps unverified):
#: 1 min doubling, twelve retries, about 68 hours in all.
TRADEGECKO_SCHEDULE: tuple[float, ...] = tuple(60.0 * 2**n for n in range(12))
#: Seconds a receiver has to connect, read and answer a delivery.
TIMEOUT = 10.0
#: The receiver's time only: a delivery waiting for one of the sender's connections (every
#: account's deliveries share this client) has not been sent, so that wait is no failed
#: attempt. The services send from fleets of workers; at 1,000 accounts' deliveries at once
#: the shared pool's 10 s wait failed hundreds of attempts with ``PoolTimeout``.
_TIMEOUTS = httpx.Timeout(TIMEOUT, pool=None)


@dataclass
class Subscription:
    id: int
    url: str
    events: list[str]
    token: str | None = None
    enabled: bool = True
    description: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The account (its API token) the subscription belongs to.
    account: str = ""
    #: What signs its deliveries where the service signs per account; else the sender's.
    secret: str | None = None


@dataclass
class Delivery:
    subscription: Subscription
    event: str
    body: bytes
    delivery_id: str = field(default_factory=lambda: str(uuid.uuid4()))


Signer = Callable[[Subscription, Delivery, int], dict[str, str]]
BodyFor = Callable[[Subscription], dict[str, Any]]


class WebhookSender:
    """Subscriptions of one service and the task that delivers their events.

    :param sign: the service's headers for ``(subscription, delivery, retry number)``.
    :param schedule: seconds before each retry, at ``speed`` 1.
    :param success: whether a status code ends the delivery successfully.
    """

    def __init__(
        self,
        sign: Signer,
        schedule: Sequence[float],
        *,
        success: Callable[[int], bool] = lambda status: 200 <= status < 300,
        gone_deletes: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.sign = sign
        self.schedule = tuple(schedule)
        self.success = success
        self.gone_deletes = gone_deletes
        self.speed = speed
        self.duplicate = 0.0
        self.reorder = 0.0
        self.drop = 0.0
        self.subscriptions: dict[int, Subscription] = {}
        #: What happened to deliveries, all accounts together ...
        self.counters: Counter[str] = Counter()
        #: ... and per account.
        self.account_counters: dict[str, Counter[str]] = {}
        self._ids = itertools.count(1)
        self._random = random.Random(seed)
        self._queue: list[Delivery] = []
        #: Deliveries taken from the queue and not ended yet (sending or waiting to retry).
        self._in_flight: list[Delivery] = []
        self._ready = anyio.Event()
        self._transport = transport

    # -- subscriptions -----------------------------------------------------------------

    def subscribe(
        self,
        url: str,
        events: Sequence[str],
        *,
        token: str | None = None,
        description: str | None = None,
        account: str = "",
        secret: str | None = None,
    ) -> Subscription:
        subscription = Subscription(
            next(self._ids), url, list(events), token, True, description, account=account
        )
        subscription.secret = secret
        self.subscriptions[subscription.id] = subscription
        return subscription

    def subscriptions_of(self, account: str) -> list[Subscription]:
        """The subscriptions of one account, oldest first."""
        return [s for s in self.subscriptions.values() if s.account == account]

    def counters_of(self, account: str) -> Counter[str]:
        return self.account_counters.get(account, Counter())

    def knobs(self, account: str | None = None) -> dict[str, Any]:
        """The knobs, and the queue, deliveries in flight, counters and subscriptions of
        ``account`` (or all)."""
        subscriptions = (
            list(self.subscriptions.values()) if account is None else self.subscriptions_of(account)
        )
        return {
            "speed": self.speed,
            "duplicate": self.duplicate,
            "reorder": self.reorder,
            "drop": self.drop,
            "queued": sum(
                1 for d in self._queue if account is None or d.subscription.account == account
            ),
            "in_flight": sum(
                1 for d in self._in_flight if account is None or d.subscription.account == account
            ),
            "counters": dict(self.counters if account is None else self.counters_of(account)),
            "subscriptions": [
                {"id": s.id, "url": s.url, "events": s.events} for s in subscriptions
            ],
        }

    def _count(self, delivery: Delivery, name: str) -> None:
        self.counters[name] += 1
        account = delivery.subscription.account
        self.account_counters.setdefault(account, Counter())[name] += 1

    def set_knobs(self, values: dict[str, Any]) -> None:
        """Set ``speed``, ``duplicate``, ``reorder``, ``drop`` from a control request.

        :raises ValueError: a knob that is unknown or out of range.
        """
        for name, value in values.items():
            if name not in ("speed", "duplicate", "reorder", "drop"):
                raise ValueError(f"unknown knob {name!r}")
            number = float(value)
            if name == "speed" and number <= 0:
                raise ValueError("speed must be positive")
            if name != "speed" and not 0.0 <= number <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
            setattr(self, name, number)

    # -- publishing and delivering -----------------------------------------------------

    def publish(self, event: str, body_for: BodyFor, *, account: str | None = None) -> None:
        """Queue ``event`` for every enabled subscription to it of ``account`` (or all)."""
        for subscription in list(self.subscriptions.values()):
            if account is not None and subscription.account != account:
                continue
            if subscription.enabled and event in subscription.events:
                body = httpx.Request("POST", "http://x", json=body_for(subscription)).content
                delivery = Delivery(subscription, event, body)
                self._queue.append(delivery)
                self._count(delivery, "published")
        if self._queue:
            self._ready.set()

    async def run(self) -> None:
        """Deliver queued events until cancelled, each delivery with its own retries."""
        async with (
            httpx.AsyncClient(timeout=_TIMEOUTS, transport=self._transport) as client,
            anyio.create_task_group() as tg,
        ):
            while True:
                await self._ready.wait()
                self._ready = anyio.Event()
                batch, self._queue = self._queue, []
                if len(batch) > 1 and self._random.random() < self.reorder:
                    self._random.shuffle(batch)
                    self.counters["reordered_batches"] += 1
                for delivery in batch:
                    if self._random.random() < self.drop:
                        self._count(delivery, "dropped")
                        continue
                    self._start(tg, client, delivery)
                    if self._random.random() < self.duplicate:
                        self._count(delivery, "duplicated")
                        self._start(tg, client, delivery)

    def _start(self, tg: anyio.abc.TaskGroup, client: httpx.AsyncClient, d: Delivery) -> None:
        self._in_flight.append(d)  # counted from here: the task may start later
        tg.start_soon(self._deliver, client, d)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        try:
            await self._attempts(client, delivery)
        finally:
            self._in_flight.remove(delivery)

    async def _attempts(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        url = delivery.subscription.url
        if url.startswith("https://"):
            url = "http://" + url.removeprefix("https://")
        for attempt in range(len(self.schedule) + 1):
            if attempt:
                await anyio.sleep(self.schedule[attempt - 1] / self.speed)
            if delivery.subscription.id not in self.subscriptions:
                return
            headers = {
                "Content-Type": "application/json",
                **self.sign(delivery.subscription, delivery, attempt),
            }
            try:
                response = await client.post(url, content=delivery.body, headers=headers)
            except httpx.HTTPError as exc:
                self._count(delivery, "failed_attempts")
                log.info("webhook %s to %s failed: %r", delivery.event, url, exc)
                continue
            if self.success(response.status_code):
                self._count(delivery, "delivered")
                return
            if response.status_code == 410 and self.gone_deletes:
                self.subscriptions.pop(delivery.subscription.id, None)
                self._count(delivery, "gone")
                return
            self._count(delivery, "failed_attempts")
        self._count(delivery, "abandoned")


def tradegecko_sender(secret: str, **kwargs: Any) -> WebhookSender:
    """TradeGecko's sender: deliveries signed with the OAuth application ``secret`` (or the
    subscription's account's own)."""

    def sign(subscription: Subscription, delivery: Delivery, attempt: int) -> dict[str, str]:
        key = subscription.secret if subscription.secret is not None else secret
        digest = hmac.new(key.encode(), delivery.body, hashlib.sha256).digest()
        return {
            "X-Gecko-Delivery": delivery.delivery_id,
            "X-Gecko-Signature": base64.b64encode(digest).decode(),
        }

    return WebhookSender(
        sign,
        TRADEGECKO_SCHEDULE,
        success=lambda status: 200 <= status < 400,
        gone_deletes=True,
        **kwargs,
    )


def katana_sender(**kwargs: Any) -> WebhookSender:
    """Katana's sender: each subscription has its own token, made by :func:`new_token`."""

    def sign(subscription: Subscription, delivery: Delivery, attempt: int) -> dict[str, str]:
        token = (subscription.token or "").encode()
        headers = {"X-Sha2-Signature": hmac.new(token, delivery.body, hashlib.sha256).hexdigest()}
        if attempt:
            headers["X-Katana-Retry-Num"] = str(attempt)
        return headers

    return WebhookSender(sign, KATANA_SCHEDULE, **kwargs)


def new_token() -> str:
    """A Katana webhook token: 16 lowercase hex digits."""
    return secrets.token_hex(8)
