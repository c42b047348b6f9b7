"""Webhook listeners: near-instant sync from TradeGecko's and Katana's notifications.

A delivery is a *source*, like a poll: the listener verifies it (signature, path token, size,
shape), writes it to the inbox as a ``webhook_received`` row and only then answers 2xx, so
that an acknowledged delivery survives a crash. The :class:`WebhookConsumer` takes deliveries
as hints (payloads are thin and may be stale, duplicated or out of order): it gathers one
object's deliveries for ``webhooks.coalesce`` seconds, settles without a re-fetch those whose
Katana ``object.status`` cannot move the order and the echoes of syncd's own writes, and
re-fetches the rest once, writing the very events the pollers write, under the same
de-duplication keys: a webhook and a poll of one change count once. Signed deliveries are
taken at their word where an earlier look, kept in the store, makes them sufficient (see
:class:`WebhookConsumer`). The pollers stay as reconciliation for whatever a webhook misses
or a stale status hid, at :attr:`~syncd.config.WebhooksConfig.reconcile_interval` while
webhooks are healthy.

Answers: bad signature 401, TradeGecko ``timestamp`` outside the replay window (older than
:attr:`~syncd.config.WebhooksConfig.replay_window`, or more than 5 minutes ahead) 401
"stale timestamp", unknown Katana path token 404, malformed body 400, body over
``max_body_bytes`` 413, unknown event 200 (logged, not stored). Nothing rejected reaches
the inbox.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import logging
import math
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from syncd.adapters.katana import KatanaClient
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.config import RETRY, Config, RetryPolicies
from syncd.domain.orders import SalesOrderFacts
from syncd.domain.rules import (
    DELIVERED,
    delivery_can_move,
    purchase_order_trigger,
    sales_order_trigger,
)
from syncd.domain.statechart import Statechart, load_statechart
from syncd.domain.triggers import SO_DELIVERED
from syncd.errors import ApiError, ConfigError, NotFound, Retries, SyncdError
from syncd.ops.asgi import bind_socket, serving_socket
from syncd.runtime import inbox
from syncd.runtime.crashpoints import crash_point
from syncd.runtime.effects import PurchaseOrderReads
from syncd.runtime.observer import Observer
from syncd.runtime.pollers import (
    OTHER_SUPPLIER,
    KatanaPoller,
    TradeGeckoPoller,
    facts_of,
    report_sales_order,
)
from syncd.store import SalesOrderEvidence, Store

__all__ = [
    "KATANA_EVENTS",
    "KATANA_PATH",
    "KATANA_VARIANT_EVENTS",
    "TRADEGECKO_EVENTS",
    "TRADEGECKO_PATH",
    "WebhookConsumer",
    "WebhookIntake",
    "WebhookKeys",
    "WebhookListener",
    "WebhookRouter",
    "bind_listener",
    "create_webhook_app",
    "katana_signature",
    "path_token_meta",
    "register_webhooks",
    "registration_record",
    "tradegecko_signature",
    "webhook_paths",
]

log = logging.getLogger("syncd.webhooks")

TRADEGECKO_EVENTS = ("purchase_order.create", "purchase_order.received", "procurement.create")
#: The Katana events that can move a link: its sales order, and the MOs behind it.
KATANA_EVENTS = (
    "sales_order.created",
    "sales_order.updated",
    "sales_order.deleted",
    "sales_order.packed",
    "sales_order.delivered",
    "manufacturing_order.created",
    "manufacturing_order.updated",
    "manufacturing_order.deleted",
    "manufacturing_order.in_progress",
    "manufacturing_order.blocked",
    "manufacturing_order.done",
)
#: Katana events that may change what a SKU's variant id is: the variant cache drops it.
KATANA_VARIANT_EVENTS = ("product.updated", "product.deleted", "variant.updated", "variant.deleted")
TRADEGECKO_PATH = "/webhooks/tradegecko"
KATANA_PATH = "/webhooks/katana"
_META_KATANA_TOKEN = "webhooks.katana_token"
#: What the last registration that worked made sure of (:func:`registration_record`).
_META_REGISTERED = "webhooks.registered"


def webhook_paths(factory: str | None = None) -> tuple[str, str]:
    """The TradeGecko path and the Katana path (before its token) a factory is sent to:
    ``/webhooks/<factory>/tradegecko``; ``None`` is the single factory's unprefixed paths."""
    if factory is None:
        return TRADEGECKO_PATH, KATANA_PATH
    return f"/webhooks/{factory}/tradegecko", f"/webhooks/{factory}/katana"


_META_PATH_TOKEN = "webhooks.path_token"
#: How far ahead of our clock a delivery's timestamp may be (clock skew).
_FUTURE_SKEW = 300.0


class _NotLinkedYet(SyncdError):
    """A delivery for an SO no link names while an import is under way: looked at again."""


def tradegecko_signature(secret: str, body: bytes) -> str:
    """``X-Gecko-Signature``: Base64 of HMAC-SHA256 of the raw body, keyed with the secret."""
    return base64.b64encode(hmac.digest(secret.encode(), body, "sha256")).decode()


def katana_signature(token: str, body: bytes) -> str:
    """``X-Sha2-Signature``: hex HMAC-SHA256 of the raw body, keyed by the webhook's token.

    *Unverified* whether Katana prefixes ``sha256=``; the listener accepts both.
    """
    return hmac.digest(token.encode(), body, "sha256").hex()


@dataclass
class WebhookKeys:
    """What verifies deliveries; the Katana tokens grow when registration creates one.

    ``verify=False`` (``webhooks.verify_signatures = false``) accepts any signature, or
    none; the Katana path token is still checked.
    """

    tradegecko_secret: str
    path_token: str
    katana_tokens: set[str] = field(default_factory=set)
    verify: bool = True

    def tradegecko_ok(self, body: bytes, header: str | None) -> bool:
        if not self.verify:
            return True
        if not header or not self.tradegecko_secret:
            return False
        expected = tradegecko_signature(self.tradegecko_secret, body)
        return hmac.compare_digest(expected.encode(), header.strip().encode())

    def katana_ok(self, body: bytes, header: str | None) -> bool:
        if not self.verify:
            return True
        if not header:
            return False
        given = header.strip().lower().removeprefix("sha256=").encode()
        # Every token is compared, so timing says nothing about which one matched.
        matches = [
            hmac.compare_digest(katana_signature(token, body).encode(), given)
            for token in sorted(self.katana_tokens)
        ]
        return any(matches)

    def path_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.path_token.encode())


