"""KatanaClient against httpx.MockTransport: decoding, paging and error typing, no sockets."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal

import httpx
import pytest
import stamina

from syncd import errors
from syncd.adapters._http import RequestBudget
from syncd.adapters.katana import KatanaClient, NewSalesOrder, NewSalesOrderRow

pytestmark = pytest.mark.anyio

BASE = "https://api.katanamrp.com/v1"

SO = {
    "id": 7,
    "order_no": "PO-7",
    "customer_id": 3,
    "location_id": 1,
    "status": "NOT_SHIPPED",
    "production_status": "NONE",
    "currency": "USD",
    "unknown_new_field": {"ignored": True},
    "sales_order_rows": [
        {
            "id": 70,
            "sales_order_id": 7,
            "variant_id": 5,
            "quantity": "1.00000",
            "price_per_unit": "599.9900000000",
            "linked_manufacturing_order_id": None,
        }
    ],
    "created_at": "2024-01-15T10:00:00.000Z",
    "updated_at": "2024-01-15T10:00:00.000Z",
    "deleted_at": None,
}


@pytest.fixture
def no_retry_sleep() -> Iterator[None]:
    # cap: never more attempts than the client configured (1 for a POST).
    stamina.set_testing(True, attempts=3, cap=True)
    try:
        yield
    finally:
        stamina.set_testing(False)


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> KatanaClient:
    return KatanaClient(
        BASE, "tok", transport=httpx.MockTransport(handler), budget=RequestBudget(1000, 60.0)
    )


async def test_decimal_strings_and_numbers_become_decimals() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer tok"
        if request.url.path == "/v1/inventory":
            assert request.url.params.get_list("variant_id") == ["5", "6"]
            data = [
                {
                    "variant_id": 5,
                    "location_id": 1,
                    "average_cost": "15.50",
                    "quantity_in_stock": "150.0",
                },
                {"variant_id": 6, "location_id": 1, "average_cost": 0.1, "quantity_in_stock": 3},
            ]
            return httpx.Response(200, json={"data": data})
        return httpx.Response(200, json=SO)

    async with _client(handler) as client:
        order = await client.get_sales_order(7)
        assert order.sales_order_rows[0].price_per_unit == Decimal("599.9900000000")
        assert order.sales_order_rows[0].quantity == Decimal("1.00000")
        records = await client.list_inventory([5, 6, 5])
    assert [r.average_cost for r in records] == [Decimal("15.50"), Decimal("0.1")]
    assert records[1].quantity_in_stock == Decimal(3)


async def test_walks_every_page_with_repeated_array_filters() -> None:
    seen: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params)
        page = int(request.url.params["page"])
        pagination = {
            "total_records": "3",
            "total_pages": "3",
            "offset": str(page - 1),
            "page": str(page),
            "first_page": str(page == 1).lower(),
            "last_page": str(page == 3).lower(),
        }
        rows = [{**SO, "id": page}]
        return httpx.Response(
            200, json={"data": rows}, headers={"X-Pagination": json.dumps(pagination)}
        )

    async with _client(handler) as client:
        orders = await client.list_sales_orders(ids=[1, 2, 3], include_deleted=True)
    assert [o.id for o in orders] == [1, 2, 3]
    assert [p["page"] for p in seen] == ["1", "2", "3"]
    assert all(p["limit"] == "250" for p in seen)
    assert seen[0].get_list("ids") == ["1", "2", "3"]
    assert seen[0]["include_deleted"] == "true"


async def test_create_sales_order_body_leaves_out_nones_and_sends_numbers() -> None:
    bodies: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=SO)

    order = NewSalesOrder(
        customer_id=3,
        order_no="PO-7",
        sales_order_rows=[NewSalesOrderRow(variant_id=5, quantity=Decimal("1.50"))],
    )
    async with _client(handler) as client:
        created = await client.create_sales_order(order)
    assert created.id == 7
    assert bodies == [
        {
            "customer_id": 3,
            "order_no": "PO-7",
            "sales_order_rows": [{"variant_id": 5, "quantity": 1.5}],
        }
    ]


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (
            401,
            {"statusCode": 401, "name": "UnauthorizedError", "message": "Unauthorized"},
            errors.AuthError,
            "Unauthorized",
        ),
        (
            404,
            {"error": {"statusCode": 404, "name": "NotFoundError", "message": "Not found"}},
            errors.NotFound,
            "Not found",
        ),
        (
            422,
            {
                "statusCode": 422,
                "name": "UnprocessableEntityError",
                "message": "invalid",
                "code": "VALIDATION_FAILED",
                "details": [{"path": ".order_no", "code": "type", "message": "should be string"}],
            },
            errors.ValidationFailed,
            ".order_no: should be string",
        ),
    ],
)
async def test_errors_are_typed(
    status: int, body: dict[str, object], kind: type[errors.ApiError], reason: str
) -> None:
    async with _client(lambda request: httpx.Response(status, json=body)) as client:
        with pytest.raises(kind) as caught:
            await client.get_sales_order(7)
    assert caught.value.status == status
    assert caught.value.endpoint == "/sales_orders/{id}"
    assert reason in caught.value.reason
    if status == 422:
        assert caught.value.details[0]["path"] == ".order_no"


async def test_html_error_body_is_described() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="<html>nope</html>", headers={"Content-Type": "text/html"})

    async with _client(handler) as client:
        with pytest.raises(errors.NotFound, match="non-JSON body of text/html"):
            await client.get_sales_order(7)


async def test_undecodable_2xx_is_a_decode_error_naming_the_endpoint() -> None:
    async with _client(lambda request: httpx.Response(200, json={"rows": []})) as c:
        with pytest.raises(errors.DecodeError) as caught:
            await c.list_customers(name="A")
    assert caught.value.endpoint == "/customers"
    async with _client(lambda request: httpx.Response(200, text="<html/>")) as c:
        with pytest.raises(errors.DecodeError, match="katana GET /factory"):
            await c.get_factory()


async def test_one_odd_record_is_skipped_and_the_rest_are_read() -> None:
    body = {"data": [{"id": "x"}, {"id": 2, "name": "Tradegecko"}]}
    async with _client(lambda request: httpx.Response(200, json=body)) as c:
        customers = await c.list_customers(name="Tradegecko")
        assert [customer.id for customer in customers] == [2]
        assert c.skipped_records == 1


async def test_429_waits_for_retry_after_then_succeeds() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(len(calls))
        if len(calls) == 1:
            return httpx.Response(
                429,
                json={"statusCode": 429, "name": "TooManyRequests", "message": "Too Many Requests"},
                headers={"Retry-After": "0.5", "X-Ratelimit-Remaining": "0"},
            )
        return httpx.Response(200, json={"base_currency_code": "EUR", "display_name": "W"})

    async with _client(handler) as client:
        blocked: list[float] = []
        original = client.budget.block_for

        def block_for(seconds: float) -> None:
            blocked.append(seconds)
            original(seconds)

        client.budget.block_for = block_for  # type: ignore[method-assign]
        factory = await client.get_factory()
    assert factory.base_currency_code == "EUR"
    assert len(calls) == 2
    assert blocked == [0.5]


async def test_5xx_retried_for_get_not_for_post(no_retry_sleep: None) -> None:
    calls: dict[str, int] = {"GET": 0, "POST": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls[request.method] += 1
        if request.method == "GET" and calls["GET"] < 3:
            return httpx.Response(503, json={"statusCode": 503, "name": "x", "message": "busy"})
        if request.method == "POST":
            return httpx.Response(500, json={"statusCode": 500, "name": "x", "message": "boom"})
        return httpx.Response(200, json={"data": []})

    async with _client(handler) as client:
        assert await client.list_customers(reference_id="r") == []
        with pytest.raises(errors.ServerError):
            await client.create_customer(name="A")
    assert calls == {"GET": 3, "POST": 1}
