"""The Katana records syncd reads and the request bodies it sends, as msgspec structs.

Decoding is tolerant of fields Katana adds (unknown keys are ignored) and strict on the
fields syncd relies on: a missing ``id`` or a quantity that is not a number fails loudly.
Money and quantities are :class:`~decimal.Decimal`, decoded from Katana's decimal strings
(``"599.9900000000"``) or JSON numbers alike, never through ``float``. Request bodies leave
out every optional field that is ``None``, because Katana rejects ``null`` for optional ids,
and encode decimals as JSON numbers, which is how ``CreateSalesOrderRequest`` types them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Generic, TypeVar

import msgspec

__all__ = [
    "BomRow",
    "Customer",
    "Factory",
    "InventoryRecord",
    "ListEnvelope",
    "ManufacturingOrder",
    "NewCustomer",
    "NewMakeToOrder",
    "NewProduct",
    "NewSalesOrder",
    "NewSalesOrderRow",
    "NewVariant",
    "NewWebhook",
    "Product",
    "SalesOrder",
    "SalesOrderRow",
    "Variant",
    "Webhook",
    "encode_request",
]

T = TypeVar("T")


class Factory(msgspec.Struct, kw_only=True):
    """The account's settings (``GET /factory``): base currency and default locations."""

    base_currency_code: str
    default_sales_location_id: int | None = None
    default_manufacturing_location_id: int | None = None
    display_name: str | None = None


class Customer(msgspec.Struct, kw_only=True):
    """A customer; syncd keeps one per TradeGecko account, found by ``reference_id``."""

    id: int
    name: str
    reference_id: str | None = None
    currency: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


class Variant(msgspec.Struct, kw_only=True):
    """A sellable or buyable SKU of a product or material.

    The spec gives variants no archived state of their own (``archived_at`` lives on the
    parent product or material); ``deleted_at`` is the only lifecycle field here.
    """

    id: int
    sku: str | None = None
    product_id: int | None = None
    material_id: int | None = None
    type: str | None = None
    sales_price: Decimal | None = None
    purchase_price: Decimal | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


class Product(msgspec.Struct, kw_only=True):
    """A finished good and its variants (the answer to ``POST /products``)."""

    id: int
    name: str
    variants: list[Variant] = msgspec.field(default_factory=list)
    archived_at: datetime | None = None
    deleted_at: datetime | None = None


class SalesOrderRow(msgspec.Struct, kw_only=True):
    """One line of a sales order; ``linked_manufacturing_order_id`` is set by make-to-order."""

    id: int
    sales_order_id: int | None = None
    variant_id: int
    quantity: Decimal
    price_per_unit: Decimal | None = None
    tax_rate_id: int | None = None
    location_id: int | None = None
    linked_manufacturing_order_id: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


class SalesOrder(msgspec.Struct, kw_only=True):
    """A Katana sales order.

    ``sales_order_rows`` nested here never include deleted rows, even with
    ``include_deleted``: use :meth:`KatanaClient.list_sales_order_rows` for those.
    """

    id: int
    order_no: str
    customer_id: int
    status: str
    production_status: str | None = None
    currency: str | None = None
    location_id: int | None = None
    customer_ref: str | None = None
    additional_info: str | None = None
    #: Create-only (no update changes them): who made the order outside Katana, and its id
    #: there; syncd's natural key (see :class:`NewSalesOrder`).
    ecommerce_order_type: str | None = None
    ecommerce_store_name: str | None = None
    ecommerce_order_id: str | None = None
    total: Decimal | None = None
    sales_order_rows: list[SalesOrderRow] = msgspec.field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


class ManufacturingOrder(msgspec.Struct, kw_only=True):
    """A manufacturing order; make-to-order ones carry their sales order and row."""

    id: int
    status: str
    order_no: str | None = None
    variant_id: int
    planned_quantity: Decimal | None = None
    actual_quantity: Decimal | None = None
    sales_order_id: int | None = None
    sales_order_row_id: int | None = None
    is_linked_to_sales_order: bool | None = None
    total_cost: Decimal | None = None
    done_date: datetime | None = None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


class BomRow(msgspec.Struct, kw_only=True):
    """One ingredient of a product variant's recipe (bill of materials)."""

    id: str
    product_variant_id: int
    ingredient_variant_id: int
    quantity: Decimal | None = None


class InventoryRecord(msgspec.Struct, kw_only=True):
    """Stock of one variant at one location, with its moving average cost."""

    variant_id: int
    location_id: int
    average_cost: Decimal | None = None
    quantity_in_stock: Decimal | None = None


class Webhook(msgspec.Struct, kw_only=True):
    """A webhook subscription; ``token`` keys the ``X-Sha2-Signature`` of its deliveries."""

    id: int
    url: str
    token: str | None = None
    enabled: bool = True
    subscribed_events: list[str] = []
    description: str | None = None


class ListEnvelope(msgspec.Struct, Generic[T]):
    """Katana's list envelope ``{"data": [...]}``."""

    data: list[T]


# -- request bodies ----------------------------------------------------------------------


class NewSalesOrderRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A row of :class:`NewSalesOrder`; without ``price_per_unit`` Katana uses the default."""

    variant_id: int
    quantity: Decimal
    price_per_unit: Decimal | None = None


class NewSalesOrder(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of ``POST /sales_orders``."""

    customer_id: int
    order_no: str
    sales_order_rows: list[NewSalesOrderRow]
    currency: str | None = None
    location_id: int | None = None
    customer_ref: str | None = None
    additional_info: str | None = None
    #: The source platform, its store and the order's id there: set at creation only, so a
    #: person cannot edit them (``order_no`` they can), and ``GET /sales_orders`` filters
    #: on each.
    ecommerce_order_type: str | None = None
    ecommerce_store_name: str | None = None
    ecommerce_order_id: str | None = None


class NewCustomer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of ``POST /customers``."""

    name: str
    reference_id: str | None = None
    currency: str | None = None


class NewVariant(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A variant inside :class:`NewProduct`."""

    sku: str
    sales_price: Decimal | None = None
    purchase_price: Decimal | None = None


class NewProduct(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of ``POST /products``."""

    name: str
    variants: list[NewVariant]


class NewMakeToOrder(msgspec.Struct, kw_only=True):
    """The body of ``POST /manufacturing_order_make_to_order``."""

    sales_order_row_id: int
    create_subassemblies: bool = False


class NewWebhook(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of ``POST /webhooks``; Katana wants an ``https://`` URL."""

    url: str
    subscribed_events: list[str]
    enabled: bool = True
    description: str | None = None


_ENCODER = msgspec.json.Encoder(decimal_format="number")


def encode_request(body: msgspec.Struct) -> bytes:
    """JSON for a request body: ``None`` fields left out, decimals as JSON numbers."""
    return _ENCODER.encode(body)
