"""Every KatanaClient method against the simulator on a loopback socket, under the contract.

All traffic goes through :class:`ValidatingTransport`: each request the client sends and
each answer the simulator gives must validate against ``katana/openapi.yaml``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from katana_openapi import ValidatingTransport
from syncd import errors
from syncd.adapters.katana import KatanaClient, NewSalesOrder, NewSalesOrderRow
from syncd.ops.asgi import serving
from syncd.sim.katana import KatanaWorld, create_app

pytestmark = pytest.mark.anyio

TOKEN = "contract-token"


@pytest.fixture
async def sim(apis: Path) -> AsyncIterator[tuple[KatanaClient, ValidatingTransport, str]]:
    app = create_app(KatanaWorld(), token=TOKEN, rate_limit=(600, 60.0))
    async with serving(app) as url:
        transport = ValidatingTransport(
            httpx.AsyncHTTPTransport(), spec_path=apis / "katana" / "openapi.yaml"
        )
        async with KatanaClient(f"{url}/v1", TOKEN, transport=transport) as client:
            yield client, transport, url


async def test_every_method_validates(
    sim: tuple[KatanaClient, ValidatingTransport, str],
) -> None:
    client, transport, url = sim
    started = datetime.now(UTC) - timedelta(seconds=1)

    factory = await client.get_factory()
    assert factory.base_currency_code == "USD"
    assert factory.default_sales_location_id == 1

    assert await client.list_customers(reference_id="TG-1") == []
    customer = await client.create_customer(name="Acme", reference_id="TG-1", currency="EUR")
    assert customer.currency == "EUR"
    found = await client.list_customers(reference_id="TG-1")
    assert [c.id for c in found] == [customer.id]
    assert [c.id for c in await client.list_customers(name="Acme")] == [customer.id]

    product = await client.create_product(
        name="Brass bell", sku="BELL-1", sales_price=Decimal("12.50"), purchase_price=None
    )
    bell = product.variants[0]
    assert bell.sku == "BELL-1"
    assert bell.sales_price == Decimal("12.50")
    variants = await client.list_variants(skus=["BELL-1", "CHAIR-OAK"])
    assert {v.sku for v in variants} == {"BELL-1", "CHAIR-OAK"}
    chair = next(v for v in variants if v.sku == "CHAIR-OAK")
    assert await client.list_variants(skus=["BELL-1"], include_deleted=True)

    order = await client.create_sales_order(
        NewSalesOrder(
            customer_id=customer.id,
            order_no="PO0435",
            customer_ref="PO0435",
            additional_info="from TradeGecko",
            sales_order_rows=[
                NewSalesOrderRow(variant_id=chair.id, quantity=Decimal("2")),
                NewSalesOrderRow(
                    variant_id=bell.id, quantity=Decimal("1.5"), price_per_unit=Decimal("9.99")
                ),
            ],
        )
    )
    assert order.order_no == "PO0435"
    assert order.status == "NOT_SHIPPED"
    assert order.production_status == "NONE"
    assert order.sales_order_rows[0].price_per_unit == Decimal("180")
    assert order.sales_order_rows[1].quantity == Decimal("1.5")
    assert order.sales_order_rows[1].price_per_unit == Decimal("9.99")

    fetched = await client.get_sales_order(order.id)
    assert fetched.id == order.id
    with pytest.raises(errors.NotFound):
        await client.get_sales_order(999_999)

    assert [o.id for o in await client.list_sales_orders(order_no="PO0435")] == [order.id]
    assert [o.id for o in await client.list_sales_orders(ids=[order.id])] == [order.id]
    assert [o.id for o in await client.list_sales_orders(updated_at_min=started)] == [order.id]
    assert await client.list_sales_orders(include_deleted=True)

    rows = await client.list_sales_order_rows([order.id], include_deleted=True)
    assert {r.sales_order_id for r in rows} == {order.id}

    # The workshop presses "Make to order" (through the control panel, not the API).
    async with httpx.AsyncClient(base_url=url) as people:
        made = await people.post(f"/_sim/sales_orders/{order.id}/make_to_order")
        assert made.status_code == 200
    mos = await client.list_manufacturing_orders(updated_at_min=started)
    assert {mo.sales_order_row_id for mo in mos} == {r.id for r in rows}
    assert all(mo.is_linked_to_sales_order for mo in mos)
    assert await client.list_manufacturing_orders(ids=[mos[0].id], include_deleted=True)

    inventory = await client.list_inventory([chair.id, bell.id])
    assert {(r.variant_id, r.location_id) for r in inventory} == {(chair.id, 1), (bell.id, 1)}
    assert all(isinstance(r.average_cost, Decimal) for r in inventory)

    assert transport.violations == []
    assert {
        "getFactory",
        "getAllCustomers",
        "createCustomer",
        "createProduct",
        "getAllVariants",
        "createSalesOrder",
        "getSalesOrder",
        "getAllSalesOrders",
        "getAllSalesOrderRows",
        "getAllManufacturingOrders",
        "getAllInventoryPoint",
    } <= set(transport.checked)


async def test_validator_catches_undeclared_filters(
    sim: tuple[KatanaClient, ValidatingTransport, str],
) -> None:
    _, transport, url = sim
    transport.strict = False
    async with httpx.AsyncClient(
        base_url=f"{url}/v1",
        transport=transport,
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as raw:
        await raw.get("/inventory", params={"variant_ids": 1})
    assert transport.violations
    assert "getAllInventoryPoint" in transport.violations[0]
    assert "variant_ids" in transport.violations[0]


async def test_make_to_order_and_recipes_validate(
    sim: tuple[KatanaClient, ValidatingTransport, str],
) -> None:
    client, transport, _ = sim
    customer = await client.create_customer(name="Acme")
    bell = (await client.create_product(name="Brass bell", sku="BELL-1")).variants[0]
    (chair,) = await client.list_variants(skus=["CHAIR-OAK"])
    assert {r.ingredient_variant_id for r in await client.list_bom_rows(chair.id)}
    # A product made through the API has no recipe.
    assert await client.list_bom_rows(bell.id) == []
    order = await client.create_sales_order(
        NewSalesOrder(
            customer_id=customer.id,
            order_no="PO0436",
            sales_order_rows=[
                NewSalesOrderRow(variant_id=chair.id, quantity=Decimal("2")),
                NewSalesOrderRow(variant_id=bell.id, quantity=Decimal("1")),
            ],
        )
    )
    chair_row, bell_row = order.sales_order_rows
    mo = await client.make_to_order(chair_row.id, create_subassemblies=True)
    assert (mo.sales_order_id, mo.sales_order_row_id) == (order.id, chair_row.id)
    assert mo.planned_quantity == Decimal("2")
    # The spec documents no refusal for a variant without a recipe: Katana makes an MO with
    # no ingredients, and the simulator does the same (syncd reads the recipe first).
    empty = await client.make_to_order(bell_row.id)
    assert empty.sales_order_row_id == bell_row.id
    rows = {r.id: r for r in (await client.get_sales_order(order.id)).sales_order_rows}
    assert rows[chair_row.id].linked_manufacturing_order_id == mo.id
    assert rows[bell_row.id].linked_manufacturing_order_id == empty.id
    assert transport.violations == []
    assert {"makeToOrderManufacturingOrder", "getAllBomRows"} <= set(transport.checked)
