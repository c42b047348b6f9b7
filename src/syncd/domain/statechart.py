"""The linked-order statechart: loaded from ``statecharts/linked_order.toml``, decided purely.

The file is the single source of state names. :class:`Statechart` wraps a synchronous
``transitions`` machine used only as a decision: given a state and a trigger it answers where
the order goes and which effect that entails. Nothing here does I/O beyond reading the file,
and no callback runs work; effects are the runtime's business.

A transition may depend on a *condition* the file declares in ``[conditions]`` (e.g.
``make_to_order_auto``): ``conditions`` lists those that must hold, ``unless`` those that must
not. Which hold is fixed when the chart is loaded (from the configuration), so a decision
stays a function of state, trigger and resume target alone.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transitions import Machine, MachineError

from syncd.errors import StatechartError

__all__ = [
    "RESUME",
    "Decision",
    "State",
    "Statechart",
    "default_statechart_path",
    "load_statechart",
]

#: The destination that means "back to the state the order was in before attention".
RESUME = "resume"

_STATE_KEYS = frozenset({"description", "effect", "follow", "attention", "terminal", "recosts_po"})
_TRANSITION_KEYS = frozenset({"trigger", "source", "dest", "description", "conditions", "unless"})


@dataclass(frozen=True)
class State:
    """One state of a linked order as the statechart file describes it."""

    name: str
    description: str = ""
    effect: str | None = None
    follow: bool = False
    attention: bool = False
    terminal: bool = False
    #: syncd re-costs the PO's lines here itself: a changed line price is no drift.
    recosts_po: bool = False


@dataclass(frozen=True)
class Decision:
    """The outcome of firing ``trigger`` in ``source``.

    ``resume_state`` is what the order returns to on ``retry``: set when it enters an
    attention state, cleared when it leaves one.
    """

    trigger: str
    source: str
    dest: str
    effect: str | None
    resume_state: str | None


class _Decider:
    """The model the machine moves; it only carries the state and the resume target."""

    state: str
    resume_state: str | None = None


class Statechart:
    """A loaded statechart: states, transitions, and a pure :meth:`decide`.

    :param holding: the declared conditions that hold (the rest do not).
    :raises StatechartError: the data is not a valid statechart, or ``holding`` names a
        condition the data does not declare.
    """

    def __init__(
        self, data: Mapping[str, Any], *, source: str = "<data>", holding: Iterable[str] = ()
    ) -> None:
        self.source = source
        self.states, self.initial, self._transitions, self.conditions = _parse(data, source)
        self.holding = frozenset(holding)
        undeclared = sorted(self.holding - set(self.conditions))
        if undeclared:
            raise StatechartError(
                f"{source}: condition {undeclared[0]!r} is set by the configuration but the "
                "statechart does not declare it in [conditions]"
            )
        self.triggers = tuple(sorted({t["trigger"] for t in self._transitions}))
        self._resumable = tuple(
            s.name for s in self.states.values() if not (s.attention or s.terminal)
        )
        self._decider = _Decider()
        self._machine = Machine(
            model=self._decider,
            states=list(self.states),
            transitions=self._machine_transitions(),
            initial=self.initial,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
        )

    def _machine_transitions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        for t in self._transitions:
            if t["dest"] != RESUME:
                result.append(
                    {
                        "trigger": t["trigger"],
                        "source": t["source"],
                        "dest": t["dest"],
                        # Fixed at load: a transition whose conditions fail is never taken.
                        "conditions": [_fixed(self._passes(t))],
                    }
                )
                continue
            result.extend(
                {
                    "trigger": t["trigger"],
                    "source": t["source"],
                    "dest": target,
                    "conditions": [_resumes_to(target)],
                }
                for target in self._resumable
            )
        return result

    def _passes(self, transition: Mapping[str, Any]) -> bool:
        return set(transition["conditions"]) <= self.holding and not (
            set(transition["unless"]) & self.holding
        )

    # -- questions -----------------------------------------------------------------------

    def state(self, name: str) -> State:
        """The state called ``name``; :class:`StatechartError` if there is none."""
        try:
            return self.states[name]
        except KeyError:
            raise StatechartError(f"unknown state {name!r} (not in {self.source})") from None

    def effect_states(self) -> dict[str, str]:
        """State name → the effect run on entering it."""
        return {s.name: s.effect for s in self.states.values() if s.effect}

    def followed_states(self) -> list[str]:
        """States in which syncd watches the Katana sales order."""
        return [s.name for s in self.states.values() if s.follow]

    def open_states(self) -> list[str]:
        """States an order can still leave."""
        return [s.name for s in self.states.values() if not s.terminal]

    def attention_states(self) -> list[str]:
        return [s.name for s in self.states.values() if s.attention]

    def terminal_states(self) -> list[str]:
        return [s.name for s in self.states.values() if s.terminal]

    def edges(self) -> list[dict[str, Any]]:
        """Every edge of the file, whatever holds: ``trigger``, ``source``, ``dest``,
        ``back`` (a retry to where the order was, one edge per state it can return to),
        ``conditions`` and ``unless``; in file order, as the diagram draws them."""
        result: list[dict[str, Any]] = []
        for t in self._transitions:
            targets = self._resumable if t["dest"] == RESUME else (t["dest"],)
            result.extend(
                {
                    "trigger": t["trigger"],
                    "source": source,
                    "dest": dest,
                    "back": t["dest"] == RESUME,
                    "conditions": list(t["conditions"]),
                    "unless": list(t["unless"]),
                }
                for source in t["source"]
                for dest in targets
            )
        return result

    def check_code(self, effects: Mapping[str, Collection[str]], fired: Collection[str]) -> None:
        """Check the statechart against the code that drives it, like a worker refusing a
        bad activity registration: a typo on either side stops start-up instead of setting
        events aside one by one.

        :param effects: effect name → the triggers its outcomes fire (the registry).
        :param fired: the other triggers the code fires (observations, operators).
        :raises StatechartError: every mismatch, named.
        """
        problems = [
            f"state {state.name!r} names effect {state.effect!r}, which syncd does not have "
            f"(it has {', '.join(sorted(effects)) or 'none'})"
            for state in self.states.values()
            if state.effect is not None and state.effect not in effects
        ]
        used = {s.effect for s in self.states.values() if s.effect}
        for name, triggers in effects.items():
            if name not in used:
                problems.append(f"syncd has effect {name!r}, which no state runs")
            for trigger in triggers:
                leaving = [
                    s.name
                    for s in self.states.values()
                    if s.effect == name
                    and not any(
                        t["trigger"] == trigger and s.name in t["source"] for t in self._transitions
                    )
                ]
                if trigger in self.triggers and leaving:
                    problems.append(
                        f"effect {name!r} fires {trigger!r}, but no transition leaves "
                        f"{', '.join(leaving)} on it"
                    )
        code = set(fired).union(*effects.values()) if effects else set(fired)
        problems += [
            f"syncd fires trigger {t!r}, which no transition has"
            for t in sorted(code)
            if t not in self.triggers
        ]
        problems += [
            f"transition trigger {t!r} is fired by nothing in syncd"
            for t in self.triggers
            if t not in code
        ]
        if problems:
            raise StatechartError(f"{self.source} does not fit the code: " + "; ".join(problems))

    def allows(self, state: str, trigger: str, *, resume_state: str | None = None) -> bool:
        """Whether ``trigger`` moves an order in ``state``."""
        return self.decide(state, trigger, resume_state=resume_state) is not None

    def decide(
        self, state: str, trigger: str, *, resume_state: str | None = None
    ) -> Decision | None:
        """Where ``trigger`` takes an order in ``state``, or ``None`` if it does not apply.

        A trigger the statechart does not know at all is an error (a bug, not an event).

        :raises StatechartError: unknown state or trigger.
        """
        self.state(state)
        if trigger not in self.triggers:
            raise StatechartError(f"unknown trigger {trigger!r} (not in {self.source})")
        decider = self._decider
        self._machine.set_state(state, decider)
        decider.resume_state = resume_state
        try:
            moved = decider.trigger(trigger)  # type: ignore[attr-defined]
        except MachineError:
            return None
        if not moved:
            return None
        dest: str = decider.state
        entered = self.states[dest]
        if entered.attention:
            resume = resume_state if self.states[state].attention else state
        else:
            resume = None
        return Decision(trigger, state, dest, entered.effect, resume)

    def decide_first(
        self, state: str, triggers: Sequence[str], *, resume_state: str | None = None
    ) -> Decision | None:
        """The decision of the first of ``triggers`` that applies in ``state``, if any (a
        look at a service may offer several, in the order to try them)."""
        for trigger in triggers:
            decision = self.decide(state, trigger, resume_state=resume_state)
            if decision is not None:
                return decision
        return None

    def valid_path(self, steps: Sequence[tuple[str | None, str, str]]) -> bool:
        """Whether a history of ``(from, to, trigger)`` steps is a path of this chart.

        The first step enters the initial state from nothing.
        """
        resume: str | None = None
        current: str | None = None
        for source, dest, trigger in steps:
            if current is None:
                if source is not None or dest != self.initial:
                    return False
                current = dest
                continue
            if source != current:
                return False
            decision = self.decide(current, trigger, resume_state=resume)
            if decision is None or decision.dest != dest:
                return False
            current, resume = decision.dest, decision.resume_state
        return True

    # -- drawing -------------------------------------------------------------------------

    def mermaid(self) -> str:
        """The statechart as a mermaid ``stateDiagram-v2``, drawn by ``transitions``."""
        text: str = self.graph("mermaid").draw(None)
        return text.rstrip() + "\n"

    def graph(self, engine: Literal["mermaid", "graphviz"] = "mermaid") -> Any:
        """The statechart as a ``transitions`` diagram (``mermaid`` or ``graphviz`` engine).

        Drawing it is the caller's business: graphviz needs Graphviz's ``dot`` program.
        """
        from transitions.extensions import GraphMachine

        graph = GraphMachine(
            states=list(self.states),
            transitions=[
                {"trigger": _label(t), "source": t["source"], "dest": t["dest"]}
                for t in self._transitions
                if t["dest"] != RESUME
            ]
            + [
                {"trigger": f"{t['trigger']} (back)", "source": t["source"], "dest": target}
                for t in self._transitions
                if t["dest"] == RESUME
                for target in self._resumable
            ],
            initial=self.initial,
            auto_transitions=False,
            graph_engine=engine,
            title="Linked order",
        )
        return graph.get_graph()


def _label(transition: Mapping[str, Any]) -> str:
    """A transition's trigger, with its conditions as the diagram shows them."""
    guards = [*transition["conditions"], *(f"not {c}" for c in transition["unless"])]
    return f"{transition['trigger']} [{', '.join(guards)}]" if guards else transition["trigger"]


