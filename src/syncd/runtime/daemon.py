"""The daemon: every factory's clients, pollers, dispatcher and webhook side in one task
group, around what they share (the store, metrics and status page, one webhook listener,
one connection pool per service host)."""

from __future__ import annotations

import hashlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx

from syncd.adapters._http import HostPool, RequestBudget, ServiceClient
from syncd.adapters.katana import KatanaClient
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.config import (
    Config,
    ConfigChange,
    KatanaConfig,
    RetryPolicies,
    TradeGeckoConfig,
    config_change,
    config_problems,
    read_config,
)
from syncd.domain.statechart import Statechart, load_statechart
from syncd.errors import (
    ApiError,
    AuthError,
    ConfigError,
    DecodeError,
    LeaseLost,
    Retries,
    RetryPolicy,
    SyncdError,
    Try,
    first_error,
    is_transient,
)
from syncd.ops.asgi import bind_socket, serving_socket
from syncd.ops.logging import register_secrets
from syncd.ops.metrics import Metrics, serve_metrics
from syncd.ops.statuspage import StatusPage
from syncd.runtime.coordinator import Coordinator, LeaseGuard, LeaseTimes
from syncd.runtime.dispatcher import Dispatcher, check_chart
from syncd.runtime.effects import Effects, attempts_since_meta, note_attempts_since
from syncd.runtime.inbox import InboxWatch
from syncd.runtime.observer import Observer, Observers
from syncd.runtime.pauses import PAUSED_PREFIX
from syncd.runtime.pollers import KatanaPoller, TradeGeckoPoller
from syncd.runtime.webhooks import (
    WebhookConsumer,
    WebhookIntake,
    WebhookListener,
    WebhookRouter,
    bind_listener,
    path_token_meta,
)
from syncd.store import DEFAULT_FACTORY, Store

__all__ = ["Daemon", "FactoryRuntime", "Pools", "check_services", "running_daemon"]

log = logging.getLogger("syncd.daemon")

#: Factories starting at the same time (each asks its services and registers its webhooks).
_STARTING_AT_ONCE = 32
#: Webhook registrations and verifications at once, when they run after the start.
_REGISTERING_AT_ONCE = 32
#: The services' answer to the start's check, for the settings it was asked with
#: (:func:`_check_record`): a restart with the same settings does not ask again.
_META_CHECKED = "start_check.passed"
#: A restart's wait is the policy's less up to this share of it: factories failing together
#: (a bug hit by all) do not start again all at once, and each wait still grows.
_RESTART_JITTER = 0.25


