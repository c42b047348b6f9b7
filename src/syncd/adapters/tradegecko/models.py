"""The TradeGecko records syncd reads, as msgspec structs.

Only the fields syncd uses are declared; every other field the API sends is ignored, so a
new or unexpected field never breaks decoding. The declared fields are strict: ids are
integers, money and quantities are :class:`~decimal.Decimal` decoded from TradeGecko's
decimal strings (never through a float), and times are timezone-aware datetimes.

The shapes follow the recorded responses of the real API (``gecko_vcr_response_bodies``) and
the documentation examples, which disagree in places: the older documented purchase order
has no ``currency_id``, ``total`` or ``received_at``, documented line items have
``price: null`` and ``freeform: null``, and recorded variants carry ``sku: ""`` when they
have no SKU. Fields that were seen missing or null are optional here.

Envelopes wrap a record the way the API does: ``{"purchase_order": {...}}`` for one,
``{"purchase_orders": [...]}`` for a list, with side-loaded records as extra top-level
arrays and, on some lists, a ``meta`` object.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import msgspec

__all__ = [
    "Account",
    "AccountEnvelope",
    "Company",
    "CompanyList",
    "Currency",
    "CurrencyList",
    "ListMeta",
    "Procurement",
    "ProcurementEnvelope",
    "ProcurementList",
    "PurchaseOrder",
    "PurchaseOrderEnvelope",
    "PurchaseOrderLineItem",
    "PurchaseOrderLineItemList",
    "PurchaseOrderList",
    "Variant",
    "VariantEnvelope",
    "VariantList",
    "Webhook",
    "WebhookEnvelope",
    "WebhookList",
    "WebhookNotification",
]


class Account(msgspec.Struct, kw_only=True, frozen=True):
    """The TradeGecko account; ``default_currency_id`` is its base currency."""

    id: int
    name: str | None = None
    default_currency_id: int | None = None
    primary_location_id: int | None = None


class Company(msgspec.Struct, kw_only=True, frozen=True):
    """A company: ``company_type`` is ``business``, ``supplier`` or ``consumer``."""

    id: int
    name: str
    company_type: str | None = None
    status: str | None = None


class Currency(msgspec.Struct, kw_only=True, frozen=True):
    """A currency of the account; ``rate`` is against the account's base currency."""

    id: int
    iso: str
    rate: Decimal | None = None


class Variant(msgspec.Struct, kw_only=True, frozen=True):
    """A sellable or purchasable variant of a product.

    ``sku`` is ``""`` (seen in recordings) or ``None`` when the variant has no SKU.
    """

    id: int
    product_id: int | None = None
    sku: str | None = None
    product_name: str | None = None
    name: str | None = None
    buy_price: Decimal | None = None
    moving_average_cost: Decimal | None = None
    stock_on_hand: Decimal | None = None
    status: str | None = None


class PurchaseOrder(msgspec.Struct, kw_only=True, frozen=True):
    """A purchase order to a supplier (``company_id``).

    ``status`` is one of ``draft``, ``active``, ``received``, ``void``, ``deleted``;
    ``procurement_status`` ``unprocured``, ``partial`` or ``procured``.
    """

    id: int
    company_id: int | None = None
    order_number: str | None = None
    status: str
    procurement_status: str | None = None
    currency_id: int | None = None
    stock_location_id: int | None = None
    total: Decimal | None = None
    purchase_order_line_item_ids: list[int]
    procurement_ids: list[int]
    created_at: datetime
    updated_at: datetime
    received_at: datetime | None = None


class PurchaseOrderLineItem(msgspec.Struct, kw_only=True, frozen=True):
    """One line of a purchase order; a ``freeform`` line is text with no variant."""

    id: int
    purchase_order_id: int
    variant_id: int | None = None
    quantity: Decimal
    price: Decimal | None = None
    freeform: bool | None = None
    label: str | None = None
    extra_cost_value: Decimal | None = None
    base_price: Decimal | None = None
    position: int | None = None
    tax_type_id: int | None = None
    tax_rate_override: Decimal | None = None
    procurement_id: int | None = None


class Procurement(msgspec.Struct, kw_only=True, frozen=True):
    """A receipt of purchase order lines into stock."""

    id: int
    purchase_order_id: int
    purchase_order_line_item_ids: list[int]
    received_at: datetime | None = None
    created_at: datetime | None = None


class ListMeta(msgspec.Struct, kw_only=True, frozen=True):
    """The ``meta`` object some lists carry."""

    total: int | None = None


class WebhookNotification(msgspec.Struct, kw_only=True, frozen=True):
    """A webhook delivery body: thin, re-fetch ``resource_url`` before acting."""

    object_id: int
    event: str
    timestamp: int | None = None
    resource_url: str | None = None


class Webhook(msgspec.Struct, kw_only=True, frozen=True):
    """A webhook subscription: one ``event`` delivered to ``address``."""

    id: int
    address: str
    event: str
    created_at: datetime | None = None
    updated_at: datetime | None = None


# -- envelopes -------------------------------------------------------------------------


class AccountEnvelope(msgspec.Struct, kw_only=True, frozen=True):
    account: Account


class CompanyList(msgspec.Struct, kw_only=True, frozen=True):
    companies: list[Company]
    meta: ListMeta | None = None


class CurrencyList(msgspec.Struct, kw_only=True, frozen=True):
    currencies: list[Currency]
    meta: ListMeta | None = None


class VariantEnvelope(msgspec.Struct, kw_only=True, frozen=True):
    variant: Variant


class VariantList(msgspec.Struct, kw_only=True, frozen=True):
    variants: list[Variant]
    meta: ListMeta | None = None


class PurchaseOrderEnvelope(msgspec.Struct, kw_only=True, frozen=True):
    """One purchase order, with its lines when fetched with ``include=``."""

    purchase_order: PurchaseOrder
    purchase_order_line_items: list[PurchaseOrderLineItem] = []


class PurchaseOrderList(msgspec.Struct, kw_only=True, frozen=True):
    purchase_orders: list[PurchaseOrder]
    meta: ListMeta | None = None


class PurchaseOrderLineItemList(msgspec.Struct, kw_only=True, frozen=True):
    purchase_order_line_items: list[PurchaseOrderLineItem]
    meta: ListMeta | None = None


class ProcurementEnvelope(msgspec.Struct, kw_only=True, frozen=True):
    """One procurement, as the receive action answers, with any side-loaded lines."""

    procurement: Procurement
    purchase_order_line_items: list[PurchaseOrderLineItem] = []


class ProcurementList(msgspec.Struct, kw_only=True, frozen=True):
    procurements: list[Procurement]
    purchase_order_line_items: list[PurchaseOrderLineItem] = []
    meta: ListMeta | None = None


class WebhookEnvelope(msgspec.Struct, kw_only=True, frozen=True):
    webhook: Webhook


class WebhookList(msgspec.Struct, kw_only=True, frozen=True):
    webhooks: list[Webhook]
    meta: ListMeta | None = None