def _fixed(value: bool) -> Any:
    def condition(event: Any) -> bool:
        return value

    return condition


def _resumes_to(target: str) -> Any:
    def condition(event: Any) -> bool:
        return bool(event.model.resume_state == target)

    condition.__name__ = f"resumes_to_{target}"
    return condition


def _parse(
    data: Mapping[str, Any], source: str
) -> tuple[dict[str, State], str, list[dict[str, Any]], dict[str, str]]:
    def fail(message: str) -> StatechartError:
        return StatechartError(f"{source}: {message}")

    raw_conditions = data.get("conditions", {})
    if not isinstance(raw_conditions, Mapping):
        raise fail("[conditions] must be a table of name = description")
    conditions = {str(name): str(text) for name, text in raw_conditions.items()}

    raw_states = data.get("states")
    if not isinstance(raw_states, Mapping) or not raw_states:
        raise fail("needs a [states] table with at least one state")
    states: dict[str, State] = {}
    for name, spec in raw_states.items():
        if not isinstance(spec, Mapping):
            raise fail(f"states.{name} must be a table")
        unknown = set(spec) - _STATE_KEYS
        if unknown:
            raise fail(f"states.{name} has unknown keys {sorted(unknown)}")
        if name == RESUME:
            raise fail(f"{RESUME!r} is reserved as the destination of a retry")
        states[name] = State(
            name=name,
            description=str(spec.get("description", "")),
            effect=spec.get("effect"),
            follow=bool(spec.get("follow", False)),
            attention=bool(spec.get("attention", False)),
            terminal=bool(spec.get("terminal", False)),
            recosts_po=bool(spec.get("recosts_po", False)),
        )
    initial = data.get("initial")
    if initial not in states:
        raise fail(f"initial state {initial!r} is not among the states")
    raw_transitions = data.get("transitions")
    if not isinstance(raw_transitions, list) or not raw_transitions:
        raise fail("needs [[transitions]]")
    transitions: list[dict[str, Any]] = []
    for index, spec in enumerate(raw_transitions):
        where = f"transitions[{index}]"
        if not isinstance(spec, Mapping):
            raise fail(f"{where} must be a table")
        unknown = set(spec) - _TRANSITION_KEYS
        if unknown:
            raise fail(f"{where} has unknown keys {sorted(unknown)}")
        trigger, sources, dest = spec.get("trigger"), spec.get("source"), spec.get("dest")
        if not isinstance(trigger, str) or not trigger:
            raise fail(f"{where}.trigger must be a name")
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list) or not sources:
            raise fail(f"{where}.source must name one or more states")
        for name in sources:
            if name not in states:
                raise fail(f"{where}.source names unknown state {name!r}")
            if states[name].terminal:
                raise fail(f"{where}.source {name!r} is terminal")
        if dest != RESUME and dest not in states:
            raise fail(f"{where}.dest names unknown state {dest!r}")
        guards: dict[str, list[str]] = {}
        for key in ("conditions", "unless"):
            names = spec.get(key, [])
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise fail(f"{where}.{key} must list condition names")
            for name in names:
                if name not in conditions:
                    raise fail(f"{where}.{key} names undeclared condition {name!r}")
            guards[key] = list(names)
        if dest == RESUME and (guards["conditions"] or guards["unless"]):
            raise fail(f"{where}: a retry back to where the order was takes no conditions")
        transitions.append({"trigger": trigger, "source": list(sources), "dest": dest, **guards})
    return states, str(initial), transitions, conditions


def default_statechart_path() -> Path:
    """Where the statechart file is: ``$SYNCD_STATECHART``, the source tree, or the install."""
    override = os.environ.get("SYNCD_STATECHART")
    if override:
        return Path(override)
    name = Path("statecharts") / "linked_order.toml"
    candidates = [
        Path(__file__).resolve().parents[3] / name,
        Path(sys.prefix) / "share" / "syncd" / name,
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def load_statechart(path: Path | str | None = None, *, holding: Iterable[str] = ()) -> Statechart:
    """Read and check a statechart file; ``holding`` names the conditions that hold.

    :raises StatechartError: the file is missing, not TOML, or not a valid statechart.
    """
    file = Path(path) if path is not None else default_statechart_path()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StatechartError(f"statechart file not found: {file}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StatechartError(f"{file}: cannot read statechart ({exc})") from None
    return Statechart(data, source=str(file), holding=holding)