class _Restarts:
    """Each factory's failures in a row on this daemon, under the restart policy
    (``daemon.restart_initial`` doubling to ``daemon.restart_max``). A run as long as the
    longest wait counts as healthy: its failure is the first again."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._failures: Retries[str] = Retries(policy)
        self._waits: dict[str, float] = {}

    def failed(self, name: str, ran_for: float) -> Try:
        """Count a failure of ``name`` after ``ran_for`` seconds of work (0: at its start):
        which one in a row, and how long to wait before its next start."""
        if ran_for >= self.policy.maximum:
            self._failures.succeeded(name)
        failure = self._failures.failed(name)
        assert failure.delay is not None  # the restart policy never gives up
        wait = self._waits[name] = failure.delay * (1 - random.uniform(0, _RESTART_JITTER))
        return Try(failure.number, wait)

    def last(self, name: str) -> float:
        """The wait after ``name``'s last failure counted (the policy's first without)."""
        return self._waits.get(name, self.policy.initial)


@dataclass
class FactoryRuntime:
    """One factory's running parts: its view of the store, its two clients (its tokens, its
    own request budgets), its dispatcher, pollers and webhook side, in its own cancel scope."""

    name: str
    #: The config with only this factory (:meth:`Config.for_factory`).
    config: Config
    store: Store
    chart: Statechart
    katana: KatanaClient
    tradegecko: TradeGeckoClient
    dispatcher: Dispatcher
    tradegecko_poller: TradeGeckoPoller
    katana_poller: KatanaPoller
    activated_at: datetime
    webhooks: WebhookListener | None = None
    #: Its lease's guard when daemons share the factories (gates its requests and effects).
    guard: LeaseGuard | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    #: Why its services refused the start's check, when it was started anyway.
    refused: ApiError | None = None

    def poll_now(self) -> None:
        """Ask both pollers to poll at once rather than at their next interval."""
        self.tradegecko_poller.kick.set()
        self.katana_poller.kick.set()

    def wake(self) -> None:
        """A delivery or an event is in its inbox: the consumer and the dispatcher look now."""
        self.dispatcher.wake()
        if self.webhooks is not None:
            self.webhooks.consumer.wake()


class Daemon:
    """A running daemon: the factories it runs (:attr:`factories`) and what they share (the
    store, the metrics and status page, the webhook listener, one connection pool per
    service host).

    The single-factory attributes (``store``, ``katana``, ``dispatcher``, ``webhooks``, ...)
    are the first running factory's, for the CLI, the demo and the tests of one factory.
    :meth:`start_factory` and :meth:`stop_factory` start and stop one factory while the
    daemon runs (a reload, a coordinator handing factories between daemons).
    """

    def __init__(
        self,
        config: Config,
        root: Store,
        *,
        chart: Statechart | None,
        metrics: Metrics,
        observer: Observer | None,
        retry: RetryPolicies,
        transports: Pools,
        metrics_url: str | None,
        webhooks_url: str | None,
        router: WebhookRouter | None,
        adjust: Callable[[Config], Config] | None = None,
    ) -> None:
        self.config = config
        #: The store as opened (the default factory's view); each factory has its own view.
        self.root = root
        self.metrics: Metrics | None = metrics
        self.metrics_url = metrics_url
        self.webhooks_url = webhooks_url
        self.router = router
        self.factories: dict[str, FactoryRuntime] = {}
        self._chart = chart
        self._charts: dict[frozenset[str], Statechart] = {}
        self._observer = observer
        self._retry = retry
        #: One connection pool per service host, shared by every factory.
        self.pools = transports
        self._adjust = adjust or (lambda config: config)
        self._tg: anyio.abc.TaskGroup | None = None
        self._reloading = anyio.Lock()
        #: Who runs which factory, when daemons share a PostgreSQL database; ``None``: this
        #: daemon runs every factory of its config (SQLite).
        self.coordinator: Coordinator | None = None
        #: The one look at the inbox for every factory (run from the first factory's start):
        #: their readers sleep until woken, no timer each.
        self.inbox_watch = InboxWatch(root)
        self._watching = False
        self._registering = anyio.Semaphore(_REGISTERING_AT_ONCE)
        #: Set once every factory of the start runs (registrations wait for it).
        self.started = anyio.Event()
        #: Set when the whole daemon stops: its factories' metrics go with it.
        self.closing = False
        #: Set once the start check of every factory is done (at once without a check).
        self.checked = anyio.Event()
        self._restarts = _Restarts(retry.restart)
        #: The factories that failed, waiting for their restart (cancelled by a stop).
        self._pending: dict[str, anyio.CancelScope] = {}

    @property
    def supervised(self) -> bool:
        """Whether a factory whose work fails is stopped alone and started again here after
        a backoff: beside other factories. A daemon of one factory ends instead (its error's
        exit code, the traceback logged), so that systemd starts the whole process again
        (``Restart=on-failure``, 15 s apart) and the unit's failure is seen; with a lease
        guard (daemons sharing the factories) the coordinator takes it again."""
        return len(self.config.factories) > 1

    def restart_pending(self, name: str) -> bool:
        """Whether ``name`` failed and waits for its restart here."""
        return name in self._pending

    async def check_services(
        self, name: str, config: Config, on_wait: Callable[[str], None] | None
    ) -> None:
        """The start check of factory ``name``'s services, on the daemon's shared pools and
        counted in its metrics."""
        await check_services(
            config,
            katana_transport=self.pools.shared("katana", config.katana.base_url),
            tradegecko_transport=self.pools.shared("tradegecko", config.tradegecko.base_url),
            on_wait=on_wait,
            observer=self._watchers(name),
        )

    def _watchers(self, name: str) -> Observer:
        """What a factory's parts tell: its metrics, and the daemon's observer if any."""
        assert self.metrics is not None
        own = self.metrics.for_factory(name)
        return Observers([own, self._observer]) if self._observer is not None else own

    # -- the first factory, for one-factory callers ----------------------------------------

    def _first(self) -> FactoryRuntime:
        if not self.factories:
            raise LookupError("no factory is running")
        return next(iter(self.factories.values()))

    @property
    def store(self) -> Store:
        return self._first().store if self.factories else self.root

    @property
    def chart(self) -> Statechart:
        return self._first().chart

    @property
    def katana(self) -> KatanaClient:
        return self._first().katana

    @property
    def tradegecko(self) -> TradeGeckoClient:
        return self._first().tradegecko

    @property
    def dispatcher(self) -> Dispatcher:
        return self._first().dispatcher

    @property
    def tradegecko_poller(self) -> TradeGeckoPoller:
        return self._first().tradegecko_poller

    @property
    def katana_poller(self) -> KatanaPoller:
        return self._first().katana_poller

    @property
    def activated_at(self) -> datetime:
        return self._first().activated_at

    @property
    def webhooks(self) -> WebhookListener | None:
        return self._first().webhooks if self.factories else None

    def poll_now(self) -> None:
        """Ask every factory's pollers to poll at once rather than at their next interval."""
        for runtime in self.factories.values():
            runtime.poll_now()

    # -- starting and stopping factories ---------------------------------------------------

    def factory_config(self, name: str) -> Config:
        """The config a factory runs with: :attr:`config` with only that factory (itself when
        it is the only one, so settings changed on it in code still hold).

        :raises KeyError: the config has no such factory.
        """
        if list(self.config.factories) == [name]:
            return self.config
        return self.config.for_factory(name)

    def chart_for(self, config: Config) -> Statechart:
        """The statechart a factory runs: the one given, else the file's with the factory's
        conditions (loaded once per set of conditions)."""
        if self._chart is not None:
            return self._chart
        holding = config.statechart_conditions()
        if holding not in self._charts:
            self._charts[holding] = check_chart(
                load_statechart(config.daemon.statechart, holding=holding)
            )
        return self._charts[holding]

    async def start_factory(
        self,
        name: str,
        guard: LeaseGuard | None = None,
        *,
        check: bool = False,
        strict: bool = True,
        on_wait: Callable[[str], None] | None = None,
    ) -> FactoryRuntime:
        """Start the factory ``name`` of :attr:`config` in the daemon's task group.

        :param guard: the factory's lease guard when daemons share the factories (the
            :class:`~syncd.runtime.coordinator.Coordinator` starts it so). Every write of
            its store view is fenced by ``guard.lease`` (:class:`~syncd.errors.LeaseLost`
            once it moved on), every request of its clients checks the guard first and
            waits no longer than it lasts, and its work is cancelled when the guard ends.
            A failure of its work then stops that factory alone (logged, the guard revoked:
            the coordinator takes it again at its first round after the factory's backoff).
            Without a guard, beside other factories (:attr:`supervised`), a failure of its
            work stops it alone too and this daemon starts it again after the backoff
            (``daemon.restart_initial`` doubling to ``daemon.restart_max``). A failure of
            the start itself is raised here, and counted into that backoff.

        :param check: first make one call to each of its services (:func:`check_services`).
        :param strict: with ``check``, a refusal raises; else it is logged and the factory
            starts anyway (its pollers pause it at the first 401 and resume when the token
            works), so one factory's wrong token never stops the others.
        :raises ValueError: it runs already.
        :raises KeyError: the config has no such factory.
        :raises ApiError: with ``check`` and ``strict``, a service refused.
        :raises StoreError: its rows cannot be read or written.
        """
        if self._tg is None:
            raise RuntimeError("the daemon is not running")
        if name in self.factories:
            raise ValueError(f"factory {name} runs already")
        config = self.factory_config(name)
        self._cancel_restart(name)  # it starts now
        try:
            return await self._start_factory(
                name, config, guard, check=check, strict=strict, on_wait=on_wait
            )
        except Exception as exc:
            # Counted like a failure of its work: a start failing every time (on a reload, a
            # restart, a coordinator's round) is tried again less and less often.
            self._failed(name, exc, ran_for=0.0)
            raise

    async def _start_factory(
        self,
        name: str,
        config: Config,
        guard: LeaseGuard | None,
        *,
        check: bool,
        strict: bool,
        on_wait: Callable[[str], None] | None,
    ) -> FactoryRuntime:
        assert self._tg is not None
        chart = self.chart_for(config)
        store = self.root.for_factory(name, lease=None if guard is None else guard.lease)
        register_secrets([config.katana.token, config.tradegecko.token])
        refused = (
            await self._check_factory(name, config, store, strict=strict, on_wait=on_wait)
            if check
            else None
        )
        activated = datetime.fromisoformat(await store.setdefault_meta(*_activated_meta()))
        await note_attempts_since(store)
        runtime: FactoryRuntime = await self._tg.start(
            self._run_factory, name, config, chart, store, activated, guard
        )
        runtime.refused = refused
        if guard is not None and self.metrics is not None:
            self.metrics.lease_takeovers.inc()
            self.metrics.factories_owned.set(len(self.factories))
        log.info(
            "factory %s running",
            name,
            extra={
                "factory": name,
                "activated_at": activated.isoformat(),
                **({} if guard is None else {"fence": guard.lease.fence}),
            },
        )
        return runtime

    async def set_first_meta(self, names: Sequence[str]) -> int:
        """Set, in one transaction, what each factory's first start sets (its activation
        time, the import attempts' mark, its webhook path token) where it is not set yet;
        each factory's start then only reads them. Return how many keys were set."""
        at_once = (_activated_meta(), attempts_since_meta())  # one start: one time for all
        rows = [(name, key, value) for name in names for key, value in at_once]
        if self.router is not None:
            rows += [(name, *path_token_meta()) for name in names]  # each its own token
        return await self.root.setdefault_meta_of(rows)

    async def _check_factory(
        self,
        name: str,
        config: Config,
        store: Store,
        *,
        strict: bool,
        on_wait: Callable[[str], None] | None,
    ) -> ApiError | None:
        """The start check of one factory's services: its refusal, or ``None`` when they
        answered (or had answered before with these very settings, beside others: a token
        revoked since pauses the factory at its first call instead).

        :raises ApiError: with ``strict``, a service refused.
        """
        if not strict and await _passed_before(store, config):
            return None
        try:
            await self.check_services(name, config, on_wait)
        except ApiError as exc:
            await store.delete_meta(_META_CHECKED)
            if strict:
                raise
            log.error(
                "factory %s: %s; it runs anyway: it stays paused until it answers",
                name,
                exc,
                extra={"factory": name},
            )
            return exc
        await store.set_meta(_META_CHECKED, _check_record(config))
        return None

    async def check_started(
        self, names: list[str], on_wait: Callable[[str], None] | None = None
    ) -> None:
        """Check the services of factories that started unchecked, after the whole start
        and a bounded number at a time (as registrations are): 1,000 factories serve their
        webhooks at once rather than after 2,000 calls. A refused factory runs on, paused
        at its first call until it answers (``refused`` says why).

        :raises ApiError: every one of them was refused: the config (a base URL, the tokens)
            is wrong, not one factory's account; said as with one factory (exit 4 or 5).
        """
        asking = anyio.Semaphore(_STARTING_AT_ONCE)
        refused: dict[str, ApiError] = {}

        async def ask(name: str) -> None:
            runtime = self.factories.get(name)
            if runtime is None:  # stopped meanwhile (a reload)
                return
            async with asking:
                exc = await self._check_factory(
                    name, runtime.config, runtime.store, strict=False, on_wait=on_wait
                )
            if exc is not None:
                runtime.refused = refused[name] = exc

        try:
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(ask, name)
        finally:
            self.checked.set()
        if names and len(refused) == len(names):
            raise refused[names[0]]

    async def stop_factory(self, name: str) -> None:
        """Stop the factory ``name``: its pollers, webhook routes (404 from now on) and
        effects (cancelled at a step boundary, as on SIGTERM: they run again at its next
        start). Its rows stay in the database. Nothing when it does not run."""
        runtime = self.factories.get(name)
        # Stopped on purpose: not started again by itself.
        if self._cancel_restart(name) and runtime is None and self.metrics is not None:
            self.metrics.forget_factory(name)  # the series it kept for its return
        if runtime is None:
            return
        runtime.scope.cancel()
        await runtime.stopped.wait()
        log.info("factory %s stopped", name, extra={"factory": name})

    def wake(self, name: str) -> None:
        """A delivery for ``name`` is in the inbox (another daemon's listener took it): its
        consumer and dispatcher look now. Nothing when it does not run here."""
        runtime = self.factories.get(name)
        if runtime is not None:
            runtime.wake()

    def _watch_inbox(self) -> InboxWatch:
        """The daemon's :attr:`inbox_watch`, running in its task group from the first call."""
        if not self._watching:
            assert self._tg is not None
            self._tg.start_soon(self.inbox_watch.run)
            self._watching = True
        return self.inbox_watch

    async def _run_factory(
        self,
        name: str,
        config: Config,
        chart: Statechart,
        store: Store,
        activated: datetime,
        guard: LeaseGuard | None,
        *,
        task_status: anyio.abc.TaskStatus[FactoryRuntime],
    ) -> None:
        metrics = self.metrics
        assert metrics is not None
        metrics.known_states(list(chart.states), factory=name)
        watchers = self._watchers(name)
        retry = self._retry
        # Many factories' first polls spread over one poll interval rather than all at
        # once (a restart of 1,000 factories asked 2,000 lists in its first second).
        spread = len(self.config.factories) > 1
        scope = anyio.CancelScope()
        runtime: FactoryRuntime | None = None
        since = 0.0
        watch = self._watch_inbox()
        try:
            # Cancelled at the lease's deadline or when the coordinator revokes it, even if
            # nothing checks: nothing of the factory outlives its lease.
            with guard.cancel_scope() if guard is not None else nullcontext(), scope:

                def serving(
                    kind: type[_Client], settings: KatanaConfig | TradeGeckoConfig
                ) -> _Client:
                    return _client(
                        kind,
                        settings,
                        self.pools.shared(kind.service, settings.base_url),
                        # Limits are per key: each factory's own budget.
                        budget=RequestBudget(
                            settings.rate_limit, settings.rate_period, reserve=settings.reserve
                        ),
                        timeout=settings.timeout,
                        retry=retry.request,
                        on_response=partial(watchers.api_answered, kind.service),
                        shadow=config.shadow,
                        guard=guard,
                    )

                async with (
                    serving(KatanaClient, config.katana) as katana,
                    serving(TradeGeckoClient, config.tradegecko) as tradegecko,
                ):
                    effects = Effects(config, katana, tradegecko, store)
                    dispatcher = Dispatcher(
                        store,
                        chart,
                        effects,
                        concurrency=config.daemon.concurrency,
                        retry=retry,
                        observer=watchers,
                        shadow=config.shadow,
                        watch=watch,
                    )
                    tg_poller = TradeGeckoPoller(
                        store, tradegecko, config, activated, dispatcher.wake, watch=watch
                    )
                    kt_poller = KatanaPoller(
                        store, katana, config, chart, activated, dispatcher.wake
                    )
                    # An SO with a followed order's key that is not its SO: settled at once.
                    kt_poller.on_duplicate = effects.settle_duplicate
                    # A receipt of a PO the polls saw unchanged need not read it.
                    effects.purchase_orders_seen = tg_poller.changes_seen_at
                    listener: WebhookListener | None = None
                    if self.router is not None:
                        consumer = WebhookConsumer(
                            store,
                            tg_poller,
                            kt_poller,
                            dispatcher.wake,
                            retry=retry,
                            chart=chart,
                            coalesce=config.webhooks.coalesce,
                            concurrency=config.webhooks.concurrency,
                            trusted=config.webhooks.verify_signatures,
                            watch=watch,
                        )
                        consumer.own_procurement = effects.made_procurement
                        listener = WebhookListener(
                            config,
                            store,
                            katana,
                            tradegecko,
                            consumer,
                            watchers,
                            factory=None if name == self.router.unprefixed else name,
                        )
                    runtime = FactoryRuntime(
                        name,
                        config,
                        store,
                        chart,
                        katana,
                        tradegecko,
                        dispatcher,
                        tg_poller,
                        kt_poller,
                        activated,
                        listener,
                        guard,
                        scope,
                    )
                    async with anyio.create_task_group() as tg:
                        await tg.start(dispatcher.run)
                        for poller in (tg_poller, kt_poller):
                            if spread:
                                delay = random.uniform(0.0, poller.interval)
                                first = partial(_first_poll, poller, delay, self.started)
                                tg.start_soon(partial(poller.run, first=first))
                            else:
                                tg.start_soon(poller.run)
                        tg.start_soon(
                            partial(
                                metrics.refresh_forever,
                                store,
                                config.metrics.refresh_interval,
                                states=list(chart.states),
                                polls=lambda: {
                                    tg_poller.name: tg_poller.last_success,
                                    kt_poller.name: kt_poller.last_success,
                                },
                                budgets={
                                    "katana": katana.budget,
                                    "tradegecko": tradegecko.budget,
                                },
                            )
                        )
                        if listener is not None and self.router is not None:
                            await listener.prepare()
                            self.router.add(name, listener)
                            tg.start_soon(listener.consumer.run)
                            assert self.webhooks_url is not None
                            # One factory registers before it counts as started (a change
                            # right after the start comes as a webhook); many register
                            # after, a bounded number at a time, as polls reconcile.
                            await tg.start(
                                partial(
                                    listener.register,
                                    self.webhooks_url,
                                    wait_first=not spread,
                                    turns=self._registering,
                                    after=self.started,
                                )
                            )
                        self.factories[name] = runtime
                        metrics.factory_running.labels(name).set(1)
                        since = anyio.current_time()
                        task_status.started(runtime)
        except Exception as exc:
            if runtime is None or name not in self.factories:
                raise  # a failed start: its caller says it
            if guard is None and not self.supervised:
                raise  # one factory alone: the daemon ends with it (see supervised)
            # One factory's fault (a bug, a write refused because the lease moved on) stops
            # that factory alone; it starts again after its backoff (here, or on SQLite by
            # this daemon; with a lease, at the coordinator's first round after it).
            failure = self._failed(name, exc, ran_for=anyio.current_time() - since)
            if failure is None:
                log.exception("factory %s failed: stopping it", name, extra={"factory": name})
            else:
                log.exception(
                    "factory %s failed: stopping it; %s %.1f s (failure %d in a row)",
                    name,
                    "it starts again in" if guard is None else "not taken here again for",
                    failure.delay,
                    failure.number,
                    extra={"factory": name, "restart_in": round(failure.delay or 0.0, 3)},
                )
            if guard is not None:
                guard.revoke("its work failed")
            elif failure is not None and failure.delay is not None:
                self._restart_later(name, failure.delay)
        finally:
            if self.router is not None:
                self.router.remove(name)
            if self.factories.get(name) is runtime:
                del self.factories[name]
            if self.restart_pending(name):
                # Its series stay for its return; the gauge says it does not run meanwhile.
                metrics.factory_running.labels(name).set(0)
            elif not self.closing:  # stopped alone: its series go (O(series) per factory)
                metrics.forget_factory(name)
            if guard is not None:
                metrics.factories_owned.set(len(self.factories))
            if runtime is not None:
                runtime.stopped.set()

    def _failed(self, name: str, error: BaseException, *, ran_for: float) -> Try | None:
        """Count a failure of ``name``'s work or start; with a coordinator, it takes the
        factory here again only after the backoff. ``None``: not counted (its lease moved
        on: no fault of the factory's)."""
        if first_error(error, LeaseLost) is not None:
            return None
        failure = self._restarts.failed(name, ran_for)
        assert failure.delay is not None
        if self.coordinator is not None:
            self.coordinator.hold_off(name, failure.delay)
        return failure

    def _restart_later(self, name: str, delay: float) -> None:
        """Start ``name`` again in ``delay`` seconds, unless it is stopped or started first
        (without a coordinator: SQLite, this daemon runs every factory)."""
        assert self._tg is not None
        self._cancel_restart(name)
        scope = self._pending[name] = anyio.CancelScope()
        self._tg.start_soon(self._restart, name, delay, scope)

    def _cancel_restart(self, name: str) -> bool:
        """Cancel ``name``'s restart; whether one was pending."""
        pending = self._pending.pop(name, None)
        if pending is not None:
            pending.cancel()
        return pending is not None

    async def _restart(self, name: str, delay: float, scope: anyio.CancelScope) -> None:
        with scope:
            await anyio.sleep(delay)
            # After a reload under way, which may have started, changed or removed it.
            async with self._reloading:
                if self._pending.get(name) is not scope:
                    return
                del self._pending[name]
                if name in self.factories:
                    return
                if name not in self.config.factories:
                    assert self.metrics is not None
                    self.metrics.forget_factory(name)  # removed while it waited
                    return
                log.info("factory %s: starting it again", name, extra={"factory": name})
                try:
                    await self.start_factory(name)
                except Exception as exc:
                    # Its start failed too (counted by start_factory): once more, later.
                    self._after_failed_start(name, exc)

    def _after_failed_start(self, name: str, error: Exception) -> None:
        """A start that failed on a reload or a restart: logged (the traceback unless it is
        one of syncd's errors, which say what is wrong) and tried again after the backoff
        the failure was counted into, without stopping the other factories."""
        delay = self._restarts.last(name)
        if isinstance(error, SyncdError):
            log.error(
                "factory %s not started: %s; trying again in %.1f s",
                name,
                error,
                delay,
                extra={"factory": name},
            )
        else:
            log.exception(
                "factory %s not started; trying again in %.1f s",
                name,
                delay,
                extra={"factory": name},
            )
        assert self.metrics is not None
        self.metrics.factory_running.labels(name).set(0)
        self._restart_later(name, delay)

    # -- reloading ---------------------------------------------------------------------------

    async def reload(self, path: str | Path) -> ConfigChange | None:
        """Read the config at ``path`` again and start, stop and restart factories to match.

        A broken config, or one changing a daemon-wide key that needs a restart, is logged
        and nothing of it applied: the daemon runs on as it was. A removed factory's rows
        stay in the database. Returns the change applied, ``None`` when refused.
        """
        async with self._reloading:
            try:
                change = _reload(path, self.config, self._adjust)
            except ConfigError as exc:
                log.error("syncd: reload refused: %s", exc)
                return None
            if change.empty:
                log.info("reload: nothing changed")
                return change
            if self.coordinator is not None:
                await self._reload_shared(change)
            else:
                for name in (*change.removed, *change.changed):
                    await self.stop_factory(name)
                self.config = change.config
                for name in (*change.changed, *change.added):
                    try:
                        await self.start_factory(name, check=True, strict=False)
                    except Exception as exc:
                        if self.supervised:
                            self._after_failed_start(name, exc)  # the others run on
                        elif isinstance(exc, SyncdError):
                            log.error(
                                "factory %s not started: %s", name, exc, extra={"factory": name}
                            )
                        else:
                            raise  # one factory alone: the daemon ends (see supervised)
            if "daemon.log_level" in change.settings:
                logging.getLogger().setLevel(self.config.daemon.log_level.upper())
            log.info(
                "reload applied",
                extra={
                    "added": list(change.added),
                    "removed": list(change.removed),
                    "changed": list(change.changed),
                    "settings": list(change.settings),
                    "factories": list(self.factories),
                },
            )
            return change

    async def _reload_shared(self, change: ConfigChange) -> None:
        """A reload when daemons share the factories: the coordinator starts the added ones
        (here or elsewhere) and hands back the removed ones at its next round; a changed one
        running here is stopped now and taken again with its new settings."""
        coordinator = self.coordinator
        assert coordinator is not None
        self.config = change.config
        if self.router is not None:
            for name in change.removed:
                self.router.intakes.pop(name, None)
        for name in (*change.changed, *change.added):
            try:
                await self.add_intake(name)
            except SyncdError as exc:
                log.error(
                    "factory %s: its webhooks not taken: %s", name, exc, extra={"factory": name}
                )
        for name in change.changed:
            guard = coordinator.owned.get(name)
            if guard is not None:
                guard.revoke("its settings changed")
                await self.stop_factory(name)
        coordinator.factories = list(self.config.factories)

    async def add_intake(self, name: str) -> None:
        """Take ``name``'s webhook deliveries here whichever daemon runs it (persisted, its
        owner woken). Nothing without a webhook listener.

        :raises StoreError: its keys cannot be read.
        """
        if self.router is None:
            return
        # Counted as the factory's deliveries (syncd_webhooks_total) on this daemon too.
        observer = self.metrics.for_factory(name) if self.metrics is not None else None
        intake = WebhookIntake(
            name, self.factory_config(name), self.root.for_factory(name), observer
        )
        await intake.prepare()
        self.router.intakes[name] = intake


