"""What replaying an order would do (``syncctl replay``), decided from stored looks alone.

A pure function of the statechart, the order and what was seen of it: the daemon's
dispatcher applies the plan, ``syncctl replay --dry-run`` only prints it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from syncd.domain.orders import LinkedOrder
from syncd.domain.rules import Signal
from syncd.domain.statechart import Statechart

__all__ = ["ReplayPlan", "ReplayStep", "plan_replay"]


@dataclass(frozen=True)
class ReplayStep:
    """One stored inbox event that moves the order when re-processed."""

    event_id: int
    trigger: str
    source: str
    dest: str
    cause: str


@dataclass(frozen=True)
class ReplayPlan:
    """What replaying an order does: re-run its state's effect, or these steps."""

    state: str
    effect: str | None
    steps: tuple[ReplayStep, ...]

    def describe(self) -> str:
        if self.effect is not None:
            return f"re-run the {self.effect} effect of {self.state}"
        if not self.steps:
            return f"nothing: no stored event moves the order from {self.state}"
        return "; ".join(
            f"event {s.event_id}: {s.source} → {s.dest} [{s.trigger}] {s.cause}" for s in self.steps
        )


def plan_replay(
    chart: Statechart, link: LinkedOrder, seen: Iterable[tuple[int, Signal]]
) -> ReplayPlan:
    """What replaying ``link`` would do, given what was seen of it (``(event id, signal)``,
    oldest first).

    In an effect state the effect is re-run. Otherwise the looks are re-played against the
    order's current state: each one the statechart accepts moves it, until a state with an
    effect takes over.
    """
    effect = chart.state(link.state).effect
    if effect is not None:
        return ReplayPlan(link.state, effect, ())
    state, resume = link.state, link.resume_state
    steps: list[ReplayStep] = []
    for event_id, signal in seen:
        decision = chart.decide_first(state, signal.triggers, resume_state=resume)
        if decision is not None:
            steps.append(ReplayStep(event_id, decision.trigger, state, decision.dest, signal.cause))
            state, resume = decision.dest, decision.resume_state
        if chart.state(state).effect is not None:
            break
    return ReplayPlan(link.state, None, tuple(steps))
