"""Webhooks: near-instant sync, verified, de-duplicated, persisted before acknowledged.

End-to-end tests run both simulators (sending webhooks) and the daemon (listening) over
loopback sockets, every Katana request and answer checked against the OpenAPI contract.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import Sims, running_sims
from syncd.config import (
    WebhooksConfig,
    parse_config,
)
from syncd.errors import ConfigError
from syncd.runtime import inbox
from syncd.runtime.daemon import Daemon
from syncd.runtime.observer import Observer
from syncd.runtime.webhooks import (
    WebhookKeys,
    WebhookListener,
    WebhookRouter,
    create_webhook_app,
    katana_signature,
    tradegecko_signature,
)
from syncd.sim import TRADEGECKO_WEBHOOK_SECRET, free_port
from syncd.sim.factory import play_factory
from syncd.sim.faults import FaultRule, Faults
from syncd.store import Store
from test_effects import settling

pytestmark = pytest.mark.anyio

SECRET = TRADEGECKO_WEBHOOK_SECRET


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    """Both simulators, sending webhooks."""
    async with running_sims(webhooks=True) as running:
        yield running


async def wait_for_state(daemon: Daemon, po_number: str, *states: str, seconds: float) -> None:
    with anyio.fail_after(seconds):
        while True:
            link = await daemon.store.link_by_po_number(po_number)
            if link is not None and link.state in states:
                return
            await anyio.sleep(0.01)


def inbox_rows(database: Path, kind: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT id, dedup_key, processed_at, outcome FROM inbox WHERE kind = ? ORDER BY id",
            (kind,),
        ).fetchall()


# -- end to end over loopback ---------------------------------------------------------------


async def test_po_becomes_so_within_a_second_by_webhook(sims: Sims, tmp_path: Path) -> None:
    # Polls every minute: only a webhook can make it in time.
    config = sims.config(tmp_path / "syncd.db", free_port())
    async with sims.daemon(config) as daemon:
        assert daemon.webhooks is not None and daemon.webhooks.registered
        assert daemon.tradegecko_poller.interval == 60.0
        started = time.monotonic()
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "imported", "in_production", seconds=1.0)
        assert time.monotonic() - started < 1.0
        async with httpx.AsyncClient() as client:
            health = (await client.get(f"{daemon.webhooks_url}/healthz")).json()
        assert health == {"status": "ok", "registered": True}
        # Katana's deliveries wait out their coalescing window, then are settled.
        await settled(tmp_path / "syncd.db", 1)
    rows = inbox_rows(tmp_path / "syncd.db", inbox.WEBHOOK_RECEIVED)
    assert rows and all(row[2] is not None for row in rows)


async def test_the_procurement_delivery_of_syncds_own_receipt_asks_no_poll(
    sims: Sims, tmp_path: Path
) -> None:
    config = sims.config(tmp_path / "syncd.db", free_port())
    database = tmp_path / "syncd.db"
    async with sims.daemon(config) as daemon, sims.factory():
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "received", seconds=30)
        with anyio.fail_after(10):
            while True:
                outcomes = [row[3] for row in inbox_rows(database, inbox.WEBHOOK_RECEIVED)]
                if "syncd's own receipt" in outcomes:
                    break
                await anyio.sleep(0.05)
    # Its echo costs nothing (before: a TradeGecko poll, kicked).
    assert "poll asked" not in outcomes, outcomes


async def test_registration_creates_only_what_is_missing_and_keeps_the_token(
    sims: Sims, tmp_path: Path
) -> None:
    port = free_port()
    config = sims.config(tmp_path / "syncd.db", port)
    for _ in range(2):
        async with sims.daemon(config):
            pass
    assert len(sims.tradegecko_webhooks.subscriptions) == 3
    assert len(sims.katana_webhooks.subscriptions) == 1
    (hook,) = sims.katana_webhooks.subscriptions.values()
    assert hook.url.startswith(f"https://127.0.0.1:{port}/webhooks/katana/")
    store = await Store.open(tmp_path / "syncd.db")
    try:
        assert await store.get_meta("webhooks.katana_token") == hook.token
    finally:
        await store.close()
    # --no-register: nothing is asked of the services.
    config.webhooks.register = False
    before = sims.katana_world.requests["GET /webhooks"]
    async with sims.daemon(config) as daemon:
        assert daemon.webhooks is not None and daemon.webhooks.registered
    assert sims.katana_world.requests["GET /webhooks"] == before


async def test_a_katana_registration_that_landed_but_answered_500_is_used_at_once(
    sims: Sims, tmp_path: Path
) -> None:
    faults = {
        "rules": [
            {"path": "/webhooks", "method": "POST", "error_rate": 1.0, "after": True, "times": 1}
        ]
    }
    response = await sims.control.put(f"{sims.katana_url}/_sim/faults", json=faults)
    assert response.status_code == 200, response.text
    config = sims.config(tmp_path / "syncd.db", free_port())
    async with sims.daemon(config) as daemon:
        # Listed again after the 500: registered, and with the token, before the start ends.
        (hook,) = sims.katana_webhooks.subscriptions.values()
        assert daemon.webhooks is not None and daemon.webhooks.registered
        assert hook.token in daemon.webhooks.keys.katana_tokens
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "imported", "in_production", seconds=5)
        # Katana's deliveries about the new SO are accepted, none refused.
        with anyio.fail_after(5):
            while True:
                if sims.katana_webhooks.counters["delivered"]:
                    break
                await anyio.sleep(0.02)
        assert sims.katana_webhooks.counters["failed_attempts"] == 0, sims.katana_webhooks.counters
    injected = (await sims.control.get(f"{sims.katana_url}/_sim/faults")).json()
    assert sum(injected["injected"].values()) == 1, injected
    assert len(sims.katana_webhooks.subscriptions) == 1


async def test_a_dropped_webhook_is_reconciled_by_the_poller(sims: Sims, tmp_path: Path) -> None:
    config = sims.config(tmp_path / "syncd.db", free_port(), poll=0.1, reconcile=0.5)
    async with sims.daemon(config) as daemon:
        # Healthy webhooks slow the polls to the reconciliation interval.
        assert daemon.tradegecko_poller.interval == 0.5
        await sims.knobs("tradegecko", drop=1.0)
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "imported", "in_production", seconds=5)
    assert sims.tradegecko_webhooks.counters["dropped"] >= 1
    assert sims.tradegecko_webhooks.counters["delivered"] == 0


async def test_duplicated_and_reordered_deliveries_have_one_effect(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    for service in ("tradegecko", "katana"):
        await sims.knobs(service, duplicate=1.0, reorder=1.0)
    async with (
        sims.daemon(config) as daemon,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: play_factory(sims.katana_url, step_delay=0.05))
        numbers = [(await sims.create_po())["order_number"] for _ in range(3)]
        for number in numbers:
            await wait_for_state(daemon, number, "received", seconds=20)
        tg.cancel_scope.cancel()
    katana = (await sims.control.get(f"{sims.katana_url}/_sim/counters")).json()
    tradegecko = (await sims.control.get(f"{sims.tradegecko_url}/_sim/counters")).json()
    assert katana["sales_orders_created"] == 3
    assert tradegecko["receipts"] == 3
    assert sims.tradegecko_webhooks.counters["duplicated"] >= 3
    # A TradeGecko delivery seen twice is stored once (keyed by X-Gecko-Delivery).
    keys = [row[1] for row in inbox_rows(database, inbox.WEBHOOK_RECEIVED) if row[1]]
    assert len(keys) == len(set(keys)) >= 3
    with sqlite3.connect(database) as db:
        discovered = db.execute("SELECT count(*) FROM inbox WHERE kind = 'po_discovered'")
        assert discovered.fetchone()[0] == 3


async def test_an_acknowledged_delivery_is_processed_after_a_restart(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    port = free_port()
    config = sims.config(database, port)
    # The TradeGecko sender is stopped for this test: the delivery is posted by hand.
    await sims.knobs("tradegecko", drop=1.0)
    async with sims.daemon(config) as daemon:
        pass  # registered and activated
    po = await sims.create_po()
    body = json.dumps({"object_id": po["id"], "event": "purchase_order.create"}).encode()
    headers = {
        "X-Gecko-Signature": tradegecko_signature(SECRET, body),
        "X-Gecko-Delivery": "delivery-1",
    }
    # The daemon acknowledges, then is stopped at once. TradeGecko refuses its token
    # meanwhile, so nothing but the inbox row can remain of the delivery.
    await sims.control.post(f"{sims.tradegecko_url}/_sim/token", json={"revoked": True})
    config.webhooks.register = False
    async with sims.daemon(config) as daemon, httpx.AsyncClient() as client:
        answer = await client.post(
            f"{daemon.webhooks_url}/webhooks/tradegecko", content=body, headers=headers
        )
        assert answer.status_code == 200
    await sims.control.post(f"{sims.tradegecko_url}/_sim/token", json={"revoked": False})
    assert await linked(database, po["order_number"]) is False
    (row,) = inbox_rows(database, inbox.WEBHOOK_RECEIVED)
    assert row[1] == "webhook:tradegecko:delivery-1"
    # The poller is kept from seeing the PO (its cursor is moved past it): only the
    # persisted delivery can import it after the restart.
    store = await Store.open(database)
    try:
        await store.set_cursor("tradegecko.purchase_orders", "2999-01-01T00:00:00+00:00")
    finally:
        await store.close()
    async with sims.daemon(config) as daemon:
        await wait_for_state(daemon, po["order_number"], "imported", "in_production", seconds=5)
    rows = inbox_rows(database, inbox.WEBHOOK_RECEIVED)
    (row,) = [row for row in rows if row[1] == "webhook:tradegecko:delivery-1"]
    assert (row[2] is not None, row[3]) == (True, "new event")


# -- deliveries as hints ------------------------------------------------------------------


async def katana_requests(sims: Sims) -> dict[str, int]:
    counters = (await sims.control.get(f"{sims.katana_url}/_sim/counters")).json()
    requests: dict[str, int] = counters["requests"]
    return requests


async def deliver_katana(
    daemon: Daemon, action: str, object_id: int, status: str, *, expect: str = "accepted"
) -> None:
    """Post one Katana delivery by hand, signed as Katana signs it."""
    assert daemon.webhooks is not None
    keys = daemon.webhooks.keys
    body = json.dumps(
        {
            "resource_type": action.split(".")[0],
            "action": action,
            "webhook_id": 1,
            "object": {"id": str(object_id), "status": status},
        }
    ).encode()
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{daemon.webhooks_url}/webhooks/katana/{keys.path_token}",
            content=body,
            headers={"X-Sha2-Signature": katana_signature(sorted(keys.katana_tokens)[0], body)},
        )
    assert answer.json() == {"status": expect}


def katana_outcomes(database: Path) -> list[tuple[str, str | None, str | None]]:
    """(event, status, outcome) of every Katana delivery, once all are settled."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT payload, outcome FROM inbox WHERE kind = ? AND source = 'katana' ORDER BY id",
            (inbox.WEBHOOK_RECEIVED,),
        ).fetchall()
    notes = [(inbox.decode(inbox.WEBHOOK_RECEIVED, bytes(p)), o) for p, o in rows]
    return [(n.event, n.status, o) for n, o in notes if isinstance(n, inbox.WebhookReceived)]


