"""The TradeGecko simulator over a real loopback socket, driven by TradeGeckoClient and httpx."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.errors import AuthError, NotFound, ValidationFailed
from syncd.ops.asgi import serving
from syncd.sim.tradegecko import DEFAULT_TOKEN, TradeGeckoWorld, create_app

AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}


@dataclass
class Sim:
    url: str
    http: httpx.AsyncClient  # raw, authenticated
    client: TradeGeckoClient

    async def create_po(self, **body: Any) -> dict[str, Any]:
        body.setdefault("supplier", "Katana")
        body.setdefault("lines", [{"sku": "MAT-OAK-BOARD", "quantity": "2", "price": "10.50"}])
        response = await self.http.post("/_sim/purchase_orders", json=body)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def counters(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self.http.get("/_sim/counters")).json()
        return data


@asynccontextmanager
async def running(rate_limit: tuple[int, float] | None = None) -> AsyncIterator[Sim]:
    async with (
        serving(create_app(rate_limit=rate_limit)) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        TradeGeckoClient(url, DEFAULT_TOKEN) as client,
    ):
        yield Sim(url, http, client)


@pytest.mark.anyio
async def test_auth_and_request_ids() -> None:
    async with running() as sim:
        response = await sim.http.get("/purchase_orders", headers={"Authorization": "Bearer x"})
        assert response.status_code == 401
        assert response.headers["X-Request-Id"]
        async with TradeGeckoClient(sim.url, "wrong") as bad:
            with pytest.raises(AuthError):
                await bad.get_current_account()
        ok = await sim.http.get("/accounts/current")
        other = await sim.http.get("/accounts/current")
        assert ok.status_code == 200
        assert ok.headers["X-Request-Id"] != other.headers["X-Request-Id"]


@pytest.mark.anyio
async def test_seed_account_currencies_and_companies() -> None:
    async with running() as sim:
        account = await sim.client.get_current_account()
        currencies = {c.iso: c for c in await sim.client.list_currencies()}
        assert set(currencies) == {"USD", "EUR", "GBP"}
        assert account.default_currency_id == currencies["USD"].id
        assert account.primary_location_id is not None
        suppliers = await sim.client.list_companies(company_type="supplier")
        assert {c.name for c in suppliers} == {"Katana", "Acme Supplies"}
        everyone = await sim.client.list_companies()
        assert [c.company_type for c in everyone].count("business") == 1


@pytest.mark.anyio
async def test_envelopes_side_loads_and_404() -> None:
    async with running() as sim:
        created = await sim.create_po(
            lines=[
                {"sku": "MAT-OAK-BOARD", "quantity": "2", "price": "10.50"},
                {"sku": "NEW-SKU-1", "quantity": "1", "price": "3", "name": "New thing"},
                {"sku": None, "quantity": "1", "price": "1"},
                {"freeform": True, "label": "Shipping", "quantity": "1", "price": "5"},
            ]
        )
        po_id = created["purchase_order"]["id"]
        raw = await sim.http.get(
            f"/purchase_orders/{po_id}", params={"include": "purchase_order_line_items"}
        )
        assert set(raw.json()) == {"purchase_order", "purchase_order_line_items"}
        plain = await sim.http.get(f"/purchase_orders/{po_id}")
        assert set(plain.json()) == {"purchase_order"}

        order, lines = await sim.client.get_purchase_order(po_id)
        assert order.status == "active"
        assert order.procurement_status == "unprocured"
        assert order.total == Decimal("30.00")
        assert [line.id for line in lines] == order.purchase_order_line_item_ids
        assert lines[0].price == Decimal("10.5")
        assert lines[3].freeform is True and lines[3].variant_id is None
        new = await sim.client.list_variants(skus=["NEW-SKU-1"])
        assert [v.product_name for v in new] == ["New thing"]
        no_sku = await sim.client.list_variants(ids=[lines[2].variant_id or 0])
        assert no_sku[0].sku == ""  # as the recorded API shows variants without SKU

        missing = await sim.http.get("/purchase_orders/999999")
        assert missing.status_code == 404
        with pytest.raises(NotFound):
            await sim.client.get_purchase_order(999999)
        nowhere = await sim.http.get("/no_such_thing")
        assert nowhere.status_code == 404
        assert nowhere.headers["Content-Type"].startswith("text/html")
        assert nowhere.headers["X-Request-Id"]


@pytest.mark.anyio
async def test_paging_header_limit_and_newest_first() -> None:
    async with running() as sim:
        ids = [
            (await sim.create_po(created_at=f"2024-01-0{day}T10:00:00Z"))["purchase_order"]["id"]
            for day in (1, 3, 2)
        ]
        page = await sim.http.get("/purchase_orders", params={"limit": 2})
        info = json.loads(page.headers["X-Pagination"])
        assert info == {
            "total_records": 3,
            "total_pages": 2,
            "first_page": True,
            "last_page": False,
            "out_of_bounds": False,
            "offset": 0,
        }
        assert [o["id"] for o in page.json()["purchase_orders"]] == [ids[1], ids[2]]
        second = await sim.http.get("/purchase_orders", params={"limit": 2, "page": 2})
        assert json.loads(second.headers["X-Pagination"])["last_page"] is True
        assert [o["id"] for o in second.json()["purchase_orders"]] == [ids[0]]
        oldest = await sim.http.get("/purchase_orders", params={"order": "created_at asc"})
        assert [o["id"] for o in oldest.json()["purchase_orders"]] == [ids[0], ids[2], ids[1]]
        too_many = await sim.http.get("/purchase_orders", params={"limit": 251})
        assert too_many.status_code == 400
        default = await sim.http.get("/variants")
        assert json.loads(default.headers["X-Pagination"])["total_records"] == len(
            default.json()["variants"]
        )
        everything = await sim.client.list_purchase_orders()
        assert [o.id for o in everything] == [ids[1], ids[2], ids[0]]


@pytest.mark.anyio
async def test_filters() -> None:
    async with running() as sim:
        katana = (await sim.create_po(created_at="2024-01-01T00:00:00Z"))["purchase_order"]
        acme = (await sim.create_po(supplier="Acme Supplies", status="draft"))["purchase_order"]
        third = (await sim.create_po())["purchase_order"]
        by_ids = await sim.client.list_purchase_orders(ids=[katana["id"], acme["id"]])
        assert {o.id for o in by_ids} == {katana["id"], acme["id"]}
        comma = await sim.http.get("/purchase_orders", params={"ids": f"{acme['id']},1"})
        assert [o["id"] for o in comma.json()["purchase_orders"]] == [acme["id"]]
        by_company = await sim.client.list_purchase_orders(company_ids=[acme["company_id"]])
        assert [o.id for o in by_company] == [acme["id"]]
        drafts = await sim.client.list_purchase_orders(status="draft")
        assert [o.id for o in drafts] == [acme["id"]]
        numbered = await sim.client.list_purchase_orders(order_number=third["order_number"])
        assert [o.id for o in numbered] == [third["id"]]
        recent = await sim.http.get(
            "/purchase_orders", params={"created_at_min": "2024-06-01T00:00:00Z"}
        )
        assert katana["id"] not in [o["id"] for o in recent.json()["purchase_orders"]]
        old = await sim.http.get(
            "/purchase_orders", params={"created_at_max": "2024-06-01T00:00:00Z"}
        )
        assert [o["id"] for o in old.json()["purchase_orders"]] == [katana["id"]]
        lines = await sim.client.list_purchase_order_line_items(third["id"])
        assert {line.purchase_order_id for line in lines} == {third["id"]}
        sku = await sim.client.list_variants(skus=["MAT-SCREW"])
        assert [v.sku for v in sku] == ["MAT-SCREW"]


@pytest.mark.anyio
async def test_price_update_idempotency_and_updated_at() -> None:
    async with running() as sim:
        created = await sim.create_po()
        po_id = created["purchase_order"]["id"]
        line_id = created["purchase_order_line_items"][0]["id"]
        before, _ = await sim.client.get_purchase_order(po_id)
        await sim.client.update_line_item_price(line_id, Decimal("12.0"), idempotency_key="p1")
        raw = await sim.http.put(
            f"/purchase_order_line_items/{line_id}",
            json={"purchase_order_line_item": {"price": "99"}},
            headers={"Idempotency-Key": "p1"},
        )
        assert raw.status_code == 204
        assert raw.content == b""
        after, lines = await sim.client.get_purchase_order(po_id)
        assert lines[0].price == Decimal("12.0")  # the replay changed nothing
        assert after.updated_at > before.updated_at
        assert after.total == Decimal("24.00")
        assert (await sim.counters())["price_updates"] == 1
        with pytest.raises(ValidationFailed) as caught:
            await sim.client.update_line_item_price(line_id, Decimal("-1"))
        assert "price" in caught.value.details
        bad = await sim.http.put(
            f"/purchase_order_line_items/{line_id}",
            json={"purchase_order_line_item": {"price": "abc"}},
        )
        assert bad.status_code == 422
        assert bad.json() == {"errors": {"price": ["is not a number"]}}


@pytest.mark.anyio
async def test_receive_semantics() -> None:
    async with running() as sim:
        (screw,) = await sim.client.list_variants(skus=["MAT-SCREW"])
        assert screw.stock_on_hand == 0
        created = await sim.create_po(
            lines=[
                {"sku": "MAT-SCREW", "quantity": "100", "price": "0.05"},
                {"freeform": True, "label": "Freight", "quantity": "1", "price": "4"},
            ]
        )
        po_id = created["purchase_order"]["id"]
        procurement = await sim.client.receive_purchase_order(po_id, idempotency_key="r1")
        again = await sim.client.receive_purchase_order(po_id, idempotency_key="r1")
        assert again.id == procurement.id  # replayed, not received twice
        order, lines = await sim.client.get_purchase_order(po_id)
        assert order.status == "received"
        assert order.procurement_status == "procured"
        assert order.received_at is not None
        assert order.procurement_ids == [procurement.id]
        assert sorted(procurement.purchase_order_line_item_ids) == sorted(
            order.purchase_order_line_item_ids
        )
        assert {line.procurement_id for line in lines} == {procurement.id}
        (screw,) = await sim.client.list_variants(skus=["MAT-SCREW"])
        assert screw.stock_on_hand == 100
        assert screw.moving_average_cost == Decimal("0.05")

        second = await sim.create_po(
            lines=[{"sku": "MAT-SCREW", "quantity": "100", "price": "0.15"}]
        )
        await sim.client.receive_purchase_order(
            second["purchase_order"]["id"], idempotency_key="r2"
        )
        (screw,) = await sim.client.list_variants(skus=["MAT-SCREW"])
        assert screw.stock_on_hand == 200
        assert screw.moving_average_cost == Decimal("0.1")

        with pytest.raises(ValidationFailed):
            await sim.client.receive_purchase_order(po_id, idempotency_key="r3")
        draft = await sim.create_po(status="draft")
        refused = await sim.http.post(
            f"/purchase_orders/{draft['purchase_order']['id']}/actions/receive"
        )
        assert refused.status_code == 422
        assert "errors" in refused.json()
        counters = await sim.counters()
        assert counters["receipts"] == 2
        assert counters["receipts_per_po"] == {
            str(po_id): 1,
            str(second["purchase_order"]["id"]): 1,
        }


@pytest.mark.anyio
async def test_control_edit_and_delete() -> None:
    async with running() as sim:
        created = await sim.create_po()
        po_id = created["purchase_order"]["id"]
        first_line = created["purchase_order_line_items"][0]["id"]
        edited = await sim.http.patch(
            f"/_sim/purchase_orders/{po_id}",
            json={
                "lines": [{"id": first_line, "quantity": "5"}],
                "add_lines": [{"sku": "MAT-VARNISH", "quantity": "1", "price": "2"}],
            },
        )
        assert edited.status_code == 200
        order, lines = await sim.client.get_purchase_order(po_id)
        assert [line.quantity for line in lines] == [Decimal("5"), Decimal("1")]
        removed = await sim.http.patch(
            f"/_sim/purchase_orders/{po_id}", json={"remove_line_ids": [first_line]}
        )
        assert len(removed.json()["purchase_order_line_items"]) == 1
        variant = await sim.http.post(
            "/_sim/variants", json={"sku": "X-1", "name": "Extra", "buy_price": "3.5"}
        )
        assert variant.status_code == 201
        assert variant.json()["variant"]["buy_price"] == "3.5"
        deleted = await sim.http.delete(f"/_sim/purchase_orders/{po_id}")
        assert deleted.status_code == 200
        order, _ = await sim.client.get_purchase_order(po_id)
        assert order.status == "deleted"
        voided = await sim.create_po()
        await sim.http.patch(
            f"/_sim/purchase_orders/{voided['purchase_order']['id']}", json={"status": "void"}
        )
        assert [o.status for o in await sim.client.list_purchase_orders(status="void")] == ["void"]
        counters = await sim.counters()
        assert counters["requests"]["GET /purchase_orders/{id}"] == 2
        assert counters["requests"]["GET /purchase_orders"] == 1


@pytest.mark.anyio
async def test_rate_limit_429_until_the_reset() -> None:
    async with running(rate_limit=(3, 300.0)) as sim:
        answers = [await sim.http.get("/currencies") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["X-Rate-Limit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
        assert answers[0].headers["X-Rate-Limit-Limit"] == "3"
        reset = int(answers[3].headers["X-Rate-Limit-Reset"])
        assert reset % 300 == 0
        assert "Retry-After" not in answers[3].headers
        assert answers[3].headers["X-Request-Id"]
        control = await sim.http.get("/_sim/counters")  # people are not rate limited
        assert control.json()["responses_429"] == 1


@pytest.mark.anyio
async def test_client_waits_out_a_short_window() -> None:
    async with running(rate_limit=(2, 1.0)) as sim:
        for _ in range(4):
            assert len(await sim.client.list_currencies()) == 3
        counters = await sim.counters()
        assert counters["requests"]["GET /currencies"] >= 4


@pytest.mark.anyio
async def test_idempotency_keys_expire_after_a_day() -> None:
    now = [datetime(2024, 1, 1, tzinfo=UTC)]
    world = TradeGeckoWorld(clock=lambda: now[0])
    app = create_app(world, rate_limit=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim", headers=AUTH) as http:
        created = await http.post("/_sim/purchase_orders", json={"lines": [{"sku": "A"}]})
        line_id = created.json()["purchase_order_line_items"][0]["id"]

        async def put(price: str) -> None:
            response = await http.put(
                f"/purchase_order_line_items/{line_id}",
                json={"purchase_order_line_item": {"price": price}},
                headers={"Idempotency-Key": "same"},
            )
            assert response.status_code == 204

        await put("1")
        await put("2")  # replayed within 24 h: nothing done
        assert world.line_items[line_id].price == Decimal("1")
        now[0] += timedelta(hours=24, seconds=1)
        await put("3")  # the key has expired: a new request
        assert world.line_items[line_id].price == Decimal("3")


@pytest.mark.anyio
async def test_lists_carry_meta_total_as_recorded() -> None:
    async with running() as sim:
        for _ in range(3):
            await sim.create_po()
        page = (await sim.http.get("/purchase_orders", params={"limit": 2})).json()
        assert len(page["purchase_orders"]) == 2
        assert page["meta"] == {"total": 3}
        companies = (await sim.http.get("/companies")).json()
        assert companies["meta"]["total"] == len(companies["companies"])


@pytest.mark.anyio
async def test_control_panel_lists_itself_and_refuses_an_empty_po() -> None:
    async with running() as sim:
        index = await sim.http.get("/_sim/")
        assert index.status_code == 200
        offered = {entry["path"]: entry for entry in index.json()["control"]}
        assert {"/_sim/purchase_orders", "/_sim/counters", "/_sim/token", "/_sim/faults"} <= set(
            offered
        )
        assert all(entry["does"] for entry in offered.values())
        empty = await sim.http.post("/_sim/purchase_orders", json={})
        assert empty.status_code == 422
        assert empty.json() == {"errors": {"purchase_order_line_items": ["can't be blank"]}}
        assert (await sim.counters())["requests"] == {}
        assert (await sim.http.get("/purchase_orders")).json()["purchase_orders"] == []
        missing = await sim.http.get("/_sim/nothing")
        assert missing.status_code == 404
        assert missing.json()["type"] == "NotFound"


# -- many accounts ------------------------------------------------------------------------

SECOND = "tradegecko-second-token"
SECOND_AUTH = {"Authorization": f"Bearer {SECOND}"}
AS_SECOND = {"X-Sim-Account": SECOND}


@asynccontextmanager
async def two_accounts(
    rate_limit: tuple[int, float] | None = None, **account: str
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A simulator with a second account, and a client of the simulator without a token."""
    app = create_app(rate_limit=rate_limit)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        created = await http.post("/_sim/accounts", json={"token": SECOND, **account})
        assert created.status_code == 201, created.text
        yield app, http


