"""The linked-order statechart: the file, the decisions it makes, and its checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.domain.statechart import RESUME, Statechart, load_statechart
from syncd.errors import StatechartError

ROOT = Path(__file__).resolve().parents[1]
CHART = load_statechart(ROOT / "statecharts" / "linked_order.toml")
#: The same file with ``katana.make_to_order = "auto"``.
AUTO = load_statechart(ROOT / "statecharts" / "linked_order.toml", holding={"make_to_order_auto"})

OPEN_STATES = [
    "discovered",
    "making_to_order",
    "imported",
    "in_production",
    "delivered",
    "needs_attention",
]
TERMINAL_STATES = ["received", "cancelled"]
#: (trigger, source) for every way an order falls into needs_attention.
FAILURES = [
    ("import_failed", "discovered"),
    ("make_to_order_failed", "making_to_order"),
    ("po_withdrawn", "making_to_order"),
    ("receive_failed", "delivered"),
    ("po_withdrawn", "imported"),
    ("po_withdrawn", "in_production"),
    ("po_withdrawn", "delivered"),
]


def test_file_loads_with_the_expected_states_and_initial() -> None:
    assert CHART.initial == "discovered"
    assert set(CHART.states) == set(OPEN_STATES + TERMINAL_STATES)
    assert sorted(CHART.terminal_states()) == sorted(TERMINAL_STATES)
    assert CHART.attention_states() == ["needs_attention"]
    assert sorted(CHART.open_states()) == sorted(OPEN_STATES)
    assert CHART.effect_states() == {
        "discovered": "import_order",
        "making_to_order": "make_to_order",
        "delivered": "receive_order",
    }
    assert set(CHART.followed_states()) == {
        "making_to_order",
        "imported",
        "in_production",
        "delivered",
        "needs_attention",
    }


def test_default_path_loads_the_same_chart() -> None:
    assert set(load_statechart().states) == set(CHART.states)
    assert load_statechart().triggers == CHART.triggers


def test_happy_path_through_production() -> None:
    state = CHART.initial
    visited = [state]
    for trigger in ("so_created", "production_started", "so_delivered", "po_received"):
        decision = CHART.decide(state, trigger)
        assert decision is not None, (state, trigger)
        assert decision.source == state
        assert decision.trigger == trigger
        assert decision.resume_state is None
        state = decision.dest
        visited.append(state)
    assert visited == ["discovered", "imported", "in_production", "delivered", "received"]


def test_manual_make_to_order_never_enters_making_to_order() -> None:
    """The shipped default: the path is today's, a person presses "Make to order"."""
    assert CHART.holding == frozenset()
    for state in CHART.states:
        for trigger in CHART.triggers:
            decision = CHART.decide(state, trigger, resume_state="imported")
            if decision is not None and state != "needs_attention":
                assert decision.dest != "making_to_order", (state, trigger)


def test_auto_make_to_order_path_through_production() -> None:
    state = AUTO.initial
    visited = [state]
    for trigger in ("so_created", "production_ordered", "so_delivered", "po_received"):
        decision = AUTO.decide(state, trigger)
        assert decision is not None, (state, trigger)
        state = decision.dest
        visited.append(state)
    assert visited == ["discovered", "making_to_order", "in_production", "delivered", "received"]
    entered = AUTO.decide("discovered", "so_created")
    assert entered is not None and entered.effect == "make_to_order"


def test_auto_make_to_order_with_nothing_to_make_waits_in_imported() -> None:
    decision = AUTO.decide("making_to_order", "nothing_to_make")
    assert decision is not None and decision.dest == "imported" and decision.effect is None
    # A person then makes it, or delivers from stock.
    assert AUTO.decide("imported", "production_started") is not None
    assert AUTO.decide("imported", "so_delivered") is not None