async def settled(database: Path, count: int, seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while True:
            rows = katana_outcomes(database)
            if len(rows) >= count and all(outcome for _, _, outcome in rows):
                return
            await anyio.sleep(0.02)


async def test_a_katana_variant_delivery_drops_the_cached_variant(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "imported", seconds=5)
        link = await daemon.store.link_by_po_number(po["order_number"])
        assert link is not None
        (line,) = link.lines
        assert await daemon.store.cached_variant_ids("katana", [line.sku], since=0) == {
            line.sku: line.katana_variant_id
        }
        before = await katana_requests(sims)
        await deliver_katana(
            daemon, "variant.updated", line.katana_variant_id, "", expect="variant forgotten"
        )
        assert await daemon.store.cached_variant_ids("katana", [line.sku], since=0) == {}
        assert await katana_requests(sims) == before  # dropped at the door: no call
        await daemon.store.remember_variants("katana", {line.katana_variant_id: line.sku})
        await deliver_katana(daemon, "product.updated", 1, "", expect="variant forgotten")
        assert await daemon.store.cached_variant_ids("katana", [line.sku], since=0) == {}
        (hook,) = await daemon.katana.list_webhooks()
    assert {"variant.updated", "variant.deleted", "product.updated"} <= set(hook.subscribed_events)


async def test_a_delivery_for_an_so_whose_import_is_not_recorded_yet_waits_for_it(
    tmp_path: Path,
) -> None:
    # The SO is made, its answer hangs 2 s: the order stays `discovered` with no SO while
    # Katana already says the SO is delivered.
    hang = Faults(
        rules=[
            FaultRule(
                path="/sales_orders",
                method="POST",
                timeout_rate=1.0,
                timeout_seconds=2.0,
                after=True,
                times=1,
            )
        ]
    )
    database = tmp_path / "syncd.db"
    async with running_sims(katana_faults=hang, webhooks=True) as sims:
        # The hung create is uncertain: its retry looks after katana.timeout + settle.
        config = settling(
            sims.config(database, free_port(), poll=60.0, reconcile=60.0), timeout=2.5, settle=0.2
        )
        async with sims.daemon(config) as daemon:
            po = await sims.create_po()
            with anyio.fail_after(5):
                while not sims.katana_world.sales_order_list():  # noqa: ASYNC110 - the sim's
                    await anyio.sleep(0.02)
            (so,) = sims.katana_world.sales_order_list()
            link = await daemon.store.link_by_po_number(po["order_number"])
            assert link is not None and link.state == "discovered" and link.so_id is None
            delivered = await sims.control.post(
                f"{sims.katana_url}/_sim/sales_orders/{so['id']}/deliver"
            )
            assert delivered.status_code == 200, delivered.text
            # No poll for a minute: only the deliveries, kept until the import is recorded,
            # can move the order.
            await wait_for_state(daemon, po["order_number"], "received", seconds=15)
    outcomes = [o for event, _, o in katana_outcomes(database) if event != "sales_order.created"]
    assert "not followed" not in outcomes, outcomes


async def test_a_status_that_cannot_move_the_order_makes_no_refetch(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "imported", seconds=5)
        await settled(database, 1)
        # The SO's `created` right after syncd's POST is its own echo: no look at the SO.
        assert katana_outcomes(database) == [
            ("sales_order.created", "NOT_SHIPPED", "echo of syncd's own write")
        ]
        link = await daemon.store.link_by_po_number(po["order_number"])
        assert link is not None and link.so_id is not None
        await sims.knobs("katana", drop=1.0)  # only the deliveries posted here
        before = await katana_requests(sims)
        # Katana's duplicates of a status that cannot move an imported order.
        for _ in range(3):
            await deliver_katana(daemon, "sales_order.updated", link.so_id, "NOT_SHIPPED")
        await settled(database, 4)
        assert await katana_requests(sims) == before
        assert (
            katana_outcomes(database)[1:]
            == [
                (
                    "sales_order.updated",
                    "NOT_SHIPPED",
                    "status NOT_SHIPPED cannot move an order imported",
                )
            ]
            * 3
        )
        # DELIVERED can move it: the update and the delivery Katana fires make one look.
        await deliver_katana(daemon, "sales_order.updated", link.so_id, "DELIVERED")
        await deliver_katana(daemon, "sales_order.delivered", link.so_id, "DELIVERED")
        await settled(database, 6)
        after = await katana_requests(sims)
        assert after.pop("GET /sales_orders", 0) == before.pop("GET /sales_orders", 0) + 1
        assert after == before
        assert daemon.webhooks is not None
        assert daemon.webhooks.consumer.refetches.get("sales_order") == 1


async def test_a_katana_delivery_makes_fewer_refetches_per_order(
    sims: Sims, tmp_path: Path
) -> None:
    # No poll in the test's time: every Katana read is the effects' or a delivery's.
    config = sims.config(tmp_path / "syncd.db", free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon, sims.factory():
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "received", seconds=20)
        await settled(tmp_path / "syncd.db", 4)
        assert daemon.webhooks is not None
        refetches = daemon.webhooks.consumer.refetches
    requests = await katana_requests(sims)
    # A first import looks no SO up: every GET /sales_orders is a delivery's re-fetch.
    assert requests.get("GET /sales_orders", 0) == refetches.get("sales_order", 0)
    assert requests.get("GET /manufacturing_orders", 0) == refetches.get("manufacturing_order", 0)
    # One look at the SO places its MO, whose DONE and the SO's DELIVERED are then taken
    # at their word; under load the MO may be heard before the import is stored (the MO
    # is looked at) or an SO delivery after that look (one more look). 8 before hints.
    assert sum(refetches.values()) <= 4, refetches


async def test_an_order_completes_with_dropped_duplicated_reordered_katana_deliveries(
    sims: Sims, tmp_path: Path
) -> None:
    config = sims.config(tmp_path / "syncd.db", free_port(), poll=60.0, reconcile=0.5)
    await sims.knobs("katana", drop=0.5, duplicate=1.0, reorder=1.0)
    async with sims.daemon(config) as daemon, sims.factory():
        numbers = [(await sims.create_po())["order_number"] for _ in range(2)]
        for number in numbers:
            await wait_for_state(daemon, number, "received", seconds=20)
    counters = sims.katana_webhooks.counters
    assert counters["dropped"] >= 1 and counters["duplicated"] >= 1
    katana = (await sims.control.get(f"{sims.katana_url}/_sim/counters")).json()
    assert katana["sales_orders_created"] == 2


async def test_deliveries_for_different_objects_are_handled_concurrently(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    config.webhooks.coalesce = 0.0
    async with sims.daemon(config) as daemon:
        numbers = [(await sims.create_po())["order_number"] for _ in range(3)]
        so_ids = []
        for number in numbers:
            await wait_for_state(daemon, number, "imported", seconds=5)
            link = await daemon.store.link_by_po_number(number)
            assert link is not None and link.so_id is not None
            so_ids.append(link.so_id)
        await settled(database, 3)
        await sims.knobs("katana", drop=1.0)
        slow = {"rules": [{"path": "/sales_orders", "method": "GET", "latency_ms": 600}]}
        assert (await sims.control.put(f"{sims.katana_url}/_sim/faults", json=slow)).is_success
        started = time.monotonic()
        for so_id in so_ids:
            await deliver_katana(daemon, "sales_order.delivered", so_id, "DELIVERED")
        await settled(database, 6)
        # One at a time would take 3 x 0.6 s.
        assert time.monotonic() - started < 1.5
        assert daemon.webhooks is not None
        assert daemon.webhooks.consumer.refetches["sales_order"] == 3


async def linked(database: Path, po_number: str) -> bool:
    store = await Store.open(database)
    try:
        return await store.link_by_po_number(po_number) is not None
    finally:
        await store.close()


# -- the listener alone -------------------------------------------------------------------


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Store, list[int]]]:
    store = await Store.open(tmp_path / "listener.db")
    woken: list[int] = []
    keys = WebhookKeys(SECRET, "path-token-123", {"0123456789abcdef"})
    app = create_webhook_app(store, keys, max_body_bytes=2048, on_received=lambda: woken.append(1))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://listener"
    ) as client:
        yield client, store, woken
    await store.close()