def _reload(path: str | Path, current: Config, adjust: Callable[[Config], Config]) -> ConfigChange:
    """:func:`reload_config`, with the command line's adjustments (``--no-register``,
    ``--shadow``) made to the new config before it is compared with the running one."""
    new = read_config(path)
    problems = config_problems(new)
    if problems:
        more = (
            f" (and {len(problems) - 1} more: `syncd check` lists them)"
            if len(problems) > 1
            else ""
        )
        raise ConfigError(f"{problems[0]}{more}; nothing was reloaded")
    change = config_change(current, adjust(new))
    if change.needs_restart:
        first_key, *others = change.needs_restart
        also = f" (so do {', '.join(others)})" if others else ""
        raise ConfigError(
            f"changed: it needs a restart of syncd{also}; nothing was reloaded", key=first_key
        )
    return change


class _Shared(httpx.AsyncBaseTransport):
    """A client's handle on a pool it shares: closing the client leaves the pool open."""

    def __init__(self, pool: httpx.AsyncBaseTransport) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.pool.handle_async_request(request)

    async def aclose(self) -> None:
        pass  # the daemon closes the pool when it stops


class Pools:
    """One connection pool per service host, shared by every factory's clients: tokens
    differ, hosts do not. A transport given (tests) stands for every host of its service."""

    def __init__(self, given: dict[str, httpx.AsyncBaseTransport | None]) -> None:
        self._given = given
        self._pools: dict[str, HostPool] = {}

    @property
    def hosts(self) -> list[str]:
        """The hosts a pool was opened for (a given transport is none of them)."""
        return list(self._pools)

    def shared(self, service: str, base_url: str) -> httpx.AsyncBaseTransport:
        given = self._given.get(service)
        if given is not None:
            return _Shared(given)
        url = httpx.URL(base_url)
        host = f"{url.scheme}://{url.host}:{url.port or ''}"
        if host not in self._pools:
            # A bounded queue for its connections, which check each request's lease guard
            # right before writing it.
            self._pools[host] = HostPool()
        return _Shared(self._pools[host])

    async def aclose(self) -> None:
        given = [t for t in self._given.values() if t is not None]
        for pool in [*self._pools.values(), *given]:
            await pool.aclose()
        self._pools.clear()


