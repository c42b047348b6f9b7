"""bench/flows.py's sustained run says what bound each steady window (the bench itself is
run by hand: it takes 11 minutes or more)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench.flows import _bounds

SHARES = {"katana": 250.0, "tradegecko": 270.0}


def mark(katana: int, tradegecko: int) -> tuple[Counter[Any], Counter[Any]]:
    """The recorders' counts at a window's edge (one endpoint each is enough)."""
    return (
        Counter({("effect", "POST /sales_orders"): katana}),
        Counter({("effect", "POST /purchase_orders/{id}/actions/receive"): tradegecko}),
    )


def test_a_window_that_spent_a_service_allowance_was_bound_by_it() -> None:
    (window,) = _bounds([mark(100, 300), mark(230, 560)], SHARES)
    assert window["spent"] == {"katana": 130, "tradegecko": 260}
    assert window["bound_by"] == ["tradegecko"]


def test_a_window_that_left_both_allowances_unspent_was_bound_by_the_feed() -> None:
    first, second = _bounds([mark(0, 0), mark(130, 200), mark(380, 460)], SHARES)
    assert first["bound_by"] == ["feed"]
    assert second["spent"] == {"katana": 250, "tradegecko": 260}
    assert second["bound_by"] == ["katana", "tradegecko"]