def tg_request(body: bytes, *, signature: str | None = "good", delivery: str = "d-1") -> Any:
    headers = {"X-Gecko-Delivery": delivery}
    if signature == "good":
        headers["X-Gecko-Signature"] = tradegecko_signature(SECRET, body)
    elif signature is not None:
        headers["X-Gecko-Signature"] = signature
    return {"content": body, "headers": headers}


async def test_new_pos_delivered_together_are_looked_at_in_one_read(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        assert daemon.webhooks is not None
        reads = daemon.webhooks.consumer.purchase_orders
        reads.window = 1.0  # wide: the three deliveries arrive together under load
        await anyio.sleep(0.5)  # past the poll at start
        _, before = await sims.counters()
        numbers = [(await sims.create_po())["order_number"] for _ in range(3)]
        for number in numbers:
            await wait_for_state(daemon, number, "imported", "in_production", seconds=10)
        _, after = await sims.counters()
        refetches = daemon.webhooks.consumer.refetches
    spent = {k: n - before["requests"].get(k, 0) for k, n in after["requests"].items()}
    by_id = {k: n for k, n in spent.items() if k.startswith("GET /purchase_orders/") and n}
    assert refetches["purchase_order"] == 3, refetches
    assert (reads.reads, reads.served) == (1, 3)
    assert spent.get("GET /purchase_orders") == 1 and by_id == {}, spent
    assert spent.get("GET /purchase_order_line_items") == 1, spent


async def test_forged_or_missing_signatures_are_refused_and_nothing_is_stored(
    listener: tuple[httpx.AsyncClient, Store, list[int]],
) -> None:
    client, store, woken = listener
    body = b'{"object_id": 5, "event": "purchase_order.create"}'
    forged = tradegecko_signature("not-the-secret", body)
    for kwargs in (tg_request(body, signature=None), tg_request(body, signature=forged)):
        assert (await client.post("/webhooks/tradegecko", **kwargs)).status_code == 401
    katana_body = b'{"resource_type": "sales_order", "action": "sales_order.updated", "object": {"id": "7", "status": "DELIVERED"}}'  # noqa: E501
    path = "/webhooks/katana/path-token-123"
    assert (await client.post(path, content=katana_body)).status_code == 401
    wrong = {"X-Sha2-Signature": katana_signature("ffffffffffffffff", katana_body)}
    assert (await client.post(path, content=katana_body, headers=wrong)).status_code == 401
    good = {"X-Sha2-Signature": katana_signature("0123456789abcdef", katana_body)}
    bad_path = "/webhooks/katana/guessed"
    assert (await client.post(bad_path, content=katana_body, headers=good)).status_code == 404
    assert await store.pending_events() == []
    assert woken == []


async def test_bad_bodies_are_refused_and_unknown_events_ignored(
    listener: tuple[httpx.AsyncClient, Store, list[int]],
) -> None:
    client, store, woken = listener
    malformed = b'{"object_id": "x"'
    assert (await client.post("/webhooks/tradegecko", **tg_request(malformed))).status_code == 400
    big = b'{"object_id": 5, "event": "purchase_order.create", "pad": "' + b"x" * 4096 + b'"}'
    assert (await client.post("/webhooks/tradegecko", **tg_request(big))).status_code == 413
    unknown = b'{"object_id": 5, "event": "fulfillments.create"}'
    answer = await client.post("/webhooks/tradegecko", **tg_request(unknown))
    assert (answer.status_code, answer.json()["status"]) == (200, "ignored")
    assert await store.pending_events() == []
    assert woken == []


async def test_a_body_in_several_chunks_is_read_whole_and_its_limit_still_holds(
    listener: tuple[httpx.AsyncClient, Store, list[int]],
) -> None:
    client, store, woken = listener

    def chunked(body: bytes, size: int) -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), size):
                yield body[start : start + size]

        # No Content-Length: the limit can only be kept while reading.
        headers = tg_request(body, delivery="d-chunked")["headers"]
        return {"content": chunks(), "headers": headers}

    body = b'{"object_id": 5, "event": "purchase_order.create", "pad": "' + b"y" * 600 + b'"}'
    answer = await client.post("/webhooks/tradegecko", **chunked(body, 100))
    assert (answer.status_code, answer.json()) == (200, {"status": "accepted"})
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(len(answer.content))
    big = b'{"object_id": 5, "event": "purchase_order.create", "pad": "' + b"x" * 4096 + b'"}'
    answer = await client.post("/webhooks/tradegecko", **chunked(big, 1000))
    assert (answer.status_code, answer.json()) == (413, {"status": "body too large"})
    (event,) = await store.pending_events(kinds=inbox.WEBHOOK_KINDS)
    note = inbox.decode(event.kind, event.payload)
    assert isinstance(note, inbox.WebhookReceived)
    assert (note.object_id, note.delivery_id) == (5, "d-chunked")
    assert woken == [1]