async def check_services(
    config: Config,
    *,
    katana_transport: httpx.AsyncBaseTransport | None = None,
    tradegecko_transport: httpx.AsyncBaseTransport | None = None,
    on_wait: Callable[[str], None] | None = None,
    within: float | None = None,
    observer: Observer | None = None,
) -> None:
    """Make one cheap authenticated call to each service before starting.

    Both are checked at once. A passing failure (5xx, 429, timeout, dropped connection, cut
    body) is retried with backoff for ``daemon.start_timeout`` seconds; a refusal (401, 404:
    a wrong token or base path) ends the check at once.

    :param on_wait: told what is awaited after each passing failure (systemd's status line).
    :param within: seconds to keep retrying instead of ``daemon.start_timeout``; 0 asks once.
    :param observer: told of each request (``syncd_api_requests_total``), as every client's.
    :raises AuthError: a token was rejected.
    :raises ApiError: a service refused, or could not be reached for the whole time.
    """
    bound = config.daemon.start_timeout if within is None else within
    deadline = anyio.current_time() + bound
    errors: dict[str, ApiError] = {}

    policy = config.retry().start

    async def probe(service: str, call: Callable[[], Awaitable[object]]) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await call()
                if attempt > 1:
                    log.info("%s answers: starting", service, extra={"attempts": attempt})
                return
            except ApiError as exc:
                left = deadline - anyio.current_time()
                if not _passing_at_start(exc):
                    errors[service] = exc
                    tg.cancel_scope.cancel()  # the config is wrong: no use waiting
                    return
                if left <= 0:
                    errors[service] = exc
                    if bound > 0:
                        log.error("%s failed for %.0f s at start: giving up", service, bound)
                    return
                wait = min(policy.delay(attempt), left)
                log.warning(
                    "%s not ready at start (try %d), retrying in %.1f s: %s",
                    service,
                    attempt,
                    wait,
                    exc,
                )
                if on_wait is not None:
                    on_wait(f"waiting for {service}: {exc}")
                await anyio.sleep(wait)

    # One attempt per call, each within the service's own timeout, 10 s and the bound: the
    # retries here are the backoff, and the last try ends at most that long after the bound.
    def probing(
        kind: type[_Client],
        settings: KatanaConfig | TradeGeckoConfig,
        transport: httpx.AsyncBaseTransport | None,
    ) -> _Client:
        timeout = max(1.0, min(settings.timeout, 10.0, bound if bound > 0 else 10.0))
        answered = None if observer is None else partial(observer.api_answered, kind.service)
        return _client(kind, settings, transport, timeout=timeout, attempts=1, on_response=answered)

    async with (
        probing(KatanaClient, config.katana, katana_transport) as katana,
        probing(TradeGeckoClient, config.tradegecko, tradegecko_transport) as tradegecko,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(probe, "katana", katana.get_factory)
        tg.start_soon(probe, "tradegecko", tradegecko.get_current_account)
    if errors:
        # A refusal says more than the other service's failure it cut short.
        raise min(
            (errors[name] for name in ("katana", "tradegecko") if name in errors),
            key=_passing_at_start,
        )


def _activated_meta() -> tuple[str, str]:
    # A factory's activation: its first start (POs created before it are not synced).
    return "activated_at", datetime.now(UTC).isoformat()


def _check_record(config: Config) -> str:
    """What a passed start check vouches for: each service's address and token (hashed:
    the database keeps no token). Any change to them asks the services again."""
    settings = (
        config.katana.base_url,
        config.katana.token,
        config.tradegecko.base_url,
        config.tradegecko.token,
    )
    return hashlib.sha256("\0".join(settings).encode()).hexdigest()


async def _passed_before(store: Store, config: Config) -> bool:
    """Whether the factory's services passed the start check with these settings, and no
    401 has paused it since (a paused factory is asked again, to say so at start)."""
    if await store.get_meta(_META_CHECKED) != _check_record(config):
        return False
    for service in ("katana", "tradegecko"):
        if await store.get_meta(f"{PAUSED_PREFIX}{service}") is not None:
            return False
    return True


async def _first_poll(
    poller: TradeGeckoPoller | KatanaPoller, delay: float, after: anyio.Event
) -> None:
    """Wait for ``poller``'s first poll: ``delay`` seconds after ``after`` (the daemon's
    whole start: the polls do not compete with the other factories' start), or a kick."""
    async with anyio.create_task_group() as waiting:

        async def kicked() -> None:
            await poller.kick.wait()
            waiting.cancel_scope.cancel()

        waiting.start_soon(kicked)
        await after.wait()
        await anyio.sleep(delay)
        waiting.cancel_scope.cancel()
    poller.kick = anyio.Event()  # the first poll is the one asked for


def _passing_at_start(error: ApiError) -> bool:
    """A failure that may pass by itself; a 401 or a 404 says the config is wrong."""
    if isinstance(error, DecodeError):
        return True  # a cut or garbled body
    return not isinstance(error, AuthError) and is_transient(error)


@asynccontextmanager
async def running_daemon(
    config: Config,
    *,
    chart: Statechart | None = None,
    observer: Observer | None = None,
    katana_transport: httpx.AsyncBaseTransport | None = None,
    tradegecko_transport: httpx.AsyncBaseTransport | None = None,
    check: bool = False,
    on_wait: Callable[[str], None] | None = None,
    adjust: Callable[[Config], Config] | None = None,
    shared: bool | None = None,
    owner: str | None = None,
) -> AsyncIterator[Daemon]:
    """Run the daemon, every factory of ``config`` in it, while the block runs; leaving the
    block stops it.

    :param observer: told what the daemon does (transitions, effects, drift, webhooks,
        requests), besides the daemon's own metrics.
    :param check: first make one call to each service of each factory
        (:func:`check_services`), after the database and the listen addresses are known to
        be usable. With one factory a refusal stops the start; with several, only when every
        factory is refused (the others start, the refused ones wait paused).
    :param on_wait: with ``check``, told what the start waits for while a service fails.
    :param adjust: what the command line changes in a config (``--no-register``), made
        again to each config a reload reads.
    :param shared: share the factories with the other daemons on the database (a
        :class:`~syncd.runtime.coordinator.Coordinator` starts the ones this daemon holds
        the lease of; the listener takes every factory's webhooks). By default on
        PostgreSQL; on SQLite the daemon runs every factory itself.
    :param owner: this daemon's name in the leases (a new one by default).
    :raises StoreInUse: another syncd runs on the SQLite file.
    :raises StoreError: the database cannot be opened.
    :raises StatechartError: the statechart file is broken.
    :raises ApiError: with ``check``, a service rejected its token or could not be reached.
    """
    if config.shadow:
        # Its own database and no webhook registration: a shadow run writes nowhere live.
        config = config.as_shadow()
    if chart is not None:
        chart = check_chart(chart)
    metrics = Metrics()
    retry = config.retry()
    pools = Pools({"katana": katana_transport, "tradegecko": tradegecko_transport})
    # Exclusive: a second daemon on the same SQLite file is refused before it decides
    # anything (StoreInUse); PostgreSQL databases are meant to be shared.
    store = await Store.open(config.daemon.database, exclusive=True)
    metrics_sock: socket.socket | None = None
    webhooks_sock: socket.socket | None = None
    try:
        metrics_sock = _metrics_socket(config)
        # Bound before anything starts, like the metrics socket: a port in use is said at once.
        webhooks_sock = bind_listener(config) if config.webhooks.enabled else None
        names = list(config.factories)
        # The factory `default` (today's single-factory config) keeps the unprefixed paths.
        router = WebhookRouter(unprefixed=DEFAULT_FACTORY) if webhooks_sock is not None else None
        daemon = Daemon(
            config,
            store,
            chart=chart,
            metrics=metrics,
            observer=observer,
            retry=retry,
            transports=pools,
            metrics_url=_url(metrics_sock) if metrics_sock is not None else None,
            webhooks_url=_url(webhooks_sock) if webhooks_sock is not None else None,
            router=router,
            adjust=adjust,
        )
        for name in names:  # a broken statechart is said before any service is asked
            daemon.chart_for(daemon.factory_config(name))
        if shared is None:
            shared = store.dialect != "sqlite"
        if not shared and len(names) > 1:
            # Their checks come after the start anyway (below). One factory, or shared ones,
            # are checked first: a refused first start must not become the activation.
            await daemon.set_first_meta(names)
        async with anyio.create_task_group() as tg:
            if router is not None and webhooks_sock is not None:
                await tg.start(_serve_webhooks, router, webhooks_sock)
            daemon._tg = tg
            if shared:
                await _start_shared(daemon, names, check=check, on_wait=on_wait, owner=owner)
            refused: dict[str, ApiError] = {}

            starting_now = anyio.Semaphore(_STARTING_AT_ONCE)

            async def start(name: str) -> None:
                try:
                    async with starting_now:
                        # Beside others, checked after the whole start (below).
                        await daemon.start_factory(
                            name, check=check and len(names) == 1, on_wait=on_wait
                        )
                except ApiError as exc:  # only with one factory
                    refused[name] = exc

            if shared:
                pass  # the coordinator started this daemon's share
            elif check and len(names) > 1:
                # Started together, a bounded number at a time, and checked after the whole
                # start (Daemon.check_started): a slow factory does not hold the others'
                # start, 1,000 factories take webhooks without waiting for 2,000 calls, and
                # their calls do not queue at once on the shared pools (they timed out waiting
                # for a connection, and httpcore's queue costs CPU by its length squared).
                async with anyio.create_task_group() as starting:
                    for name in names:
                        starting.start_soon(start, name)
                tg.start_soon(daemon.check_started, names, on_wait)
            else:
                for name in names:
                    await start(name)
                daemon.checked.set()
            daemon.started.set()
            if refused:
                raise next(iter(refused.values()))
            if metrics_sock is not None:
                page = StatusPage(
                    config.daemon.database,
                    daemon.chart_for(daemon.factory_config(names[0])),
                    webhooks_enabled=config.webhooks.enabled,
                    factories=lambda: list(daemon.factories),
                )
                await tg.start(serve_metrics, metrics, metrics_sock, page)
            log.info(
                "syncd running",
                extra={
                    "database": config.daemon.database,
                    "metrics": daemon.metrics_url or "off",
                    "webhooks": daemon.webhooks_url or "off",
                    "mode": config.daemon.mode,
                    "factories": list(daemon.factories),
                    **(
                        {"activated_at": daemon.activated_at.isoformat()}
                        if len(daemon.factories) == 1
                        else {}
                    ),
                },
            )
            try:
                yield daemon
            finally:
                daemon.closing = True
                tg.cancel_scope.cancel()
    finally:
        for sock in (metrics_sock, webhooks_sock):
            if sock is not None:
                sock.close()
        with anyio.CancelScope(shield=True):
            await pools.aclose()
            await store.close()


async def _start_shared(
    daemon: Daemon,
    names: list[str],
    *,
    check: bool,
    on_wait: Callable[[str], None] | None,
    owner: str | None,
) -> None:
    """Start sharing the factories with the other daemons on the database: every factory's
    webhook intake, the services' check of every factory (as without sharing: the start
    fails only when every factory is refused), then the coordinator's first round."""
    assert daemon._tg is not None
    config = daemon.config
    for name in names:
        await daemon.add_intake(name)
    if check:
        refused: dict[str, ApiError] = {}

        async def ask(name: str) -> None:
            settings = daemon.factory_config(name)
            try:
                await daemon.check_services(name, settings, on_wait)
            except ApiError as exc:
                refused[name] = exc
                log.error(
                    "factory %s: %s; it runs anyway: it stays paused until it answers",
                    name,
                    exc,
                    extra={"factory": name},
                )

        async with anyio.create_task_group() as asking:
            for name in names:
                asking.start_soon(ask, name)
        if names and len(refused) == len(names):
            raise refused[names[0]]
    coordinator = Coordinator(
        daemon.root,
        daemon,
        names,
        owner=owner,
        times=LeaseTimes(config.daemon.lease_ttl, config.daemon.lease_renew),
    )
    daemon.coordinator = coordinator
    await daemon._tg.start(coordinator.run)
    log.info(
        "sharing the factories with the daemons on the database",
        extra={"owner": coordinator.owner, "running here": list(daemon.factories)},
    )


async def _serve_webhooks(
    router: WebhookRouter,
    sock: socket.socket,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The one webhook listener of every factory, until cancelled."""
    async with serving_socket(router, sock) as url:
        log.info("webhook listener on %s", url)
        task_status.started()
        await anyio.sleep_forever()


_Client = TypeVar("_Client", bound=ServiceClient)


def _client(
    kind: type[_Client],
    settings: KatanaConfig | TradeGeckoConfig,
    transport: httpx.AsyncBaseTransport | None,
    **options: Any,
) -> _Client:
    """A client of one service at its configured address, with its token."""
    return kind(settings.base_url, settings.token, transport=transport, **options)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _metrics_socket(config: Config) -> socket.socket | None:
    """The metrics endpoint's listening socket, bound before anything starts.

    :raises ConfigError: the address cannot be listened on (in use, not local, no rights).
    """
    if not config.metrics.enabled:
        return None
    host, port = config.metrics.address()
    try:
        return bind_socket(host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {config.metrics.listen}: {exc.strerror or exc}",
            key="metrics.listen",
        ) from None
