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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from syncd.domain import triggers
from syncd.domain.orders import (
    LineLink,
    PurchaseOrderLine,
    PurchaseOrderSnapshot,
    SalesOrderFacts,
    SalesOrderRowFacts,
)

__all__ = [
    "DELIVERED",
    "PARTIALLY_DELIVERED",
    "PO_WITHDRAWN",
    "PRODUCTION_DONE",
    "PRODUCTION_UNDERWAY",
    "Drift",
    "Signal",
    "cost_update",
    "delivery_can_move",
    "lines_to_import",
    "order_number_for",
    "pick_average_cost",
    "purchase_order_drift",
    "purchase_order_signal",
    "purchase_order_trigger",
    "sales_order_drift",
    "sales_order_notes",
    "sales_order_signal",
    "sales_order_trigger",
]

#: Katana's sales order status once goods have gone out.
DELIVERED = "DELIVERED"
#: Production statuses that mean nothing is left to make (or nothing was ever made).
PRODUCTION_DONE = frozenset({"DONE", "NONE", "NOT_APPLICABLE"})
#: Production statuses that mean work has begun.
PRODUCTION_UNDERWAY = frozenset({"IN_PROGRESS", "BLOCKED", "DONE"})
#: Katana's sales order status once some, not all, goods have gone out.
PARTIALLY_DELIVERED = "PARTIALLY_DELIVERED"
#: TradeGecko PO statuses that withdraw the order.
PO_WITHDRAWN = frozenset({"void", "deleted", "archived"})


@dataclass(frozen=True)
class Drift:
    """One edit found after import, never copied across: on which side, and what changed.

    ``str()`` is the note the order keeps (``drift in Katana: SO TG-PO1 CHAIR price 150 →
    99``).
    """

    side: Literal["tradegecko", "katana"]
    text: str

    def __str__(self) -> str:
        return f"drift in {'TradeGecko' if self.side == 'tradegecko' else 'Katana'}: {self.text}"


@dataclass(frozen=True)
class Signal:
    """What a look at a service says to the statechart: the triggers to try, in order (the
    first that applies wins), and the cause the history shows."""

    triggers: tuple[str, ...]
    cause: str


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
        return (triggers.SO_DELETED,)
    production = facts.production_status or "NONE"
    if facts.status == DELIVERED and production in PRODUCTION_DONE:
        return (triggers.SO_DELIVERED,)
    if production in PRODUCTION_UNDERWAY or facts.manufacturing_order_ids:
        return (triggers.PRODUCTION_STARTED,)
    return ()


def delivery_can_move(
    resource: str,
    status: str | None,
    *,
    deleted: bool,
    allows: Callable[[str], bool],
    so_status: str | None = None,
) -> bool:
    """Whether a Katana webhook delivery saying ``status`` of a ``resource`` could move the
    order, whose chart ``allows`` some triggers: only then is the object worth a re-fetch.

    A sales order's delivery carries the SO's status, not its production (the MOs'
    deliveries tell that), so the status is tried with no production known; a status that
    leaves a note for a person (partial delivery) counts too. A manufacturing order's
    delivery carries the production, not the SO's status, so every SO status the rules tell
    apart is tried, or only ``so_status`` when the SO's last known status is given. No
    status, a deleted MO, or another resource: it cannot tell, so yes.
    """

    def facts(so_status: str, production: str | None, mos: tuple[int, ...]) -> SalesOrderFacts:
        return SalesOrderFacts(
            so_id=0,
            order_no="",
            status=so_status,
            production_status=production,
            deleted=deleted,
            manufacturing_order_ids=mos,
        )

    if resource == "sales_order" and (status is not None or deleted):
        seen = facts(status or "", None, ())
        return any(map(allows, sales_order_trigger(seen))) or bool(sales_order_notes(seen))
    if resource == "manufacturing_order" and status is not None and not deleted:
        # An MO's delivery means the SO has a manufacturing order behind it.
        return any(
            allows(trigger)
            for known in ((DELIVERED, "") if so_status is None else (so_status,))
            for trigger in sales_order_trigger(facts(known, status, (0,)))
        )
    return True


