"""The TradeGecko models against the recorded real responses, and the simulator against both.

Every recorded body (and documentation example) of a resource syncd reads must decode with
the models as it is. The simulator must answer with the same field names and JSON types as
the recordings for the resources it serves.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from conftest import APIS
from syncd.adapters.tradegecko import models
from syncd.sim.tradegecko import DEFAULT_TOKEN, create_app

FIXTURES = APIS / "tradegecko" / "fixtures"

BODIES: dict[str, type[Any]] = {
    "gecko_vcr_response_bodies/accounts_current.json": models.AccountEnvelope,
    "gecko_vcr_response_bodies/companies.json": models.CompanyList,
    "gecko_vcr_response_bodies/companies_count.json": models.CompanyList,
    "gecko_vcr_response_bodies/currencies.json": models.CurrencyList,
    "gecko_vcr_response_bodies/currencies_count.json": models.CurrencyList,
    "gecko_vcr_response_bodies/variants.json": models.VariantList,
    "gecko_vcr_response_bodies/variants_count.json": models.VariantList,
    "gecko_vcr_response_bodies/purchase_orders.json": models.PurchaseOrderList,
    "gecko_vcr_response_bodies/purchase_orders_count.json": models.PurchaseOrderList,
    "gecko_vcr_response_bodies/purchase_order_line_items.json": models.PurchaseOrderLineItemList,
    "gecko_vcr_response_bodies/purchase_order_line_items_count.json": (
        models.PurchaseOrderLineItemList
    ),
    "docs_examples/docs_old_procurement_1.json": models.ProcurementList,
    "docs_examples/docs_old_procurement_2.json": models.ProcurementEnvelope,
    "docs_examples/docs_old_purchase_order_1.json": models.PurchaseOrderEnvelope,
    "docs_examples/docs_old_variant_1.json": models.VariantList,
    "docs_examples/docs_old_variant_2.json": models.VariantEnvelope,
    "docs_examples/smaug_webhook_notification_payload.json": models.WebhookNotification,
}

# The recorded `/accounts` list has no envelope struct of its own: decode its records.
RECORD_LISTS: dict[str, tuple[str, type[Any]]] = {
    "gecko_vcr_response_bodies/accounts.json": ("accounts", models.Account),
}

# The official per-resource field reference carries sample records too.
SMAUG: dict[str, type[Any]] = {
    "account": models.Account,
    "company": models.Company,
    "currency": models.Currency,
    "variant": models.Variant,
    "purchase_order": models.PurchaseOrder,
    "purchase_order_line_item": models.PurchaseOrderLineItem,
}


def _body(name: str) -> bytes:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing")
    return path.read_bytes()


def test_every_resource_body_is_covered() -> None:
    wanted = ("account", "compan", "currenc", "variant", "purchase_order", "procurement")
    on_disk = {
        f"{p.parent.name}/{p.name}"
        for folder in ("gecko_vcr_response_bodies", "docs_examples")
        for p in (FIXTURES / folder).glob("*.json")
        if p.name.startswith(wanted) or "procurement" in p.name or "purchase_order" in p.name
    }
    assert on_disk
    assert on_disk <= set(BODIES) | set(RECORD_LISTS)


@pytest.mark.parametrize("name", sorted(BODIES))
def test_recorded_body_decodes(name: str) -> None:
    decoded = msgspec.json.decode(_body(name), type=BODIES[name])
    assert isinstance(decoded, BODIES[name])


@pytest.mark.parametrize("name", sorted(RECORD_LISTS))
def test_recorded_record_list_decodes(name: str) -> None:
    key, kind = RECORD_LISTS[name]
    records = json.loads(_body(name))[key]
    assert records
    for record in records:
        assert isinstance(msgspec.convert(record, kind), kind)


@pytest.mark.parametrize("resource", sorted(SMAUG))
def test_smaug_reference_samples_decode(resource: str) -> None:
    text = _body(f"smaug_locales/{resource}.en.yml").decode()
    samples = yaml.safe_load(text)["en"][resource]["json"]
    assert samples
    for sample in samples:
        decoded = msgspec.json.decode(json.dumps(sample).encode(), type=SMAUG[resource])
        assert decoded.id == sample["id"]


def test_money_and_quantities_are_decimal_strings() -> None:
    lines = msgspec.json.decode(
        _body("gecko_vcr_response_bodies/purchase_order_line_items.json"),
        type=models.PurchaseOrderLineItemList,
    ).purchase_order_line_items
    assert str(lines[0].quantity) == "4999.0"
    assert str(lines[0].price) == "20.0"
    variants = msgspec.json.decode(
        _body("gecko_vcr_response_bodies/variants.json"), type=models.VariantList
    ).variants
    assert variants[0].sku == ""  # recorded variants without SKU carry "", not null
    assert str(variants[3].moving_average_cost) == "18.745"
    docs = msgspec.json.decode(
        _body("docs_examples/docs_old_procurement_2.json"), type=models.ProcurementEnvelope
    )
    assert docs.purchase_order_line_items[0].price is None
    assert docs.purchase_order_line_items[0].freeform is None


def test_strict_fields_reject_wrong_types() -> None:
    body = json.loads(_body("gecko_vcr_response_bodies/purchase_orders.json"))
    body["purchase_orders"][0]["id"] = "28381"
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(json.dumps(body).encode(), type=models.PurchaseOrderList)
    body = json.loads(_body("gecko_vcr_response_bodies/purchase_orders.json"))
    del body["purchase_orders"][0]["status"]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(json.dumps(body).encode(), type=models.PurchaseOrderList)


# -- the simulator's shapes against the recordings -------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def _recorded(name: str, key: str) -> list[dict[str, Any]]:
    data = json.loads(_body(f"gecko_vcr_response_bodies/{name}.json"))[key]
    return data if isinstance(data, list) else [data]


def _assert_same_shape(
    served: dict[str, Any], recorded: list[dict[str, Any]], allowed_extra: set[str]
) -> None:
    recorded_keys = set().union(*(r.keys() for r in recorded))
    assert recorded_keys <= served.keys(), recorded_keys - served.keys()
    assert served.keys() - recorded_keys <= allowed_extra, served.keys() - recorded_keys
    for key in recorded_keys:
        seen = {_json_type(r[key]) for r in recorded if key in r} - {"null"}
        mine = _json_type(served[key])
        if mine != "null" and seen:
            assert mine in seen, f"{key}: served {mine}, recorded {seen}"


def _smaug_keys(resource: str) -> set[str]:
    text = _body(f"smaug_locales/{resource}.en.yml").decode()
    return set(yaml.safe_load(text)["en"][resource]["attributes"])


@pytest.mark.anyio
async def test_simulator_serves_the_recorded_shapes() -> None:
    app = create_app(rate_limit=None)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
        created = await http.post(
            "/_sim/purchase_orders",
            json={"supplier": "Katana", "lines": [{"sku": "MAT-OAK-BOARD", "quantity": "2"}]},
        )
        assert created.status_code == 201
        po_id = created.json()["purchase_order"]["id"]

        async def get(path: str, key: str) -> dict[str, Any]:
            response = await http.get(path, headers=headers)
            assert response.status_code == 200, response.text
            data: Any = response.json()[key]
            record: dict[str, Any] = data[0] if isinstance(data, list) else data
            return record

        account = await get("/accounts/current", "account")
        _assert_same_shape(account, _recorded("accounts_current", "account"), set())
        company = await get("/companies", "companies")
        _assert_same_shape(company, _recorded("companies", "companies"), set())
        currency = await get("/currencies", "currencies")
        _assert_same_shape(currency, _recorded("currencies", "currencies"), set())
        variant = await get("/variants", "variants")
        _assert_same_shape(variant, _recorded("variants", "variants"), set())
        order = await get("/purchase_orders", "purchase_orders")
        _assert_same_shape(
            order, _recorded("purchase_orders", "purchase_orders"), _smaug_keys("purchase_order")
        )
        line = await get("/purchase_order_line_items", "purchase_order_line_items")
        _assert_same_shape(
            line,
            _recorded("purchase_order_line_items", "purchase_order_line_items"),
            _smaug_keys("purchase_order_line_item"),
        )
        received = await http.post(f"/purchase_orders/{po_id}/actions/receive", headers=headers)
        assert received.status_code == 201
        documented = json.loads(_body("docs_examples/docs_old_procurement_2.json"))
        _assert_same_shape(received.json()["procurement"], [documented["procurement"]], set())
