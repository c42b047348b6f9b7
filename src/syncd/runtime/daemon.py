"""The daemon: the store, both clients, the pollers and the dispatcher in one task group."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import httpx

from syncd.adapters._http import RequestBudget, ServiceClient
from syncd.adapters.katana import KatanaClient
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.config import Config, KatanaConfig, TradeGeckoConfig
from syncd.domain.statechart import Statechart, load_statechart
from syncd.errors import ApiError, AuthError, ConfigError, DecodeError, is_transient
from syncd.ops.asgi import bind_socket
from syncd.ops.logging import register_secrets
from syncd.ops.metrics import Metrics, serve_metrics
from syncd.ops.statuspage import StatusPage
from syncd.runtime.dispatcher import Dispatcher, check_chart
from syncd.runtime.effects import Effects, note_attempts_since
from syncd.runtime.observer import Observer, Observers
from syncd.runtime.pollers import KatanaPoller, TradeGeckoPoller
from syncd.runtime.webhooks import WebhookConsumer, WebhookListener, bind_listener
from syncd.store import Store

__all__ = ["Daemon", "check_one_factory", "check_services", "running_daemon"]

log = logging.getLogger("syncd.daemon")


def check_one_factory(config: Config) -> None:
    """This daemon runs one factory: more in the config would be silently left alone.

    :raises ConfigError: the config has several factories.
    """
    if len(config.factories) > 1:
        names = ", ".join(config.factories)
        raise ConfigError(
            f"{len(config.factories)} factories ({names}): this syncd runs one factory per "
            "daemon; give each its own config and database until several run in one"
        )


@dataclass
class Daemon:
    """A running daemon's parts, for the CLI, the demo and the tests."""

    config: Config
    store: Store
    chart: Statechart
    katana: KatanaClient
    tradegecko: TradeGeckoClient
    dispatcher: Dispatcher
    tradegecko_poller: TradeGeckoPoller
    katana_poller: KatanaPoller
    activated_at: datetime
    metrics: Metrics | None = None
    #: Where ``/metrics`` is served (``http://host:port``); ``None`` when disabled.
    metrics_url: str | None = None
    #: The webhook listener; ``None`` when ``webhooks.enabled`` is off.
    webhooks: WebhookListener | None = None
    #: Where the webhook listener listens (``http://host:port``).
    webhooks_url: str | None = None

    def poll_now(self) -> None:
        """Ask both pollers to poll at once rather than at their next interval."""
        self.tradegecko_poller.kick.set()
        self.katana_poller.kick.set()