class _TradeGeckoBody(msgspec.Struct, kw_only=True):
    object_id: int
    event: str
    timestamp: float | None = None
    resource_url: str | None = None


class _KatanaObject(msgspec.Struct, kw_only=True):
    id: int | str
    status: str | None = None
    href: str | None = None


class _KatanaBody(msgspec.Struct, kw_only=True):
    resource_type: str
    action: str
    webhook_id: int | None = None
    object: _KatanaObject


_tradegecko_body = msgspec.json.Decoder(_TradeGeckoBody).decode
_katana_body = msgspec.json.Decoder(_KatanaBody).decode


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    # ASGI's messages read directly: most deliveries come in one, and Request.stream()'s
    # async generator costs more than the loop.
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_encode_answer = msgspec.json.Encoder().encode


class _Answer(Response):
    """A listener's answer, ``{"status": message}``, with a short result name for the
    metrics. Built without Starlette's rendering: the body and headers of a message are
    made once (a listener answers the same few messages again and again)."""

    media_type = "application/json"
    result: str

    def __init__(self, status: int, message: str) -> None:
        self.status_code = status
        self.background = None
        self.body, headers, self.result = _rendered(message)
        self.raw_headers = list(headers)


@functools.lru_cache(maxsize=64)
def _rendered(message: str) -> tuple[bytes, tuple[tuple[bytes, bytes], ...], str]:
    body = _encode_answer({"status": message})
    headers = ((b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"))
    return body, headers, message.split(":")[0].replace(" ", "_").replace("-", "_").lower()


def _answer(status: int, message: str) -> Response:
    return _Answer(status, message)


async def _acknowledged() -> None:
    # Async, so it runs on the event loop right after the response (a sync function would go
    # to a worker thread, giving the consumer a turn before the crash point).
    crash_point("webhook_acknowledged")


#: Stateless, so one serves every answer.
_ACKNOWLEDGED = BackgroundTask(_acknowledged)


def create_webhook_app(
    store: Store,
    keys: WebhookKeys,
    *,
    max_body_bytes: int,
    on_received: Callable[[], None],
    health: Callable[[], dict[str, object]] | None = None,
    observer: Observer | None = None,
    replay_window: float | None = None,
    clock: Callable[[], float] = time.time,
    notify: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:
    """The listener's ASGI app: ``POST /webhooks/tradegecko``,
    ``POST /webhooks/katana/{path token}``, ``GET /healthz``.

    ``on_received`` wakes the consumer once a delivery is stored; ``observer`` is told what
    each delivery was answered. ``replay_window``: seconds a TradeGecko delivery's
    ``timestamp`` may lie behind ``clock()`` (at most 5 minutes ahead); ``None`` checks no
    timestamp. The daemon's listener passes ``webhooks.replay_window``. ``notify`` is
    awaited once a delivery is stored (another daemon owns the factory: wake it); a failure
    of it is logged, the delivery still acknowledged (the owner looks at its inbox anyway).
    """

    def stale(timestamp: float | None) -> bool:
        if replay_window is None or timestamp is None:
            return False  # Older payloads carry no timestamp.
        age = clock() - timestamp
        return not -_FUTURE_SKEW <= age <= replay_window

    async def persist(received: inbox.WebhookReceived, dedup_key: str | None) -> Response:
        event_id = await store.add_event(
            received.service,
            inbox.WEBHOOK_RECEIVED,
            inbox.encode(received),
            dedup_key=dedup_key,
        )
        if event_id is None:
            log.info("duplicate %s delivery %s", received.service, received.delivery_id)
            return _answer(200, "duplicate")
        on_received()
        if notify is not None:
            try:
                await notify()
            except SyncdError as exc:
                log.warning("delivery stored, its factory's owner not woken: %s", exc)
        answer = _answer(200, "accepted")
        # Runs once the 200 is sent: the sender will not try again, only the inbox row is left.
        answer.background = _ACKNOWLEDGED
        return answer

    async def signed_body(
        request: Request, service: str, verify: Callable[[bytes, str | None], bool], header: str
    ) -> bytes | Response:
        """The delivery's body, or the answer refusing it (too large, not signed right)."""
        try:
            body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            return _answer(413, "body too large")
        if not verify(body, request.headers.get(header)):
            log.warning("%s delivery with a bad or missing signature refused", service)
            return _answer(401, "bad signature")
        return body

    async def tradegecko(request: Request) -> Response:
        body = await signed_body(request, "TradeGecko", keys.tradegecko_ok, "x-gecko-signature")
        if isinstance(body, Response):
            return body
        delivery = request.headers.get("x-gecko-delivery", "").strip()
        try:
            note = _tradegecko_body(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _answer(400, f"malformed body: {exc}")
        if not delivery:
            return _answer(400, "no X-Gecko-Delivery")
        if stale(note.timestamp):
            log.warning(
                "TradeGecko delivery %s refused: timestamp %s outside the replay window",
                delivery,
                note.timestamp,
            )
            return _answer(401, "stale timestamp")
        if note.event.startswith("variant."):
            # TradeGecko sends no variant update, but a variant event is still news.
            await store.forget_variants("tradegecko", variant_ids=[note.object_id])
            return _answer(200, "variant forgotten")
        if note.event not in TRADEGECKO_EVENTS:
            log.info("TradeGecko event %s ignored", note.event)
            return _answer(200, "ignored")
        received = inbox.WebhookReceived(
            service="tradegecko",
            event=note.event,
            resource_type=note.event.split(".", 1)[0],
            object_id=note.object_id,
            delivery_id=delivery,
        )
        return await persist(received, f"webhook:tradegecko:{delivery}")

    async def katana(request: Request) -> Response:
        if not keys.path_ok(str(request.path_params["token"])):
            return _answer(404, "not found")
        body = await signed_body(request, "Katana", keys.katana_ok, "x-sha2-signature")
        if isinstance(body, Response):
            return body
        try:
            note = _katana_body(body)
            object_id = int(note.object.id)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return _answer(400, f"malformed body: {exc}")
        if note.action in KATANA_VARIANT_EVENTS:
            # The cache is keyed by variant: a product's change drops all of Katana's (rare).
            if note.action.startswith("variant."):
                await store.forget_variants("katana", variant_ids=[object_id])
            else:
                await store.forget_variants("katana", every=True)
            return _answer(200, "variant forgotten")
        if note.action not in KATANA_EVENTS:
            log.info("Katana event %s ignored", note.action)
            return _answer(200, "ignored")
        retry = request.headers.get("x-katana-retry-num", "")
        received = inbox.WebhookReceived(
            service="katana",
            event=note.action,
            resource_type=note.action.split(".", 1)[0],
            object_id=object_id,
            # isdigit() alone accepts "²", which int() refuses.
            retry=int(retry) if retry.isascii() and retry.isdigit() else None,
            status=note.object.status,
        )
        # No event id: the consumer coalesces duplicates and weighs the status first.
        return await persist(received, None)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", **(health() if health else {})})

    def counted(
        service: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            response = await handler(request)
            if observer is not None:
                result = getattr(response, "result", str(response.status_code))
                observer.webhook_answered(service, result)
            return response

        return endpoint

    return Starlette(
        routes=[
            Route(TRADEGECKO_PATH, counted("tradegecko", tradegecko), methods=["POST"]),
            Route(KATANA_PATH + "/{token}", counted("katana", katana), methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


_Key = tuple[str, int]
_KATANA_RESOURCES = frozenset(event.split(".", 1)[0] for event in KATANA_EVENTS)
_Batch = list[tuple[int, inbox.WebhookReceived]]
#: The most followed SOs one look reads to place an MO heard of (one request); with more
#: that may own it, the MO itself is looked at.
_OWNERS_PER_LOOK = 50


class WebhookConsumer:
    """Turns persisted deliveries into the pollers' events, taking them as hints.

    Deliveries for one object within ``coalesce`` seconds are looked at once; a Katana
    delivery whose status cannot move the order (:func:`~syncd.domain.rules.delivery_can_move`
    against the chart) and the echoes of syncd's own writes are settled without a re-fetch.
    Objects are handled ``concurrency`` at a time, one object's deliveries in order. A
    delivery missed or settled on a stale status is caught by the pollers' reconciliation.

    Signed deliveries (``trusted``) are taken at their word where a look makes them
    sufficient, with the evidence in the store (it survives a restart): a look at an SO
    keeps what it saw and places the MOs its rows link; an MO heard of that no look placed
    is placed by one look at the followed SOs that may own it (several such MOs in a window
    share it), the MO itself being looked at only when none of them links it; a placed
    MO's statuses need no look; an SO's DELIVERED moves the order with no look when every
    MO its last look placed said DONE since, no row waited for an MO and no SO delivery
    since may have been a row edit. Otherwise one look, as before.
    """

    def __init__(
        self,
        store: Store,
        tradegecko_poller: TradeGeckoPoller,
        katana_poller: KatanaPoller,
        wake: Callable[[], None],
        *,
        retry: RetryPolicies = RETRY,
        chart: Statechart | None = None,
        coalesce: float = 0.5,
        concurrency: int = 8,
        trusted: bool = True,
        watch: inbox.InboxWatch | None = None,
    ) -> None:
        self.store = store
        #: The daemon's look at the inbox, which wakes the consumer when another daemon's
        #: listener persisted a delivery; without one it looks every
        #: :data:`inbox.LOOK_EVERY` seconds.
        self.watch = watch
        self.tradegecko_poller = tradegecko_poller
        self.katana_poller = katana_poller
        self._wake_dispatcher = wake
        self._kick = anyio.Event()
        self.retry = retry
        self.chart = chart or load_statechart()
        self.coalesce = coalesce
        self._limiter = anyio.CapacityLimiter(concurrency)
        #: Re-fetches that failed, by object; after their attempts the pollers reconcile.
        self._retries: Retries[_Key] = Retries(retry.webhook)
        #: Deliveries handed to an object's worker and not yet settled.
        self._claimed: set[int] = set()
        self._queued: dict[_Key, _Batch] = {}
        self._busy: set[_Key] = set()
        #: Deliveries are signed (``webhooks.verify_signatures``): the statuses they say
        #: are taken at their word, with what looks placed (kept in the store).
        self.trusted = trusted
        #: Manufacturing order → its sales order, as looks placed it (a cache of the
        #: store's placements): its deliveries are gathered with the SO's.
        self._mo_so: dict[int, int | None] = {}
        self._mo_lookup = anyio.Lock()
        #: The newest delivery collected (inbox ids grow), and by SO the newest one
        #: collected before its last look began: deliveries up to it are covered by it.
        self._collected = 0
        self._looked: dict[int, int] = {}
        #: Re-fetches made, by resource (for tests and the curious).
        self.refetches: dict[str, int] = {}
        #: Whether syncd's own receipt made a procurement (the daemon sets it): its
        #: delivery is an echo, and asks no poll.
        self.own_procurement: Callable[[int], bool] = lambda procurement_id: False
        #: PO look-ups due together share one read (several new POs at once); while the
        #: budget is contended they wait up to 5 s for more.
        # No fixed window: deliveries handled together still share a read (they join while
        # it is due), and a PO created alone is looked at at once (PO → SO latency); only
        # while TradeGecko's budget has callers waiting does the batch stay open for more.
        self.purchase_orders = PurchaseOrderReads(
            tradegecko_poller.client, patience=5.0, window=0.0
        )

    def wake(self) -> None:
        """Tell the consumer a delivery was persisted."""
        self._kick.set()

    async def run(self) -> None:
        # With a watch, no timer: idle, the consumer sleeps until a delivery is persisted
        # (deliveries left pending by a failure are seen by the watch's next look).
        with inbox.watched(
            self.watch, self.store.factory, self.wake, kinds=inbox.WEBHOOK_KINDS
        ) as patience:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        await self._collect(tg)
                    except SyncdError as exc:
                        log.warning("webhook deliveries not processed yet: %s", exc)
                        await anyio.sleep(self.retry.webhook.initial)
                    with anyio.move_on_after(patience):
                        await self._kick.wait()
                    self._kick = anyio.Event()

    async def _collect(self, tg: anyio.abc.TaskGroup) -> None:
        """Hand every new persisted delivery to its object's worker, starting one if idle."""
        events = await self.store.pending_events(
            len(self._claimed) + 200, kinds=inbox.WEBHOOK_KINDS
        )
        for event in events:
            if event.id in self._claimed:
                continue
            try:
                note = inbox.decode(event.kind, event.payload)
            except (KeyError, msgspec.DecodeError) as exc:
                await self.store.mark_processed(event.id, f"unreadable: {exc}")
                continue
            assert isinstance(note, inbox.WebhookReceived)
            key = self._key(note)
            self._collected = max(self._collected, event.id)
            self._claimed.add(event.id)
            self._queued.setdefault(key, []).append((event.id, note))
            if key not in self._busy:
                self._busy.add(key)
                tg.start_soon(self._work, key)

    def _key(self, note: inbox.WebhookReceived) -> _Key:
        """Whose deliveries these are: an MO's known sales order gathers them with the
        SO's own (5 MOs finishing make one look at their SO)."""
        if note.resource_type == "manufacturing_order":
            so_id = self._mo_so.get(note.object_id)
            if so_id is not None:
                return ("sales_order", so_id)
        return (note.resource_type, note.object_id)

    async def _work(self, key: _Key) -> None:
        try:
            while True:
                # The window: what else arrives for this object joins the one look. TradeGecko
                # deliveries are told apart by their id at the door; a PO's discovery waits not.
                await anyio.sleep(self.coalesce if key[0] in _KATANA_RESOURCES else 0)
                batch = self._queued.pop(key, None)
                if not batch:
                    return
                async with self._limiter:
                    await self._settle(key, batch)
        finally:
            # No await since the empty pop: a delivery queued meanwhile starts a new worker.
            self._busy.discard(key)

    async def _settle(self, key: _Key, batch: _Batch) -> None:
        resource, object_id = key
        try:
            try:
                newest = max(event_id for event_id, _ in batch)
                outcome, count = await self._look(resource, object_id, batch, newest)
            except NotFound:
                outcome, count = "gone", 0
            except SyncdError as exc:
                delay = self._retries.failed(key).delay
                if delay is not None:
                    log.warning("webhook re-fetch of %s %s failed: %s", resource, object_id, exc)
                    await anyio.sleep(delay)
                    # In order: these go before anything that arrived meanwhile.
                    self._queued[key] = batch + self._queued.get(key, [])
                    return
                outcome, count = f"failed (the poller reconciles): {exc}", 0
            self._retries.succeeded(key)
            for event_id, _ in batch:
                # Every delivery of the batch shares the one look.
                await self.store.mark_processed(event_id, outcome)
                self._claimed.discard(event_id)
        except SyncdError as exc:
            # The store failed: the deliveries stay pending and are collected again.
            log.warning("webhook deliveries not processed yet: %s", exc)
            self._claimed.difference_update(event_id for event_id, _ in batch)
            await anyio.sleep(self.retry.webhook.initial)
            return
        if count:
            self._wake_dispatcher()

    def _counted(self, resource: str) -> None:
        self.refetches[resource] = self.refetches.get(resource, 0) + 1

    async def _look(
        self, resource: str, object_id: int, batch: _Batch, newest: int
    ) -> tuple[str, int]:
        if resource == "purchase_order":
            return await self._purchase_order(object_id, [note for _, note in batch])
        if resource == "procurement":
            if self.own_procurement(object_id):
                return "syncd's own receipt", 0
            # A receipt by someone else: the poll reads the PO's new state.
            self.tradegecko_poller.kick.set()
            return "poll asked", 0
        if resource == "manufacturing_order":
            return await self._manufacturing_order(object_id, batch, newest)
        if resource == "sales_order":
            return await self._weigh(object_id, batch, newest)
        return f"nothing to do for {resource}", 0

    def _hint(
        self,
        notes: list[inbox.WebhookReceived],
        state: str,
        resume: str | None,
        so_status: str | None,
    ) -> str:
        """Why the deliveries need no look at the order in ``state``, whose SO's status is
        last known as ``so_status`` (``None``: unknown), or ``""`` if they do."""
        if all(note.event == "sales_order.created" for note in notes):
            # Only syncd's import creates a followed SO; its outcome already said so.
            return "echo of syncd's own write"

        def allows(trigger: str) -> bool:
            return self.chart.allows(state, trigger, resume_state=resume)

        # What the MOs' deliveries are weighed with: a delivery saying DELIVERED (reordered
        # ones may be stale, so only the status that can move counts), else the last known.
        if any(n.resource_type == "sales_order" and n.status == DELIVERED for n in notes):
            so_status = DELIVERED
        if any(
            delivery_can_move(
                note.resource_type,
                note.status,
                deleted=note.event.endswith(".deleted"),
                allows=allows,
                so_status=so_status,
            )
            for note in notes
        ):
            return ""
        statuses = ", ".join(sorted({note.status or "none" for note in notes}))
        return f"status {statuses} cannot move an order {state}"

    def _word(self, note: inbox.WebhookReceived) -> str | None:
        """The status a delivery is taken at its word for: only a signed one's (anyone can
        send an unsigned one), sent the first time (a retry is older than what was sent
        since), of an object not deleted."""
        if not self.trusted or note.retry or note.event.endswith(".deleted"):
            return None
        return note.status

    async def _hear(self, so_id: int, batch: _Batch) -> None:
        """Keep what the deliveries say of SO ``so_id`` and its placed MOs (by inbox id:
        a delivery heard later than another wins)."""
        for event_id, note in batch:
            status = self._word(note)
            if note.resource_type == "manufacturing_order":
                if status is not None:
                    await self.store.hear_manufacturing_order(note.object_id, status, event_id)
            elif note.resource_type == "sales_order" and note.event != "sales_order.created":
                # Anything but DELIVERED may be an edit of its rows (Katana's SO deliveries
                # say only the status): the rows are looked at again before it moves.
                await self.store.hear_sales_order(
                    so_id, event_id, status=status, edit=status != DELIVERED
                )

    async def _weigh(self, so_id: int, batch: _Batch, newest: int) -> tuple[str, int]:
        """Look at the SO only when what the deliveries say could move its order and what
        is known (the last look, signed deliveries since) cannot tell how."""
        notes = [note for _, note in batch]
        link = await self.store.link_by_so(so_id)
        # The SO may be the one an import just made, its outcome not stored yet: wait
        # (retried like a failed look) rather than settle its deliveries as not followed.
        if (
            link is None
            and not all(n.event == "sales_order.created" for n in notes)
            and (await self.store.counts_by_state()).get(self.chart.initial, 0)
        ):
            raise _NotLinkedYet(f"Katana SO {so_id} is no order's yet; an import is under way")
        if link is None or link.state not in self.katana_poller.followed_states:
            return "not followed", 0
        evidence = await self.store.sales_order_evidence(so_id)
        if evidence is not None:
            # Without a look kept there is nothing to add to: the look will tell.
            await self._hear(so_id, batch)
            evidence = await self.store.sales_order_evidence(so_id)
        so_status = evidence.status if evidence is not None else None
        if why := self._hint(notes, link.state, link.resume_state, so_status):
            return why, 0
        if evidence is not None and (facts := self._delivered_by_word(evidence)) is not None:
            allowed = self.chart.allows(link.state, SO_DELIVERED, resume_state=link.resume_state)
            if allowed:
                return await self._report_delivered(evidence, facts, link.id)
        return await self._sales_orders({so_id}, newest)

    def _delivered_by_word(self, evidence: SalesOrderEvidence) -> SalesOrderFacts | None:
        """What a look would now see, when the evidence tells it: the SO said DELIVERED
        (signed, or the look), its rows unchanged since the look, which showed no row
        waiting for production, and every MO the look placed on it DONE (said after the
        look, or as the look saw it). ``None``: a look must tell."""
        if not self.trusted or evidence.status != DELIVERED or evidence.edited is not None:
            return None
        if evidence.waiting:
            return None
        facts = msgspec.json.decode(evidence.facts, type=SalesOrderFacts)
        if facts.deleted or not facts.manufacturing_order_ids:
            return None
        placed = {p.mo_id: p for p in evidence.placements}
        for mo_id in facts.manufacturing_order_ids:
            placement = placed.get(mo_id)
            if placement is None or placement.so_id != evidence.so_id:
                return None
            if placement.heard is not None and placement.heard > placement.placed:
                done = placement.status == "DONE"
            else:
                done = facts.production_status == "DONE"
            if not done:
                return None
        delivered = msgspec.structs.replace(
            facts, status=DELIVERED, production_status="DONE", updated_at=None
        )
        return delivered if SO_DELIVERED in sales_order_trigger(delivered) else None

    async def _report_delivered(
        self, evidence: SalesOrderEvidence, facts: SalesOrderFacts, link_id: int
    ) -> tuple[str, int]:
        """The event a look would have written, from the evidence: under a key the same
        evidence makes again (workers racing on one SO write it once)."""
        heard = max([evidence.heard or 0, *(p.heard or 0 for p in evidence.placements)], default=0)
        added = await report_sales_order(self.store, facts, f"heard:{heard}", link_id)
        return ("delivered, as signed deliveries say" if added else "nothing new"), added

    async def _manufacturing_order(self, mo_id: int, batch: _Batch, newest: int) -> tuple[str, int]:
        if mo_id not in self._mo_so:
            placement = await self.store.placement(mo_id)
            if placement is None:
                # One at a time: the first look places its siblings (a 5-line order makes
                # 5 MOs at once, 10 orders in flight 10), so theirs need no look.
                async with self._mo_lookup:
                    placement = await self.store.placement(mo_id)
                    if placement is None:
                        return await self._unknown_manufacturing_order(mo_id, batch, newest)
            self._mo_so[mo_id] = placement.so_id
        so_id = self._mo_so[mo_id]
        if so_id is None:
            return "made for no sales order", 0
        return await self._weigh(so_id, batch, newest)

    async def _unknown_manufacturing_order(
        self, mo_id: int, batch: _Batch, newest: int
    ) -> tuple[str, int]:
        # Which order it belongs to is unknown: weighed against every followed order's
        # state; then the followed SOs that may own it are looked at together, and only if
        # none of them links it, the MO itself.
        notes = [note for _, note in batch]
        followed = self.katana_poller.followed_states
        held = [state for state in await self.store.counts_by_state() if state in followed]
        # A look's triggers never include ``retry``, the one a resume state decides.
        movable = [state for state in held if not self._hint(notes, state, None, None)]
        if not movable:
            return "status cannot move any followed order", 0
        # Its owner is one whose order it can move, and whose rows may link a new MO.
        owners = await self.store.sales_orders_waiting(
            sorted(await self.store.so_ids_in_states(movable))
        )
        if 0 < len(owners) <= _OWNERS_PER_LOOK:
            outcome, added = await self._sales_orders(owners, newest)
            placement = await self.store.placement(mo_id)
            if placement is not None:
                self._mo_so[mo_id] = placement.so_id
                return outcome, added
        self._counted("manufacturing_order")
        looked = self._collected
        orders = await self.katana_poller.client.list_manufacturing_orders(
            ids=[mo_id], include_deleted=True
        )
        for mo in orders:
            # An MO made for no sales order stays so: its deliveries need no look again.
            await self.store.place_manufacturing_order(mo.id, mo.sales_order_id, looked)
            self._mo_so[mo.id] = mo.sales_order_id
        so_ids = {mo.sales_order_id for mo in orders if mo.sales_order_id is not None}
        return await self._sales_orders(so_ids, newest)

    async def _purchase_order(
        self, po_id: int, notes: list[inbox.WebhookReceived]
    ) -> tuple[str, int]:
        poller = self.tradegecko_poller
        if all(note.event == "purchase_order.received" for note in notes):
            link = await self.store.link_by_po(po_id)
            # A received PO is withdrawn from nothing; a linked one was received by syncd's
            # own receive effect, whose outcome moves the order.
            if link is not None and purchase_order_trigger("received") is None:
                return "echo of syncd's own write", 0
        self._counted("purchase_order")
        po, lines = await self.purchase_orders.read(po_id)
        if po.company_id not in await poller.supplier_ids():
            await poller.note_not_linked(po, OTHER_SUPPLIER, supplier=f"company {po.company_id}")
            return "another supplier", 0
        linked = bool(await self.store.linked_po_ids([po.id]))
        added = await poller.consider(po, linked=linked, lines=lines)
        return ("new event" if added else "nothing new"), added

    async def _sales_orders(self, so_ids: Iterable[int], newest: int) -> tuple[str, int]:
        """Look at the followed ones among ``so_ids`` (one request) unless a look that began
        after the ``newest`` delivery was collected (so after Katana's change) already saw
        them; keep what it saw and place the MOs their rows link."""
        poller = self.katana_poller
        followed = await self.store.so_ids_in_states(poller.followed_states)
        wanted = sorted(i for i in so_ids if i in followed)
        if not wanted:
            return "not followed", 0
        wanted = [i for i in wanted if self._looked.get(i, 0) < newest]
        if not wanted:
            return "covered by a later look", 0
        looked = self._collected
        for so_id in wanted:
            self._looked[so_id] = looked
        self._counted("sales_order")
        orders = await poller.client.list_sales_orders(ids=wanted, include_deleted=True)
        for so in orders:
            facts = facts_of(so)
            await self.store.record_sales_order_look(
                so.id,
                looked,
                inbox.encode(facts),
                status=so.status,
                waiting=any(
                    row.deleted_at is None and row.linked_manufacturing_order_id is None
                    for row in so.sales_order_rows
                ),
                mo_ids=facts.manufacturing_order_ids,
            )
            for mo_id in facts.manufacturing_order_ids:
                self._mo_so[mo_id] = so.id
        added = await poller.report(orders, followed)
        return ("new event" if added else "nothing new"), added


async def register_webhooks(
    store: Store,
    katana: KatanaClient,
    tradegecko: TradeGeckoClient,
    base_url: str,
    keys: WebhookKeys,
    *,
    factory: str | None = None,
) -> None:
    """Make sure both services send to ``base_url``: list, then create only what is missing.

    Katana's returned token is kept in the database and added to ``keys``. ``factory`` names
    the factory in the paths (:func:`webhook_paths`); ``None`` registers the unprefixed ones.

    Once both are, :func:`registration_record` is kept in the database: a start that finds
    it needs not ask again (:class:`WebhookListener` verifies it later).

    :raises ApiError: a service refused or could not be reached.
    :raises StoreError: the token or the record cannot be written.
    """
    base = base_url.rstrip("/")
    tg_path, kt_path = webhook_paths(factory)
    tg_url = base + tg_path
    present = {hook.event for hook in await tradegecko.list_webhooks() if hook.address == tg_url}
    for event in TRADEGECKO_EVENTS:
        if event not in present:
            await tradegecko.create_webhook(tg_url, event)
            log.info("TradeGecko webhook %s registered", event)
    kt_url = f"{base}{kt_path}/{keys.path_token}"
    record = registration_record(base_url, keys, factory)
    if not kt_url.startswith("https://"):
        log.error("Katana sends webhooks only to https:// addresses; %s is not", base)
        await store.set_meta(_META_REGISTERED, record)
        return
    mine = [hook for hook in await katana.list_webhooks() if hook.url == kt_url]
    if mine:
        missing = set(KATANA_EVENTS) - set(mine[0].subscribed_events)
        if missing:
            log.warning("the Katana webhook lacks %s: add them in Katana", sorted(missing))
        token = mine[0].token
    else:
        try:
            created = await katana.create_webhook(
                kt_url, (*KATANA_EVENTS, *KATANA_VARIANT_EVENTS), description="syncd"
            )
        except ApiError as exc:
            if exc.status is not None and exc.status < 500:
                raise
            # The POST may have landed with its answer lost: its token is in the listing, and
            # without it every delivery would be refused until the next start.
            landed = [hook for hook in await katana.list_webhooks() if hook.url == kt_url]
            if not landed:
                raise
            log.warning(
                "Katana webhook registration answered %s but it landed: using it",
                exc,
                extra={"webhook_id": landed[0].id},
            )
            token = landed[0].token
        else:
            token = created.token
            log.info("Katana webhook registered", extra={"webhook_id": created.id})
    if token:
        keys.katana_tokens.add(token)
        await store.set_meta(_META_KATANA_TOKEN, token)
    await store.set_meta(_META_REGISTERED, record)


def registration_record(base_url: str, keys: WebhookKeys, factory: str | None = None) -> str:
    """What a registration makes sure of: both addresses (the Katana one holds the path
    token) and the events. A start finding the same one recorded registers nothing; any
    change (``public_base_url``, the token, syncd's events) registers again."""
    base = base_url.rstrip("/")
    tg_path, kt_path = webhook_paths(factory)
    return json.dumps(
        {
            "tradegecko": [base + tg_path, *TRADEGECKO_EVENTS],
            "katana": [f"{base}{kt_path}/{keys.path_token}", *KATANA_EVENTS],
        }
    )


def bind_listener(config: Config) -> socket.socket:
    """The listening socket for ``webhooks.listen``.

    :raises ConfigError: the address cannot be listened on (in use, not local, no rights).
    """
    hooks = config.webhooks
    host, port = hooks.address()
    try:
        return bind_socket(host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {hooks.listen}: {exc.strerror or exc}", key="webhooks.listen"
        ) from None


def path_token_meta() -> tuple[str, str]:
    """The meta key of a factory's path token and a new token, set if unset (a daemon sets
    it for many factories at once with :meth:`Store.setdefault_meta_of`)."""
    return _META_PATH_TOKEN, secrets.token_urlsafe(24)


async def _load_keys(keys: WebhookKeys, config: Config, store: Store) -> None:
    """The factory's path token (made once, kept in the database) and every Katana token
    its deliveries may be signed with (the configured one, the one registered)."""
    if not keys.path_token:
        keys.path_token = await store.setdefault_meta(*path_token_meta())
    stored = await store.get_meta(_META_KATANA_TOKEN)
    keys.katana_tokens |= {t for t in (config.webhooks.katana_token, stored) if t}


class WebhookListener:
    """One factory's side of the listener: its keys, its app, its registration and health.

    ``factory`` names the factory in the paths (``/webhooks/<factory>/...``); ``None``
    keeps the single factory's unprefixed paths. :meth:`run` serves it alone on a socket;
    the daemon serves several through one :class:`WebhookRouter` instead.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        katana: KatanaClient,
        tradegecko: TradeGeckoClient,
        consumer: WebhookConsumer,
        observer: Observer | None = None,
        *,
        factory: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.katana = katana
        self.tradegecko = tradegecko
        self.consumer = consumer
        self.observer = observer or Observer()
        self.factory = factory
        self.url: str | None = None
        self.public_url: str | None = None
        self.registered = False
        self.app: Starlette | None = None
        self.keys = WebhookKeys(
            config.webhooks.tradegecko_secret,
            config.webhooks.path_token,
            verify=config.webhooks.verify_signatures,
        )

    async def _load_keys(self) -> None:
        await _load_keys(self.keys, self.config, self.store)

    def health(self) -> dict[str, object]:
        return {"registered": self.registered}

    async def prepare(self) -> Starlette:
        """Load the keys and build the app (:attr:`app`) serving the unprefixed paths."""
        hooks = self.config.webhooks
        if not hooks.verify_signatures:
            log.warning(
                "webhooks.verify_signatures = false: webhook signatures are NOT checked; "
                "anyone who can reach the listener can send deliveries"
            )
        await self._load_keys()
        self.app = create_webhook_app(
            self.store,
            self.keys,
            max_body_bytes=hooks.max_body_bytes,
            on_received=self.consumer.wake,
            health=self.health,
            observer=self.observer,
            replay_window=hooks.replay_window,
        )
        return self.app

    async def run(
        self,
        sock: socket.socket | None = None,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``sock`` (by default one from :func:`bind_listener`, then closed here)
        until cancelled; ``task_status`` gets the listener's URL once it listens.

        :raises ConfigError: the listen address cannot be listened on.
        """
        app = await self.prepare()
        owned = sock is None
        if sock is None:
            sock = bind_listener(self.config)
        try:
            async with serving_socket(app, sock) as url:
                log.info("webhook listener on %s", url)
                await self.register(url, task_status=task_status)
        finally:
            if owned:
                sock.close()

    #: Seconds between two verifications of registered webhooks (each lists both
    #: services' webhooks and creates what is gone), jittered by a tenth either way.
    verify_every = 3600.0

    async def register(
        self,
        url: str,
        *,
        wait_first: bool = True,
        turns: anyio.Semaphore | None = None,
        after: anyio.Event | None = None,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register the webhooks at ``webhooks.public_base_url`` (else ``url``, where the
        listener listens) until they are, then verify them every :attr:`verify_every`
        seconds until cancelled; ``task_status`` gets ``url`` once the factory may count as
        started.

        Webhooks the database records as registered for these addresses (a restart) are
        not asked about at start: they count as registered at once, and are first verified
        at a random moment within ``webhooks.reconcile_interval`` (the polls reconcile
        meanwhile, so a webhook gone while syncd was down loses nothing).

        :param wait_first: make the first registration before ``task_status`` (one
            factory: a change made right after the start comes as a webhook); else after.
        :param turns: taken around each registration or verification (many factories'
            registrations a bounded number at a time).
        :param after: without ``wait_first``, registrations wait for it (the daemon's
            whole start: they do not compete with the other factories' start).
        """
        self.url = url
        self.public_url = self.config.webhooks.public_base_url.rstrip("/") or url
        hooks = self.config.webhooks
        if not hooks.register:  # registered by hand (--no-register): nothing to ask
            self._healthy()
            task_status.started(url)
            await anyio.sleep_forever()
        recorded = await self.store.get_meta(_META_REGISTERED)
        if recorded == registration_record(self.public_url, self.keys, self.factory):
            self._healthy()
            task_status.started(url)
            await anyio.sleep(random.uniform(0.0, hooks.reconcile_interval))
        else:
            done = await self._register_once(turns) if wait_first else False
            task_status.started(url)
            if not wait_first:
                if after is not None:
                    await after.wait()
                done = await self._register_once(turns)
            policy = self.config.retry().registration
            failures = 0
            while not done:
                failures += 1
                await anyio.sleep(policy.delay(failures))
                done = await self._register_once(turns)
            await self._sleep_between_verifications()
        await self._verify_forever(turns)

    async def _sleep_between_verifications(self) -> None:
        every = self.verify_every
        await anyio.sleep(random.uniform(0.9 * every, 1.1 * every))

    async def _verify_forever(self, turns: anyio.Semaphore | None) -> None:
        """List both services' webhooks now and then, and register again what is gone."""
        policy = self.config.retry().registration
        while True:
            failures = 0
            while not await self._register_once(turns, verifying=True):
                failures += 1
                await anyio.sleep(policy.delay(failures))
            await self._sleep_between_verifications()

    async def _register_once(
        self, turns: anyio.Semaphore | None = None, *, verifying: bool = False
    ) -> bool:
        assert self.public_url is not None
        try:
            async with turns if turns is not None else _no_turns():
                await register_webhooks(
                    self.store,
                    self.katana,
                    self.tradegecko,
                    self.public_url,
                    self.keys,
                    factory=self.factory,
                )
        except SyncdError as exc:
            what = "webhooks not verified" if verifying else "webhooks not registered"
            log.warning("%s: %s", what, exc, extra=self._where())
            return False
        if not self.registered:
            self._healthy()
        return True

    def _healthy(self) -> None:
        self.registered = True
        # Changes now come as webhooks: the polls only reconcile what a delivery missed.
        self.consumer.tradegecko_poller.reconcile()
        self.consumer.katana_poller.reconcile()
        log.info("webhooks healthy: polls reconcile", extra=self._where())

    def _where(self) -> dict[str, str]:
        return {"factory": self.factory} if self.factory is not None else {}


@asynccontextmanager
async def _no_turns() -> AsyncIterator[None]:
    yield


class WebhookIntake:
    """A factory's deliveries taken by a daemon that does not run it (several daemons on one
    database behind one load balancer): verified with the factory's keys, persisted through
    a view without a lease, and its owner woken (:meth:`Store.notify`). Registration and
    the consumer are the owner's.
    """

    #: How often the Katana webhook token is read again when a Katana delivery comes (the
    #: owner may have registered the webhook since).
    refresh_interval = 1.0

    def __init__(
        self, name: str, config: Config, store: Store, observer: Observer | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.store = store
        self.observer = observer
        self.app: ASGIApp | None = None
        self.keys = WebhookKeys(
            config.webhooks.tradegecko_secret,
            config.webhooks.path_token,
            verify=config.webhooks.verify_signatures,
        )
        self._loaded_at = -math.inf

    async def _load_keys(self) -> None:
        await _load_keys(self.keys, self.config, self.store)
        self._loaded_at = time.monotonic()

    async def prepare(self) -> ASGIApp:
        """Load the keys and build the app (:attr:`app`)."""
        await self._load_keys()

        async def notify() -> None:
            await self.store.notify(self.name)

        app = create_webhook_app(
            self.store,
            self.keys,
            max_body_bytes=self.config.webhooks.max_body_bytes,
            on_received=lambda: None,
            observer=self.observer,
            replay_window=self.config.webhooks.replay_window,
            notify=notify,
        )

        async def refreshing(scope: Scope, receive: Receive, send: Send) -> None:
            if str(scope.get("path", "")).startswith(KATANA_PATH) and (
                time.monotonic() - self._loaded_at >= self.refresh_interval
            ):
                try:
                    await self._load_keys()
                except SyncdError as exc:
                    log.warning("factory %s: webhook keys not read again: %s", self.name, exc)
            await app(scope, receive, send)

        self.app = refreshing
        return refreshing


class WebhookRouter:
    """One listener for every factory: ``/webhooks/<factory>/tradegecko`` and
    ``/webhooks/<factory>/katana/<path token>`` go to that factory's
    :class:`WebhookListener`; the unprefixed paths go to the factory ``unprefixed`` names
    (the single factory of today's configs). A factory not running is a 404.

    Factories come and go while it serves (:meth:`add`, :meth:`remove`).
    """

    def __init__(self, unprefixed: str | None = None) -> None:
        self.unprefixed = unprefixed
        self.listeners: dict[str, WebhookListener] = {}
        #: Every configured factory's intake when daemons share them: a factory not
        #: running here is served by it (persisted, its owner woken).
        self.intakes: dict[str, WebhookIntake] = {}

    def _serving(self, name: str) -> WebhookListener | WebhookIntake | None:
        return self.listeners.get(name) or self.intakes.get(name)

    def add(self, name: str, listener: WebhookListener) -> None:
        if listener.app is None:
            raise ValueError(f"factory {name}: the listener is not prepared")
        self.listeners[name] = listener

    def remove(self, name: str) -> None:
        self.listeners.pop(name, None)

    def route(self, path: str) -> tuple[WebhookListener | WebhookIntake, str] | None:
        """The listener a path goes to and the unprefixed path it serves it as."""
        parts = path.split("/")  # "", "webhooks", first, ...
        if len(parts) < 3 or parts[0] or parts[1] != "webhooks":
            return None
        listener = self._serving(parts[2])
        if listener is not None and len(parts) >= 4 and parts[3] in ("tradegecko", "katana"):
            return listener, "/" + "/".join([parts[1], *parts[3:]])
        if parts[2] in ("tradegecko", "katana") and self.unprefixed is not None:
            default = self._serving(self.unprefixed)
            if default is not None:
                return default, path
        return None

    def health(self) -> dict[str, object]:
        """The single factory's health as it always was; with several, each one's."""
        if self.intakes:
            # Shared factories: each one's health where it runs here; the others run elsewhere.
            return {
                "registered": all(lsn.registered for lsn in self.listeners.values()),
                "factories": {
                    name: {**self.listeners[name].health(), "here": True}
                    if name in self.listeners
                    else {"here": False}
                    for name in self.intakes
                },
            }
        if self.unprefixed is not None and list(self.listeners) == [self.unprefixed]:
            return self.listeners[self.unprefixed].health()
        listeners = self.listeners.values()
        return {
            # None running yet (the listener serves before the factories start): not yet.
            "registered": bool(listeners) and all(lsn.registered for lsn in listeners),
            "factories": {name: lsn.health() for name, lsn in self.listeners.items()},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = str(scope["path"])
        if path == "/healthz":
            response: Response = JSONResponse({"status": "ok", **self.health()})
            await response(scope, receive, send)
            return
        found = self.route(path)
        if found is None:
            await _answer(404, "not found")(scope, receive, send)
            return
        listener, inner = found
        assert listener.app is not None
        await listener.app({**scope, "path": inner, "raw_path": inner.encode()}, receive, send)
