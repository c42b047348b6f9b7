"""Several factories in one daemon: each its own store rows, clients, budgets, pollers and
webhook paths, against simulators serving one account per factory."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from conftest import Sims, running_sims
from syncd.config import (
    Config,
    DaemonConfig,
    Factory,
    FactoryWebhooks,
    KatanaConfig,
    MetricsConfig,
    TradeGeckoConfig,
    WebhooksConfig,
    load_config,
)
from syncd.domain.orders import LinkedOrder
from syncd.errors import AuthError, RetryPolicy, first_error
from syncd.runtime import daemon as daemon_module
from syncd.runtime import inbox
from syncd.runtime.daemon import Daemon, running_daemon
from syncd.runtime.dispatcher import Dispatcher
from syncd.runtime.pollers import TradeGeckoPoller
from syncd.sim import free_port
from syncd.store import Store
from test_metrics import samples, scrape

pytestmark = pytest.mark.anyio


def factories_config(
    sims: Sims,
    database: Path,
    names: list[str],
    *,
    webhook_port: int | None = None,
    poll: float = 0.1,
) -> Config:
    """A config running ``names``, one simulator account each (in the order of
    ``sims.factories``); with ``webhook_port`` they listen for webhooks there."""
    factories: dict[str, Factory] = {}
    for name, tokens in zip(names, sims.factories, strict=False):
        factories[name] = Factory(
            name=name,
            tradegecko=TradeGeckoConfig(
                base_url=sims.tradegecko_url,
                token=tokens.tradegecko_token,
                poll_interval=poll,
                rate_limit=100_000,
            ),
            katana=KatanaConfig(
                base_url=sims.katana_api_url,
                token=tokens.katana_token,
                poll_interval=poll,
                rate_limit=100_000,
            ),
            webhooks=FactoryWebhooks(tradegecko_secret=tokens.tradegecko_webhook_secret),
        )
    hooks = (
        WebhooksConfig(
            enabled=True,
            listen=f"127.0.0.1:{webhook_port}",
            # Katana sends only to https; the simulators deliver it over plain http.
            public_base_url=f"https://127.0.0.1:{webhook_port}",
        )
        if webhook_port is not None
        else WebhooksConfig()
    )
    # The default factory's settings are the top-level tables.
    default = factories.get("default")
    top = {"tradegecko": default.tradegecko, "katana": default.katana} if default else {}
    return Config(
        daemon=DaemonConfig(database=str(database), retry_initial=0.2, retry_max=1.0),
        metrics=MetricsConfig(listen="127.0.0.1:0", refresh_interval=0.1),
        webhooks=hooks,
        factories=factories,
        **top,  # type: ignore[arg-type]
    )


async def wait_in(
    daemon: Daemon, factory: str, po_numbers: list[str], *states: str, seconds: float = 30
) -> list[LinkedOrder]:
    """Wait until each PO of ``factory`` has a link in one of ``states``."""
    store = daemon.root.for_factory(factory)
    with anyio.fail_after(seconds):
        while True:
            links = [await store.link_by_po_number(n) for n in po_numbers]
            if all(link is not None and link.state in states for link in links):
                return [link for link in links if link is not None]
            await anyio.sleep(0.05)


async def registered(daemon: Daemon, names: list[str], seconds: float = 10) -> None:
    """Wait until each factory's webhooks are registered (several factories register after
    their start)."""
    with anyio.fail_after(seconds):
        for name in names:
            hooks = daemon.factories[name].webhooks
            assert hooks is not None
            while not hooks.registered:  # noqa: ASYNC110 - a test's bounded look
                await anyio.sleep(0.02)


async def metric(
    daemon: Daemon, name: str, expected: float, *, at_least: bool = False, **labels: str
) -> None:
    """Wait (bounded: the gauges are refreshed every 0.1 s) for a sample to read ``expected``
    (or more, ``at_least``)."""
    assert daemon.metrics_url is not None
    key = (name, frozenset(labels.items()))
    seen = None
    with anyio.move_on_after(10):
        while True:
            seen = samples(await scrape(daemon.metrics_url)).get(key)
            if seen == expected or (at_least and seen is not None and seen >= expected):
                return
            await anyio.sleep(0.05)
    raise AssertionError(f"{name}{labels} is {seen}, not {expected}")


async def test_three_factories_in_one_daemon_each_link_only_their_own_orders(
    tmp_path: Path,
) -> None:
    names = ["north", "south", "east"]
    async with running_sims(accounts=3) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", names)
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            sims.factory(),
        ):
            assert list(daemon.factories) == names
            # 1, 2 and 3 POs: the same PO numbers and ids exist in several accounts.
            created = {
                name: [await sims.create_po(factory=tokens) for _ in range(count)]
                for count, (name, tokens) in enumerate(
                    zip(names, sims.factories, strict=True), start=1
                )
            }
            daemon.poll_now()
            links = {
                name: await wait_in(daemon, name, [po["order_number"] for po in pos], "received")
                for name, pos in created.items()
            }
            for name in names:
                await metric(
                    daemon,
                    "syncd_orders",
                    len(created[name]),
                    factory=name,
                    state="received",
                )
            text = await scrape(daemon.metrics_url or "")
            # Each factory's own budgets; one pool for the one TradeGecko host of all three
            # (Katana's traffic goes through the test's contract check, given).
            budgets = {id(daemon.factories[n].katana.budget) for n in names}
            assert len(budgets) == 3
            assert daemon.pools.hosts == [sims.tradegecko_url]

        for name, tokens in zip(names, sims.factories, strict=True):
            numbers = [po["order_number"] for po in created[name]]
            katana_counts, tg_counts = await sims.counters(tokens)
            # Exactly one SO per PO in its own Katana account, one receipt in its own
            # TradeGecko account: nothing crossed.
            assert katana_counts["sales_orders_by_order_no"] == {f"TG-{n}": 1 for n in numbers}
            assert tg_counts["receipts_per_po"] == {str(po["id"]): 1 for po in created[name]}
            orders = sims.katana_world_of(tokens).sales_orders
            for link in links[name]:
                assert link.so_id is not None
                assert orders[link.so_id].order_no == f"TG-{link.po_number}"
        # Requests counted per factory, no label beyond the three.
        factories = {
            dict(labels)["factory"]
            for (metric_name, labels) in samples(text)
            if metric_name == "syncd_api_requests_total"
        }
        assert factories == set(names)


async def test_a_revoked_katana_token_pauses_only_its_own_factory(tmp_path: Path) -> None:
    names = ["north", "south", "east"]
    async with running_sims(accounts=3) as sims:
        revoked = sims.factories[1]
        sims.katana_accounts[revoked.katana_token].revoked = True
        config = factories_config(sims, tmp_path / "syncd.db", names)
        # The start's check refuses south's token: south starts paused, the others run.
        async with (
            running_daemon(config, katana_transport=sims.katana_contract, check=True) as daemon,
            sims.factory(),
        ):
            assert list(daemon.factories) == names
            pos = {
                name: await sims.create_po(factory=tokens)
                for name, tokens in zip(names, sims.factories, strict=True)
            }
            for name in ("north", "east"):
                await wait_in(daemon, name, [pos[name]["order_number"]], "received")
            south = daemon.root.for_factory("south")
            with anyio.fail_after(10):
                while await south.get_meta("paused.katana") is None:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            (held,) = await wait_in(daemon, "south", [pos["south"]["order_number"]], "discovered")
            assert held.so_id is None
            await metric(daemon, "syncd_service_paused", 1, factory="south", service="katana")
            for name in ("north", "east"):
                await metric(daemon, "syncd_service_paused", 0, factory=name, service="katana")
                assert await daemon.root.for_factory(name).get_meta("paused.katana") is None

            # The token works again: south resumes and finishes on its own.
            sims.katana_accounts[revoked.katana_token].revoked = False
            await wait_in(daemon, "south", [pos["south"]["order_number"]], "received")
            await metric(daemon, "syncd_service_paused", 0, factory="south", service="katana")
        katana_counts, _ = await sims.counters(revoked)
        assert katana_counts["sales_orders_by_order_no"] == {
            f"TG-{pos['south']['order_number']}": 1
        }


async def test_webhooks_are_routed_per_factory_and_a_stopped_factory_is_a_404(
    tmp_path: Path,
) -> None:
    names = ["default", "north"]
    async with running_sims(accounts=2, webhooks=True) as sims:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        public = f"https://127.0.0.1:{port}"
        # Polls every minute: only webhooks bring the new orders in time.
        config = factories_config(sims, tmp_path / "syncd.db", names, webhook_port=port, poll=60)
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            sims.factory(),
            httpx.AsyncClient(timeout=5) as http,
        ):
            # `default` keeps today's paths; the others are named in theirs.
            paths = {"default": "/webhooks", "north": "/webhooks/north"}
            await registered(daemon, names)  # beside others, after the start
            for name in names:
                runtime = daemon.factories[name]
                assert runtime.webhooks is not None and runtime.webhooks.registered
                tg_hooks = {hook.address for hook in await runtime.tradegecko.list_webhooks()}
                assert tg_hooks == {f"{public}{paths[name]}/tradegecko"}
                kt_hooks = [hook.url for hook in await runtime.katana.list_webhooks()]
                assert kt_hooks == [
                    f"{public}{paths[name]}/katana/{runtime.webhooks.keys.path_token}"
                ]
            health = (await http.get(f"{base}/healthz")).json()
            assert health == {
                "status": "ok",
                "registered": True,
                "factories": {name: {"registered": True} for name in names},
            }

            pos = {
                name: await sims.create_po(factory=tokens)
                for name, tokens in zip(names, sims.factories, strict=True)
            }
            for name in names:
                await wait_in(daemon, name, [pos[name]["order_number"]], "received")
            for name in names:
                await metric(
                    daemon,
                    "syncd_webhooks_total",
                    1,
                    at_least=True,
                    factory=name,
                    service="tradegecko",
                    result="accepted",
                )
            assert (await http.post(f"{base}/webhooks/nowhere/tradegecko")).status_code == 404

            # Stopping a factory: its routes answer 404, its rows stay, the other runs on.
            await daemon.stop_factory("north")
            assert list(daemon.factories) == ["default"]
            answer = await http.post(f"{base}/webhooks/north/tradegecko", content=b"{}")
            assert answer.status_code == 404
            kept = await daemon.root.for_factory("north").link_by_po_number(
                pos["north"]["order_number"]
            )
            assert kept is not None and kept.state == "received"
            second = await sims.create_po(factory=sims.factories[0])
            await wait_in(daemon, "default", [second["order_number"]], "received")
            assert daemon.store.factory == "default"

            # Started again, with its history.
            runtime = await daemon.start_factory("north")
            assert list(daemon.factories) == names and runtime.webhooks is not None
            assert (await http.get(f"{base}/healthz")).json()["factories"]["north"] == {
                "registered": True
            }
            third = await sims.create_po(factory=sims.factories[1])
            await wait_in(daemon, "north", [third["order_number"]], "received")


async def test_a_429_storm_on_one_factory_does_not_slow_the_others(tmp_path: Path) -> None:
    names = ["north", "south", "east"]
    async with running_sims(accounts=3) as sims:
        stormed = sims.factories[1]
        # Every Katana call of south's token answers 429 with a minute to wait.
        burst = {"seconds": 120, "retry_after": 60, "account": stormed.katana_token}
        answer = await sims.control.put(f"{sims.katana_url}/_sim/faults", json={"burst": burst})
        assert answer.status_code == 200, answer.text
        config = factories_config(sims, tmp_path / "syncd.db", names)
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            sims.factory(),
        ):
            pos = {
                name: await sims.create_po(factory=tokens)
                for name, tokens in zip(names, sims.factories, strict=True)
            }
            with anyio.fail_after(20):  # a minute's wait in south would not fit
                for name in ("north", "east"):
                    await wait_in(daemon, name, [pos[name]["order_number"]], "received")
            held = await daemon.root.for_factory("south").link_by_po_number(
                pos["south"]["order_number"]
            )
            assert held is None or held.so_id is None
            # Only south's token met the storm, and south waits it out (a few calls only).
            faults = (await sims.control.get(f"{sims.katana_url}/_sim/faults")).json()
            assert set(faults["injected_by_account"]) == {stormed.katana_token}
            assert sims.katana_accounts[stormed.katana_token].describe()["requests"] <= 5


async def test_a_stopped_factory_leaves_the_metrics_and_a_reload_restarts_a_changed_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_sims(accounts=3) as sims:
        path = tmp_path / "syncd.toml"

        def write(prefixes: dict[str, object]) -> None:
            text = (
                f'[daemon]\ndatabase = "{tmp_path / "syncd.db"}"\nretry_initial = 0.2\n'
                'retry_max = 1.0\n[metrics]\nlisten = "127.0.0.1:0"\nrefresh_interval = 0.1\n'
                f'[tradegecko]\nbase_url = "{sims.tradegecko_url}"\npoll_interval = 0.1\n'
                f'[katana]\nbase_url = "{sims.katana_api_url}"\npoll_interval = 0.1\n'
                "rate_limit = 100000\n"
            )
            for (name, prefix), tokens in zip(prefixes.items(), sims.factories, strict=False):
                value = f'"{prefix}"' if isinstance(prefix, str) else str(prefix)
                text += (
                    f'[factories.{name}.tradegecko]\ntoken = "{tokens.tradegecko_token}"\n'
                    f'[factories.{name}.katana]\ntoken = "{tokens.katana_token}"\n'
                    f"order_no_prefix = {value}\n"
                )
            path.write_text(text)

        write({"north": "N-", "south": "S-"})
        config = load_config(path)
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            sims.factory(),
        ):
            assert list(daemon.factories) == ["north", "south"]
            await metric(daemon, "syncd_inbox_backlog_events", 0, factory="south")
            before = daemon.factories["north"]

            # north changed, south removed, east added.
            write({"north": "NM-", "east": "E-"})
            change = await daemon.reload(path)
            assert change is not None
            assert (change.added, change.removed, change.changed) == (
                ("east",),
                ("south",),
                ("north",),
            )
            assert sorted(daemon.factories) == ["east", "north"]
            assert daemon.factories["north"] is not before
            assert daemon.factories["north"].config.katana.order_no_prefix == "NM-"
            # south's series went with it: the factory label stays bounded.
            text = await scrape(daemon.metrics_url or "")
            assert 'factory="south"' not in text
            await metric(daemon, "syncd_inbox_backlog_events", 0, factory="east")
            po = await sims.create_po(factory=sims.factories[0])
            (link,) = await wait_in(daemon, "north", [po["order_number"]], "received")
            assert link.so_number == f"NM-{po['order_number']}"

            # A broken file: said, and nothing changes.
            write({"north": "NM-", "east": 5})
            with caplog.at_level(logging.ERROR, logger="syncd.daemon"):
                assert await daemon.reload(path) is None
            assert "syncd: reload refused: factories.east.katana.order_no_prefix" in caplog.text
            assert sorted(daemon.factories) == ["east", "north"]
            # The same files again: nothing to do.
            write({"north": "NM-", "east": "E-"})
            again = await daemon.reload(path)
            assert again is not None and again.empty


async def test_the_start_fails_only_when_every_factory_is_refused(tmp_path: Path) -> None:
    async with running_sims(accounts=2) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", ["north", "south"])
        for tokens in sims.factories:
            sims.katana_accounts[tokens.katana_token].revoked = True
        # Both start (webhooks taken at once), then their checks end the daemon with the
        # refusal, as one factory's would. A task group may wrap it: unwrapped below.
        with pytest.raises(BaseException) as raised, anyio.fail_after(10):
            async with running_daemon(config, check=True) as daemon:
                assert sorted(daemon.factories) == ["north", "south"]
                await anyio.sleep_forever()
        error = raised.value
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        assert isinstance(error, AuthError), raised.value


async def test_factories_start_a_bounded_number_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 factories' checks and registrations at once queued on the shared pools until
    they timed out; the start takes a few at a time, each one's start whole, and checks
    their services after the whole start, a few at a time too."""
    import syncd.runtime.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "_STARTING_AT_ONCE", 2)
    checking, most = 0, 0
    check = daemon_module.check_services
    release = anyio.Event()

    async def counted(*args: object, **kwargs: object) -> None:
        nonlocal checking, most
        checking += 1
        most = max(most, checking)
        try:
            await release.wait()  # the daemon runs before any check ends
            await anyio.sleep(0.05)  # long enough for the others to pile up if unbounded
            await check(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            checking -= 1

    monkeypatch.setattr(daemon_module, "check_services", counted)
    names = [f"f{i}" for i in range(5)]
    async with running_sims(accounts=5) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", names)
        async with running_daemon(config, check=True) as daemon:
            assert list(daemon.factories) and set(daemon.factories) == set(names)
            assert not daemon.checked.is_set()
            release.set()
            with anyio.fail_after(10):  # checked after the whole start
                await daemon.checked.wait()
            assert all(runtime.refused is None for runtime in daemon.factories.values())
    assert most == 2


async def test_idle_factories_read_their_inbox_only_when_the_daemons_one_look_wakes_them(
    tmp_path: Path,
) -> None:
    names = ["north", "south", "east"]
    async with running_sims(accounts=3) as sims:
        config = factories_config(
            sims, tmp_path / "syncd.db", names, webhook_port=free_port(), poll=60.0
        )
        async with running_daemon(config, katana_transport=sims.katana_contract) as daemon:
            reads: dict[str, int] = dict.fromkeys(names, 0)
            for name in names:
                store = daemon.factories[name].store
                real = store.pending_events

                async def counted(
                    *args: Any, _name: str = name, _real: Any = real, **kwargs: Any
                ) -> Any:
                    reads[_name] += 1
                    return await _real(*args, **kwargs)

                store.pending_events = counted  # type: ignore[method-assign]
            looks = daemon.inbox_watch.looks
            await anyio.sleep(2.5)
            # Idle: no factory looked at its inbox by itself (each of its dispatcher, webhook
            # consumer and import watcher used to, every second); the daemon's one watch did.
            assert reads == dict.fromkeys(names, 0)
            assert daemon.inbox_watch.looks >= looks + 2
            # What another process writes (syncctl import, here a PO's discovery) is seen
            # within about a second and a half, by that factory alone.
            po = await sims.create_po(factory=sims.factories[1])
            # A delivery another daemon's listener took (PostgreSQL; its NOTIFY is not
            # heard here): the consumer finds it at the watch's next look.
            delivery = inbox.WebhookReceived(
                service="tradegecko",
                event="purchase_order.create",
                resource_type="purchase_order",
                object_id=987_654,
            )
            other = await Store.open(config.daemon.database)
            try:
                request = inbox.ImportRequest(po_number=po["order_number"], operator="test")
                requested = await other.for_factory("south").add_event(
                    "syncctl", inbox.IMPORT_REQUESTED, inbox.encode(request)
                )
                delivered = await other.for_factory("east").add_event(
                    "tradegecko", inbox.WEBHOOK_RECEIVED, inbox.encode(delivery)
                )
            finally:
                await other.close()
            await wait_in(daemon, "south", [po["order_number"]], "imported", seconds=3)
            # Each request settled by the reader it was for (the PO may have come by its
            # own webhook first: the import then finds it linked).
            for factory, event_id in (("south", requested), ("east", delivered)):
                assert event_id is not None
                view = daemon.root.for_factory(factory)
                with anyio.fail_after(3):
                    while True:
                        outcome = await view.event_outcome(event_id)
                        if outcome is not None and outcome[0] is not None:
                            break
                        await anyio.sleep(0.05)
            assert reads["north"] == 0
            assert reads["south"] >= 2  # the import watcher, then the dispatcher
            assert reads["east"] >= 1  # its consumer


async def test_a_restart_asks_no_service_again_unless_a_setting_changed(tmp_path: Path) -> None:
    """Several factories: a service check passed with these very settings is not asked
    again at the next start (counted in the metrics when it is); a token revoked since
    pauses its factory at its first call, with the poller's message; a changed setting is
    checked again."""
    names = ["north", "south"]
    async with running_sims(accounts=2) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", names)
        worlds = [sims.katana_world_of(tokens) for tokens in sims.factories]
        async with running_daemon(config, check=True) as daemon:
            await daemon.checked.wait()  # the checks come after the start
            assert daemon.metrics_url is not None
            text = await scrape(daemon.metrics_url)
            for name in names:  # the check is counted like every other call
                asked = samples(text).get(
                    (
                        "syncd_api_requests_total",
                        frozenset(
                            {
                                "factory": name,
                                "service": "katana",
                                "method": "GET",
                                "endpoint": "/factory",
                                "status": "200",
                            }.items()
                        ),
                    )
                )
                assert asked == 1, name
        assert [world.requests["GET /factory"] for world in worlds] == [1, 1]

        # South's TradeGecko token is revoked while syncd is down: the start asks nobody,
        # south pauses at its first poll, north runs on.
        sims.tradegecko_accounts[sims.factories[1].tradegecko_token].revoked = True
        async with running_daemon(config, check=True) as daemon:
            await daemon.checked.wait()  # the checks come after the start
            assert list(daemon.factories) == names
            assert all(runtime.refused is None for runtime in daemon.factories.values())
            assert [world.requests["GET /factory"] for world in worlds] == [1, 1]
            south = daemon.root.for_factory("south")
            with anyio.fail_after(10):
                while (paused := await south.get_meta("paused.tradegecko")) is None:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert paused.startswith("tradegecko rejected the token (401) since ")
            po = await sims.create_po(factory=sims.factories[0])
            # (its import asks Katana's base currency: GET /factory once more)
            await wait_in(daemon, "north", [po["order_number"]], "imported", "received")
        before = worlds[0].requests["GET /factory"]

        # A paused factory is asked again at the next start; one whose settings changed too.
        north = config.factories["north"]
        north.katana.base_url = north.katana.base_url + "/"
        async with running_daemon(config, check=True) as daemon:
            await daemon.checked.wait()  # the checks come after the start
            assert daemon.factories["south"].refused is not None  # asked, and refused
            assert daemon.factories["north"].refused is None
        assert worlds[0].requests["GET /factory"] == before + 1


async def test_a_first_start_sets_every_factorys_first_keys_together_and_a_restart_keeps_them(
    tmp_path: Path,
) -> None:
    """What each factory's first start sets (activation time, import attempts' mark, webhook
    path token) is set for all of them in one transaction before they start (one activation
    time for all: 1,000 factories wrote three transactions each), their starts use it, and a
    restart changes none of it."""
    names = ["north", "south", "east"]
    keys = ("activated_at", "import_attempts_since", "webhooks.path_token")
    async with running_sims(accounts=3) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", names, webhook_port=free_port())
        async with running_daemon(config) as daemon:
            first = {
                name: {key: await daemon.root.for_factory(name).get_meta(key) for key in keys}
                for name in names
            }
            assert len({meta["activated_at"] for meta in first.values()}) == 1
            assert len({meta["webhooks.path_token"] for meta in first.values()}) == 3
            for name, runtime in daemon.factories.items():
                assert runtime.activated_at.isoformat() == first[name]["activated_at"]
                assert runtime.webhooks is not None
                assert runtime.webhooks.keys.path_token == first[name]["webhooks.path_token"]
            assert await daemon.set_first_meta(names) == 0
        async with running_daemon(config) as daemon:
            again = {
                name: {key: await daemon.root.for_factory(name).get_meta(key) for key in keys}
                for name in names
            }
            assert again == first


async def test_many_factories_first_polls_wait_for_the_start_and_a_kick() -> None:
    """Beside others, a poller's first poll comes its delay after the daemon's whole start,
    or at once when asked (``syncctl poll``, a webhook's hint)."""
    from functools import partial
    from typing import cast

    from syncd.runtime.daemon import _first_poll
    from syncd.runtime.pollers import TradeGeckoPoller

    class Poller:
        def __init__(self) -> None:
            self.kick = anyio.Event()
            self.polled_at: float | None = None

        async def run(self, *, first: Any) -> None:
            await first()
            self.polled_at = anyio.current_time()
            await anyio.sleep_forever()

    started = anyio.Event()
    waiting, kicked = Poller(), Poller()
    async with anyio.create_task_group() as tg:
        for poller in (waiting, kicked):
            first = partial(_first_poll, cast(TradeGeckoPoller, poller), 0.3, started)
            tg.start_soon(partial(poller.run, first=first))
        await anyio.sleep(0.2)
        assert waiting.polled_at is None and kicked.polled_at is None  # the start goes on
        kicked.kick.set()
        await anyio.sleep(0.05)
        assert kicked.polled_at is not None and not kicked.kick.is_set()
        began = anyio.current_time()
        started.set()
        with anyio.fail_after(5):
            while waiting.polled_at is None:  # noqa: ASYNC110 - a test's bounded look
                await anyio.sleep(0.02)
        assert waiting.polled_at - began >= 0.29
        tg.cancel_scope.cancel()


def restarting(config: Config, initial: float, maximum: float) -> Config:
    """``config`` with a factory's restart after a failure ``initial`` s, doubling to
    ``maximum`` s."""
    daemon = msgspec.structs.replace(config.daemon, restart_initial=initial, restart_max=maximum)
    return msgspec.structs.replace(config, daemon=daemon)


def failing_tradegecko_polls(
    monkeypatch: pytest.MonkeyPatch, factory: str, times: int = 1_000
) -> list[float]:
    """Make the first ``times`` TradeGecko polls of ``factory`` raise a bug-like error (the
    fault then gone); the loop times of the failures."""
    failed: list[float] = []
    poll = TradeGeckoPoller.poll_once

    async def failing(self: TradeGeckoPoller) -> int:
        if self.store.factory == factory and len(failed) < times:
            failed.append(anyio.current_time())
            raise RuntimeError("a bug in the poller")
        return await poll(self)

    monkeypatch.setattr(TradeGeckoPoller, "poll_once", failing)
    return failed


async def test_a_failing_factory_stops_alone_and_is_started_again_with_growing_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite, three factories: south's poller raises at each of its polls. South alone
    stops (its routes 404, syncd_factory_running 0), the daemon starts it again after
    0.5 s, 1 s, 2 s (less a quarter of jitter at most), the others finish their orders
    meanwhile; once the fault is gone south finishes its order, exactly once."""
    names = ["north", "south", "east"]
    failed = failing_tradegecko_polls(monkeypatch, "south", times=4)
    port = free_port()
    async with running_sims(accounts=3, webhooks=True) as sims:
        config = restarting(
            factories_config(sims, tmp_path / "syncd.db", names, webhook_port=port), 0.5, 2.0
        )
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            sims.factory(),
            httpx.AsyncClient(timeout=5) as http,
        ):
            south_po = await sims.create_po(factory=sims.factories[1])
            with anyio.fail_after(10):
                while len(failed) < 2:  # noqa: ASYNC110 - a test's bounded look
                    await anyio.sleep(0.02)
            # In its backoff (at least 0.75 s after the second failure): stopped alone.
            await anyio.sleep(0.1)
            assert sorted(daemon.factories) == ["east", "north"]
            assert daemon.restart_pending("south")
            answer = await http.post(f"http://127.0.0.1:{port}/webhooks/south/tradegecko")
            assert answer.status_code == 404
            found = samples(await scrape(daemon.metrics_url or ""))
            assert found[("syncd_factory_running", frozenset({"factory": "south"}.items()))] == 0
            assert found[("syncd_factory_running", frozenset({"factory": "north"}.items()))] == 1
            others = {
                name: await sims.create_po(factory=sims.factories[names.index(name)])
                for name in ("north", "east")
            }
            for name, po in others.items():
                await wait_in(daemon, name, [po["order_number"]], "received")
            # The fault gone after its fourth failure, started again after its next wait
            # (2 s at most): it finishes its order.
            (link,) = await wait_in(daemon, "south", [south_po["order_number"]], "received")
            assert link.so_id is not None
            assert "south" in daemon.factories and not daemon.restart_pending("south")
            await metric(daemon, "syncd_factory_running", 1, factory="south")
        gaps = [later - earlier for earlier, later in itertools.pairwise(failed)]
        # Growing waits, never a tight loop: each at least its policy's wait less a quarter
        # (0.375, 0.75, 1.5 s), each longer than the one before.
        assert len(gaps) == 3, gaps
        for gap, wait in zip(gaps, (0.5, 1.0, 2.0), strict=True):
            assert gap >= 0.75 * wait, gaps
        assert gaps[0] < gaps[1] < gaps[2], gaps
        assert gaps[0] < 1.5, gaps  # and not the first one held back
        # Exactly one SO and one receipt each, south's included.
        for name, po in {"south": south_po, **others}.items():
            katana_counts, tg_counts = await sims.counters(sims.factories[names.index(name)])
            assert katana_counts["sales_orders_by_order_no"] == {f"TG-{po['order_number']}": 1}
            assert tg_counts["receipts_per_po"] == {str(po["id"]): 1}
    # Each failure logged once, with its traceback and the wait before the next start (a
    # poll failing before its restart counted as started is said as a start that failed);
    # no other factory ever stopped.
    logged = [
        r
        for r in caplog.records
        if r.getMessage().startswith(("factory south failed", "factory south not started"))
    ]
    assert len(logged) == 4, [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is not None for r in logged)
    assert logged[0].getMessage().startswith("factory south failed: stopping it; it starts again")
    assert "(failure 4 in a row)" in logged[-1].getMessage() or "not started" in str(logged[-1])
    assert not [
        r
        for r in caplog.records
        if "failed: stopping it" in r.getMessage() and "south" not in r.getMessage()
    ]


async def test_a_factory_stopped_while_waiting_for_its_restart_stays_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["north", "south"]
    failed = failing_tradegecko_polls(monkeypatch, "south")
    async with running_sims(accounts=2) as sims:
        config = restarting(factories_config(sims, tmp_path / "syncd.db", names), 1.0, 2.0)
        async with running_daemon(config, katana_transport=sims.katana_contract) as daemon:
            with anyio.fail_after(10):
                while not daemon.restart_pending("south"):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await metric(daemon, "syncd_factory_running", 0, factory="south")
            await daemon.stop_factory("south")  # a reload removing it does so
            assert not daemon.restart_pending("south")
            await anyio.sleep(1.5)  # past its restart's time
            assert list(daemon.factories) == ["north"] and len(failed) == 1
            text = await scrape(daemon.metrics_url or "")
            assert 'factory="south"' not in text  # its series left with it
            assert 'syncd_factory_running{factory="north"} 1.0' in text


async def test_a_factorys_start_failing_on_a_reload_leaves_the_others_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A factory added by a reload whose start raises (a bug before it runs) is logged and
    started again after its backoff; the running factories go on."""
    names = ["north", "south"]
    tries: list[float] = []
    run = Dispatcher.run

    async def failing(self: Dispatcher, **kwargs: Any) -> None:
        if self.store.factory == "east":
            tries.append(anyio.current_time())
            if len(tries) <= 2:  # its first two starts
                raise RuntimeError("a bug in the dispatcher's start")
        await run(self, **kwargs)

    monkeypatch.setattr(Dispatcher, "run", failing)
    async with running_sims(accounts=3) as sims:
        config = restarting(factories_config(sims, tmp_path / "syncd.db", names), 0.5, 2.0)
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            sims.factory(),
        ):
            path = tmp_path / "syncd.toml"
            path.write_text("")
            added = restarting(
                factories_config(sims, tmp_path / "syncd.db", [*names, "east"]), 0.5, 2.0
            )
            monkeypatch.setattr(daemon_module, "read_config", lambda _: added)
            change = await daemon.reload(path)
            assert change is not None and change.added == ("east",)
            assert sorted(daemon.factories) == ["north", "south"]
            assert daemon.restart_pending("east")
            po = await sims.create_po(factory=sims.factories[0])
            await wait_in(daemon, "north", [po["order_number"]], "received")
            with anyio.fail_after(10):
                while "east" not in daemon.factories:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            east = await sims.create_po(factory=sims.factories[2])
            await wait_in(daemon, "east", [east["order_number"]], "received")
            assert sorted(daemon.factories) == ["east", "north", "south"]
    assert len(tries) == 3
    assert tries[1] - tries[0] >= 0.375 and tries[2] - tries[1] >= 0.75, tries
    not_started = [r for r in caplog.records if r.getMessage().startswith("factory east not")]
    assert len(not_started) == 2 and all(r.exc_info is not None for r in not_started)


