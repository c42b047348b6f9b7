"""Hostile inputs, property-tested: the webhook listener and both API decoders.

The listener never answers 5xx and never raises, stores nothing it refused, and stores a
correctly signed delivery exactly once. The clients turn any 2xx body into typed models or a
:class:`~syncd.errors.ApiError`, never another exception.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
import stamina
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from syncd import errors
from syncd.adapters._http import RequestBudget
from syncd.adapters.katana import KatanaClient
from syncd.adapters.katana.models import ManufacturingOrder, SalesOrder
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.runtime.webhooks import (
    KATANA_EVENTS,
    TRADEGECKO_EVENTS,
    WebhookKeys,
    create_webhook_app,
    katana_signature,
    tradegecko_signature,
)
from syncd.store import Store

SECRET = "tg-secret"
PATH_TOKEN = "path-token-123"
KATANA_TOKEN = "0123456789abcdef"
MAX_BODY = 2048

HOSTILE = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies --------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def _body_strategy(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    """Binary, text, random JSON, huge, empty, and valid bodies truncated at a random byte."""
    truncated = st.sampled_from(valid).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n])
    )
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        json_values.map(_dumps),
        st.integers(MAX_BODY - 2, MAX_BODY * 3).map(lambda n: b"[" * n),
        st.just(b""),
        truncated,
        st.sampled_from(valid),
    )


def _tg_valid_bodies() -> list[bytes]:
    return [_dumps({"object_id": 5, "event": e, "timestamp": 1}) for e in TRADEGECKO_EVENTS]


def _katana_valid_bodies() -> list[bytes]:
    return [
        _dumps({"resource_type": "x", "action": e, "object": {"id": "7", "status": "DONE"}})
        for e in KATANA_EVENTS
    ]


# Header values as raw bytes (as a proxy may pass them): any byte but CR, LF and NUL.
header_bytes = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)
latin1_text = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=12).map(
    lambda t: t.replace("\r", "").replace("\n", "").encode("latin-1")
)
header_value = header_bytes | latin1_text


def _signature_choice(
    sign: Callable[[bytes], str],
) -> st.SearchStrategy[Callable[[bytes], bytes | None]]:
    return st.one_of(
        st.just(lambda body: None),
        st.just(lambda body: sign(body).encode()),
        st.just(lambda body: b"  sha256=" + sign(body).upper().encode() + b" "),
        header_value.map(lambda garbage: lambda body: garbage),
    )


# -- the listener, driven one example at a time --------------------------------------------


def _run_listener(
    check: Callable[[httpx.AsyncClient, Store], Awaitable[None]],
) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = await Store.open(Path(tmp) / "listener.db")
            try:
                keys = WebhookKeys(SECRET, PATH_TOKEN, {KATANA_TOKEN})
                app = create_webhook_app(
                    store, keys, max_body_bytes=MAX_BODY, on_received=lambda: None
                )
                transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://listener"
                ) as client:
                    await check(client, store)
            finally:
                await store.close()

    anyio.run(main)


async def _post(
    client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, bytes]
) -> httpx.Response:
    # httpx takes bytes values only with bytes names.
    response = await client.post(
        path, content=body, headers=[(name.encode(), value) for name, value in headers.items()]
    )
    assert response.status_code < 500, (response.status_code, response.text)
    return response


async def _assert_inbox(store: Store, response: httpx.Response, before: int) -> int:
    pending = await store.pending_events()
    stored = len(pending) - before
    if not response.is_success or response.json()["status"] != "accepted":
        assert stored == 0, (response.status_code, response.text)
    else:
        assert stored == 1
    return len(pending)


@HOSTILE
@given(
    body=_body_strategy(_tg_valid_bodies()),
    signature=_signature_choice(lambda body: tradegecko_signature(SECRET, body)),
    delivery=st.none() | header_value,
    extra=st.dictionaries(
        st.sampled_from(["content-type", "x-gecko-delivery", "content-encoding", "x-other"]),
        header_value,
        max_size=2,
    ),
)
def test_tradegecko_listener_survives_anything(
    body: bytes,
    signature: Callable[[bytes], bytes | None],
    delivery: bytes | None,
    extra: dict[str, bytes],
) -> None:
    headers = dict(extra)
    if delivery is not None:
        headers["x-gecko-delivery"] = delivery
    sig = signature(body)
    if sig is not None:
        headers["x-gecko-signature"] = sig

    async def check(client: httpx.AsyncClient, store: Store) -> None:
        response = await _post(client, "/webhooks/tradegecko", body, headers)
        count = await _assert_inbox(store, response, 0)
        # A repeat is never stored twice (same delivery id).
        again = await _post(client, "/webhooks/tradegecko", body, headers)
        assert again.status_code == response.status_code
        assert await _assert_inbox(store, again, count) == count or count == 0

    _run_listener(check)


katana_tokens = st.one_of(
    st.just(PATH_TOKEN),
    st.text(max_size=30).map(lambda t: quote(t, safe="")),
    st.text(max_size=30).map(lambda t: quote(t, safe="/%")),
    st.just(PATH_TOKEN + "/extra"),
    st.just(quote(PATH_TOKEN + "\u00e9")),
)


@HOSTILE
@given(
    token=katana_tokens,
    body=_body_strategy(_katana_valid_bodies()),
    signature=_signature_choice(lambda body: katana_signature(KATANA_TOKEN, body)),
    retry=st.none() | header_value,
)
def test_katana_listener_survives_anything(
    token: str,
    body: bytes,
    signature: Callable[[bytes], bytes | None],
    retry: bytes | None,
) -> None:
    headers: dict[str, bytes] = {}
    sig = signature(body)
    if sig is not None:
        headers["x-sha2-signature"] = sig
    if retry is not None:
        headers["x-katana-retry-num"] = retry

    async def check(client: httpx.AsyncClient, store: Store) -> None:
        response = await _post(client, f"/webhooks/katana/{token}", body, headers)
        await _assert_inbox(store, response, 0)

    _run_listener(check)


def test_katana_listener_odd_digit_retry_header() -> None:
    # "²" passes str.isdigit() but int() refuses it: it once made the listener answer 500.
    body = _katana_valid_bodies()[0]
    headers = {
        "x-sha2-signature": katana_signature(KATANA_TOKEN, body).encode(),
        "x-katana-retry-num": b"\xb2",
    }

    async def check(client: httpx.AsyncClient, store: Store) -> None:
        response = await _post(client, f"/webhooks/katana/{PATH_TOKEN}", body, headers)
        assert response.status_code == 200
        assert await _assert_inbox(store, response, 0) == 1

    _run_listener(check)


@settings(max_examples=200, deadline=None)
@given(
    object_id=st.integers(min_value=0, max_value=2**63 - 1),
    event=st.sampled_from(TRADEGECKO_EVENTS),
    delivery=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    repeats=st.integers(1, 3),
)
def test_signed_tradegecko_delivery_is_stored_exactly_once(
    object_id: int, event: str, delivery: str, repeats: int
) -> None:
    body = _dumps({"object_id": object_id, "event": event})
    headers = {
        "x-gecko-signature": tradegecko_signature(SECRET, body).encode(),
        "x-gecko-delivery": delivery.encode(),
    }

    async def check(client: httpx.AsyncClient, store: Store) -> None:
        answers = [
            (await _post(client, "/webhooks/tradegecko", body, headers)).json()["status"]
            for _ in range(repeats)
        ]
        assert answers == ["accepted"] + ["duplicate"] * (repeats - 1)
        pending = await store.pending_events()
        assert len(pending) == 1
        assert str(object_id) in pending[0].payload.decode()

    _run_listener(check)


@settings(max_examples=200, deadline=None)
@given(
    object_id=st.integers(min_value=0, max_value=2**63 - 1),
    as_text=st.booleans(),
    event=st.sampled_from(KATANA_EVENTS),
    prefixed=st.booleans(),
)
def test_signed_katana_delivery_is_stored_exactly_once(
    object_id: int, as_text: bool, event: str, prefixed: bool
) -> None:
    oid: int | str = str(object_id) if as_text else object_id
    body = _dumps({"resource_type": "x", "action": event, "object": {"id": oid}})
    sig = katana_signature(KATANA_TOKEN, body)
    headers = {"x-sha2-signature": (f"sha256={sig}" if prefixed else sig).encode()}

    async def check(client: httpx.AsyncClient, store: Store) -> None:
        response = await _post(client, f"/webhooks/katana/{PATH_TOKEN}", body, headers)
        assert response.json()["status"] == "accepted"
        pending = await store.pending_events()
        assert len(pending) == 1
        assert str(object_id) in pending[0].payload.decode()

    _run_listener(check)


# -- API decoders -------------------------------------------------------------------------

KATANA_BASE = "https://api.katanamrp.com/v1"
KATANA_SO: dict[str, Any] = {
    "id": 7,
    "order_no": "PO-7",
    "customer_id": 3,
    "location_id": 1,
    "status": "NOT_SHIPPED",
    "production_status": "NONE",
    "currency": "USD",
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
TG_LINE: dict[str, Any] = {
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
TG_PO: dict[str, Any] = {
    "id": 28381,
    "company_id": 633468,
    "currency_id": 4,
    "stock_location_id": 159,
    "status": "active",
    "procurement_status": "unprocured",
    "order_number": "PO28381",
    "created_at": "2014-09-30T11:37:19.501Z",
    "updated_at": "2014-09-30T11:37:24.218Z",
    "total": "232311.62",
    "purchase_order_line_item_ids": [177772],
    "procurement_ids": [],
}


def _mutated(record: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The record with some fields given random values (or removed)."""
    keys = sorted(record)
    return st.dictionaries(
        st.sampled_from(keys), st.just(KeyError) | json_values, min_size=1, max_size=4
    ).map(
        lambda changes: {
            k: changes.get(k, v) for k, v in record.items() if changes.get(k) is not KeyError
        }
    )


