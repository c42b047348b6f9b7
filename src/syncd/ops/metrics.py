"""Prometheus metrics: one registry per daemon, served at ``/metrics`` in its task group.

Counters and histograms are updated where things happen: :class:`Metrics` is an
:class:`~syncd.runtime.observer.Observer`, told by the dispatcher, the webhook listener and
the HTTP clients what they did; gauges that come from the database
(orders per state, inbox backlog) are refreshed by :meth:`Metrics.refresh` on a timer, so a
scrape never touches SQLite. No label carries an order: label values are factories, states,
triggers, services, endpoint templates and status codes, all bounded (a factory's series go
when it stops). Every series but the build info, the refresh time and the API latency has a
``factory`` label (``default`` for today's single-factory config), left out of the table
below. The latency is the service host's, shared by its factories (one pool per host).

Every metric (``syncd_`` prefix, base units):

=============================================  ==================================================
``syncd_build_info{version,python}``           1, with the running version
``syncd_orders{state}``                        linked orders in each state
``syncd_orders_oldest_age_seconds{state}``     how long the oldest order has sat in each state
``syncd_transitions_total{from,to,trigger}``   transitions applied
``syncd_state_duration_seconds{state}``        time spent in a state, observed on leaving it
``syncd_api_requests_total{service,method,     HTTP requests sent; ``status="none"`` when no
endpoint,status}``                             answer came (timeout, refused)
``syncd_api_request_duration_seconds{service,  request latency
method,endpoint}``
``syncd_api_rate_limit_remaining{service}``    what the service last said remains of its limit
``syncd_inbox_backlog_events``                 inbox events waiting for the dispatcher
``syncd_inbox_oldest_event_age_seconds``       age of the oldest waiting event (0 when none)
``syncd_poll_last_success_timestamp_seconds    when each poller last polled successfully
{source}``
``syncd_effect_retries_total{effect}``         effect runs that failed for a passing reason
                                               and will be tried again
``syncd_effect_failures_total{effect}``        effect runs that gave up: a person must look
``syncd_metrics_refresh_timestamp_seconds``    when the database gauges were last refreshed
``syncd_drift_detected_total{side}``           orders edited after import (recorded as drift)
``syncd_webhooks_total{service,result}``       webhook deliveries by what the listener answered
``syncd_service_paused{service}``              1 while the service rejects the token (401):
                                               every order is paused
=============================================  ==================================================
"""

from __future__ import annotations

import logging
import platform
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import anyio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_asgi_app,
)

from syncd import __version__
from syncd.adapters._http import RequestBudget
from syncd.ops.asgi import serving_socket
from syncd.ops.statuspage import StatusPage
from syncd.runtime.observer import Observer, TransitionNotice
from syncd.store import DEFAULT_FACTORY, Store

__all__ = ["Metrics", "serve_metrics"]

log = logging.getLogger("syncd.metrics")

#: Time in a state runs from seconds (an import) to weeks (production).
_STATE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400)
_API_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SERVICES = ("tradegecko", "katana")
#: The pollers' meta key prefix of a paused service (``paused.katana``).
_PAUSED_PREFIX = "paused."