async def test_a_daemon_of_one_factory_ends_with_its_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One factory: its failure ends the daemon (syncd exits; systemd starts it again)."""
    failed = failing_tradegecko_polls(monkeypatch, "default")
    async with running_sims(accounts=1) as sims:
        config = factories_config(sims, tmp_path / "syncd.db", ["default"])
        with pytest.raises(BaseException) as raised:
            async with running_daemon(config, katana_transport=sims.katana_contract):
                await anyio.sleep(10)
                pytest.fail("the daemon ran on without its only factory")
    assert first_error(raised.value, RuntimeError) is not None, raised.value
    assert len(failed) == 1


def test_a_factorys_restart_waits_double_jittered_down_and_a_long_run_resets_them() -> None:
    restarts = daemon_module._Restarts(RetryPolicy(initial=0.5, maximum=2.0))
    waits = [restarts.failed("south", ran_for=0.1) for _ in range(5)]
    assert [w.number for w in waits] == [1, 2, 3, 4, 5]
    for failure, policy in zip(waits, (0.5, 1.0, 2.0, 2.0, 2.0), strict=True):
        assert failure.delay is not None and 0.75 * policy <= failure.delay <= policy
    assert restarts.last("south") == waits[-1].delay
    # A run as long as the longest wait was healthy: its failure is the first again.
    again = restarts.failed("south", ran_for=2.0)
    assert again.number == 1 and again.delay is not None and again.delay <= 0.5
    assert restarts.failed("north", ran_for=0.0).number == 1  # each factory its own count
