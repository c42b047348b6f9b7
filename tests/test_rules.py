"""The mapping rules between a TradeGecko PO and a Katana SO."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from syncd.domain.orders import (
    LineLink,
    PurchaseOrderLine,
    PurchaseOrderSnapshot,
    SalesOrderFacts,
    SalesOrderRowFacts,
)
from syncd.domain.rules import (
    Drift,
    Signal,
    cost_update,
    delivery_can_move,
    lines_to_import,
    order_number_for,
    pick_average_cost,
    purchase_order_drift,
    purchase_order_signal,
    purchase_order_trigger,
    sales_order_drift,
    sales_order_signal,
    sales_order_trigger,
)
from syncd.domain.statechart import load_statechart

D = Decimal
WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _line(line_id: int, **kwargs: object) -> PurchaseOrderLine:
    fields: dict[str, object] = {
        "variant_id": 100 + line_id,
        "quantity": D("2"),
        "price": D("9.50"),
    }
    fields.update(kwargs)
    return PurchaseOrderLine(line_id=line_id, **fields)  # type: ignore[arg-type]


def _snapshot(*lines: PurchaseOrderLine) -> PurchaseOrderSnapshot:
    return PurchaseOrderSnapshot(
        po_id=1,
        po_number="PO0435",
        status="active",
        company_id=7,
        currency_id=3,
        created_at=WHEN,
        updated_at=WHEN,
        lines=lines,
    )


# -- order_number_for -------------------------------------------------------------------------


def test_order_number_is_the_prefix_and_the_po_number() -> None:
    assert order_number_for("PO0435", "TG-") == "TG-PO0435"
    assert order_number_for("PO0435", "") == "PO0435"
    assert order_number_for("PO0435", "TG-") != order_number_for("PO0436", "TG-")


# -- lines_to_import ------------------------------------------------------------------------


def test_lines_to_import_follows_position_then_line_id() -> None:
    snapshot = _snapshot(
        _line(1, position=3),
        _line(2, position=None),
        _line(3, position=1),
        _line(4, position=2),
        _line(5, position=None),
    )
    rows, notes = lines_to_import(snapshot)
    assert [row.line_id for row in rows] == [3, 4, 1, 2, 5]
    assert notes == []


def test_freeform_and_variantless_lines_are_left_out_with_a_note() -> None:
    snapshot = _snapshot(
        _line(1, position=1),
        _line(2, position=2, freeform=True, variant_id=None, label="Shipping"),
        _line(3, position=3, variant_id=None),
        _line(4, position=4),
    )
    rows, notes = lines_to_import(snapshot)
    assert [row.line_id for row in rows] == [1, 4]
    assert rows[0] is snapshot.lines[0]
    assert notes == [
        "line 2 (Shipping) has no variant: left out",
        "line 3 (freeform) has no variant: left out",
    ]


def test_a_freeform_line_is_left_out_even_with_a_variant() -> None:
    rows, notes = lines_to_import(_snapshot(_line(1, freeform=True, label="Setup fee")))
    assert rows == []
    assert notes == ["line 1 (Setup fee) has no variant: left out"]


def test_landed_cost_is_noted_but_the_line_is_imported() -> None:
    snapshot = _snapshot(
        _line(1, landed_cost=D("1.25")),
        _line(2, landed_cost=D("0")),
        _line(3, landed_cost=None),
    )
    rows, notes = lines_to_import(snapshot)
    assert [row.line_id for row in rows] == [1, 2, 3]
    assert rows[0].price == D("9.50")
    assert notes == ["line 1: landed cost 1.25 left out of the SO price"]


# -- pick_average_cost ----------------------------------------------------------------------


def test_the_record_at_the_orders_location_wins() -> None:
    records = [(1, D("10"), D("5")), (2, D("20"), D("1")), (3, D("30"), D("100"))]
    assert pick_average_cost(records, 2) == D("20")


def test_a_zero_or_null_cost_at_the_location_keeps_the_price() -> None:
    assert pick_average_cost([(1, D("10"), D("5")), (2, D("0"), D("5"))], 2) is None
    assert pick_average_cost([(1, D("10"), D("5")), (2, None, D("5"))], 2) is None


def test_without_a_location_match_the_mean_is_weighted_by_stock() -> None:
    records = [
        (1, D("10"), D("1")),
        (2, D("20"), D("3")),
        (3, D("0"), D("50")),  # no cost: ignored
        (4, D("99"), D("0")),  # no stock: ignored
        (5, D("99"), None),  # unknown stock: ignored
    ]
    result = pick_average_cost(records, None)
    assert result == D("17.5")
    assert isinstance(result, Decimal)
    assert pick_average_cost(records, 42) == D("17.5")


def test_without_stock_anywhere_the_plain_mean_of_known_costs() -> None:
    records = [(1, D("10"), D("0")), (2, D("20"), None), (3, None, D("0")), (4, D("0"), None)]
    assert pick_average_cost(records, None) == D("15")


@pytest.mark.parametrize(
    "records",
    [
        [],
        [(1, D("0"), D("5")), (2, None, D("3"))],
        [(1, None, None), (2, D("0"), D("0"))],
    ],
)
def test_no_cost_anywhere_is_none(
    records: list[tuple[int, Decimal | None, Decimal | None]],
) -> None:
    assert pick_average_cost(records, None) is None


def test_the_weighted_mean_is_exact_decimal_arithmetic() -> None:
    result = pick_average_cost([(1, D("0.1"), D("1")), (2, D("0.2"), D("1"))], None)
    assert result == D("0.15")
    assert isinstance(result, Decimal)


# -- cost_update ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "average"),
    [
        (D("9.50"), D("0")),
        (D("9.50"), D("0.00")),
        (D("9.50"), None),
        (None, None),
        (D("12.50"), D("12.5")),
        (D("12.3457"), D("12.345678")),  # equal at the precision kept
        (D("9.50"), D("0.00001")),  # rounds to 0: never set a price of 0
    ],
)
def test_cost_update_keeps_the_price(current: Decimal | None, average: Decimal | None) -> None:
    assert cost_update(current, average) is None


@pytest.mark.parametrize(
    ("current", "average", "expected"),
    [
        (D("9.50"), D("11.25"), D("11.25")),
        (None, D("11.25"), D("11.25")),
        (D("10"), D("12.345678"), D("12.3457")),
        (D("10"), D("0.1") + D("0.2"), D("0.3")),
        (D("10"), D("7.10000"), D("7.1")),
    ],
)
def test_cost_update_returns_the_new_cost_exactly(
    current: Decimal | None, average: Decimal, expected: Decimal
) -> None:
    result = cost_update(current, average)
    assert type(result) is Decimal
    assert result == expected
    assert format(result, "f") == format(expected, "f")


# -- sales_order_trigger --------------------------------------------------------------------


def _facts(
    status: str = "NOT_SHIPPED",
    production: str | None = "NOT_STARTED",
    *,
    deleted: bool = False,
    mos: tuple[int, ...] = (),
) -> SalesOrderFacts:
    return SalesOrderFacts(
        so_id=9,
        order_no="TG-PO0435",
        status=status,
        production_status=production,
        deleted=deleted,
        manufacturing_order_ids=mos,
    )


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        pytest.param(_facts(deleted=True), ("so_deleted",), id="deleted"),
        pytest.param(_facts("DELIVERED", "DONE", deleted=True), ("so_deleted",), id="deleted-wins"),
        pytest.param(_facts("DELIVERED", "DONE"), ("so_delivered",), id="delivered-done"),
        pytest.param(_facts("DELIVERED", "NONE"), ("so_delivered",), id="delivered-none"),
        pytest.param(_facts("DELIVERED", None), ("so_delivered",), id="delivered-null"),
        pytest.param(_facts("DELIVERED", "NOT_APPLICABLE"), ("so_delivered",), id="delivered-n/a"),
        pytest.param(
            _facts("DELIVERED", "IN_PROGRESS"),
            ("production_started",),
            id="delivered-while-in-progress",
        ),
        pytest.param(_facts(production="IN_PROGRESS"), ("production_started",), id="in-progress"),
        pytest.param(_facts(production="BLOCKED"), ("production_started",), id="blocked"),
        pytest.param(_facts(production="DONE"), ("production_started",), id="done-not-delivered"),
        pytest.param(
            _facts(production="NOT_STARTED", mos=(55,)),
            ("production_started",),
            id="not-started-with-mo",
        ),
        pytest.param(_facts(production="NOT_STARTED"), (), id="not-started-without-mo"),
        pytest.param(_facts(production=None), (), id="no-production"),
    ],
)
def test_sales_order_trigger(facts: SalesOrderFacts, expected: tuple[str, ...]) -> None:
    triggers = tuple(sales_order_trigger(facts))
    assert triggers == expected
    assert set(triggers) <= set(load_statechart().triggers)


# -- purchase_order_trigger -----------------------------------------------------------------


@pytest.mark.parametrize("status", ["void", "deleted", "archived"])
def test_a_withdrawn_po_fires_po_withdrawn(status: str) -> None:
    assert purchase_order_trigger(status) == "po_withdrawn"
    assert "po_withdrawn" in load_statechart().triggers


@pytest.mark.parametrize("status", ["draft", "active", "received", ""])
def test_other_po_statuses_fire_nothing(status: str) -> None:
    assert purchase_order_trigger(status) is None


# -- what a look says: signals -------------------------------------------------------------


def test_a_look_at_the_sales_order_says_its_triggers_and_why() -> None:
    signal = sales_order_signal(_facts("DELIVERED", "DONE", deleted=True))
    assert signal == Signal(
        ("so_deleted",), "Katana SO TG-PO0435: DELIVERED, production DONE (deleted)"
    )
    assert sales_order_signal(_facts(production=None)) == Signal(
        (), "Katana SO TG-PO0435: NOT_SHIPPED, production none"
    )


def test_a_linked_pos_status_says_its_trigger_and_why() -> None:
    assert purchase_order_signal("void") == Signal(("po_withdrawn",), "TradeGecko PO is void")
    assert purchase_order_signal("active") == Signal((), "TradeGecko PO is active")


# -- drift ---------------------------------------------------------------------------------


def test_po_drift_is_a_value_naming_its_side_and_reads_as_the_note() -> None:
    snapshot = _snapshot(_line(1), _line(2))
    now = [_line(1, quantity=D("5")), _line(3)]
    drift = purchase_order_drift(snapshot, now)
    assert {d.side for d in drift} == {"tradegecko"}
    assert [str(d) for d in drift] == [
        "drift in TradeGecko: line 1 quantity 2 → 5",
        "drift in TradeGecko: line 2 removed",
        "drift in TradeGecko: line 3 added (variant 103, quantity 2, price 9.5)",
    ]
    assert purchase_order_drift(snapshot, list(snapshot.lines)) == []


def test_so_drift_is_a_value_naming_its_side_and_reads_as_the_note() -> None:
    lines = [
        LineLink(line_id=1, sku="OAK", katana_variant_id=7, quantity=D("2"), price=D("150")),
        LineLink(line_id=2, sku="ASH", katana_variant_id=8, quantity=D("1"), price=D("10")),
    ]
    rows = [
        SalesOrderRowFacts(variant_id=7, quantity=D("2"), price=D("99")),
        SalesOrderRowFacts(variant_id=9, quantity=D("4"), price=None),
    ]
    drift = sales_order_drift(lines, rows, "TG-PO0435")
    assert drift == [
        Drift("katana", "SO TG-PO0435 OAK price 150 → 99"),
        Drift("katana", "SO TG-PO0435 row for ASH removed"),
        Drift("katana", "SO TG-PO0435 row added (variant 9, quantity 4)"),
    ]
    assert str(drift[0]) == "drift in Katana: SO TG-PO0435 OAK price 150 → 99"


@pytest.mark.parametrize(
    ("resource", "status", "deleted", "state", "moves"),
    [
        # A sales order's status alone: only DELIVERED moves, and only where the chart says.
        ("sales_order", "NOT_SHIPPED", False, "imported", False),
        ("sales_order", "PENDING", False, "in_production", False),
        ("sales_order", "DELIVERED", False, "imported", True),
        ("sales_order", "DELIVERED", False, "in_production", True),
        ("sales_order", "DELIVERED", False, "delivered", False),
        ("sales_order", "DELIVERED", False, "making_to_order", False),
        # A partial delivery moves nothing but leaves a note for a person.
        ("sales_order", "PARTIALLY_DELIVERED", False, "in_production", True),
        ("sales_order", None, True, "imported", True),
        # A manufacturing order: any status starts production of an imported order; only
        # DONE can complete the delivery of one in production.
        ("manufacturing_order", "NOT_STARTED", False, "imported", True),
        ("manufacturing_order", "IN_PROGRESS", False, "imported", True),
        ("manufacturing_order", "IN_PROGRESS", False, "in_production", False),
        ("manufacturing_order", "BLOCKED", False, "in_production", False),
        ("manufacturing_order", "DONE", False, "in_production", True),
        ("manufacturing_order", "DONE", False, "making_to_order", False),
        # Cannot tell: look.
        ("sales_order", None, False, "imported", True),
        ("manufacturing_order", None, False, "in_production", True),
        ("manufacturing_order", "DONE", True, "delivered", True),
    ],
)
def test_a_delivery_can_move_the_order_only_as_the_chart_says(
    resource: str, status: str | None, deleted: bool, state: str, moves: bool
) -> None:
    chart = load_statechart()
    assert (
        delivery_can_move(
            resource, status, deleted=deleted, allows=lambda trigger: chart.allows(state, trigger)
        )
        is moves
    )


def test_an_mo_finishing_weighs_the_sales_orders_known_status() -> None:
    chart = load_statechart()

    def moves(so_status: str | None) -> bool:
        return delivery_can_move(
            "manufacturing_order",
            "DONE",
            deleted=False,
            allows=lambda trigger: chart.allows("in_production", trigger),
            so_status=so_status,
        )

    # Not delivered yet: the SO's own DELIVERED delivery will call for the look.
    assert (moves("NOT_SHIPPED"), moves("DELIVERED"), moves(None)) == (False, True, True)