@pytest.mark.anyio
async def test_accounts_are_created_with_their_own_webhook_secret() -> None:
    async with two_accounts(webhook_secret="s3cret") as (_app, http):
        listed = (await http.get("/_sim/accounts")).json()["accounts"]
        assert [(a["token"], a["webhook_secret"], a["started"]) for a in listed] == [
            (DEFAULT_TOKEN, "tradegecko-sim-webhook-secret", True),
            (SECOND, "s3cret", False),
        ]
        third = await http.post("/_sim/accounts", json={"token": "third"})
        assert third.json()["account"]["webhook_secret"] == "third-webhook-secret"
        again = await http.post("/_sim/accounts", json={"token": SECOND})
        assert again.status_code == 422
        assert again.json() == {"errors": {"token": ["has already been taken"]}}
        blank = await http.post("/_sim/accounts", json={"token": "x", "webhook_secret": ""})
        assert blank.status_code == 400
        assert blank.json()["type"] == "BadRequest"
        nobody = await http.get("/_sim/counters", params={"account": "nobody"})
        assert nobody.status_code == 404
        assert nobody.json() == {
            "type": "NotFound",
            "message": "Couldn't find account with 'id'=nobody",
        }
        assert (await http.get("/_sim/")).json()["accounts"] == [DEFAULT_TOKEN, SECOND, "third"]


