"""What syncd knows about one linked order, in the business's words, with no I/O.

A :class:`PurchaseOrderSnapshot` is the PO as first seen (only that version is synced); a
:class:`SalesOrderFacts` is what a look at the Katana sales order tells; a
:class:`LinkedOrder` is the row the store keeps for the pair.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import msgspec

__all__ = [
    "LineLink",
    "LinkedOrder",
    "PurchaseOrderLine",
    "PurchaseOrderSnapshot",
    "SalesOrderFacts",
    "SalesOrderRowFacts",
]


class PurchaseOrderLine(msgspec.Struct, kw_only=True, frozen=True):
    """One TradeGecko PO line as first seen."""

    line_id: int
    variant_id: int | None
    quantity: Decimal
    price: Decimal | None
    freeform: bool = False
    label: str | None = None
    landed_cost: Decimal | None = None
    position: int | None = None


class PurchaseOrderSnapshot(msgspec.Struct, kw_only=True, frozen=True):
    """A TradeGecko PO as syncd first saw it: the version that is synced."""

    po_id: int
    po_number: str
    status: str
    company_id: int | None
    currency_id: int | None
    created_at: datetime
    updated_at: datetime
    lines: tuple[PurchaseOrderLine, ...]


class SalesOrderRowFacts(msgspec.Struct, kw_only=True, frozen=True):
    """One live row of a Katana sales order, as a look at the order shows it."""

    variant_id: int
    quantity: Decimal
    price: Decimal | None = None


class SalesOrderFacts(msgspec.Struct, kw_only=True, frozen=True):
    """What one look at a Katana sales order says about its progress."""

    so_id: int
    order_no: str
    status: str
    production_status: str | None
    deleted: bool
    manufacturing_order_ids: tuple[int, ...] = ()
    updated_at: datetime | None = None
    #: The live rows, in order, to compare with what was imported (drift).
    rows: tuple[SalesOrderRowFacts, ...] = ()


class LineLink(msgspec.Struct, kw_only=True, frozen=True):
    """How one PO line maps to a Katana SO row, decided at import."""

    line_id: int
    sku: str
    katana_variant_id: int
    quantity: Decimal
    price: Decimal | None
    created_variant: bool = False
    cost_before: Decimal | None = None
    cost_after: Decimal | None = None


class LinkedOrder(msgspec.Struct, kw_only=True):
    """A TradeGecko PO and its Katana SO, with where the pair is in the statechart."""

    id: int
    po_id: int
    po_number: str
    state: str
    resume_state: str | None = None
    reason: str | None = None
    so_id: int | None = None
    so_number: str | None = None
    currency: str | None = None
    snapshot: PurchaseOrderSnapshot | None = None
    lines: tuple[LineLink, ...] = ()
    notes: tuple[str, ...] = ()
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: When the order entered its current state.
    state_since: datetime | None = None