def _answers(valid: list[bytes], mutants: st.SearchStrategy[bytes]) -> st.SearchStrategy[Any]:
    body = st.one_of(
        json_values.map(_dumps),
        st.sampled_from(valid).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
        mutants,
        st.binary(max_size=100),
        st.just(b"[" * 10_000),
    )
    status = st.sampled_from([200, 200, 200, 201, 204, 400, 401, 402, 404, 422, 429, 500, 503])
    pagination = st.none() | header_value | json_values.map(lambda v: json.dumps(v).encode())
    return st.tuples(body, status, pagination)


@pytest.fixture(scope="module", autouse=True)
def _no_retries() -> Iterator[None]:
    stamina.set_testing(True, attempts=1)
    try:
        yield
    finally:
        stamina.set_testing(False)


def _handler(answer: tuple[bytes, int, bytes | None]) -> Callable[[httpx.Request], httpx.Response]:
    body, status, pagination = answer

    def handle(request: httpx.Request) -> httpx.Response:
        # Random pagination facts must not page forever: the fourth page is empty.
        if int(request.url.params.get("page", "1")) > 3:
            return httpx.Response(200, content=b'{"data": [], "purchase_orders": []}')
        headers = {b"x-pagination": pagination} if pagination is not None else {}
        return httpx.Response(status, content=body, headers=headers)

    return handle


