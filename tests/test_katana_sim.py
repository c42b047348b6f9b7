"""The Katana simulator's behaviour: auth, paging, filters, limits, and the workshop's costing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from syncd.ops.asgi import serving
from syncd.sim.factory import play_factory
from syncd.sim.katana import WEBHOOK_EVENTS, KatanaWorld, create_app

pytestmark = pytest.mark.anyio

TOKEN = "katana-sim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://katana")


@pytest.fixture
def world() -> KatanaWorld:
    return KatanaWorld()


@pytest.fixture
async def http(world: KatanaWorld) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(create_app(world, rate_limit=None)) as client:
        yield client


async def _order(
    http: httpx.AsyncClient, skus: dict[str, str], *, order_no: str = "PO-1"
) -> dict[str, Any]:
    customer = await http.post("/v1/customers", json={"name": "Acme"}, headers=AUTH)
    rows = []
    for sku, quantity in skus.items():
        found = await http.get("/v1/variants", params={"sku": sku}, headers=AUTH)
        rows.append({"variant_id": found.json()["data"][0]["id"], "quantity": float(quantity)})
    answer = await http.post(
        "/v1/sales_orders",
        json={"customer_id": customer.json()["id"], "order_no": order_no, "sales_order_rows": rows},
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


async def test_bad_or_missing_token_is_401(http: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = await http.get("/v1/factory", headers=headers)
        assert answer.status_code == 401
        assert answer.json() == {
            "statusCode": 401,
            "name": "UnauthorizedError",
            "message": "Unauthorized",
        }


async def test_paging_header_and_limit_cut(http: httpx.AsyncClient) -> None:
    for n in range(3):
        await http.post("/v1/customers", json={"name": f"C{n}"}, headers=AUTH)
    first = await http.get("/v1/customers", params={"limit": 2}, headers=AUTH)
    assert [c["name"] for c in first.json()["data"]] == ["C2", "C1"]  # newest first
    assert json.loads(first.headers["X-Pagination"]) == {
        "total_records": "3",
        "total_pages": "2",
        "offset": "0",
        "page": "1",
        "first_page": "true",
        "last_page": "false",
    }
    second = await http.get("/v1/customers", params={"limit": 2, "page": 2}, headers=AUTH)
    assert [c["name"] for c in second.json()["data"]] == ["C0"]
    assert json.loads(second.headers["X-Pagination"])["last_page"] == "true"
    big = await http.get("/v1/variants", params={"limit": 1000}, headers=AUTH)
    assert json.loads(big.headers["X-Pagination"])["total_pages"] == "1"


async def test_filters(http: httpx.AsyncClient) -> None:
    await http.post("/v1/customers", json={"name": "A", "reference_id": "r-1"}, headers=AUTH)
    await http.post("/v1/customers", json={"name": "B", "reference_id": "r-2"}, headers=AUTH)
    by_ref = await http.get("/v1/customers", params={"reference_id": "r-2"}, headers=AUTH)
    assert [c["name"] for c in by_ref.json()["data"]] == ["B"]
    by_name = await http.get("/v1/customers", params={"name": "A"}, headers=AUTH)
    assert [c["reference_id"] for c in by_name.json()["data"]] == ["r-1"]
    skus = await http.get(
        "/v1/variants", params=[("sku", "CHAIR-OAK"), ("sku", "MAT-SCREW")], headers=AUTH
    )
    assert sorted(v["sku"] for v in skus.json()["data"]) == ["CHAIR-OAK", "MAT-SCREW"]
    order = await _order(http, {"CHAIR-OAK": "1"})
    later = order["updated_at"]
    same = await http.get("/v1/sales_orders", params={"updated_at_min": later}, headers=AUTH)
    assert [o["id"] for o in same.json()["data"]] == [order["id"]]
    other = await _order(http, {"STOOL-PINE": "1"}, order_no="PO-2")
    newer = await http.get(
        "/v1/sales_orders", params={"updated_at_min": other["created_at"]}, headers=AUTH
    )
    assert [o["id"] for o in newer.json()["data"]] == [other["id"]]
    rows = await http.get(
        "/v1/sales_order_rows", params={"sales_order_ids": order["id"]}, headers=AUTH
    )
    assert [r["sales_order_id"] for r in rows.json()["data"]] == [order["id"]]
    by_ids = await http.get(
        "/v1/sales_orders", params=[("ids", order["id"]), ("ids", other["id"])], headers=AUTH
    )
    assert len(by_ids.json()["data"]) == 2


async def test_decimal_strings_where_spec_says_string(http: httpx.AsyncClient) -> None:
    order = await _order(http, {"CHAIR-OAK": "2"})
    row = order["sales_order_rows"][0]
    assert row["price_per_unit"] == "180.0000000000"
    assert row["quantity"] == 2
    inventory = await http.get("/v1/inventory", params={"variant_id": 1}, headers=AUTH)
    record = inventory.json()["data"][0]
    assert record["average_cost"] == "12.5000000000"
    assert record["quantity_in_stock"] == "1000.00000"


async def test_soft_delete_hides_unless_asked(http: httpx.AsyncClient) -> None:
    order = await _order(http, {"CHAIR-OAK": "1"})
    assert (await http.delete(f"/_sim/sales_orders/{order['id']}")).status_code == 204
    hidden = await http.get("/v1/sales_orders", headers=AUTH)
    assert hidden.json()["data"] == []
    shown = await http.get("/v1/sales_orders", params={"include_deleted": "true"}, headers=AUTH)
    deleted = shown.json()["data"][0]
    assert deleted["deleted_at"] is not None
    assert deleted["updated_at"] > order["updated_at"]
    assert (await http.get(f"/v1/sales_orders/{order['id']}", headers=AUTH)).status_code == 404
    rows = await http.get(
        "/v1/sales_order_rows",
        params={"sales_order_ids": order["id"], "include_deleted": "true"},
        headers=AUTH,
    )
    assert rows.json()["data"][0]["deleted_at"] is not None


async def test_delete_through_the_api_is_204_then_404_and_412_with_a_manufacturing_order(
    http: httpx.AsyncClient,
) -> None:
    order = await _order(http, {"CHAIR-OAK": "1"})
    deleted = await http.delete(f"/v1/sales_orders/{order['id']}", headers=AUTH)
    assert deleted.status_code == 204, deleted.text
    assert (await http.get(f"/v1/sales_orders/{order['id']}", headers=AUTH)).status_code == 404
    again = await http.delete(f"/v1/sales_orders/{order['id']}", headers=AUTH)
    assert again.status_code == 404, again.text
    made = await _order(http, {"CHAIR-OAK": "1"}, order_no="PO-2")
    mo = await http.post(
        "/v1/manufacturing_order_make_to_order",
        json={"sales_order_row_id": made["sales_order_rows"][0]["id"]},
        headers=AUTH,
    )
    assert mo.status_code == 200, mo.text
    refused = await http.delete(f"/v1/sales_orders/{made['id']}", headers=AUTH)
    assert refused.status_code == 412, refused.text
    assert refused.json()["name"] == "PreconditionFailedError"
    assert (await http.get(f"/v1/sales_orders/{made['id']}", headers=AUTH)).status_code == 200


async def test_unknown_or_null_fields_are_422(http: httpx.AsyncClient) -> None:
    answer = await http.post("/v1/customers", json={"name": "A", "nickname": "x"}, headers=AUTH)
    assert answer.status_code == 422
    body = answer.json()
    assert body["code"] == "VALIDATION_FAILED"
    assert body["details"][0]["code"] == "additionalProperties"
    assert body["details"][0]["info"] == {"additionalProperty": "nickname"}
    nested = await http.post(
        "/v1/sales_orders",
        json={"customer_id": 1, "sales_order_rows": [{"variant_id": 1, "quantity": 1, "x": 1}]},
        headers=AUTH,
    )
    assert nested.status_code == 422
    assert nested.json()["details"][0]["path"] == ".sales_order_rows[0]"
    null_location = await http.post(
        "/v1/sales_orders",
        json={
            "customer_id": 1,
            "location_id": None,
            "sales_order_rows": [{"variant_id": 1, "quantity": 1}],
        },
        headers=AUTH,
    )
    assert null_location.status_code == 422
    assert null_location.json()["details"][0]["path"] == ".location_id"


async def test_rate_limit_429_with_headers(world: KatanaWorld) -> None:
    async with _client(create_app(world, rate_limit=(3, 60.0))) as http:
        answers = [await http.get("/v1/factory", headers=AUTH) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["X-Ratelimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
        limited = answers[-1]
        assert limited.json() == {
            "statusCode": 429,
            "name": "TooManyRequests",
            "message": "Too Many Requests",
        }
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert int(limited.headers["X-Ratelimit-Reset"]) > 1e12  # epoch milliseconds
        assert (await http.get("/_sim/state")).status_code == 200  # the panel is not limited
        other = await http.get("/v1/factory", headers={"Authorization": "Bearer other"})
        assert other.status_code == 401
        counters = (await http.get("/_sim/counters")).json()
        assert counters["responses_429"] == 1
        assert counters["requests"]["GET /factory"] == 5


async def test_finishing_mos_moves_the_average_cost(
    http: httpx.AsyncClient, world: KatanaWorld
) -> None:
    chair = world.variant_id_for_sku("CHAIR-OAK")
    oak = world.variant_id_for_sku("MAT-OAK-BOARD")
    world.stock[(chair, 1)].quantity = Decimal(2)
    world.stock[(chair, 1)].average_cost = Decimal(70)
    order = await _order(http, {"CHAIR-OAK": "2"})
    mos = (await http.post(f"/_sim/sales_orders/{order['id']}/make_to_order")).json()
    assert len(mos) == 1
    mo_id = mos[0]["id"]
    assert (await http.post(f"/_sim/manufacturing_orders/{mo_id}/start")).status_code == 200
    done = (await http.post(f"/_sim/manufacturing_orders/{mo_id}/finish")).json()
    # 3 x 12.50 + 16 x 0.05 + 2 x 1.80 + 1.5 h x 24.00 = 77.90 a chair
    assert Decimal(str(done["total_cost"])) == Decimal("155.80")
    assert done["status"] == "DONE" and done["done_date"] is not None
    assert world.stock_of(chair).average_cost == Decimal("73.95")  # (2x70 + 2x77.9) / 4
    assert world.stock_of(chair).quantity == 4
    assert world.stock_of(oak).quantity == 1000 - 6
    await http.post(f"/_sim/sales_orders/{order['id']}/deliver")
    assert world.stock_of(chair).quantity == 2
    assert world.stock_of(chair).average_cost == Decimal("73.95")


async def test_product_without_recipe_costs_nothing(
    http: httpx.AsyncClient, world: KatanaWorld
) -> None:
    made = await http.post(
        "/v1/products",
        json={"name": "Bell", "variants": [{"sku": "BELL", "sales_price": 9.5}]},
        headers=AUTH,
    )
    assert made.status_code == 200
    order = await _order(http, {"BELL": "3"})
    (mo,) = (await http.post(f"/_sim/sales_orders/{order['id']}/make_to_order")).json()
    await http.post(f"/_sim/manufacturing_orders/{mo['id']}/finish")
    bell = made.json()["variants"][0]["id"]
    inventory = await http.get("/v1/inventory", params={"variant_id": bell}, headers=AUTH)
    assert inventory.json()["data"][0]["average_cost"] == "0.0000000000"
    assert inventory.json()["data"][0]["quantity_in_stock"] == "3.00000"


async def test_production_status_and_updated_at_follow_the_mos(
    http: httpx.AsyncClient,
) -> None:
    order = await _order(http, {"CHAIR-OAK": "1", "STOOL-PINE": "1"})
    assert order["production_status"] == "NONE"

    async def fetch() -> dict[str, Any]:
        data: dict[str, Any] = (
            await http.get(f"/v1/sales_orders/{order['id']}", headers=AUTH)
        ).json()
        return data

    first, second = (await http.post(f"/_sim/sales_orders/{order['id']}/make_to_order")).json()
    seen = await fetch()
    assert seen["production_status"] == "NOT_STARTED"
    assert seen["updated_at"] > order["updated_at"]
    await http.post(f"/_sim/manufacturing_orders/{first['id']}/start")
    started = await fetch()
    assert started["production_status"] == "IN_PROGRESS"
    assert started["updated_at"] > seen["updated_at"]
    await http.post(f"/_sim/manufacturing_orders/{first['id']}/finish")
    assert (await fetch())["production_status"] == "NOT_STARTED"
    await http.post(f"/_sim/manufacturing_orders/{second['id']}/finish")
    assert (await fetch())["production_status"] == "DONE"
    mos = await http.get("/v1/manufacturing_orders", params={"status": "DONE"}, headers=AUTH)
    assert len(mos.json()["data"]) == 2


async def test_control_panel_and_counters(http: httpx.AsyncClient) -> None:
    await _order(http, {"CHAIR-OAK": "1"}, order_no="PO-9")
    order = await _order(http, {"CHAIR-OAK": "1"}, order_no="PO-9")
    row = order["sales_order_rows"][0]
    edited = await http.patch(
        f"/_sim/sales_orders/{order['id']}",
        json={"rows": [{"id": row["id"], "quantity": 5, "price_per_unit": 150}]},
    )
    assert edited.json()["sales_order_rows"][0]["quantity"] == 5
    assert edited.json()["sales_order_rows"][0]["price_per_unit"] == "150.0000000000"
    status = await http.post(f"/_sim/sales_orders/{order['id']}/status", json={"status": "PACKED"})
    assert status.json()["status"] == "PACKED"
    product = await http.post(
        "/_sim/products",
        json={
            "name": "Shelf",
            "sku": "SHELF",
            "sales_price": 50,
            "recipe": [{"sku": "MAT-PINE-BOARD", "quantity": 2}],
            "operations": [{"name": "Assembly", "hours": 1, "cost_per_hour": 20}],
        },
    )
    assert product.json()["variants"][0]["sku"] == "SHELF"
    state = (await http.get("/_sim/state")).json()
    assert {so["order_no"] for so in state["sales_orders"]} == {"PO-9"}
    assert state["manufacturing_orders"] == []
    counters = (await http.get("/_sim/counters")).json()
    assert counters["sales_orders_created"] == 2
    assert counters["sales_orders_by_order_no"] == {"PO-9": 2}
    assert counters["customers_created"] == 2
    assert counters["products_created"] == 1
    assert counters["requests"]["POST /sales_orders"] == 2
    assert counters["responses_429"] == 0


async def test_patch_resets_omitted_additional_info(http: httpx.AsyncClient) -> None:
    customer = (await http.post("/v1/customers", json={"name": "A"}, headers=AUTH)).json()
    order = (
        await http.post(
            "/v1/sales_orders",
            json={
                "customer_id": customer["id"],
                "additional_info": "keep me",
                "sales_order_rows": [{"variant_id": 1, "quantity": 1}],
            },
            headers=AUTH,
        )
    ).json()
    assert order["order_no"] == f"SO-{order['id']}"
    patched = await http.patch(
        f"/v1/sales_orders/{order['id']}", json={"customer_ref": "X"}, headers=AUTH
    )
    assert patched.json()["additional_info"] == ""
    assert patched.json()["customer_ref"] == "X"


async def test_factory_player_carries_an_order_to_delivery(world: KatanaWorld) -> None:
    async with serving(create_app(world, rate_limit=None)) as url, _client_at(url) as http:
        order = await _order(http, {"CHAIR-OAK": "1", "MAT-SCREW": "10"})
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(play_factory, url, step_delay=0.02, customer_name="Acme"))
            with anyio.fail_after(5):
                while True:
                    state = (await http.get(f"/v1/sales_orders/{order['id']}", headers=AUTH)).json()
                    if state["status"] == "DELIVERED":
                        break
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert state["production_status"] == "DONE"
    chair = world.variant_id_for_sku("CHAIR-OAK")
    assert world.stock_of(chair).quantity == 0  # made one, delivered one
    assert world.stock_of(chair).average_cost == Decimal("77.9")


def _client_at(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url)


def test_the_known_webhook_events_are_the_contracts(apis: Path) -> None:
    import yaml

    spec = yaml.safe_load((apis / "katana" / "openapi.yaml").read_text())
    assert list(WEBHOOK_EVENTS) == spec["components"]["schemas"]["WebhookEvent"]["enum"]


async def test_a_webhook_for_an_event_katana_does_not_know_is_refused(
    http: httpx.AsyncClient,
) -> None:
    body = {"url": "https://example.com/hook", "subscribed_events": ["sales_order.created"]}
    assert (await http.post("/v1/webhooks", json=body, headers=AUTH)).status_code == 200
    typo = {**body, "subscribed_events": ["sales_order.created", "sales_order.deliverd"]}
    refused = await http.post("/v1/webhooks", json=typo, headers=AUTH)
    assert refused.status_code == 422
    (detail,) = refused.json()["details"]
    assert (detail["path"], detail["code"]) == (".subscribed_events[1]", "enum")
    assert "sales_order.delivered" in detail["info"]["allowedValues"]


async def test_control_panel_index_and_unknown_paths_answer_katana_json(
    http: httpx.AsyncClient,
) -> None:
    index = await http.get("/_sim/")
    assert index.status_code == 200
    assert index.json()["api"] == "/v1"
    paths = {entry["path"] for entry in index.json()["control"]}
    assert {"/_sim/sales_orders/{id:int}/deliver", "/_sim/counters", "/_sim/faults"} <= paths
    for path in ("/v1/nothing", "/_sim/nothing"):
        missing = await http.get(path, headers=AUTH)
        assert missing.status_code == 404
        assert missing.json()["statusCode"] == 404
        assert missing.json()["name"] == "NotFoundError"


# -- many accounts ------------------------------------------------------------------------

SECOND = "katana-second-token"
SECOND_AUTH = {"Authorization": f"Bearer {SECOND}"}
AS_SECOND = {"X-Sim-Account": SECOND}


async def _second_account(http: httpx.AsyncClient) -> dict[str, Any]:
    created = await http.post("/_sim/accounts", json={"token": SECOND})
    assert created.status_code == 201, created.text
    account: dict[str, Any] = created.json()["account"]
    return account


async def test_accounts_are_created_listed_and_refused_in_katanas_words(
    http: httpx.AsyncClient,
) -> None:
    account = await _second_account(http)
    assert account == {
        "token": SECOND,
        "revoked": False,
        "started": False,  # its workshop is seeded on first use
        "requests": 0,
        "responses_429": 0,
    }
    index = (await http.get("/_sim/")).json()
    assert index["accounts"] == [TOKEN, SECOND]
    assert index["default_account"] == TOKEN
    assert "/_sim/accounts" in {entry["path"] for entry in index["control"]}
    again = await http.post("/_sim/accounts", json={"token": SECOND})
    assert again.status_code == 409
    assert again.json()["name"] == "ConflictError"
    for bad in ({}, {"token": ""}, {"token": " x"}, {"token": 3}, {"token": "y", "secret": "z"}):
        refused = await http.post("/_sim/accounts", json=bad)
        assert refused.status_code == 400, bad
        assert refused.json()["name"] == "BadRequest"
    nobody = await http.get("/_sim/state", headers={"X-Sim-Account": "nobody"})
    assert nobody.status_code == 404
    assert nobody.json() == {
        "statusCode": 404,
        "name": "NotFoundError",
        "message": "Account 'nobody' not found",
    }


async def test_two_accounts_never_see_each_others_records(http: httpx.AsyncClient) -> None:
    await _second_account(http)
    first = await _order(http, {"CHAIR-OAK": "1"}, order_no="PO-FIRST")
    assert (await http.get("/v1/sales_orders", headers=SECOND_AUTH)).json()["data"] == []
    assert (await http.get("/v1/customers", headers=SECOND_AUTH)).json()["data"] == []
    # The second workshop is a whole seeded one of its own.
    variants = await http.get("/v1/variants", params={"sku": "CHAIR-OAK"}, headers=SECOND_AUTH)
    chair = variants.json()["data"][0]["id"]
    customer = await http.post("/v1/customers", json={"name": "Other"}, headers=SECOND_AUTH)
    body = {
        "customer_id": customer.json()["id"],
        "order_no": "PO-SECOND",
        "sales_order_rows": [{"variant_id": chair, "quantity": 2}],
    }
    second = await http.post("/v1/sales_orders", json=body, headers=SECOND_AUTH)
    assert second.status_code == 200, second.text
    mine = (await http.get("/v1/sales_orders", headers=AUTH)).json()["data"]
    theirs = (await http.get("/v1/sales_orders", headers=SECOND_AUTH)).json()["data"]
    assert [so["order_no"] for so in mine] == ["PO-FIRST"]
    assert [so["order_no"] for so in theirs] == ["PO-SECOND"]
    # The control panel acts on the account named (header or query), else the default.
    state = (await http.get("/_sim/state", params={"account": SECOND})).json()
    assert [so["order_no"] for so in state["sales_orders"]] == ["PO-SECOND"]
    made = await http.post(
        f"/_sim/sales_orders/{second.json()['id']}/make_to_order", headers=AS_SECOND
    )
    assert made.status_code == 200, made.text
    assert (await http.get("/_sim/state")).json()["manufacturing_orders"] == []
    assert (
        len((await http.get("/_sim/state", headers=AS_SECOND)).json()["manufacturing_orders"]) == 1
    )
    assert first["order_no"] == "PO-FIRST"


async def test_each_token_has_its_own_rate_budget_and_counters(world: KatanaWorld) -> None:
    async with _client(create_app(world, rate_limit=(3, 60.0))) as http:
        await _second_account(http)
        storm = [await http.get("/v1/factory", headers=AUTH) for _ in range(6)]
        assert [a.status_code for a in storm] == [200, 200, 200, 429, 429, 429]
        calm = [await http.get("/v1/factory", headers=SECOND_AUTH) for _ in range(3)]
        assert [a.status_code for a in calm] == [200, 200, 200]
        assert [a.headers["X-Ratelimit-Remaining"] for a in calm] == ["2", "1", "0"]
        default = (await http.get("/_sim/counters")).json()
        second = (await http.get("/_sim/counters", headers=AS_SECOND)).json()
        assert (default["responses_429"], default["requests"]) == (3, {"GET /factory": 6})
        assert (second["responses_429"], second["requests"]) == (0, {"GET /factory": 3})
        listed = (await http.get("/_sim/accounts")).json()["accounts"]
        assert [(a["token"], a["requests"], a["responses_429"]) for a in listed] == [
            (TOKEN, 6, 3),
            (SECOND, 3, 0),
        ]
    assert world.requests == {"GET /factory": 6}  # the default account's world keeps its own


async def test_revoking_one_accounts_token_leaves_the_other(http: httpx.AsyncClient) -> None:
    await _second_account(http)
    revoked = await http.post("/_sim/token", json={"revoked": True}, headers=AS_SECOND)
    assert revoked.json() == {"revoked": True}
    assert (await http.get("/v1/factory", headers=SECOND_AUTH)).status_code == 401
    assert (await http.get("/v1/factory", headers=AUTH)).status_code == 200
    await http.post("/_sim/token", params={"account": SECOND}, json={"revoked": False})
    assert (await http.get("/v1/factory", headers=SECOND_AUTH)).status_code == 200


async def test_webhooks_are_the_accounts_own(http: httpx.AsyncClient) -> None:
    await _second_account(http)
    hook = {"url": "https://first.example/hook", "subscribed_events": ["sales_order.created"]}
    other = {"url": "https://second.example/hook", "subscribed_events": ["sales_order.created"]}
    assert (await http.post("/v1/webhooks", json=hook, headers=AUTH)).status_code == 200
    made = await http.post("/v1/webhooks", json=other, headers=SECOND_AUTH)
    listed = (await http.get("/v1/webhooks", headers=SECOND_AUTH)).json()["data"]
    assert [w["url"] for w in listed] == ["https://second.example/hook"]
    assert listed[0]["token"] == made.json()["token"]  # each webhook its own token
    await _order(http, {"CHAIR-OAK": "1"})  # an event in the default account only
    mine = (await http.get("/_sim/webhooks")).json()
    theirs = (await http.get("/_sim/webhooks", headers=AS_SECOND)).json()
    assert (mine["queued"], mine["counters"]) == (1, {"published": 1})
    assert (theirs["queued"], theirs["counters"]) == (0, {})
    assert [s["url"] for s in theirs["subscriptions"]] == ["https://second.example/hook"]


async def test_a_fault_rule_may_name_an_account(http: httpx.AsyncClient) -> None:
    await _second_account(http)
    rules = {"rules": [{"path": "/factory", "error_rate": 1.0, "account": SECOND}]}
    assert (await http.put("/_sim/faults", json=rules)).status_code == 200
    assert (await http.get("/v1/factory", headers=SECOND_AUTH)).status_code == 500
    assert (await http.get("/v1/factory", headers=AUTH)).status_code == 200
    second = (await http.get("/_sim/counters", headers=AS_SECOND)).json()
    default = (await http.get("/_sim/counters")).json()
    assert (second["faults_injected"], default["faults_injected"]) == ({"error": 1}, {})
    burst = {"burst": {"requests": 2, "account": TOKEN}}
    await http.put("/_sim/faults", json=burst)
    assert (await http.get("/v1/factory", headers=SECOND_AUTH)).status_code == 200
    assert (await http.get("/v1/factory", headers=AUTH)).status_code == 429


async def test_factory_player_works_in_every_account_in_use(world: KatanaWorld) -> None:
    async with serving(create_app(world, rate_limit=None)) as url, _client_at(url) as http:
        await _second_account(http)
        await http.post("/_sim/accounts", json={"token": "idle"})
        first = await _order(http, {"CHAIR-OAK": "1"})
        variants = await http.get("/v1/variants", params={"sku": "CHAIR-OAK"}, headers=SECOND_AUTH)
        customer = await http.post("/v1/customers", json={"name": "B"}, headers=SECOND_AUTH)
        body = {
            "customer_id": customer.json()["id"],
            "sales_order_rows": [{"variant_id": variants.json()["data"][0]["id"], "quantity": 1}],
        }
        second = (await http.post("/v1/sales_orders", json=body, headers=SECOND_AUTH)).json()
        waiting = {(first["id"], TOKEN), (second["id"], SECOND)}
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(play_factory, url, step_delay=0.02))
            with anyio.fail_after(10):
                while True:
                    for order_id, token in sorted(waiting):
                        auth = {"Authorization": f"Bearer {token}"}
                        state = await http.get(f"/v1/sales_orders/{order_id}", headers=auth)
                        if state.json()["status"] == "DELIVERED":
                            waiting.discard((order_id, token))
                    if not waiting:
                        break
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        listed = {a["token"]: a for a in (await http.get("/_sim/accounts")).json()["accounts"]}
        assert listed["idle"]["started"] is False  # the player did not seed an idle workshop


async def test_a_thousand_accounts_through_the_control_panel(http: httpx.AsyncClient) -> None:
    # A sanity bound only; the measured figures are in the notes.
    started = time.perf_counter()
    for n in range(1000):
        created = await http.post("/_sim/accounts", json={"token": f"factory-{n}"})
        assert created.status_code == 201
    assert time.perf_counter() - started < 60
    listed = (await http.get("/_sim/accounts")).json()["accounts"]
    assert len(listed) == 1001
    assert not any(a["started"] for a in listed[1:])
    last = {"Authorization": "Bearer factory-999"}
    assert (await http.get("/v1/factory", headers=last)).status_code == 200


async def test_recipes_and_mos_made_per_row_are_each_accounts_own(
    http: httpx.AsyncClient,
) -> None:
    await _second_account(http)
    shelf = await http.post(
        "/_sim/products",
        json={
            "name": "Shelf",
            "sku": "SHELF",
            "sales_price": 50,
            "recipe": [{"sku": "MAT-PINE-BOARD", "quantity": 2}],
        },
        headers=AS_SECOND,
    )
    assert shelf.status_code == 200, shelf.text
    shelf_id = shelf.json()["variants"][0]["id"]

    async def bom_rows(auth: dict[str, str], **params: Any) -> list[dict[str, Any]]:
        answer = await http.get("/v1/bom_rows", params={"limit": 250, **params}, headers=auth)
        assert answer.status_code == 200, answer.text
        rows: list[dict[str, Any]] = answer.json()["data"]
        return rows

    (row,) = await bom_rows(SECOND_AUTH, product_variant_id=shelf_id)
    assert row["quantity"] == 2
    # The recipe is the second workshop's only: the default one has the catalogue's.
    assert len(await bom_rows(SECOND_AUTH)) == len(await bom_rows(AUTH)) + 1

    customer = await http.post("/v1/customers", json={"name": "Other"}, headers=SECOND_AUTH)
    order = await http.post(
        "/v1/sales_orders",
        json={
            "customer_id": customer.json()["id"],
            "order_no": "PO-SHELF",
            "sales_order_rows": [{"variant_id": shelf_id, "quantity": 1}],
        },
        headers=SECOND_AUTH,
    )
    (so_row,) = order.json()["sales_order_rows"]
    made = await http.post(
        "/v1/manufacturing_order_make_to_order",
        json={"sales_order_row_id": so_row["id"]},
        headers=SECOND_AUTH,
    )
    assert made.status_code == 200, made.text
    theirs = (await http.get("/_sim/counters", headers=AS_SECOND)).json()
    mine = (await http.get("/_sim/counters")).json()
    assert theirs["manufacturing_orders_per_row"] == {str(so_row["id"]): 1}
    assert mine["manufacturing_orders_per_row"] == {}