async def test_valid_deliveries_are_persisted_once_then_acknowledged(
    listener: tuple[httpx.AsyncClient, Store, list[int]],
) -> None:
    client, store, woken = listener
    body = b'{"object_id": 5, "event": "purchase_order.create", "timestamp": 1546272000}'
    for _ in range(2):
        assert (await client.post("/webhooks/tradegecko", **tg_request(body))).status_code == 200
    katana_body = b'{"resource_type": "sales_order", "action": "sales_order.delivered", "webhook_id": 1, "object": {"id": "7", "status": "DELIVERED"}}'  # noqa: E501
    for signature in (
        katana_signature("0123456789abcdef", katana_body),
        "sha256=" + katana_signature("0123456789abcdef", katana_body),
    ):
        answer = await client.post(
            "/webhooks/katana/path-token-123",
            content=katana_body,
            headers={"X-Sha2-Signature": signature},
        )
        assert answer.status_code == 200
    events = await store.pending_events(kinds=inbox.WEBHOOK_KINDS)
    notes = [inbox.decode(e.kind, e.payload) for e in events]
    assert notes == [
        inbox.WebhookReceived(
            service="tradegecko",
            event="purchase_order.create",
            resource_type="purchase_order",
            object_id=5,
            delivery_id="d-1",
        ),
        *[
            inbox.WebhookReceived(
                service="katana",
                event="sales_order.delivered",
                resource_type="sales_order",
                object_id=7,
                # The payload's status is kept: the consumer weighs it before a re-fetch.
                status="DELIVERED",
            )
        ]
        * 2,
    ]
    assert len(woken) == 3
    # The dispatcher never sees raw deliveries.
    assert await store.pending_events(exclude_kinds=inbox.WEBHOOK_KINDS) == []