def test_making_to_order_is_left_only_by_its_effect_or_an_end() -> None:
    """A look at the SO that shows some of syncd's MOs must not move the order on: after a
    crash the effect is re-run from this state and makes the rest."""
    assert AUTO.decide("making_to_order", "production_started") is None
    # Nor a delivery seen meanwhile: the floor may deliver what syncd has made so far.
    assert AUTO.decide("making_to_order", "so_delivered") is None
    moves = {
        t: d.dest for t in AUTO.triggers if (d := AUTO.decide("making_to_order", t)) is not None
    }
    assert moves == {
        "production_ordered": "in_production",
        "nothing_to_make": "imported",
        "make_to_order_failed": "needs_attention",
        "po_withdrawn": "needs_attention",
        "found_delivered": "delivered",
        "so_deleted": "cancelled",
        "cancel": "cancelled",
    }


def test_a_condition_the_chart_does_not_declare_is_refused() -> None:
    with pytest.raises(StatechartError, match="condition 'weekend' is set by the configuration"):
        Statechart(copy.deepcopy(BASE), source="bad.toml", holding={"weekend"})


def test_conditions_choose_between_transitions_of_one_trigger() -> None:
    data = copy.deepcopy(BASE)
    data["conditions"] = {"fast": "skip b"}
    data["transitions"] = [
        {"trigger": "go", "source": ["a"], "dest": "b", "unless": ["fast"]},
        {"trigger": "go", "source": ["a"], "dest": "done", "conditions": "fast"},
        {"trigger": "finish", "source": "b", "dest": "done"},
    ]
    slow = Statechart(copy.deepcopy(data)).decide("a", "go")
    fast = Statechart(copy.deepcopy(data), holding=["fast"]).decide("a", "go")
    assert slow is not None and slow.dest == "b"
    assert fast is not None and fast.dest == "done"
    assert "go [fast]" in Statechart(data).mermaid()


def test_delivered_straight_from_imported_when_production_is_skipped() -> None:
    decision = CHART.decide("imported", "so_delivered")
    assert decision is not None
    assert decision.dest == "delivered"
    assert decision.effect == "receive_order"


def test_effects_fire_on_entering_their_states_only() -> None:
    into_imported = CHART.decide("discovered", "so_created")
    into_production = CHART.decide("imported", "production_started")
    into_delivered = CHART.decide("in_production", "so_delivered")
    into_received = CHART.decide("delivered", "po_received")
    assert into_imported is not None and into_imported.effect is None
    assert into_production is not None and into_production.effect is None
    assert into_delivered is not None and into_delivered.effect == "receive_order"
    assert into_received is not None and into_received.effect is None
    # discovered is entered again (with its effect) only by a retry back to it.
    back = CHART.decide("needs_attention", "retry", resume_state="discovered")
    assert back is not None
    assert back.dest == "discovered"
    assert back.effect == "import_order"
    assert CHART.state("discovered").effect == "import_order"


def test_the_failure_list_covers_every_way_into_attention() -> None:
    found = set()
    for source in CHART.open_states():
        if CHART.state(source).attention:
            continue
        for trigger in CHART.triggers:
            decision = CHART.decide(source, trigger)
            if decision is not None and CHART.state(decision.dest).attention:
                found.add((trigger, source))
    assert found == set(FAILURES)


@pytest.mark.parametrize(("trigger", "source"), FAILURES)
def test_failure_needs_attention_and_retry_returns_to_the_source(trigger: str, source: str) -> None:
    failed = CHART.decide(source, trigger)
    assert failed is not None
    assert failed.dest == "needs_attention"
    assert failed.resume_state == source
    assert failed.effect is None

    retried = CHART.decide("needs_attention", "retry", resume_state=failed.resume_state)
    assert retried is not None
    assert retried.dest == source
    assert retried.resume_state is None
    assert retried.effect == CHART.state(source).effect


