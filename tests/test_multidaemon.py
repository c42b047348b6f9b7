"""Several daemons on one PostgreSQL database (the session's real server): they share the
factories through leases, fence every write with them, take any factory's webhooks and
wake its owner. In-process daemons here; real processes killed, frozen and reloaded in
the end-to-end test below."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from conftest import Sims, running_sims
from multidaemon_harness import cluster
from pg_server import PostgresServer, pg_server_fixture  # noqa: F401 - for pytest to find
from syncd.config import Config, DaemonConfig
from syncd.runtime.daemon import Daemon, running_daemon
from syncd.runtime.pollers import TradeGeckoPoller
from syncd.runtime.webhooks import tradegecko_signature
from syncd.sim import free_ports
from test_daemon import factories_config, wait_in
from test_metrics import samples, scrape

pytestmark = pytest.mark.anyio

NAMES = ["north", "south", "east", "west"]


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def shared_config(
    sims: Sims, url: str, *, webhook_port: int | None = None, poll: float = 0.1
) -> Config:
    """Four factories on ``url`` with short leases (3 s, renewed every 0.5 s)."""
    config = factories_config(sims, Path("unused.db"), NAMES, webhook_port=webhook_port, poll=poll)
    daemon = DaemonConfig(
        database=url, retry_initial=0.2, retry_max=1.0, lease_ttl=3.0, lease_renew=0.5
    )
    return msgspec.structs.replace(config, daemon=daemon)


@asynccontextmanager
async def daemons(sims: Sims, configs: list[Config], first: int = 0) -> AsyncIterator[list[Daemon]]:
    """Daemons on ``configs``, named ``d<first>``, ``d<first + 1>``, ..."""
    async with AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                running_daemon(config, katana_transport=sims.katana_contract, owner=f"d{first + i}")
            )
            for i, config in enumerate(configs)
        ]
        yield started


async def until(condition: object, seconds: float = 20.0) -> None:
    assert callable(condition)
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - a condition on several objects
            await anyio.sleep(0.05)


def running_where(started: list[Daemon]) -> dict[str, list[str]]:
    """Factory → the daemons running it now."""
    where: dict[str, list[str]] = {name: [] for name in NAMES}
    for daemon in started:
        assert daemon.coordinator is not None
        for name in daemon.factories:
            where[name].append(daemon.coordinator.owner)
    return where


async def test_two_daemons_share_four_factories_and_one_takes_all_when_the_other_stops(
    pg_database: str,
) -> None:
    async with running_sims(accounts=4) as sims, sims.factory():
        config = shared_config(sims, pg_database)
        async with daemons(sims, [config]) as (second,):
            async with daemons(sims, [config], first=1) as (first,):
                both = [first, second]
                # Each runs two, none twice.
                await until(lambda: all(len(d.factories) == 2 for d in both))
                assert all(len(owners) == 1 for owners in running_where(both).values())
                pos = {
                    name: await sims.create_po(factory=tokens)
                    for name, tokens in zip(NAMES, sims.factories, strict=True)
                }
                for name in NAMES:
                    owner = next(d for d in both if name in d.factories)
                    await wait_in(owner, name, [pos[name]["order_number"]], "received")
                    # Every write of its view is fenced by its lease.
                    assert owner.factories[name].store.lease is not None
                for daemon in both:
                    assert daemon.metrics_url is not None
                    found = samples(await scrape(daemon.metrics_url))
                    assert found[("syncd_factories_owned", frozenset())] == 2
                    assert found[("syncd_lease_takeovers_total", frozenset())] >= 2
                    running = {
                        dict(labels)["factory"]
                        for (metric, labels), value in found.items()
                        if metric == "syncd_factory_running" and value == 1
                    }
                    assert running == set(daemon.factories)
                leases = await first.root.leases()
                assert {r.factory for r in leases if r.held} == set(NAMES)
                gone = list(first.factories)
            # The first stopped cleanly (its leases released): the second takes its two at
            # its next rounds, not after the TTL.
            stopped = time.monotonic()
            await until(lambda: set(second.factories) == set(NAMES), seconds=10)
            assert time.monotonic() - stopped < 3.0
            more = {
                name: await sims.create_po(factory=sims.factories[NAMES.index(name)])
                for name in gone
            }
            for name, po in more.items():
                await wait_in(second, name, [po["order_number"]], "received")

        for name, tokens in zip(NAMES, sims.factories, strict=True):
            katana_counts, tg_counts = await sims.counters(tokens)
            made = [pos[name], *([more[name]] if name in more else [])]
            assert katana_counts["sales_orders_by_order_no"] == {
                f"TG-{po['order_number']}": 1 for po in made
            }
            assert tg_counts["receipts_per_po"] == {str(po["id"]): 1 for po in made}


async def test_any_daemon_takes_any_factorys_webhook_and_the_owner_is_woken_at_once(
    pg_database: str,
) -> None:
    ports = free_ports(2)
    async with running_sims(accounts=4) as sims, sims.factory():
        # Polls every 60 s: only the wake-up can make a delivery's PO arrive quickly.
        configs = [shared_config(sims, pg_database, webhook_port=port, poll=60.0) for port in ports]
        async with daemons(sims, configs) as (first, second):
            both = [first, second]
            await until(lambda: all(len(d.factories) == 2 for d in both))
            # Registered by the owner only, in each factory's own account, at the shared
            # public address.
            await until(
                lambda: all(
                    d.router is not None
                    and all(lsn.registered for lsn in d.router.listeners.values())
                    for d in both
                )
            )
            name = next(iter(second.factories))  # delivered to the first, which lacks it
            assert name not in first.factories
            tokens = sims.factories[NAMES.index(name)]
            await anyio.sleep(0.3)  # past the owner's first poll
            po = await sims.create_po(factory=tokens)
            woken: list[str] = []
            wake = second.wake

            def noting(factory: str) -> None:
                woken.append(factory)
                wake(factory)

            second.wake = noting  # type: ignore[method-assign,assignment]
            body = json.dumps(
                {"event": "purchase_order.create", "object_id": po["id"], "timestamp": time.time()}
            ).encode()
            started = time.monotonic()
            async with httpx.AsyncClient() as http:
                answer = await http.post(
                    f"http://127.0.0.1:{ports[0]}/webhooks/{name}/tradegecko",
                    content=body,
                    headers={
                        "X-Gecko-Signature": tradegecko_signature(
                            tokens.tradegecko_webhook_secret, body
                        ),
                        "X-Gecko-Delivery": "delivery-1",
                        "Content-Type": "application/json",
                    },
                )
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"status": "accepted"}
                # An unknown factory is still a 404; /healthz names where each one runs.
                missing = await http.post(
                    f"http://127.0.0.1:{ports[0]}/webhooks/nowhere/tradegecko", content=b"{}"
                )
                assert missing.status_code == 404
                health = (await http.get(f"http://127.0.0.1:{ports[0]}/healthz")).json()
                assert health["factories"][name] == {"here": False}
            # Counted on the daemon that took it.
            assert first.metrics_url is not None
            counted = samples(await scrape(first.metrics_url))
            labels = {"factory": name, "service": "tradegecko", "result": "accepted"}
            assert counted[("syncd_webhooks_total", frozenset(labels.items()))] == 1
            # The owner's consumer and dispatcher woke at once: the PO is imported (its SO
            # made) long before the owner's next poll.
            store = second.root.for_factory(name)
            with anyio.fail_after(10):
                while True:
                    link = await store.link_by_po_number(po["order_number"])
                    if link is not None and link.so_id is not None:
                        break
                    await anyio.sleep(0.05)
            assert woken == [name]  # by the first's NOTIFY, forwarded by the coordinator
            assert time.monotonic() - started < 10  # not the 60 s poll
            # Persisted by the first (no lease), taken by the owner's consumer.
            assert [e for e in await store.pending_events(10) if e.kind == "webhook_received"] == []


async def test_on_sqlite_the_daemon_runs_every_factory_itself(tmp_path: Path) -> None:
    async with running_sims(accounts=4) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", NAMES)
        async with running_daemon(config, katana_transport=sims.katana_contract) as daemon:
            assert daemon.coordinator is None
            assert list(daemon.factories) == NAMES
            assert all(r.guard is None and r.store.lease is None for r in daemon.factories.values())


# -- end to end: real processes ------------------------------------------------------------


async def test_three_daemons_twelve_factories_killed_frozen_added_removed_and_reloaded(
    pg_database: str, tmp_path: Path
) -> None:
    """3 ``syncd run`` on one PostgreSQL, 12 factories: one SIGKILLed and restarted, one
    frozen past its leases (it sends and writes nothing for what it lost), one added and
    one removed, a factory added and one removed by SIGHUP; every PO of every active
    factory ends with exactly one SO and one receipt, every history a statechart path."""
    async with cluster(pg_database, tmp_path, factories=12, ttl=3.0, renew=0.5) as run:
        first = [await run.start(slot) for slot in range(3)]
        for daemon in first:
            await run.wait_running(daemon)
        assert sorted((await run.spread()).values()) == [4, 4, 4]
        await run.create_pos()

        # SIGKILL one and start it again: its leases expire, the others take them; the
        # new process joins and gets its share back.
        killed = first[0]
        killed.signal(signal.SIGKILL)
        killed.proc.wait(timeout=10)
        await run.create_pos()
        await run.wait_running(await run.start(killed.slot))
        await run.spread()

        # Frozen past its leases, then resumed.
        frozen = await run.freeze(first[1])
        assert frozen.ok, frozen
        assert frozen.taken_over_after < 3.0 + 2.0, frozen
        assert frozen.stopped_on_resume, run.tail(first[1])
        await run.create_pos()
        await run.spread()

        # A daemon added, one removed (SIGTERM: its leases released at once).
        await run.wait_running(await run.start(3))
        assert sorted((await run.spread()).values()) == [3, 3, 3, 3]
        leaving = run.daemons[2]
        leaving.signal(signal.SIGTERM)
        assert leaving.proc.wait(timeout=20) == 0, run.tail(leaving)
        assert sorted((await run.spread()).values()) == [4, 4, 4]

        # A factory added and one removed, by SIGHUP to every daemon.
        run.add_factory("f12", run.sims.factories[12])
        run.remove_factory("f05")
        run.reload_all()
        await run.spread()
        await run.create_pos()

        assert await run.finish(seconds=60), await run.verdict()
        verdict = await run.verdict()
        assert verdict.ok, verdict
        assert verdict.orders == 4 * 11 + 1  # 4 rounds of 12, less f05's; f12's one
        # f05 stopped everywhere: no daemon runs it, none holds its lease.
        assert "f05" not in await run.holders()


async def test_a_factory_that_fails_stops_alone_and_is_started_again(
    pg_database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one factory's work (here its TradeGecko poller, twice) stops that factory
    alone; the coordinator takes it again only after its backoff (0.5 s, then 1 s, less a
    quarter of jitter at most) and it finishes its PO."""
    failures = {"south": 2}
    runs: list[float] = []
    run = TradeGeckoPoller.run

    async def failing(self: TradeGeckoPoller, **kwargs: Any) -> None:
        if self.store.factory == "south":
            runs.append(anyio.current_time())
        if failures.get(self.store.factory, 0) > 0:
            failures[self.store.factory] -= 1
            raise RuntimeError("a bug in the poller")
        await run(self, **kwargs)

    monkeypatch.setattr(TradeGeckoPoller, "run", failing)
    caplog.set_level(logging.INFO, logger="syncd.coordinator")
    async with running_sims(accounts=4) as sims, sims.factory():
        config = shared_config(sims, pg_database)
        config = msgspec.structs.replace(
            config,
            daemon=msgspec.structs.replace(config.daemon, restart_initial=0.5, restart_max=2.0),
        )
        async with daemons(sims, [config]) as (daemon,):
            pos = {
                name: await sims.create_po(factory=tokens)
                for name, tokens in zip(NAMES, sims.factories, strict=True)
            }
            for name in NAMES:
                await wait_in(daemon, name, [pos[name]["order_number"]], "received")
            assert failures == {"south": 0}
    # Not taken again before its backoff ended, however soon the next round came.
    assert len(runs) == 3, runs
    assert runs[1] - runs[0] >= 0.375 and runs[2] - runs[1] >= 0.75, runs
    failed = [r for r in caplog.records if "factory south failed" in r.getMessage()]
    assert len(failed) == 2, [r.getMessage() for r in caplog.records]
    assert "; not taken here again for " in failed[0].getMessage()
    assert "(failure 2 in a row)" in failed[1].getMessage()
    # Its lease let go meanwhile (another daemon may take it), each time once it stopped.
    released = [
        r for r in caplog.records if r.getMessage() == "factory south: released (it failed here)"
    ]
    assert len(released) == 2, [r.getMessage() for r in caplog.records]
    assert not [
        r
        for r in caplog.records
        if "failed: stopping it" in r.getMessage() and "south" not in r.getMessage()
    ]
