"""TradeGeckoClient against an in-process fake (httpx.MockTransport): no sockets, fast."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stamina

from syncd.adapters._http import RequestBudget
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.errors import DecodeError, NotFound, ServerError, ValidationFailed

Handler = Callable[[httpx.Request], httpx.Response]

LINE = {
    "id": 177772,
    "purchase_order_id": 28381,
    "variant_id": 2033689,
    "procurement_id": None,
    "tax_type_id": 2103,
    "quantity": "4999.0",
    "position": 0,
    "tax_rate_override": None,
    "price": "20.10",
    "label": None,
    "freeform": False,
    "base_price": None,
    "extra_cost_value": "0.0",
    "image_url": None,
    "tax_rate": None,
}


def _order(order_id: int) -> dict[str, Any]:
    return {
        "id": order_id,
        "company_id": 633468,
        "currency_id": 4,
        "stock_location_id": 159,
        "status": "active",
        "procurement_status": "unprocured",
        "order_number": f"PO{order_id}",
        "created_at": "2014-09-30T11:37:19.501Z",
        "updated_at": "2014-09-30T11:37:24.218Z",
        "total": "232311.62",
        "purchase_order_line_item_ids": [177772],
        "procurement_ids": [],
    }


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=data, headers=headers)


def _client(handler: Handler, **kwargs: Any) -> TradeGeckoClient:
    return TradeGeckoClient(
        "https://api.tradegecko.test", "tok", transport=httpx.MockTransport(handler), **kwargs
    )


@pytest.fixture
def fast_retries() -> Iterator[None]:
    stamina.set_testing(True, attempts=5, cap=True)
    try:
        yield
    finally:
        stamina.set_testing(False)


@pytest.mark.anyio
async def test_purchase_order_decimals_and_side_loaded_lines() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _json({"purchase_order": _order(28381), "purchase_order_line_items": [LINE]})

    async with _client(handler) as client:
        order, lines = await client.get_purchase_order(28381)
    assert order.total == Decimal("232311.62")
    assert isinstance(order.total, Decimal)
    assert order.created_at == datetime(2014, 9, 30, 11, 37, 19, 501000, tzinfo=UTC)
    assert lines[0].price == Decimal("20.10")
    assert str(lines[0].price) == "20.10"  # exact, never through a float
    assert lines[0].quantity == Decimal("4999.0")
    assert seen[0].url.path == "/purchase_orders/28381"
    assert seen[0].url.params["include"] == "purchase_order_line_items"
    assert seen[0].headers["Authorization"] == "Bearer tok"


@pytest.mark.anyio
async def test_list_walks_every_page_until_the_last() -> None:
    pages: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        pages.append(page)
        assert request.url.params["limit"] == "250"
        info = {
            "total_records": 3,
            "total_pages": 3,
            "first_page": page == 1,
            "last_page": page == 3,
            "out_of_bounds": False,
            "offset": (page - 1) * 250,
        }
        return _json(
            {"purchase_orders": [_order(100 - page)]}, headers={"X-Pagination": json.dumps(info)}
        )

    async with _client(handler) as client:
        orders = await client.list_purchase_orders(status="active")
    assert pages == [1, 2, 3]
    assert [o.id for o in orders] == [99, 98, 97]


@pytest.mark.anyio
async def test_filters_are_spelled_as_tradegecko_spells_them() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/variants":
            return _json({"variants": []})
        return _json({"purchase_orders": []})

    async with _client(handler) as client:
        await client.list_purchase_orders(
            ids=[1, 2],
            company_ids=[7],
            order_number="PO0435",
            updated_at_min=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        )
        await client.list_variants(skus=["A", "B"])
        assert await client.list_variants(ids=[]) == []
    query = seen[0].url.query.decode()
    assert "ids%5B%5D=1&ids%5B%5D=2" in query
    assert seen[0].url.params["company_id"] == "7"
    assert seen[0].url.params["order_number"] == "PO0435"
    assert seen[0].url.params["updated_at_min"] == "2024-05-01T12:00:00.000Z"
    assert seen[1].url.params.get_list("sku[]") == ["A", "B"]
    assert len(seen) == 2  # an empty id filter sends nothing


@pytest.mark.anyio
async def test_long_id_filters_go_in_chunks_without_repeats() -> None:
    seen: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ids = request.url.params.get_list("ids[]")
        seen.append(ids)
        return _json({"purchase_orders": [_order(int(i)) for i in ids]})

    wanted = [*range(1, 151), 7, 150]  # 150 ids, two of them twice
    async with _client(handler) as client:
        orders = await client.list_purchase_orders(ids=wanted)
        assert [len(chunk) for chunk in seen] == [100, 50]
        assert [o.id for o in orders] == list(range(1, 151))
        seen.clear()
        await client.list_purchase_orders(ids=[9])
    assert seen == [["9"]]  # ``ids[]`` even for one id


@pytest.mark.anyio
async def test_a_list_answer_without_its_records_is_a_decode_error() -> None:
    async with _client(lambda request: _json({"companies": []})) as client:
        with pytest.raises(DecodeError, match="no 'purchase_orders' list") as caught:
            await client.list_purchase_orders()
    assert caught.value.endpoint == "/purchase_orders"


@pytest.mark.anyio
async def test_price_update_sends_the_wrapper_and_accepts_204() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with _client(handler) as client:
        await client.update_line_item_price(5, Decimal("12.0"), idempotency_key="k1")
    assert len(seen) == 1
    assert seen[0].method == "PUT"
    assert seen[0].url.path == "/purchase_order_line_items/5"
    assert json.loads(seen[0].content) == {"purchase_order_line_item": {"price": "12.0"}}
    assert seen[0].headers["Idempotency-Key"] == "k1"


@pytest.mark.anyio
async def test_422_becomes_validation_failed_with_field_details() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _json({"errors": {"price": ["is not a number"]}}, 422)

    async with _client(handler) as client:
        with pytest.raises(ValidationFailed) as caught:
            await client.update_line_item_price(5, Decimal("1"))
    assert caught.value.details == {"price": ["is not a number"]}
    assert caught.value.endpoint == "/purchase_order_line_items/{id}"
    assert "price is not a number" in str(caught.value)


@pytest.mark.anyio
async def test_html_404_becomes_not_found() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404,
            text="<html><body>The page you were looking for doesn't exist.</body></html>",
            headers={"Content-Type": "text/html; charset=utf-8", "X-Request-Id": "req-1"},
        )

    async with _client(handler) as client:
        with pytest.raises(NotFound) as caught:
            await client.get_purchase_order(404404)
    assert caught.value.status == 404
    assert caught.value.request_id == "req-1"
    assert caught.value.endpoint == "/purchase_orders/{id}"
    assert "text/html" in caught.value.reason


@pytest.mark.anyio
async def test_2xx_with_a_broken_body_is_a_decode_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _json({"purchase_order": {"id": "not-an-int"}})

    async with _client(handler) as client:
        with pytest.raises(DecodeError):
            await client.get_purchase_order(1)


@pytest.mark.anyio
async def test_429_waits_for_the_reset_then_succeeds() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            reset = str(int(time.time()) + 1)
            return _json(
                {"message": "Too Many Requests"},
                429,
                {"X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Reset": reset},
            )
        return _json({"account": {"id": 7067, "default_currency_id": 8078}})

    budget = RequestBudget(300, 300.0)
    async with _client(handler, budget=budget) as client:
        account = await client.get_current_account()
    assert account.default_currency_id == 8078
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.4  # waited for the reset, at least the 0.5 s floor
    assert budget.remaining_reported == 0


@pytest.mark.anyio
@pytest.mark.usefixtures("fast_retries")
async def test_get_is_retried_on_500() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            return httpx.Response(500, text="Internal Server Error")
        return _json({"currencies": [{"id": 4, "iso": "SGD", "rate": "1.0"}]})

    async with _client(handler) as client:
        currencies = await client.list_currencies()
    assert calls == 3
    assert currencies[0].rate == Decimal("1.0")


@pytest.mark.anyio
@pytest.mark.usefixtures("fast_retries")
async def test_receive_sends_its_key_and_is_retried_on_500() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(500, text="oops")
        return _json(
            {
                "procurement": {
                    "id": 51,
                    "purchase_order_id": 127,
                    "purchase_order_line_item_ids": [172],
                    "received_at": "2013-02-21T23:16:56Z",
                    "created_at": "2013-02-21T23:17:19Z",
                }
            },
            201,
        )

    async with _client(handler) as client:
        procurement = await client.receive_purchase_order(127, idempotency_key="receive-127")
    assert procurement.id == 51
    assert len(seen) == 2
    assert all(r.headers["Idempotency-Key"] == "receive-127" for r in seen)
    assert seen[0].method == "POST"
    assert seen[0].url.path == "/purchase_orders/127/actions/receive"
    assert seen[0].content == b""


@pytest.mark.anyio
@pytest.mark.usefixtures("fast_retries")
async def test_a_post_without_a_key_is_not_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500, text="oops")

    async with _client(handler) as client:
        with pytest.raises(ServerError):
            await client.request("POST", "/purchase_orders/1/actions/receive")
    assert calls == 1