def test_retry_without_a_resume_state_does_not_apply() -> None:
    assert CHART.decide("needs_attention", "retry") is None
    # A terminal or attention state is never a retry target.
    assert CHART.decide("needs_attention", "retry", resume_state="received") is None
    assert CHART.decide("needs_attention", "retry", resume_state="needs_attention") is None


def test_leaving_attention_other_than_by_retry_clears_resume_state() -> None:
    decision = CHART.decide("needs_attention", "so_deleted", resume_state="imported")
    assert decision is not None
    assert decision.dest == "cancelled"
    assert decision.resume_state is None


@pytest.mark.parametrize("state", OPEN_STATES)
def test_cancel_from_every_open_state(state: str) -> None:
    decision = CHART.decide(state, "cancel", resume_state="imported")
    assert decision is not None
    assert decision.dest == "cancelled"
    assert decision.effect is None


@pytest.mark.parametrize("state", TERMINAL_STATES)
def test_terminal_states_accept_nothing(state: str) -> None:
    for trigger in CHART.triggers:
        assert CHART.decide(state, trigger, resume_state="imported") is None, trigger
        assert not CHART.allows(state, trigger)


def test_a_trigger_that_does_not_apply_returns_none() -> None:
    imported = CHART.decide("discovered", "so_created")
    assert imported is not None
    assert CHART.decide(imported.dest, "so_created") is None
    assert CHART.decide("discovered", "po_received") is None
    assert not CHART.allows("discovered", "po_received")
    assert CHART.allows("discovered", "so_created")


def test_unknown_trigger_raises() -> None:
    with pytest.raises(StatechartError, match="unknown trigger 'explode'"):
        CHART.decide("imported", "explode")


def test_unknown_state_raises() -> None:
    with pytest.raises(StatechartError, match="unknown state 'limbo'"):
        CHART.decide("limbo", "cancel")
    with pytest.raises(StatechartError, match="unknown state 'limbo'"):
        CHART.state("limbo")


def test_valid_path_accepts_a_real_history() -> None:
    history = [
        (None, "discovered", "po_discovered"),
        ("discovered", "imported", "so_created"),
        ("imported", "in_production", "production_started"),
        ("in_production", "needs_attention", "po_withdrawn"),
        ("needs_attention", "in_production", "retry"),
        ("in_production", "delivered", "so_delivered"),
        ("delivered", "received", "po_received"),
    ]
    assert CHART.valid_path(history)


@pytest.mark.parametrize(
    "history",
    [
        pytest.param([(None, "imported", "so_created")], id="does-not-start-at-initial"),
        pytest.param([("discovered", "discovered", "po_discovered")], id="first-step-has-a-source"),
        pytest.param(
            [(None, "discovered", "x"), ("discovered", "delivered", "so_delivered")],
            id="skips-a-state",
        ),
        pytest.param(
            [(None, "discovered", "x"), ("imported", "in_production", "production_started")],
            id="source-is-not-current",
        ),
        pytest.param(
            [(None, "discovered", "x"), ("discovered", "cancelled", "so_created")],
            id="wrong-destination",
        ),
        pytest.param(
            [
                (None, "discovered", "x"),
                ("discovered", "imported", "so_created"),
                ("imported", "needs_attention", "po_withdrawn"),
                ("needs_attention", "discovered", "retry"),
            ],
            id="retry-to-the-wrong-state",
        ),
        pytest.param(
            [
                (None, "discovered", "x"),
                ("discovered", "cancelled", "cancel"),
                ("cancelled", "imported", "so_created"),
            ],
            id="leaves-a-terminal-state",
        ),
    ],
)
def test_valid_path_rejects_a_broken_history(
    history: list[tuple[str | None, str, str]],
) -> None:
    assert not CHART.valid_path(history)


# -- malformed statechart data --------------------------------------------------------------

BASE: dict[str, Any] = {
    "initial": "a",
    "states": {"a": {"effect": "work"}, "b": {}, "done": {"terminal": True}},
    "transitions": [
        {"trigger": "go", "source": ["a"], "dest": "b"},
        {"trigger": "finish", "source": "b", "dest": "done"},
    ],
}