def test_webhooks_config_reads_secrets_and_names_wrong_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SYNCD_TRADEGECKO_WEBHOOK_SECRET", "from-env")
    text = 'tradegecko.token = "t"\nkatana.token = "k"\n[webhooks]\nenabled = true\n'
    config = parse_config(text)
    assert config.webhooks.tradegecko_secret == "from-env"
    with pytest.raises(ConfigError) as error:
        parse_config(text + 'listen = "nowhere"\n')
    assert error.value.key == "webhooks.listen"
    with pytest.raises(ConfigError) as error:
        parse_config(text + "reconcile_interval = 0\n")
    assert error.value.key == "webhooks.reconcile_interval"
    assert (config.webhooks.coalesce, config.webhooks.concurrency) == (0.5, 8)
    for wrong, key in (("coalesce = -1", "coalesce"), ("concurrency = 0", "concurrency")):
        with pytest.raises(ConfigError) as error:
            parse_config(text + wrong + "\n")
        assert error.value.key == f"webhooks.{key}"
        assert f"got {wrong.split(' = ')[1]}" in str(error.value)


async def test_the_simulator_retries_on_the_real_schedule_compressed() -> None:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from syncd.sim.webhooks import KATANA_SCHEDULE, katana_sender

    seen: list[tuple[float, str | None, str]] = []
    in_flight: list[int] = []  # what the knobs said at each attempt
    answered = anyio.Event()

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        seen.append(
            (
                time.monotonic(),
                request.headers.get("x-katana-retry-num"),
                request.headers["x-sha2-signature"],
            )
        )
        assert request.headers["x-sha2-signature"] == katana_signature("0123456789abcdef", body)
        in_flight.append(sender.knobs()["in_flight"])
        if len(seen) < 3:
            return Response(status_code=500)
        answered.set()
        return Response(status_code=200)

    app = Starlette(routes=[Route("/hook", endpoint, methods=["POST"])])
    sender = katana_sender(speed=300.0, transport=httpx.ASGITransport(app=app))
    sender.subscribe("https://daemon/hook", ["sales_order.updated"], token="0123456789abcdef")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.run)
        sender.publish("sales_order.updated", lambda sub: {"object": {"id": "1"}})
        with anyio.fail_after(5):
            await answered.wait()
        await anyio.sleep(0.05)
        ended = sender.knobs()
        tg.cancel_scope.cancel()
    assert [retry for _, retry, _ in seen] == [None, "1", "2"]
    # A delivery between its retries is in flight, not queued; once answered, neither.
    assert in_flight == [1, 1, 1]
    assert (ended["queued"], ended["in_flight"]) == (0, 0)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
    for gap, planned in zip(gaps, KATANA_SCHEDULE, strict=False):
        assert gap >= planned / 300.0 * 0.9
    assert sender.counters["failed_attempts"] == 2


async def test_every_answer_is_counted_by_result(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "counted.db")
    results: list[tuple[str, str]] = []

    class Answers(Observer):
        def webhook_answered(self, service: str, result: str) -> None:
            results.append((service, result))

    keys = WebhookKeys(SECRET, "path-token-123", {"0123456789abcdef"})
    app = create_webhook_app(
        store, keys, max_body_bytes=2048, on_received=lambda: None, observer=Answers()
    )
    body = b'{"object_id": 5, "event": "purchase_order.create", "timestamp": 1546272000}'
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://listener"
    ) as client:
        await client.post("/webhooks/tradegecko", **tg_request(body))
        await client.post("/webhooks/tradegecko", **tg_request(body))
        await client.post("/webhooks/tradegecko", **tg_request(body, signature="forged"))
        await client.post("/webhooks/tradegecko", **tg_request(b"{", delivery="d-2"))
        await client.post("/webhooks/tradegecko", **tg_request(b"x" * 4096, delivery="d-3"))
        await client.post("/webhooks/katana/guessed", content=b"{}")
    await store.close()
    assert results == [
        ("tradegecko", "accepted"),
        ("tradegecko", "duplicate"),
        ("tradegecko", "bad_signature"),
        ("tradegecko", "malformed_body"),
        ("tradegecko", "body_too_large"),
        ("katana", "not_found"),
    ]


