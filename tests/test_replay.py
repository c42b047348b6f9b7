"""What replaying an order would do: a pure function of the chart, the order and its looks."""

from __future__ import annotations

from syncd.domain.orders import LinkedOrder
from syncd.domain.replay import ReplayPlan, ReplayStep, plan_replay
from syncd.domain.rules import Signal
from syncd.domain.statechart import load_statechart

CHART = load_statechart()


def _link(state: str, resume: str | None = None) -> LinkedOrder:
    return LinkedOrder(id=1, po_id=2, po_number="PO1", state=state, resume_state=resume)


def test_an_effect_state_re_runs_its_effect_whatever_was_seen() -> None:
    plan = plan_replay(CHART, _link("delivered"), [(5, Signal(("so_deleted",), "gone"))])
    assert plan == ReplayPlan("delivered", "receive_order", ())
    assert plan.describe() == "re-run the receive_order effect of delivered"


def test_looks_move_the_order_in_turn_until_an_effect_state_takes_over() -> None:
    seen = [
        (3, Signal((), "nothing new")),
        (4, Signal(("production_started",), "MO linked")),
        (6, Signal(("so_delivered",), "delivered")),
        (9, Signal(("so_deleted",), "deleted later")),  # after delivered: the effect takes over
    ]
    plan = plan_replay(CHART, _link("imported"), seen)
    assert plan.effect is None
    assert plan.steps == (
        ReplayStep(4, "production_started", "imported", "in_production", "MO linked"),
        ReplayStep(6, "so_delivered", "in_production", "delivered", "delivered"),
    )
    assert plan.describe() == (
        "event 4: imported → in_production [production_started] MO linked; "
        "event 6: in_production → delivered [so_delivered] delivered"
    )


def test_the_first_trigger_of_a_look_that_applies_wins() -> None:
    plan = plan_replay(CHART, _link("imported"), [(7, Signal(("so_delivered", "x"), "both"))])
    assert [s.dest for s in plan.steps] == ["delivered"]


def test_nothing_that_moves_the_order_says_so() -> None:
    plan = plan_replay(CHART, _link("needs_attention", "imported"), [(2, Signal((), "seen"))])
    assert plan == ReplayPlan("needs_attention", None, ())
    assert plan.describe() == "nothing: no stored event moves the order from needs_attention"