def test_the_base_data_is_valid() -> None:
    chart = Statechart(copy.deepcopy(BASE))
    assert chart.triggers == ("finish", "go")
    decision = chart.decide("a", "go")
    assert decision is not None and decision.dest == "b"


def test_only_the_receipt_recosts_the_po() -> None:
    assert CHART.state("delivered").recosts_po
    assert not any(CHART.state(s).recosts_po for s in CHART.states if s != "delivered")


@pytest.mark.parametrize(
    ("effects", "fired", "message"),
    [
        ({"work": ("go",)}, ("finish", "go"), None),
        ({"wrk": ("go",)}, ("finish",), "state 'a' names effect 'work', which syncd does not have"),
        ({"work": ("go",), "other": ()}, ("finish",), "syncd has effect 'other', which no state"),
        ({"work": ("goo",)}, ("finish", "go"), "syncd fires trigger 'goo', which no transition"),
        (
            {"work": ("finish",)},
            ("go",),
            "effect 'work' fires 'finish', but no transition leaves a",
        ),
        ({"work": ()}, ("go",), "transition trigger 'finish' is fired by nothing in syncd"),
    ],
)
def test_the_code_and_the_chart_are_checked_against_each_other(
    effects: dict[str, tuple[str, ...]], fired: tuple[str, ...], message: str | None
) -> None:
    chart = Statechart(copy.deepcopy(BASE), source="base.toml")
    if message is None:
        chart.check_code(effects, fired)
        return
    with pytest.raises(StatechartError, match=message) as caught:
        chart.check_code(effects, fired)
    assert str(caught.value).startswith("base.toml does not fit the code: ")


def _broken(change: str) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    if change == "unknown state key":
        data["states"]["b"]["colour"] = "red"
    elif change == "unknown transition key":
        data["transitions"][1]["guard"] = "x"
    elif change == "unknown dest":
        data["transitions"][0]["dest"] = "nowhere"
    elif change == "unknown source":
        data["transitions"][0]["source"] = ["nowhere"]
    elif change == "terminal source":
        data["transitions"].append({"trigger": "reopen", "source": ["done"], "dest": "a"})
    elif change == "missing initial":
        del data["initial"]
    elif change == "initial not a state":
        data["initial"] = "z"
    elif change == "reserved resume":
        data["states"][RESUME] = {}
    elif change == "no states":
        data["states"] = {}
    elif change == "no transitions":
        data["transitions"] = []
    elif change == "transition without trigger":
        del data["transitions"][0]["trigger"]
    elif change == "undeclared condition":
        data["transitions"][0]["conditions"] = ["sunny"]
    elif change == "conditions not names":
        data["conditions"] = {"sunny": "it is"}
        data["transitions"][0]["unless"] = [1]
    elif change == "conditions not a table":
        data["conditions"] = ["sunny"]
    elif change == "conditional retry":
        data["states"]["stuck"] = {"attention": True}
        data["conditions"] = {"sunny": "it is"}
        data["transitions"].append(
            {"trigger": "retry", "source": ["stuck"], "dest": RESUME, "conditions": ["sunny"]}
        )
    else:  # pragma: no cover - a typo in the parametrize list
        raise AssertionError(change)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("unknown state key", r"states\.b has unknown keys \['colour'\]"),
        ("unknown transition key", r"transitions\[1\] has unknown keys \['guard'\]"),
        ("unknown dest", r"transitions\[0\]\.dest names unknown state 'nowhere'"),
        ("unknown source", r"transitions\[0\]\.source names unknown state 'nowhere'"),
        ("terminal source", r"transitions\[2\]\.source 'done' is terminal"),
        ("missing initial", r"initial state None is not among the states"),
        ("initial not a state", r"initial state 'z' is not among the states"),
        ("reserved resume", r"'resume' is reserved"),
        ("no states", r"needs a \[states\] table"),
        ("no transitions", r"needs \[\[transitions\]\]"),
        ("transition without trigger", r"transitions\[0\]\.trigger must be a name"),
        ("undeclared condition", r"transitions\[0\]\.conditions names undeclared condition"),
        ("conditions not names", r"transitions\[0\]\.unless must list condition names"),
        ("conditions not a table", r"\[conditions\] must be a table"),
        ("conditional retry", r"transitions\[2\]: a retry .* takes no conditions"),
    ],
)
def test_malformed_data_is_refused_naming_the_problem(change: str, message: str) -> None:
    with pytest.raises(StatechartError, match=message) as caught:
        Statechart(_broken(change), source="bad.toml")
    assert str(caught.value).startswith("bad.toml: ")