# -- signature switch and replay window -----------------------------------------------------


async def test_unsigned_deliveries_are_accepted_when_verification_is_off_and_warned_at_start(
    sims: Sims, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = sims.config(tmp_path / "syncd.db", free_port())
    config.webhooks.verify_signatures = False
    config.webhooks.tradegecko_secret = ""
    caplog.set_level(logging.WARNING, logger="syncd.webhooks")
    async with sims.daemon(config) as daemon:
        warnings = [
            r for r in caplog.records if r.name == "syncd.webhooks" and r.levelno == logging.WARNING
        ]
        assert any("webhooks.verify_signatures" in r.getMessage() for r in warnings)
        body = json.dumps(
            {"object_id": 999, "event": "purchase_order.create", "timestamp": int(time.time())}
        ).encode()
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{daemon.webhooks_url}/webhooks/tradegecko",
                content=body,
                headers={"X-Gecko-Delivery": "unsigned-1"},
            )
        assert (answer.status_code, answer.json()["status"]) == (200, "accepted")
    keys = [row[1] for row in inbox_rows(tmp_path / "syncd.db", inbox.WEBHOOK_RECEIVED)]
    assert "webhook:tradegecko:unsigned-1" in keys


async def test_signatures_off_needs_no_secret_and_accepts_unsigned_katana(
    tmp_path: Path,
) -> None:
    # The secret is required only while signatures are checked.
    text = 'tradegecko.token = "t"\nkatana.token = "k"\n[webhooks]\nenabled = true\n'
    parsed = parse_config(text + "verify_signatures = false\n")
    assert (parsed.webhooks.verify_signatures, parsed.webhooks.replay_window) == (False, 345600.0)
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    assert error.value.key == "webhooks.tradegecko_secret"
    with pytest.raises(ConfigError) as error:
        parse_config(text + "verify_signatures = false\nreplay_window = 0\n")
    assert error.value.key == "webhooks.replay_window"
    store = await Store.open(tmp_path / "unsigned.db")
    keys = WebhookKeys(SECRET, "path-token-123", {"0123456789abcdef"}, verify=False)
    app = create_webhook_app(store, keys, max_body_bytes=2048, on_received=lambda: None)
    katana_body = json.dumps(
        {"resource_type": "sales_order", "action": "sales_order.updated", "object": {"id": "7"}}
    ).encode()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://listener"
    ) as client:
        answer = await client.post("/webhooks/katana/path-token-123", content=katana_body)
        assert answer.status_code == 200
        # The path token is no signature: still checked.
        answer = await client.post("/webhooks/katana/guessed", content=katana_body)
        assert answer.status_code == 404
    assert len(await store.pending_events(kinds=inbox.WEBHOOK_KINDS)) == 1
    await store.close()


NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
async def windowed(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Store, list[int]]]:
    store = await Store.open(tmp_path / "windowed.db")
    woken: list[int] = []
    keys = WebhookKeys(SECRET, "path-token-123")
    app = create_webhook_app(
        store,
        keys,
        max_body_bytes=2048,
        on_received=lambda: woken.append(1),
        replay_window=WebhooksConfig().replay_window,
        clock=lambda: NOW,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://listener"
    ) as client:
        yield client, store, woken
    await store.close()


def tg_body(timestamp: float | None) -> bytes:
    note: dict[str, Any] = {"object_id": 5, "event": "purchase_order.create"}
    if timestamp is not None:
        note["timestamp"] = timestamp
    return json.dumps(note).encode()


async def test_stale_and_future_timestamps_are_refused_and_nothing_is_stored(
    windowed: tuple[httpx.AsyncClient, Store, list[int]],
) -> None:
    client, store, woken = windowed
    for n, timestamp in enumerate((NOW - 4 * DAY - 1, NOW - 30 * DAY, NOW + 301, 1e300)):
        answer = await client.post(
            "/webhooks/tradegecko", **tg_request(tg_body(timestamp), delivery=f"replay-{n}")
        )
        assert (answer.status_code, answer.json()["status"]) == (401, "stale timestamp")
    assert await store.pending_events() == []
    assert woken == []


async def test_a_three_day_old_retry_and_a_timestampless_delivery_are_accepted(
    windowed: tuple[httpx.AsyncClient, Store, list[int]],
) -> None:
    client, store, woken = windowed
    cases = (("retry", NOW - 3 * DAY), ("skewed", NOW + 299), ("old-format", None))
    for delivery, timestamp in cases:
        answer = await client.post(
            "/webhooks/tradegecko", **tg_request(tg_body(timestamp), delivery=delivery)
        )
        assert (answer.status_code, answer.json()["status"]) == (200, "accepted")
    # De-duplication on X-Gecko-Delivery stays.
    again = await client.post("/webhooks/tradegecko", **tg_request(tg_body(NOW), delivery="retry"))
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    events = await store.pending_events(kinds=inbox.WEBHOOK_KINDS)
    notes = [inbox.decode(e.kind, e.payload) for e in events]
    assert [getattr(n, "delivery_id", None) for n in notes] == [d for d, _ in cases]
    assert len(woken) == 3


class _Prepared:
    """What the router needs of a factory's listener: its app and whether it registered."""

    def __init__(self, name: str) -> None:
        async def echo(request: Request) -> JSONResponse:
            return JSONResponse({"factory": name, "path": request.url.path})

        self.app = Starlette(routes=[Route("/{rest:path}", echo, methods=["POST"])])
        self.registered = False

    def health(self) -> dict[str, object]:
        return {"registered": self.registered}