def purchase_order_trigger(status: str) -> str | None:
    """The trigger a TradeGecko PO status fires for an order already linked."""
    if status in PO_WITHDRAWN:
        return triggers.PO_WITHDRAWN
    return None


def sales_order_signal(facts: SalesOrderFacts) -> Signal:
    """What a look at the sales order says to the statechart."""
    production = facts.production_status or "none"
    cause = f"Katana SO {facts.order_no}: {facts.status}, production {production}" + (
        " (deleted)" if facts.deleted else ""
    )
    return Signal(tuple(sales_order_trigger(facts)), cause)


def purchase_order_signal(status: str) -> Signal:
    """What a linked PO's status in TradeGecko says to the statechart."""
    trigger = purchase_order_trigger(status)
    return Signal((trigger,) if trigger else (), f"TradeGecko PO is {status}")


def sales_order_notes(facts: SalesOrderFacts) -> list[str]:
    """What a look at the SO says that moves nothing but a person should see.

    A partly delivered SO waits: TradeGecko receives whole POs only.
    """
    if facts.status == PARTIALLY_DELIVERED and not facts.deleted:
        return [
            f"Katana SO {facts.order_no} is partially delivered: waiting for the whole "
            "delivery (TradeGecko receives whole POs only)"
        ]
    return []


def _number(value: Decimal | None) -> str:
    return "none" if value is None else f"{value.normalize():f}"


def purchase_order_drift(
    snapshot: PurchaseOrderSnapshot, current: Iterable[PurchaseOrderLine]
) -> list[Drift]:
    """How the PO now differs from the snapshot that was synced (lines, quantities, prices).

    Edits after import are never copied to Katana; they are recorded as drift.
    """
    first = {line.line_id: line for line in snapshot.lines}
    now = {line.line_id: line for line in current}
    drift: list[Drift] = []
    for line_id, before in first.items():
        after = now.get(line_id)
        if after is None:
            drift.append(Drift("tradegecko", f"line {line_id} removed"))
            continue
        if after.variant_id != before.variant_id:
            drift.append(
                Drift(
                    "tradegecko", f"line {line_id} variant {before.variant_id} → {after.variant_id}"
                )
            )
        if after.quantity != before.quantity:
            drift.append(
                Drift(
                    "tradegecko",
                    f"line {line_id} quantity {_number(before.quantity)} → "
                    f"{_number(after.quantity)}",
                )
            )
        if after.price != before.price:
            drift.append(
                Drift(
                    "tradegecko",
                    f"line {line_id} price {_number(before.price)} → {_number(after.price)}",
                )
            )
    for line_id, after in now.items():
        if line_id not in first:
            drift.append(
                Drift(
                    "tradegecko",
                    f"line {line_id} added (variant {after.variant_id}, "
                    f"quantity {_number(after.quantity)}, price {_number(after.price)})",
                )
            )
    return drift


def sales_order_drift(
    lines: Sequence[LineLink], rows: Sequence[SalesOrderRowFacts], order_no: str
) -> list[Drift]:
    """How the SO's live rows differ from what the import made of the PO lines.

    Rows are matched to lines in order by Katana variant (the same variant may be on two
    rows); a line with no row left was deleted, a row with no line was added.
    """
    if not lines:
        return []
    left = list(rows)
    drift: list[Drift] = []
    for line in lines:
        index = next(
            (i for i, row in enumerate(left) if row.variant_id == line.katana_variant_id), None
        )
        if index is None:
            drift.append(Drift("katana", f"SO {order_no} row for {line.sku} removed"))
            continue
        row = left.pop(index)
        if row.quantity != line.quantity:
            drift.append(
                Drift(
                    "katana",
                    f"SO {order_no} {line.sku} quantity "
                    f"{_number(line.quantity)} → {_number(row.quantity)}",
                )
            )
        if line.price is not None and row.price is not None and row.price != line.price:
            drift.append(
                Drift(
                    "katana",
                    f"SO {order_no} {line.sku} price {_number(line.price)} → {_number(row.price)}",
                )
            )
    drift.extend(
        Drift(
            "katana",
            f"SO {order_no} row added (variant {row.variant_id}, quantity {_number(row.quantity)})",
        )
        for row in left
    )
    return drift