def test_load_statechart_refuses_a_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(StatechartError, match="not found"):
        load_statechart(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("initial = \n", encoding="utf-8")
    with pytest.raises(StatechartError, match="cannot read statechart"):
        load_statechart(bad)


# -- drawing ---------------------------------------------------------------------------------


def test_mermaid_names_every_state_and_trigger() -> None:
    text = CHART.mermaid()
    assert text.startswith("---\nLinked order\n---\nstateDiagram-v2")
    for state in CHART.states:
        assert f'state "{state}" as {state}' in text
    for trigger in CHART.triggers:
        assert trigger in text
    assert "[*] --> discovered" in text
    assert "needs_attention --> imported: retry (back)" in text


def test_committed_diagram_matches_the_statechart() -> None:
    committed = (ROOT / "statecharts" / "linked_order.mmd").read_text(encoding="utf-8")
    assert committed == load_statechart().mermaid(), (
        "statecharts/linked_order.mmd is stale: regenerate it from load_statechart().mermaid()"
    )


# -- any sequence of triggers ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(CHART.triggers), max_size=40))
def test_random_trigger_sequences_stay_inside_the_chart(triggers: list[str]) -> None:
    state, resume = CHART.initial, None
    history: list[tuple[str | None, str, str]] = [(None, state, "po_discovered")]
    effects = [CHART.state(state).effect]
    for trigger in triggers:
        decision = CHART.decide(state, trigger, resume_state=resume)
        if decision is None:
            continue
        assert not CHART.state(state).terminal, f"left terminal {state} by {trigger}"
        assert decision.source == state
        assert decision.dest in CHART.states
        assert decision.effect == CHART.state(decision.dest).effect
        if decision.effect is not None:
            # An effect runs only on a real entry, never on staying put.
            assert decision.dest != decision.source
            effects.append(decision.effect)
        if CHART.state(decision.dest).attention:
            assert decision.resume_state in CHART.open_states()
            assert not CHART.state(decision.resume_state).attention
        else:
            assert decision.resume_state is None
        history.append((state, decision.dest, trigger))
        state, resume = decision.dest, decision.resume_state
    assert state in CHART.states
    assert CHART.valid_path(history)
    entries = [dest for _, dest, _ in history if CHART.state(dest).effect]
    assert len(effects) == len(entries)


def test_edges_list_every_transition_of_the_file_with_its_conditions() -> None:
    edges = CHART.edges()
    assert {
        "trigger": "so_created",
        "source": "discovered",
        "dest": "making_to_order",
        "back": False,
        "conditions": ["make_to_order_auto"],
        "unless": [],
    } in edges
    # Whatever holds: the same edges for the auto chart.
    assert AUTO.edges() == edges
    # Every edge a decision can take is listed.
    for chart in (CHART, AUTO):
        for source in chart.states:
            for trigger in chart.triggers:
                decision = chart.decide(source, trigger, resume_state="imported")
                if decision is not None:
                    assert any(
                        (e["source"], e["dest"], e["trigger"]) == (source, decision.dest, trigger)
                        for e in edges
                    ), (source, trigger)