def _only_api_errors(call: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        try:
            return await call()
        except errors.ApiError:
            return None

    return anyio.run(main)


katana_valid = [
    _dumps({"data": [KATANA_SO]}),
    _dumps(KATANA_SO),
]
katana_mutants = _mutated(KATANA_SO).flatmap(
    lambda so: st.sampled_from([_dumps({"data": [so, KATANA_SO]}), _dumps(so)])
)


@HOSTILE
@given(answer=_answers(katana_valid, katana_mutants), which=st.integers(0, 3))
@example(answer=(b"[" * 100_000, 200, None), which=0)
@example(answer=(_dumps({"data": [KATANA_SO]}), 200, b"[" * 100_000), which=0)
@example(answer=(b"[" * 100_000, 422, None), which=2)
def test_katana_client_decodes_or_raises_api_error(
    answer: tuple[bytes, int, bytes | None], which: int
) -> None:
    async def call() -> Any:
        async with KatanaClient(
            KATANA_BASE,
            "tok",
            transport=httpx.MockTransport(_handler(answer)),
            budget=RequestBudget(1000, 60.0),
            max_rate_wait=0.0,  # a 429 raises RateLimited at once instead of waiting
        ) as client:
            result: list[SalesOrder] | list[ManufacturingOrder]
            if which == 0:
                result = await client.list_sales_orders()
            elif which == 1:
                result = await client.list_sales_orders(ids=[7, 8])
            elif which == 2:
                result = [await client.get_sales_order(7)]
            else:
                result = await client.list_manufacturing_orders()
            return result

    result = _only_api_errors(call)
    if result is not None:
        assert isinstance(result, list)
        if which < 3:
            assert all(isinstance(item, SalesOrder) for item in result)


tg_valid = [
    _dumps({"purchase_orders": [TG_PO]}),
    _dumps({"purchase_order": TG_PO, "purchase_order_line_items": [TG_LINE]}),
    _dumps({"purchase_order_line_items": [TG_LINE]}),
]
tg_mutants = st.one_of(
    _mutated(TG_PO).map(lambda po: _dumps({"purchase_orders": [po, TG_PO]})),
    st.tuples(_mutated(TG_PO), _mutated(TG_LINE)).map(
        lambda pl: _dumps({"purchase_order": pl[0], "purchase_order_line_items": [pl[1]]})
    ),
    _mutated(TG_LINE).map(lambda line: _dumps({"purchase_order_line_items": [line]})),
)


@HOSTILE
@given(answer=_answers(tg_valid, tg_mutants), which=st.integers(0, 3))
@example(answer=(b"[" * 100_000, 200, None), which=1)
@example(answer=(_dumps({"purchase_orders": [TG_PO]}), 200, b"[" * 100_000), which=0)
@example(answer=(b"[" * 100_000, 422, None), which=1)
def test_tradegecko_client_decodes_or_raises_api_error(
    answer: tuple[bytes, int, bytes | None], which: int
) -> None:
    async def call() -> Any:
        async with TradeGeckoClient(
            "https://api.tradegecko.test",
            "tok",
            transport=httpx.MockTransport(_handler(answer)),
            max_rate_wait=0.0,
        ) as client:
            if which == 0:
                return await client.list_purchase_orders()
            if which == 1:
                po, lines = await client.get_purchase_order(28381)
                return [po, *lines]
            if which == 2:
                return await client.list_purchase_order_line_items(28381)
            return await client.list_companies()

    result = _only_api_errors(call)
    if result is not None:
        assert isinstance(result, list)