@pytest.mark.anyio
async def test_two_accounts_never_see_each_others_records() -> None:
    async with two_accounts() as (app, http):
        body = {"supplier": "Katana", "lines": [{"sku": "MAT-OAK-BOARD", "quantity": "1"}]}
        theirs = await http.post("/_sim/purchase_orders", json=body, headers=AS_SECOND)
        assert theirs.status_code == 201, theirs.text
        mine = await http.get("/purchase_orders", headers=AUTH)
        assert mine.json()["purchase_orders"] == []
        listed = (await http.get("/purchase_orders", headers=SECOND_AUTH)).json()
        assert [po["id"] for po in listed["purchase_orders"]] == [
            theirs.json()["purchase_order"]["id"]
        ]
        line = theirs.json()["purchase_order_line_items"][0]["id"]
        put = {"purchase_order_line_item": {"price": "9.0"}}
        # The default account has no such line; an idempotency key is the account's own.
        key = {"Idempotency-Key": "k-1"}
        missing = await http.put(f"/purchase_order_line_items/{line}", json=put, headers=AUTH | key)
        assert missing.status_code == 404
        done = await http.put(
            f"/purchase_order_line_items/{line}", json=put, headers=SECOND_AUTH | key
        )
        assert done.status_code == 204
        assert "Idempotent-Replayed" not in done.headers
        assert app.state.accounts[SECOND].state.world.line_items[line].price == Decimal("9.0")
        assert app.state.world.purchase_orders == {}


