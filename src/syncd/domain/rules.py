"""The mapping rules between a TradeGecko PO and a Katana SO, as pure functions.

- Every PO line with a variant becomes one SO row: same quantity, price per unit = the line's
  item cost, no tax rate. Freeform lines and landed-cost shares are left out, and noted.
- The SO is numbered after the PO (``order_number_for``) so the import can look it up before
  creating it: a crash between the create and its record cannot make a second SO.
- On receipt each line's cost becomes the variant's Katana average cost, unless that cost is
  0 or unknown, in which case the line keeps its price.
- What a look at the SO means for the order (``sales_order_trigger``) and what a PO status
  means (``purchase_order_trigger``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal

from syncd.domain.orders import PurchaseOrderLine, PurchaseOrderSnapshot, SalesOrderFacts

__all__ = [
    "DELIVERED",
    "PO_WITHDRAWN",
    "PRODUCTION_DONE",
    "PRODUCTION_UNDERWAY",
    "cost_update",
    "lines_to_import",
    "order_number_for",
    "pick_average_cost",
    "purchase_order_trigger",
    "sales_order_trigger",
]

#: Katana's sales order status once goods have gone out.
DELIVERED = "DELIVERED"
#: Production statuses that mean nothing is left to make (or nothing was ever made).
PRODUCTION_DONE = frozenset({"DONE", "NONE", "NOT_APPLICABLE"})
#: Production statuses that mean work has begun.
PRODUCTION_UNDERWAY = frozenset({"IN_PROGRESS", "BLOCKED", "DONE"})
#: TradeGecko PO statuses that withdraw the order.
PO_WITHDRAWN = frozenset({"void", "deleted", "archived"})


def order_number_for(po_number: str, prefix: str) -> str:
    """The Katana ``order_no`` that names a TradeGecko PO, e.g. ``TG-PO0435``."""
    return f"{prefix}{po_number}"


def lines_to_import(
    snapshot: PurchaseOrderSnapshot,
) -> tuple[list[PurchaseOrderLine], list[str]]:
    """The lines that become SO rows, in PO order, and notes on what was left out."""
    rows: list[PurchaseOrderLine] = []
    notes: list[str] = []
    ordered = sorted(
        snapshot.lines, key=lambda line: (line.position is None, line.position, line.line_id)
    )
    for line in ordered:
        if line.freeform or line.variant_id is None:
            notes.append(
                f"line {line.line_id} ({line.label or 'freeform'}) has no variant: left out"
            )
            continue
        rows.append(line)
        if line.landed_cost:
            notes.append(
                f"line {line.line_id}: landed cost {line.landed_cost} left out of the SO price"
            )
    return rows, notes


def pick_average_cost(
    records: Iterable[tuple[int, Decimal | None, Decimal | None]], location_id: int | None
) -> Decimal | None:
    """The average cost to use from Katana inventory records ``(location, cost, in stock)``.

    The record at the sales order's location wins, even when its cost is 0 or null; without
    one, the stock-weighted mean of
    the locations that hold stock; when no location holds stock (the made goods have just
    been delivered), the plain mean of the costs Katana still records; with no cost
    anywhere, ``None``.
    """
    records = list(records)
    for location, cost, _ in records:
        if location == location_id:
            # Katana's own answer for where the goods are: 0 or null means keep the price.
            return cost if cost else None
    weighted = [(cost, qty) for _, cost, qty in records if cost and qty and qty > 0]
    total = sum((qty for _, qty in weighted), Decimal(0))
    if weighted and total:
        return sum((cost * qty for cost, qty in weighted), Decimal(0)) / total
    costs = [cost for _, cost, _ in records if cost]
    if not costs:
        return None
    return sum(costs, Decimal(0)) / len(costs)


def cost_update(current: Decimal | None, average_cost: Decimal | None) -> Decimal | None:
    """The new item cost of a PO line, or ``None`` to keep the line as it is.

    Keeps the price when Katana's average cost is 0 or unknown, or already equal.
    """
    if average_cost is None or average_cost == 0:
        return None
    cost = average_cost.quantize(Decimal("0.0001")).normalize()
    if cost == 0:
        # Below the precision kept: a price of 0 is exactly what the rule keeps out.
        return None
    if current is not None and current == cost:
        return None
    return cost


def sales_order_trigger(facts: SalesOrderFacts) -> Sequence[str]:
    """The triggers a look at the sales order fires, in the order to try them.

    Both are offered when the order is delivered, so an order that skipped the production
    state (made from stock, or the look came late) still arrives.
    """
    if facts.deleted:
        return ("so_deleted",)
    production = facts.production_status or "NONE"
    if facts.status == DELIVERED and production in PRODUCTION_DONE:
        return ("so_delivered",)
    if production in PRODUCTION_UNDERWAY or facts.manufacturing_order_ids:
        return ("production_started",)
    return ()


def purchase_order_trigger(status: str) -> str | None:
    """The trigger a TradeGecko PO status fires for an order already linked."""
    if status in PO_WITHDRAWN:
        return "po_withdrawn"
    return None
