"""The dispatcher: takes inbox events in order, lets the statechart decide, runs effects.

One task reads the inbox; decisions are applied one at a time, each in one transaction with
the event that caused it. Effects run concurrently (at most ``concurrency`` working at once;
one waiting for a service's request budget gives its slot back meanwhile), at most one per
order at once, and write their outcome back to the inbox as the next event. After a
restart the dispatcher first drains what was persisted, then re-runs the effect of every
order that sits in an effect state: effects are idempotent, so a crash between an API call
and its record is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup

from syncd.adapters._http import PlannedRequest, Slot, WritePlan, planning
from syncd.config import RETRY, RetryPolicies
from syncd.domain.orders import LinkedOrder, PurchaseOrderSnapshot, SalesOrderFacts
from syncd.domain.replay import plan_replay
from syncd.domain.rules import (
    Drift,
    Signal,
    purchase_order_drift,
    purchase_order_signal,
    sales_order_drift,
    sales_order_notes,
    sales_order_signal,
)
from syncd.domain.statechart import Decision, Statechart
from syncd.domain.triggers import OBSERVATION_TRIGGERS, OPERATOR_TRIGGERS
from syncd.errors import (
    AuthError,
    Retries,
    StoreError,
    SyncdError,
    WriteWithheld,
    is_transient,
)
from syncd.runtime import inbox
from syncd.runtime.crashpoints import crash_point
from syncd.runtime.effects import EFFECTS, IMPORT_ORDER, EffectRunner, Outcome
from syncd.runtime.observer import Observer, TransitionNotice
from syncd.runtime.pauses import pause_service
from syncd.store import InboxEvent, Store

__all__ = ["Dispatcher", "check_chart"]

log = logging.getLogger("syncd.dispatcher")

#: What handles one inbox kind: the event, and its decoded payload.
_Handler = Callable[[InboxEvent, Any], Awaitable[None]]


def check_chart(chart: Statechart) -> Statechart:
    """``chart``, once checked against the code: every effect it names is registered, and the
    triggers the code fires and its own are the same names.

    :raises StatechartError: naming every mismatch.
    """
    chart.check_code(
        {name: spec.fires for name, spec in EFFECTS.items()},
        fired=(*OBSERVATION_TRIGGERS, *OPERATOR_TRIGGERS),
    )
    return chart


class Dispatcher:
    """Drives every linked order through the statechart.

    Each inbox kind has one handler (:attr:`handlers`); each decides once, and the decision
    is applied in one transaction with the event that caused it.
    """

    def __init__(
        self,
        store: Store,
        chart: Statechart,
        effects: EffectRunner,
        *,
        concurrency: int = 4,
        retry: RetryPolicies = RETRY,
        observer: Observer | None = None,
        shadow: bool = False,
        watch: inbox.InboxWatch | None = None,
    ) -> None:
        self.store = store
        #: The daemon's look at the inbox, which wakes the dispatcher when another process
        #: wrote its events; without one it looks every :data:`inbox.LOOK_EVERY` seconds.
        self.watch = watch
        #: A shadow run: each effect's writes are planned (recorded, answered with
        #: placeholders), never sent, and the plan is kept instead of the outcome.
        self.shadow = shadow
        self.chart = chart
        self.effects = effects
        self.retry = retry
        #: Told each transition, effect run and newly recorded drift.
        self.observer = observer or Observer()
        #: Effects actively working at once; one parked on a request budget holds none.
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._wake = anyio.Event()
        self._running: set[int] = set()
        self._again: set[int] = set()
        #: Effects that failed for a passing reason, by order; retried until they work.
        self._effect_retries: Retries[int] = Retries(retry.effect)
        #: Inbox events that could not be applied, by event; set aside after their attempts.
        self._event_retries: Retries[int] = Retries(retry.event)
        self._tg: TaskGroup | None = None
        #: Inbox kind → its handler; the sources' own kinds (:data:`inbox.SOURCE_KINDS`)
        #: never reach the dispatcher.
        self.handlers: dict[str, _Handler] = {
            inbox.PO_DISCOVERED: self._apply_po_discovered,
            inbox.PO_OBSERVED: self._apply_po_observed,
            inbox.SO_OBSERVED: self._apply_so_observed,
            inbox.EFFECT_OUTCOME: self._apply_effect_outcome,
            inbox.OPERATOR: self._apply_operator,
        }

    def wake(self) -> None:
        """Tell the dispatcher that the inbox has something new."""
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # With a watch, no timer: idle, the dispatcher sleeps until its events are written.
        with inbox.watched(
            self.watch, self.store.factory, self.wake, exclude_kinds=inbox.SOURCE_KINDS
        ) as patience:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self.drain()
                await self.resume_effects()
                task_status.started()
                while True:
                    if await self.drain() == 0:
                        with anyio.move_on_after(patience):
                            await self._wake.wait()
                        self._wake = anyio.Event()

    async def drain(self) -> int:
        """Process every pending inbox event; returns how many."""
        total = 0
        while events := await self.store.pending_events(exclude_kinds=inbox.SOURCE_KINDS):
            for event in events:
                await self._handle(event)
            total += len(events)
        return total

    async def resume_effects(self) -> None:
        """Start the effect of every order waiting in an effect state."""
        states = list(self.chart.effect_states())
        for link in await self.store.links_in_states(states):
            if link.id not in self._running:
                self._schedule(link.id)

    # -- events --------------------------------------------------------------------------

    async def _handle(self, event: InboxEvent) -> None:
        try:
            payload = inbox.decode(event.kind, event.payload)
            handler = self.handlers[event.kind]
        except (KeyError, msgspec.DecodeError) as exc:
            log.error(
                "inbox event %s (%s) is unreadable: %s",
                event.id,
                event.kind,
                exc,
                extra=_ids(event),
            )
            await self.store.mark_processed(event.id, f"unreadable: {exc}")
            return
        try:
            await handler(event, payload)
        except StoreError as exc:
            if is_transient(exc):
                # The database is locked by another process or the disk failed: nothing is
                # given up, the event waits for the next pass.
                log.warning("event %s waits: %s", event.id, exc, extra=_ids(event))
                await anyio.sleep(self.retry.store.initial)
            else:
                await self._failed(event, exc)
        except SyncdError as exc:
            await self._failed(event, exc)
        else:
            self._event_retries.succeeded(event.id)

    async def _failed(self, event: InboxEvent, exc: SyncdError) -> None:
        """Typically another writer moved the order between our read and our write: the next
        pass decides again. A fault that persists must not wedge the inbox."""
        attempt = self._event_retries.failed(event.id)
        if attempt.delay is None:
            log.error(
                "event %s (%s) set aside after %d tries: %s",
                event.id,
                event.kind,
                attempt.number,
                exc,
                extra=_ids(event),
            )
            await self._set_aside(event.id, f"failed: {exc}")
        else:
            log.warning(
                "event %s not applied (try %d): %s",
                event.id,
                attempt.number,
                exc,
                extra=_ids(event),
            )
            await anyio.sleep(attempt.delay)

    async def _set_aside(self, event_id: int, outcome: str) -> None:
        try:
            await self.store.mark_processed(event_id, outcome)
        except SyncdError as exc:
            log.error("cannot mark event %s processed: %s", event_id, exc)

    # -- one handler per inbox kind ------------------------------------------------------

    async def _apply_po_discovered(
        self, event: InboxEvent, snapshot: PurchaseOrderSnapshot
    ) -> None:
        link = await self.store.create_link(
            snapshot,
            state=self.chart.initial,
            trigger=inbox.PO_DISCOVERED,
            cause=f"PO {snapshot.po_number} created in TradeGecko ({event.source})",
            event_id=event.id,
        )
        if link is None:
            return
        self._notify(link, None, link.state, inbox.PO_DISCOVERED, "discovered")
        if self.chart.state(link.state).effect:
            self._schedule(link.id)

    async def _apply_po_observed(
        self, event: InboxEvent, observed: inbox.PurchaseOrderObserved
    ) -> None:
        link = await self._link_or_settle(event)
        if link is None:
            return
        state = self.chart.state(link.state)
        if (
            observed.lines is not None
            and link.snapshot is not None
            and not state.terminal
            # The receipt re-costs the PO's lines itself: that is no drift.
            and not state.recosts_po
        ):
            link = await self._note(link, purchase_order_drift(link.snapshot, observed.lines))
        await self._move(event, link, purchase_order_signal(observed.status))

    async def _apply_so_observed(self, event: InboxEvent, facts: SalesOrderFacts) -> None:
        link = await self._link_or_settle(event)
        if link is None:
            return
        if not self.chart.state(link.state).terminal:
            # What moves nothing but a person should see: a partly delivered SO that
            # waits, and edits after import (never copied across).
            seen: list[str | Drift] = [*sales_order_notes(facts)]
            if not facts.deleted:
                seen += sales_order_drift(link.lines, facts.rows, facts.order_no)
            link = await self._note(link, seen)
        await self._move(event, link, sales_order_signal(facts))

    async def _apply_operator(self, event: InboxEvent, command: inbox.OperatorCommand) -> None:
        if command.action == inbox.REPLAY:
            await self._replay(event, command)
            return
        link = await self._link_or_settle(event)
        if link is not None:
            await self._move(event, link, Signal((command.action,), command.cause()))

    async def _apply_effect_outcome(self, event: InboxEvent, outcome: Outcome) -> None:
        link = await self._link_or_settle(event)
        if link is None:
            return
        if outcome.so_id is not None:
            owner = await self.store.link_by_so(outcome.so_id)
            if owner is not None and owner.id != link.id:
                # Two POs with one number map to one order_no: never share an SO.
                reason = (
                    f"Katana SO {outcome.so_number} already belongs to PO {owner.po_number} "
                    f"(link {owner.id}); is the PO number {link.po_number} used twice?"
                )
                outcome = Outcome(
                    effect=outcome.effect, trigger=IMPORT_ORDER.failed, cause=reason, reason=reason
                )
        decision = self.chart.decide(link.state, outcome.trigger, resume_state=link.resume_state)
        if decision is not None:
            await self._apply(link, decision, outcome.cause, event.id, outcome)
            gave_up = self.chart.state(decision.dest).attention
            self.observer.effect_ran(outcome.effect, "failed" if gave_up else "ok")
            return
        notes = list(outcome.notes)
        if outcome.so_id is not None and link.so_id != outcome.so_id:
            # The import raced a cancel or a void: the SO exists but nothing follows it.
            warning = (
                f"Katana SO {outcome.so_number} (id {outcome.so_id}) was made while the order "
                f"was {link.state}: check it in Katana"
            )
            log.error(warning, extra={"po": link.po_number})
            notes.append(warning)
        if notes:
            await self.store.note(link.id, notes=notes)
        await self.store.mark_processed(event.id, f"no move from {link.state} ({outcome.trigger})")
        self.observer.effect_ran(outcome.effect, "ok")

    # -- shared by the handlers ----------------------------------------------------------

    async def _link_or_settle(self, event: InboxEvent) -> LinkedOrder | None:
        """The order ``event`` is about; ``None`` (the event settled) if there is none."""
        link = await self._link_for(event)
        if link is None:
            await self.store.mark_processed(event.id, "no linked order")
        return link

    async def _move(self, event: InboxEvent, link: LinkedOrder, signal: Signal) -> None:
        """Decide once what ``signal`` does to ``link`` and apply it, or settle the event."""
        decision = self.chart.decide_first(
            link.state, signal.triggers, resume_state=link.resume_state
        )
        if decision is not None:
            await self._apply(link, decision, signal.cause, event.id, None)
            return
        await self.store.mark_processed(
            event.id, f"no move from {link.state} ({', '.join(signal.triggers) or 'nothing new'})"
        )

    async def _note(self, link: LinkedOrder, seen: Sequence[str | Drift]) -> LinkedOrder:
        """Record on the link what a look shows that moves nothing; count new drift."""
        new = [item for item in seen if str(item) not in link.notes]
        if not new:
            return link
        await self.store.note(link.id, notes=[str(item) for item in new])
        for side in sorted({item.side for item in new if isinstance(item, Drift)}):
            self.observer.drift_found(side)
        log.warning("order noted", extra={"po": link.po_number, "notes": "; ".join(map(str, new))})
        return await self.store.get_link(link.id) or link

    async def _link_for(self, event: InboxEvent) -> LinkedOrder | None:
        if event.link_id is not None:
            return await self.store.get_link(event.link_id)
        if event.so_id is not None:
            return await self.store.link_by_so(event.so_id)
        if event.po_id is not None:
            return await self.store.link_by_po(event.po_id)
        return None

    async def _apply(
        self,
        link: LinkedOrder,
        decision: Decision,
        cause: str,
        event_id: int | None,
        outcome: Outcome | None,
    ) -> LinkedOrder:
        extra: dict[str, object] = {}
        if outcome is not None:
            if outcome.so_id is not None:
                extra["so_id"] = outcome.so_id
                extra["so_number"] = outcome.so_number
            if outcome.currency is not None:
                extra["currency"] = outcome.currency
        updated = await self.store.apply(
            link,
            decision,
            cause=cause,
            event_id=event_id,
            reason=(outcome.reason if outcome else None)
            or (cause if decision.resume_state else None),
            lines=outcome.lines if outcome else None,
            notes=outcome.notes if outcome else (),
            **extra,  # type: ignore[arg-type]
        )
        crash_point("transition_applied")
        left = self.chart.state(decision.source).effect
        if self.shadow and left is not None and decision.dest != decision.source:
            # Moved on without its effect's writes (the other integration received the PO,
            # say): nothing is left to send.
            await self.store.drop_plan(link.id, left)
        self._effect_retries.succeeded(link.id)
        self._notify(
            updated, decision.source, decision.dest, decision.trigger, cause, link.state_since
        )
        if decision.effect:
            self._schedule(updated.id)
        elif self.chart.state(decision.source).attention and self.chart.state(decision.dest).follow:
            updated = await self._reobserve(updated)
        return updated

    async def _reobserve(self, link: LinkedOrder) -> LinkedOrder:
        """After a retry, apply the last look at the SO again: it was seen while the order
        could not move, and its de-duplication key is spent."""
        seen = [e for e in await self.store.events_for_link(link.id) if e.kind == inbox.SO_OBSERVED]
        if not seen:
            return link
        facts = inbox.decode(seen[-1].kind, seen[-1].payload)
        assert isinstance(facts, SalesOrderFacts)
        signal = sales_order_signal(facts)
        decision = self.chart.decide_first(
            link.state, signal.triggers, resume_state=link.resume_state
        )
        if decision is None:
            return link
        return await self._apply(
            link, decision, f"{signal.cause} (seen before the retry)", None, None
        )

    async def fire(self, link: LinkedOrder, trigger: str, cause: str) -> LinkedOrder | None:
        """Fire an operator's trigger (retry, cancel) on ``link``; ``None`` if not allowed."""
        decision = self.chart.decide(link.state, trigger, resume_state=link.resume_state)
        if decision is None:
            return None
        return await self._apply(link, decision, cause, None, None)

    def _notify(
        self,
        link: LinkedOrder,
        source: str | None,
        dest: str,
        trigger: str,
        cause: str,
        since: datetime | None = None,
    ) -> None:
        log.info(
            "order moved",
            extra={
                "po": link.po_number,
                "so": link.so_number,
                "from": source,
                "to": dest,
                "trigger": trigger,
                "cause": cause,
            },
        )
        self.observer.transitioned(TransitionNotice(link, source, dest, trigger, cause, since))

    # -- effects -------------------------------------------------------------------------

    def _schedule(self, link_id: int) -> None:
        if link_id in self._running:
            self._again.add(link_id)
            return
        assert self._tg is not None, "the dispatcher is not running"
        self._running.add(link_id)
        self._tg.start_soon(self._run_effect, link_id)

    async def _run_effect(self, link_id: int) -> None:
        try:
            while True:
                self._again.discard(link_id)
                try:
                    await self._effect_once(link_id)
                except SyncdError as exc:
                    # The store refused a write: the effect runs again (it is idempotent)
                    # once the database takes writes again.
                    log.error(
                        "effect for order %s could not be recorded: %s",
                        link_id,
                        exc,
                        extra={"link": link_id},
                    )
                    await anyio.sleep(self.retry.effect.initial)
                    self._again.add(link_id)
                if link_id not in self._again:
                    return
        finally:
            self._running.discard(link_id)

    async def _effect_once(self, link_id: int) -> None:
        """Run the effect of the order's state and write its outcome to the inbox; what the
        outcome means is decided once, when its handler applies it."""
        link = await self.store.get_link(link_id)
        if link is None:
            return
        effect = self.chart.state(link.state).effect
        if effect is None:
            return
        if await self.store.has_pending_event(link.id, inbox.EFFECT_OUTCOME):
            # The last run's outcome is not applied yet; running again could act twice.
            return
        failure: SyncdError | None = None
        # The effect's own slot: a request that waits for its budget gives it back for the
        # wait (RequestBudget.acquire), so effects for the other service run meanwhile.
        async with Slot(self._limiter):
            with planning() if self.shadow else nullcontext(WritePlan()) as plan:
                try:
                    outcome = await self.effects.run(effect, link)
                except WriteWithheld as withheld:
                    # A write no client knows how to plan: it ends the plan, unsent.
                    await self._planned(link, effect, [*plan.requests, _withheld(withheld)])
                    return
                except SyncdError as exc:
                    # Effects turn what needs a person into an outcome; what is left may pass.
                    failure = exc
        if failure is None and plan.requests:
            # Its outcome holds placeholder ids: it is the plan, never applied.
            await self._planned(link, effect, _explained(plan.requests, outcome))
            return
        if failure is not None:
            if isinstance(failure, AuthError):
                # Seen here first when no poll calls the service (nothing followed yet).
                await pause_service(self.store, failure.service, failure)
            self.observer.effect_ran(effect, "retry")
            await self._retry_later(link, effect, failure)
            return
        if self.shadow:
            # It ran to its end without a write (it found its work done): no plan.
            await self.store.drop_plan(link.id, effect)
        await self.store.add_event(
            "effect",
            inbox.EFFECT_OUTCOME,
            inbox.encode(outcome),
            link_id=link.id,
            po_id=link.po_id,
        )
        crash_point("outcome_written")
        self.wake()

    async def _planned(
        self, link: LinkedOrder, effect: str, requests: Sequence[PlannedRequest]
    ) -> None:
        """A shadow run ran the effect to its end with every write planned, not sent: those
        requests are the order's plan. The order waits in its effect state; running again
        would plan the same, so only a new decision (or a restart) runs the effect again."""
        await self.store.record_plan(link.id, link.po_number, effect, requests)
        self._effect_retries.succeeded(link.id)
        self.observer.effect_ran(effect, "withheld")
        log.info(
            "effect %s for %s planned (shadow run): %s",
            effect,
            link.po_number,
            "; ".join(f"{r.service} {r.method} {r.path}" for r in requests),
            extra={"po": link.po_number, "so": link.so_number},
        )

    # -- operators -----------------------------------------------------------------------

    async def _replay(self, event: InboxEvent, command: inbox.OperatorCommand) -> None:
        link = await self._link_or_settle(event)
        if link is None:
            return
        plan = plan_replay(
            self.chart, link, inbox.replayable(await self.store.events_for_link(link.id))
        )
        log.info(
            "operator replay",
            extra={"po": link.po_number, "so": link.so_number, "plan": plan.describe()},
        )
        if plan.effect is not None:
            await self.store.mark_processed(event.id, f"replay: {plan.describe()}")
            self._effect_retries.succeeded(link.id)
            self._schedule(link.id)
            return
        applied = 0
        current: LinkedOrder | None = link
        for step in plan.steps:
            if current is None:
                break
            decision = self.chart.decide(
                current.state, step.trigger, resume_state=current.resume_state
            )
            if decision is None:
                break
            cause = f"{command.cause()}: event {step.event_id}: {step.cause}"
            current = await self._apply(
                current, decision, cause, event.id if applied == 0 else None, None
            )
            applied += 1
        if applied == 0:
            await self.store.mark_processed(event.id, f"replay: {plan.describe()}")

    async def _retry_later(self, link: LinkedOrder, effect: str, error: Exception) -> None:
        attempt = self._effect_retries.failed(link.id)
        # The effect policy never gives up: a passing failure passes.
        delay = attempt.delay if attempt.delay is not None else self.retry.effect.maximum
        log.warning(
            "effect %s for %s failed (attempt %d), retrying in %.0f s: %s",
            effect,
            link.po_number,
            attempt.number,
            delay,
            error,
            extra={"po": link.po_number, "so": link.so_number},
        )
        await self.store.note(link.id, last_error=f"{effect}: {error}")
        await anyio.sleep(delay)
        self._again.add(link.id)