@pytest.mark.anyio
async def test_each_token_has_its_own_rate_window_and_revocation() -> None:
    async with two_accounts(rate_limit=(2, 300.0)) as (app, http):
        storm = [await http.get("/currencies", headers=SECOND_AUTH) for _ in range(5)]
        assert [a.status_code for a in storm] == [200, 200, 429, 429, 429]
        calm = [await http.get("/currencies", headers=AUTH) for _ in range(2)]
        assert [a.headers["X-Rate-Limit-Remaining"] for a in calm] == ["1", "0"]
        theirs = (await http.get("/_sim/counters", headers=AS_SECOND)).json()
        mine = (await http.get("/_sim/counters")).json()
        assert (theirs["responses_429"], theirs["requests"]) == (3, {"GET /currencies": 5})
        assert (mine["responses_429"], mine["requests"]) == (0, {"GET /currencies": 2})
        await http.post("/_sim/token", json={"revoked": True}, headers=AS_SECOND)
        assert (await http.get("/accounts/current", headers=SECOND_AUTH)).status_code == 401
        await http.post("/_sim/token", json={"revoked": True})
        assert (await http.get("/accounts/current", headers=AUTH)).status_code == 401
        await http.post("/_sim/token", json={"revoked": False}, headers=AS_SECOND)
        assert app.state.accounts[SECOND].revoked is False
        assert app.state.accounts[DEFAULT_TOKEN].revoked is True