@pytest.mark.anyio
async def test_the_router_sends_each_factorys_paths_to_its_listener() -> None:
    router = WebhookRouter(unprefixed="default")
    transport = httpx.ASGITransport(app=router)
    async with httpx.AsyncClient(transport=transport, base_url="http://syncd") as http:
        # Serving before any factory started: nothing is registered yet, every path is 404.
        assert (await http.get("/healthz")).json() == {
            "status": "ok",
            "registered": False,
            "factories": {},
        }
        assert (await http.post("/webhooks/tradegecko")).status_code == 404

        listeners = {name: _Prepared(name) for name in ("default", "north")}
        for name, listener in listeners.items():
            router.add(name, cast(WebhookListener, listener))

        async def where(path: str) -> tuple[int, Any]:
            answer = await http.post(path)
            return answer.status_code, answer.json()

        # Each factory's app sees its paths without the factory's name in them.
        assert await where("/webhooks/north/tradegecko") == (
            200,
            {"factory": "north", "path": "/webhooks/tradegecko"},
        )
        assert await where("/webhooks/north/katana/tok") == (
            200,
            {"factory": "north", "path": "/webhooks/katana/tok"},
        )
        # The default factory keeps today's paths, and answers at its name too.
        assert await where("/webhooks/katana/tok") == (
            200,
            {"factory": "default", "path": "/webhooks/katana/tok"},
        )
        assert (await where("/webhooks/default/tradegecko"))[1]["factory"] == "default"
        for path in ("/webhooks/south/tradegecko", "/webhooks/north/other", "/elsewhere"):
            assert (await http.post(path)).status_code == 404, path

        listeners["default"].registered = True
        health = (await http.get("/healthz")).json()
        assert health["registered"] is False  # north is not yet
        assert health["factories"] == {
            "default": {"registered": True},
            "north": {"registered": False},
        }

        # A stopped factory's paths are a 404; the single factory left answers as it always did.
        router.remove("north")
        assert (await http.post("/webhooks/north/tradegecko")).status_code == 404
        assert (await http.get("/healthz")).json() == {"status": "ok", "registered": True}


# -- deliveries taken at their word: placements and evidence kept in the store ------------


async def imported_so(sims: Sims, daemon: Daemon, lines: int = 1) -> tuple[str, int]:
    """A new PO's number and its SO's id, once the order is imported."""
    po = await sims.create_po(lines)
    await wait_for_state(daemon, po["order_number"], "imported", seconds=5)
    link = await daemon.store.link_by_po_number(po["order_number"])
    assert link is not None and link.so_id is not None
    return po["order_number"], link.so_id


def looks(daemon: Daemon) -> dict[str, int]:
    """The consumer's Katana looks so far, by resource."""
    assert daemon.webhooks is not None
    made = daemon.webhooks.consumer.refetches
    return {r: n for r, n in made.items() if r in ("sales_order", "manufacturing_order")}