async def check_services(
    config: Config,
    *,
    katana_transport: httpx.AsyncBaseTransport | None = None,
    tradegecko_transport: httpx.AsyncBaseTransport | None = None,
    on_wait: Callable[[str], None] | None = None,
    within: float | None = None,
) -> None:
    """Make one cheap authenticated call to each service before starting.

    Both are checked at once. A passing failure (5xx, 429, timeout, dropped connection, cut
    body) is retried with backoff for ``daemon.start_timeout`` seconds; a refusal (401, 404:
    a wrong token or base path) ends the check at once.

    :param on_wait: told what is awaited after each passing failure (systemd's status line).
    :param within: seconds to keep retrying instead of ``daemon.start_timeout``; 0 asks once.
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
        return _client(kind, settings, transport, timeout=timeout, attempts=1)

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
) -> AsyncIterator[Daemon]:
    """Run the daemon while the block runs; leaving the block stops it.

    :param observer: told what the daemon does (transitions, effects, drift, webhooks,
        requests), besides the daemon's own metrics.
    :param check: first make one call to each service (:func:`check_services`), after the
        database and the listen addresses are known to be usable.
    :param on_wait: with ``check``, told what the start waits for while a service fails.
    :raises StoreInUse: another syncd runs on the SQLite file.
    :raises StoreError: the database cannot be opened.
    :raises StatechartError: the statechart file is broken.
    :raises ApiError: with ``check``, a service rejected its token or could not be reached.
    """
    check_one_factory(config)
    if config.shadow:
        # Its own database and no webhook registration: a shadow run writes nowhere live.
        config = config.as_shadow()
    register_secrets([config.katana.token, config.tradegecko.token])
    chart = check_chart(
        chart or load_statechart(config.daemon.statechart, holding=config.statechart_conditions())
    )
    metrics = Metrics()
    metrics.known_states(list(chart.states))
    watchers = Observers([metrics, observer]) if observer is not None else metrics
    retry = config.retry()
    # Exclusive: a second daemon on the same SQLite file is refused before it decides
    # anything (StoreInUse); PostgreSQL databases are meant to be shared.
    store = await Store.open(config.daemon.database, exclusive=True)
    metrics_sock: socket.socket | None = None
    webhooks_sock: socket.socket | None = None
    try:
        metrics_sock = _metrics_socket(config)
        # Bound before anything starts, like the metrics socket: a port in use is said at once.
        webhooks_sock = bind_listener(config) if config.webhooks.enabled else None
        if check:
            await check_services(
                config,
                katana_transport=katana_transport,
                tradegecko_transport=tradegecko_transport,
                on_wait=on_wait,
            )
        activated = datetime.fromisoformat(
            await store.setdefault_meta("activated_at", datetime.now(UTC).isoformat())
        )
        await note_attempts_since(store)

        def serving(
            kind: type[_Client],
            settings: KatanaConfig | TradeGeckoConfig,
            transport: httpx.AsyncBaseTransport | None,
        ) -> _Client:
            return _client(
                kind,
                settings,
                transport,
                budget=RequestBudget(
                    settings.rate_limit, settings.rate_period, reserve=settings.reserve
                ),
                timeout=settings.timeout,
                retry=retry.request,
                on_response=partial(watchers.api_answered, kind.service),
                shadow=config.shadow,
            )

        async with (
            serving(KatanaClient, config.katana, katana_transport) as katana,
            serving(TradeGeckoClient, config.tradegecko, tradegecko_transport) as tradegecko,
        ):
            dispatcher = Dispatcher(
                store,
                chart,
                Effects(config, katana, tradegecko, store),
                concurrency=config.daemon.concurrency,
                retry=retry,
                observer=watchers,
                shadow=config.shadow,
            )
            tg_poller = TradeGeckoPoller(store, tradegecko, config, activated, dispatcher.wake)
            kt_poller = KatanaPoller(store, katana, config, chart, activated, dispatcher.wake)
            listener: WebhookListener | None = None
            if webhooks_sock is not None:
                consumer = WebhookConsumer(
                    store,
                    tg_poller,
                    kt_poller,
                    dispatcher.wake,
                    retry=retry,
                    chart=chart,
                    coalesce=config.webhooks.coalesce,
                    concurrency=config.webhooks.concurrency,
                )
                listener = WebhookListener(config, store, katana, tradegecko, consumer, watchers)
            daemon = Daemon(
                config,
                store,
                chart,
                katana,
                tradegecko,
                dispatcher,
                tg_poller,
                kt_poller,
                activated,
                metrics,
                metrics_url=_url(metrics_sock) if metrics_sock is not None else None,
                webhooks=listener,
                webhooks_url=_url(webhooks_sock) if webhooks_sock is not None else None,
            )
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                tg.start_soon(tg_poller.run)
                tg.start_soon(kt_poller.run)
                tg.start_soon(
                    lambda: metrics.refresh_forever(
                        store,
                        config.metrics.refresh_interval,
                        states=list(chart.states),
                        polls=lambda: {
                            tg_poller.name: tg_poller.last_success,
                            kt_poller.name: kt_poller.last_success,
                        },
                        budgets={"katana": katana.budget, "tradegecko": tradegecko.budget},
                    )
                )
                if listener is not None and webhooks_sock is not None:
                    tg.start_soon(listener.consumer.run)
                    await tg.start(listener.run, webhooks_sock)
                if metrics_sock is not None:
                    page = StatusPage(
                        config.daemon.database, chart, webhooks_enabled=config.webhooks.enabled
                    )
                    await tg.start(serve_metrics, metrics, metrics_sock, page)
                log.info(
                    "syncd running",
                    extra={
                        "database": config.daemon.database,
                        "metrics": daemon.metrics_url or "off",
                        "webhooks": daemon.webhooks_url or "off",
                        "mode": config.daemon.mode,
                        "activated_at": activated.isoformat(),
                    },
                )
                try:
                    yield daemon
                finally:
                    tg.cancel_scope.cancel()
    finally:
        for sock in (metrics_sock, webhooks_sock):
            if sock is not None:
                sock.close()
        with anyio.CancelScope(shield=True):
            await store.close()


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