@pytest.mark.anyio
async def test_webhooks_go_to_the_accounts_own_subscriptions_signed_with_its_secret() -> None:
    got: list[tuple[str, str, bytes]] = []

    async def receive(request: Request) -> Response:
        got.append((request.url.path, request.headers["X-Gecko-Signature"], await request.body()))
        return Response(status_code=200)

    receiver = Starlette(routes=[Route("/{who}", receive, methods=["POST"])])
    async with (
        two_accounts(webhook_secret="second-secret") as (app, http),
        serving(receiver) as hooks,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(app.state.webhooks.run)
        for who, auth in (("first", AUTH), ("second", SECOND_AUTH)):
            hook = {"webhook": {"address": f"{hooks}/{who}", "event": "purchase_order.create"}}
            assert (await http.post("/webhooks", json=hook, headers=auth)).status_code == 201
        listed = (await http.get("/webhooks", headers=SECOND_AUTH)).json()["webhooks"]
        assert [w["address"] for w in listed] == [f"{hooks}/second"]
        body = {"lines": [{"sku": "MAT-OAK-BOARD"}]}
        await http.post("/_sim/purchase_orders", json=body, headers=AS_SECOND)
        with anyio.fail_after(5):
            while True:
                knobs = (await http.get("/_sim/webhooks", headers=AS_SECOND)).json()
                if knobs["counters"].get("delivered"):
                    break
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    ((path, signature, sent),) = got
    assert path == "/second"
    digest = hmac.new(b"second-secret", sent, hashlib.sha256).digest()
    assert signature == base64.b64encode(digest).decode()
    assert app.state.webhooks.counters_of(DEFAULT_TOKEN) == {}