async def test_an_mo_heard_of_is_placed_by_one_look_at_the_sales_orders_that_may_own_it(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        orders = [await imported_so(sims, daemon) for _ in range(2)]
        await settled(database, 2)  # the SOs' created echoes
        await sims.knobs("katana", drop=1.0)  # only the deliveries posted here
        before = await katana_requests(sims)
        world = sims.katana_world
        mo_ids = [world.make_to_order_all(so_id)[0]["id"] for _, so_id in orders]
        for mo_id in mo_ids:
            await deliver_katana(daemon, "manufacturing_order.created", mo_id, "NOT_STARTED")
        for number, _ in orders:
            await wait_for_state(daemon, number, "in_production", seconds=5)
        await settled(database, 4)
        after = await katana_requests(sims)
        # Neither MO is looked at: one read of both SOs places both and moves both orders.
        assert after.get("GET /manufacturing_orders", 0) == before.get(
            "GET /manufacturing_orders", 0
        )
        assert after["GET /sales_orders"] == before.get("GET /sales_orders", 0) + 1
        assert looks(daemon) == {"sales_order": 1}
        for (_, so_id), mo_id in zip(orders, mo_ids, strict=True):
            placement = await daemon.store.placement(mo_id)
            assert placement is not None and placement.so_id == so_id


async def test_a_placed_mos_statuses_are_taken_at_their_word_across_a_restart(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    world = sims.katana_world
    async with sims.daemon(config) as daemon:
        number, so_id = await imported_so(sims, daemon)
        await settled(database, 1)
        await sims.knobs("katana", drop=1.0)
        (mo,) = world.make_to_order_all(so_id)
        await deliver_katana(daemon, "manufacturing_order.created", mo["id"], "NOT_STARTED")
        await wait_for_state(daemon, number, "in_production", seconds=5)
        await settled(database, 2)
        placed = looks(daemon)
        world.start_mo(mo["id"])
        await deliver_katana(daemon, "manufacturing_order.in_progress", mo["id"], "IN_PROGRESS")
        world.finish_mo(mo["id"])
        await deliver_katana(daemon, "manufacturing_order.done", mo["id"], "DONE")
        await settled(database, 4)
        assert looks(daemon) == placed == {"sales_order": 1}  # the MO's word, no look
    config.webhooks.register = False
    # A new process: only the database remembers the placement and the MO's DONE.
    async with sims.daemon(config) as daemon:
        with anyio.fail_after(5):
            while daemon.katana_poller.last_success is None:  # noqa: ASYNC110 - the poll at start
                await anyio.sleep(0.02)
        world.deliver(so_id)
        await deliver_katana(daemon, "sales_order.delivered", so_id, "DELIVERED")
        await wait_for_state(daemon, number, "received", seconds=10)
        assert looks(daemon) == {}
    assert katana_outcomes(database)[-1] == (
        "sales_order.delivered",
        "DELIVERED",
        "delivered, as signed deliveries say",
    )


async def _deliver_with(sims: Sims, daemon: Daemon, database: Path, case: str) -> str:
    """Take an order through production with the deliveries of ``case``; deliver its SO
    (signed, DELIVERED) and return the order's number once received."""
    world = sims.katana_world
    number, so_id = await imported_so(sims, daemon, lines=2 if case == "row not made" else 1)
    await settled(database, 1)
    await sims.knobs("katana", drop=1.0)
    rows = world.get_sales_order(so_id).row_ids
    mo = world.make_to_order(rows[0])
    await deliver_katana(daemon, "manufacturing_order.created", mo["id"], "NOT_STARTED")
    await wait_for_state(daemon, number, "in_production", seconds=5)
    await settled(database, 2)
    world.start_mo(mo["id"])
    world.finish_mo(mo["id"])
    sent = 2
    if case != "done not heard":
        await deliver_katana(daemon, "manufacturing_order.done", mo["id"], "DONE")
        sent += 1
    if case == "reordered":
        # The MO's older status comes last: its DONE is not the word to take.
        await deliver_katana(daemon, "manufacturing_order.updated", mo["id"], "IN_PROGRESS")
        sent += 1
    if case == "rows edited":
        world.edit_rows(so_id, [{"id": rows[0], "price_per_unit": 99}])
        await deliver_katana(daemon, "sales_order.updated", so_id, "NOT_SHIPPED")
        sent += 1
    await settled(database, sent)
    world.deliver(so_id)
    await deliver_katana(daemon, "sales_order.delivered", so_id, "DELIVERED")
    await wait_for_state(daemon, number, "received", seconds=10)
    return number


@pytest.mark.parametrize("case", ["complete", "done not heard", "reordered", "row not made"])
async def test_delivered_moves_with_no_look_only_when_the_evidence_is_complete(
    sims: Sims, tmp_path: Path, case: str
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        await _deliver_with(sims, daemon, database, case)
        # The look that placed the MO, and one at the delivery unless the evidence told.
        assert looks(daemon) == {"sales_order": 1 if case == "complete" else 2}
    outcome = katana_outcomes(database)[-1]
    assert (outcome[2] == "delivered, as signed deliveries say") is (case == "complete")


async def test_a_row_edit_heard_after_the_look_is_looked_at_on_delivery_and_kept_as_drift(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        number = await _deliver_with(sims, daemon, database, "rows edited")
        assert looks(daemon) == {"sales_order": 2}
        link = await daemon.store.link_by_po_number(number)
        assert link is not None
        assert any("price" in note and "99" in note for note in link.notes), link.notes


async def test_unsigned_deliveries_are_not_taken_at_their_word(sims: Sims, tmp_path: Path) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    config.webhooks.verify_signatures = False
    async with sims.daemon(config) as daemon:
        await _deliver_with(sims, daemon, database, "complete")
        assert looks(daemon) == {"sales_order": 2}


async def test_a_row_edit_whose_delivery_is_lost_is_recorded_as_drift_by_the_reconcile_poll(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    config = sims.config(database, free_port(), poll=60.0, reconcile=60.0)
    async with sims.daemon(config) as daemon:
        number, so_id = await imported_so(sims, daemon)
        await sims.knobs("katana", drop=1.0)  # the edit's delivery never comes
        (row,) = sims.katana_world.get_sales_order(so_id).row_ids
        sims.katana_world.edit_rows(so_id, [{"id": row, "price_per_unit": 99}])
        daemon.poll_now()  # the reconcile poll, due every webhooks.reconcile_interval
        with anyio.fail_after(10):
            while True:
                link = await daemon.store.link_by_po_number(number)
                assert link is not None
                if any("drift in Katana" in note and "99" in note for note in link.notes):
                    break
                await anyio.sleep(0.05)


async def _webhook_lists(sims: Sims) -> tuple[int, int]:
    """How often each service's webhooks were listed: (Katana, TradeGecko)."""
    counters = (await sims.control.get(f"{sims.tradegecko_url}/_sim/counters")).json()
    tradegecko = sum(n for k, n in counters["requests"].items() if k == "GET /webhooks")
    return sims.katana_world.requests["GET /webhooks"], tradegecko


async def test_a_restart_trusts_recorded_registrations_and_verifies_them_later(
    sims: Sims, tmp_path: Path
) -> None:
    """Registrations recorded for these addresses are not listed again at start; they are
    verified within the reconcile interval, and what the service lost is registered again."""
    port = free_port()
    config = sims.config(tmp_path / "syncd.db", port, reconcile=0.5)
    async with sims.daemon(config):
        pass
    first = await _webhook_lists(sims)
    assert first == (1, 1)
    # Lost while syncd was down (deleted in the services' settings).
    sims.tradegecko_webhooks.subscriptions.clear()
    sims.katana_webhooks.subscriptions.clear()
    async with sims.daemon(config) as daemon:
        assert daemon.webhooks is not None and daemon.webhooks.registered
        assert await _webhook_lists(sims) == first  # nothing asked at start
        # The first verification, at a random moment within the 0.5 s reconcile interval.
        with anyio.fail_after(10):
            while len(sims.katana_webhooks.subscriptions) < 1:  # noqa: ASYNC110 - bounded look
                await anyio.sleep(0.05)
        assert len(sims.tradegecko_webhooks.subscriptions) == 3
        (hook,) = sims.katana_webhooks.subscriptions.values()
        assert hook.token in daemon.webhooks.keys.katana_tokens  # its deliveries verify
        po = await sims.create_po()
        await wait_for_state(daemon, po["order_number"], "imported", "in_production", seconds=10)
    assert await _webhook_lists(sims) >= (2, 2)

    # Another public address: the record does not match, so the start registers again.
    config.webhooks.public_base_url = f"https://localhost:{port}"
    lists = await _webhook_lists(sims)
    async with sims.daemon(config) as daemon:
        assert daemon.webhooks is not None and daemon.webhooks.registered
        after = await _webhook_lists(sims)
        assert after[0] > lists[0] and after[1] > lists[1]
    addresses = {sub.url for sub in sims.katana_webhooks.subscriptions.values()}
    assert any(url.startswith(f"https://localhost:{port}/") for url in addresses)