class Metrics(Observer):
    """The daemon's metrics, in their own :class:`CollectorRegistry`; an observer of the
    daemon."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("syncd_build", "The running syncd.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.orders = Gauge(
            "syncd_orders", "Linked orders in each state.", ["factory", "state"], registry=r
        )
        self.orders_oldest_age = Gauge(
            "syncd_orders_oldest_age_seconds",
            "How long the order that has waited longest in each state has been there.",
            ["factory", "state"],
            registry=r,
        )
        self.transitions = Counter(
            "syncd_transitions",
            "Transitions of linked orders.",
            ["factory", "from", "to", "trigger"],
            registry=r,
        )
        self.state_duration = Histogram(
            "syncd_state_duration_seconds",
            "Time an order spent in a state, observed when it leaves the state.",
            ["factory", "state"],
            buckets=_STATE_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            "syncd_api_requests",
            "HTTP requests to TradeGecko and Katana, by answer status.",
            ["factory", "service", "method", "endpoint", "status"],
            registry=r,
        )
        # No factory label: a service host's latency is its factories' (one pool per host),
        # and a histogram child is ~4.7 KB: per factory, 1,000 factories' first orders
        # added ~85 MB to the daemon (18 endpoints each).
        self.api_duration = Histogram(
            "syncd_api_request_duration_seconds",
            "Time from sending a request to reading its whole answer (every factory's).",
            ["service", "method", "endpoint"],
            buckets=_API_BUCKETS,
            registry=r,
        )
        self.rate_limit_remaining = Gauge(
            "syncd_api_rate_limit_remaining",
            "Requests the service last said remain in its rate-limit window.",
            ["factory", "service"],
            registry=r,
        )
        self.drift_detected = Counter(
            "syncd_drift_detected",
            "Edits found after import (never copied across), by the side edited.",
            ["factory", "side"],
            registry=r,
        )
        self.webhooks = Counter(
            "syncd_webhooks",
            "Webhook deliveries, by service and what the listener answered.",
            ["factory", "service", "result"],
            registry=r,
        )
        self.inbox_backlog = Gauge(
            "syncd_inbox_backlog_events",
            "Inbox events waiting to be processed.",
            ["factory"],
            registry=r,
        )
        self.inbox_oldest_age = Gauge(
            "syncd_inbox_oldest_event_age_seconds",
            "Age of the oldest inbox event waiting to be processed (0 when none waits).",
            ["factory"],
            registry=r,
        )
        self.last_poll = Gauge(
            "syncd_poll_last_success_timestamp_seconds",
            "When each poller last completed a poll, as a Unix time.",
            ["factory", "source"],
            registry=r,
        )
        self.effect_retries = Counter(
            "syncd_effect_retries",
            "Effect runs that failed for a passing reason and will be tried again.",
            ["factory", "effect"],
            registry=r,
        )
        self.effect_failures = Counter(
            "syncd_effect_failures",
            "Effect runs that gave up: the order needs a person.",
            ["factory", "effect"],
            registry=r,
        )
        self.service_paused = Gauge(
            "syncd_service_paused",
            "1 while the service rejects syncd's token (401) and every order is paused.",
            ["factory", "service"],
            registry=r,
        )
        # Several daemons on one PostgreSQL database: what this one holds.
        self.factories_owned = Gauge(
            "syncd_factories_owned",
            "Factories this daemon runs now (it holds their leases).",
            registry=r,
        )
        self.lease_takeovers = Counter(
            "syncd_lease_takeovers",
            "Factories this daemon took the lease of and started.",
            registry=r,
        )
        self.factory_running = Gauge(
            "syncd_factory_running",
            "1 while the factory runs on this daemon (absent elsewhere).",
            ["factory"],
            registry=r,
        )
        self.refreshed = Gauge(
            "syncd_metrics_refresh_timestamp_seconds",
            "When the gauges read from the database were last refreshed, as a Unix time.",
            registry=r,
        )
        #: The factories refresh_forever runs for, and which of its tasks reads for them all.
        self._refreshing: dict[str, _Refreshing] = {}
        self._refresher: str | None = None
        self._refresher_gone: anyio.Event | None = None  # made in the event loop

    # -- the observer ------------------------------------------------------------------

    def transitioned(self, notice: TransitionNotice) -> None:
        self.transition(notice.source, notice.dest, notice.trigger, notice.since)

    def effect_ran(self, effect: str, result: str) -> None:
        self.effect(effect, result)

    def drift_found(self, side: str) -> None:
        self.drift(side)

    def webhook_answered(self, service: str, result: str) -> None:
        self.webhook(service, result)

    def api_answered(
        self, service: str, method: str, endpoint: str, status: int, seconds: float
    ) -> None:
        self.api(service, method, endpoint, status, seconds)

    def for_factory(self, factory: str) -> Observer:
        """An observer counting what one factory's parts report under its ``factory``."""
        return _FactoryMetrics(self, factory)

    # -- counting ------------------------------------------------------------------------

    def api_hook(
        self, service: str, *, factory: str = DEFAULT_FACTORY
    ) -> Callable[[str, str, int, float], None]:
        """An ``on_response`` hook for the :class:`ServiceClient` of ``service``."""

        def observe(method: str, endpoint: str, status: int, seconds: float) -> None:
            self.api(service, method, endpoint, status, seconds, factory=factory)

        return observe

    def api(
        self,
        service: str,
        method: str,
        endpoint: str,
        status: int,
        seconds: float,
        *,
        factory: str = DEFAULT_FACTORY,
    ) -> None:
        """Count a request and observe its time."""
        code = str(status) if status else "none"
        self.api_requests.labels(factory, service, method, endpoint, code).inc()
        self.api_duration.labels(service, method, endpoint).observe(seconds)

    def transition(
        self,
        source: str | None,
        dest: str,
        trigger: str,
        since: datetime | None,
        *,
        factory: str = DEFAULT_FACTORY,
    ) -> None:
        """Count a transition; observe how long the order sat in ``source``."""
        self.transitions.labels(factory, source or "none", dest, trigger).inc()
        if source is not None and since is not None and source != dest:
            self.state_duration.labels(factory, source).observe(
                max(0.0, self._clock() - since.timestamp())
            )

    def effect(self, effect: str, result: str, *, factory: str = DEFAULT_FACTORY) -> None:
        """Count an effect run that ended in ``retry`` or ``failed``; ``ok`` is not counted."""
        if result == "retry":
            self.effect_retries.labels(factory, effect).inc()
        elif result == "failed":
            self.effect_failures.labels(factory, effect).inc()

    def webhook(self, service: str, result: str, *, factory: str = DEFAULT_FACTORY) -> None:
        """Count a webhook delivery: accepted, duplicate, ignored, bad_signature, ..."""
        self.webhooks.labels(factory, service, result).inc()

    def drift(self, side: str, *, factory: str = DEFAULT_FACTORY) -> None:
        """Count an order found edited after import on ``side`` (tradegecko or katana)."""
        self.drift_detected.labels(factory, side).inc()

    def known_states(self, states: list[str], *, factory: str = DEFAULT_FACTORY) -> None:
        """Export 0 for every state of ``factory`` (and its other zero-valued series) before
        its first refresh, so dashboards and alerts see the series from the start."""
        for state in states:
            self.orders.labels(factory, state).set(0)
            self.orders_oldest_age.labels(factory, state).set(0)
        for service in _SERVICES:
            self.drift_detected.labels(factory, service)
            self.webhooks.labels(factory, service, "accepted")
            self.service_paused.labels(factory, service).set(0)
        self.inbox_backlog.labels(factory).set(0)
        self.inbox_oldest_age.labels(factory).set(0)

    def forget_factory(self, factory: str) -> None:
        """Drop every series of a factory that stopped: the ``factory`` label stays bounded
        by the factories running."""
        for metric in self._by_factory:
            # prometheus_client has no "remove where"; its children are keyed by label values.
            for values in [v for v in metric._metrics if v and v[0] == factory]:
                metric.remove(*values)

    @property
    def _by_factory(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (
            self.orders,
            self.orders_oldest_age,
            self.transitions,
            self.state_duration,
            self.api_requests,
            self.rate_limit_remaining,
            self.drift_detected,
            self.webhooks,
            self.inbox_backlog,
            self.inbox_oldest_age,
            self.last_poll,
            self.effect_retries,
            self.effect_failures,
            self.service_paused,
            self.factory_running,
        )

    # -- refresh -------------------------------------------------------------------------

    async def refresh(
        self,
        store: Store,
        *,
        states: list[str],
        polls: Mapping[str, float | None],
        budgets: Mapping[str, RequestBudget],
    ) -> None:
        """Read the database gauges of the store's factory once; set the in-memory ones."""
        now = self._clock()
        counts = await store.counts_by_state()
        oldest = await store.oldest_by_state()
        backlog = await store.inbox_backlog()
        paused = await store.meta_with_prefix(_PAUSED_PREFIX)
        self._set(
            _Refreshing(store, states, lambda: polls, budgets),
            now,
            counts=counts,
            oldest=oldest,
            backlog=backlog,
            paused=paused,
        )
        self.refreshed.set(now)

    async def refresh_all(self) -> None:
        """Refresh every factory that :meth:`refresh_forever` runs for: a few queries each
        grouped by factory for all of them (1,000 factories, 4 queries), not 4 per factory."""
        running = dict(self._refreshing)
        if len(running) == 1:
            (one,) = running.values()
            await self.refresh(one.store, states=one.states, polls=one.polls(), budgets=one.budgets)
            return
        if not running:
            return
        now = self._clock()
        store = next(iter(running.values())).store  # any view reads every factory's rows
        counts = await store.counts_by_state_per_factory()
        oldest = await store.oldest_by_state_per_factory()
        backlogs = await store.inbox_backlog_per_factory()
        paused = await store.meta_with_prefix_per_factory(_PAUSED_PREFIX)
        # Only the factories still running after the reads: a stopped one's series are gone
        # (forget_factory) and must not come back.
        for factory, entry in self._refreshing.items():
            if running.get(factory) is not entry:
                continue
            self._set(
                entry,
                now,
                counts=counts.get(factory, {}),
                oldest=oldest.get(factory, {}),
                backlog=backlogs.get(factory, (0, None)),
                paused=paused.get(factory, {}),
            )
        self.refreshed.set(now)

    def _set(
        self,
        entry: _Refreshing,
        now: float,
        *,
        counts: Mapping[str, int],
        oldest: Mapping[str, tuple[str, float]],
        backlog: tuple[int, float | None],
        paused: Mapping[str, str],
    ) -> None:
        factory = entry.store.factory
        for state in sorted(set(entry.states) | set(counts)):
            self.orders.labels(factory, state).set(counts.get(state, 0))
            since = oldest.get(state)
            self.orders_oldest_age.labels(factory, state).set(
                max(0.0, now - since[1]) if since else 0
            )
        waiting, oldest_event = backlog
        self.inbox_backlog.labels(factory).set(waiting)
        self.inbox_oldest_age.labels(factory).set(
            max(0.0, now - oldest_event) if oldest_event else 0
        )
        for service in sorted(set(_SERVICES) | set(paused)):
            self.service_paused.labels(factory, service).set(1 if service in paused else 0)
        for source, at in entry.polls().items():
            if at is not None:
                self.last_poll.labels(factory, source).set(at)
        for service, budget in entry.budgets.items():
            if budget.remaining_reported is not None:
                self.rate_limit_remaining.labels(factory, service).set(budget.remaining_reported)

    async def refresh_forever(
        self,
        store: Store,
        interval: float,
        *,
        states: list[str],
        polls: Callable[[], Mapping[str, float | None]],
        budgets: Mapping[str, RequestBudget],
    ) -> None:
        """Refresh the store's factory every ``interval`` seconds until cancelled; a failed
        read is logged.

        With several factories one of these tasks refreshes them all at once
        (:meth:`refresh_all`) while the others wait; when it stops, another takes over.
        """
        mine = self._refreshing[store.factory] = _Refreshing(store, states, polls, budgets)
        try:
            while True:
                if self._refresher is not None:
                    if self._refresher_gone is None:
                        self._refresher_gone = anyio.Event()
                    await self._refresher_gone.wait()
                    continue
                self._refresher = store.factory
                try:
                    while True:
                        try:
                            await self.refresh_all()
                        except Exception as exc:  # a metrics read must never stop the daemon
                            log.warning("metrics refresh failed: %s", exc)
                        await anyio.sleep(interval)
                finally:
                    self._refresher = None
                    if self._refresher_gone is not None:
                        self._refresher_gone.set()
                        self._refresher_gone = None
        finally:
            if self._refreshing.get(store.factory) is mine:
                del self._refreshing[store.factory]


async def serve_metrics(
    metrics: Metrics,
    sock: socket.socket,
    status: StatusPage | None = None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on the bound ``sock`` until cancelled; with ``status``, the status
    page beside it (``/``, ``/orders/{po_number}``)."""
    app = make_asgi_app(registry=metrics.registry)
    if status is not None:
        app = status.app(metrics_app=app)
    try:
        async with serving_socket(app, sock):
            task_status.started()
            await anyio.sleep_forever()
    finally:
        if status is not None:
            with anyio.CancelScope(shield=True):
                await status.close()


@dataclass(frozen=True, eq=False)
class _Refreshing:
    """What one factory's gauges are refreshed from."""

    store: Store
    states: list[str]
    polls: Callable[[], Mapping[str, float | None]]
    budgets: Mapping[str, RequestBudget]


class _FactoryMetrics(Observer):
    """What one factory's parts report, counted under its ``factory`` label."""

    def __init__(self, metrics: Metrics, factory: str) -> None:
        self._metrics = metrics
        self.factory = factory

    def transitioned(self, notice: TransitionNotice) -> None:
        self._metrics.transition(
            notice.source, notice.dest, notice.trigger, notice.since, factory=self.factory
        )

    def effect_ran(self, effect: str, result: str) -> None:
        self._metrics.effect(effect, result, factory=self.factory)

    def drift_found(self, side: str) -> None:
        self._metrics.drift(side, factory=self.factory)

    def webhook_answered(self, service: str, result: str) -> None:
        self._metrics.webhook(service, result, factory=self.factory)

    def api_answered(
        self, service: str, method: str, endpoint: str, status: int, seconds: float
    ) -> None:
        self._metrics.api(service, method, endpoint, status, seconds, factory=self.factory)