def _explained(requests: Sequence[PlannedRequest], outcome: Outcome) -> list[PlannedRequest]:
    """``requests`` with what the outcome knows and the requests do not: the SKU of each
    SO row's variant, and each re-costed line's price before and after."""
    lines = outcome.lines or ()
    skus = {str(line.katana_variant_id): line.sku for line in lines}
    by_line = {f"/purchase_order_line_items/{line.line_id}": line for line in lines}
    explained: list[PlannedRequest] = []
    for request in requests:
        detail: dict[str, Any] | None = None
        line = by_line.get(request.path)
        if request.endpoint == "/sales_orders" and skus:
            detail = {"skus": skus}
        elif request.method == "PUT" and line is not None:
            detail = {
                "line_id": line.line_id,
                "sku": line.sku,
                "before": None if line.cost_before is None else str(line.cost_before),
                "after": None if line.cost_after is None else str(line.cost_after),
            }
        explained.append(replace(request, detail=detail) if detail else request)
    return explained


def _withheld(withheld: WriteWithheld) -> PlannedRequest:
    return PlannedRequest(
        withheld.service, withheld.method, withheld.endpoint, withheld.path, withheld.body
    )


def _ids(event: InboxEvent) -> dict[str, object]:
    """What a line about an inbox event names: its order, by id (the event has no number)."""
    return {"link": event.link_id, "po_id": event.po_id, "so_id": event.so_id}
