"""The metrics endpoint of a running daemon: what it says, that promtool accepts it, and that
a real Prometheus server scrapes it."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Sims
from syncd import __version__
from syncd.ops.metrics import Metrics
from syncd.sim import free_port
from test_flow import is_state, wait_for

pytestmark = pytest.mark.anyio

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


#: The series without a ``factory`` label.
_DAEMON_WIDE = ("syncd_build_info", "syncd_metrics_refresh_timestamp_seconds")


def value(text: str, name: str, **labels: str) -> float | None:
    """A sample's value; the factory ``default``'s unless ``factory`` is named."""
    if not name.startswith(_DAEMON_WIDE):
        labels.setdefault("factory", "default")
    return samples(text).get((name, frozenset(labels.items())))


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_running_daemon_exports_its_metrics_and_promtool_accepts_them(
    sims: Sims, tmp_path: Path
) -> None:
    async with sims.daemon(tmp_path / "syncd.db") as daemon, sims.factory():
        assert daemon.metrics_url is not None
        po = await sims.create_po(
            [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"}]
        )
        daemon.poll_now()
        await wait_for(daemon, [po["order_number"]], is_state("received"))
        for _ in range(100):  # the gauges are refreshed every 0.1 s
            text = await scrape(daemon.metrics_url)
            if value(text, "syncd_orders", state="received") == 1:
                break
            await anyio.sleep(0.05)

    assert value(text, "syncd_orders", state="needs_attention") == 0
    assert (
        value(
            text,
            "syncd_build_info",
            version=__version__,
            python=platform.python_version(),
        )
        == 1
    )
    assert (
        value(
            text,
            "syncd_transitions_total",
            **{"from": "discovered", "to": "imported", "trigger": "so_created"},
        )
        == 1
    )
    assert (
        value(
            text,
            "syncd_transitions_total",
            **{"from": "delivered", "to": "received", "trigger": "po_received"},
        )
        == 1
    )
    assert value(text, "syncd_state_duration_seconds_count", state="discovered") == 1
    assert value(text, "syncd_inbox_backlog_events") == 0
    assert value(text, "syncd_inbox_oldest_event_age_seconds") == 0
    for source in ("tradegecko", "katana"):
        last = value(text, "syncd_poll_last_success_timestamp_seconds", source=source)
        assert last is not None and last > 1.7e9
    # Requests are counted by endpoint template, never by an order's id.
    requests = {
        (dict(labels)["service"], dict(labels)["endpoint"], dict(labels)["status"])
        for (name, labels) in samples(text)
        if name == "syncd_api_requests_total"
    }
    assert ("katana", "/sales_orders", "200") in requests
    assert ("tradegecko", "/purchase_orders", "200") in requests
    assert all(
        "{" in endpoint or not any(c.isdigit() for c in endpoint) for _, endpoint, _ in requests
    )
    assert "syncd_api_request_duration_seconds_bucket" in text
    assert po["order_number"] not in text

    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = await anyio.run_process(
        [PROMTOOL, "check", "metrics"], input=text.encode(), check=False
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", report  # not one lint remark


def test_metrics_of_two_daemons_do_not_mix() -> None:
    first, second = Metrics(), Metrics()
    first.effect("import_order", "retry")
    first.effect("receive_order", "failed")
    assert (
        first.registry.get_sample_value(
            "syncd_effect_retries_total", {"factory": "default", "effect": "import_order"}
        )
        == 1
    )
    assert (
        first.registry.get_sample_value(
            "syncd_effect_failures_total", {"factory": "default", "effect": "receive_order"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "syncd_effect_retries_total", {"factory": "default", "effect": "import_order"}
        )
        is None
    )


async def test_a_real_prometheus_scrapes_the_daemon(sims: Sims, tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("the prometheus server is not installed (Debian package prometheus)")
    async with sims.daemon(tmp_path / "syncd.db") as daemon:
        assert daemon.metrics_url is not None
        target = daemon.metrics_url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: syncd\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        async with await anyio.open_process(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as prometheus:
            try:
                result: list[dict[str, object]] = []
                async with httpx.AsyncClient(timeout=5) as client:
                    with anyio.fail_after(60):
                        while not result:
                            await anyio.sleep(0.5)
                            try:
                                response = await client.get(
                                    f"http://127.0.0.1:{port}/api/v1/query",
                                    params={"query": 'syncd_orders{state="received"}'},
                                )
                            except httpx.TransportError:
                                continue
                            if response.status_code == 200:
                                result = response.json()["data"]["result"]
                    up = await client.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}
                    )
            finally:
                prometheus.terminate()
                with anyio.move_on_after(10):
                    await prometheus.wait()
    assert result[0]["metric"]["job"] == "syncd"  # type: ignore[index]
    assert result[0]["value"][1] == "0"  # type: ignore[index]
    assert up.json()["data"]["result"][0]["value"][1] == "1"


async def _paused(url: str, service: str, expected: float) -> str:
    with anyio.fail_after(10):
        while True:
            text = await scrape(url)
            if value(text, "syncd_service_paused", service=service) == expected:
                return text
            await anyio.sleep(0.05)


async def test_a_rejected_token_shows_as_a_paused_service_until_it_works(
    sims: Sims, tmp_path: Path
) -> None:
    token = f"{sims.tradegecko_url}/_sim/token"
    async with sims.daemon(tmp_path / "syncd.db") as daemon:
        assert daemon.metrics_url is not None
        text = await _paused(daemon.metrics_url, "tradegecko", 0)
        assert value(text, "syncd_service_paused", service="katana") == 0
        assert (await sims.control.post(token, json={"revoked": True})).status_code < 300
        daemon.poll_now()
        text = await _paused(daemon.metrics_url, "tradegecko", 1)
        assert value(text, "syncd_service_paused", service="katana") == 0
        assert (await sims.control.post(token, json={"revoked": False})).status_code < 300
        daemon.poll_now()
        await _paused(daemon.metrics_url, "tradegecko", 0)


async def test_several_factories_are_refreshed_by_one_grouped_read(tmp_path: Path) -> None:
    """Each factory's refresh_forever runs, one of them reads for all (4 queries, whatever
    the number of factories); when it stops, another takes over; a stopped factory's series
    do not come back."""
    from syncd.adapters._http import RequestBudget
    from syncd.store import Store

    metrics = Metrics()
    store = await Store.open(tmp_path / "syncd.db")
    try:
        names = [f"f{i}" for i in range(6)]
        views = {name: store.for_factory(name) for name in names}
        await views["f3"].set_meta("paused.katana", "401")
        await views["f4"].add_event("tradegecko", "webhook", b"x")
        queries: list[str] = []
        fetchall = store._db.fetchall

        async def counted(sql: str, args: object = ()) -> object:
            queries.append(sql)
            return await fetchall(sql, args)  # type: ignore[arg-type]

        store._db.fetchall = counted  # type: ignore[method-assign, assignment]

        def text() -> str:
            from prometheus_client import generate_latest

            return generate_latest(metrics.registry).decode()

        async with anyio.create_task_group() as tg:
            scopes: dict[str, anyio.CancelScope] = {}

            async def refreshing(name: str) -> None:
                with anyio.CancelScope() as scope:
                    scopes[name] = scope
                    await metrics.refresh_forever(
                        views[name],
                        0.05,
                        states=["received"],
                        polls=lambda: {"tradegecko": 123.0},
                        budgets={"katana": RequestBudget(60, 60.0)},
                    )

            for name in names:
                tg.start_soon(refreshing, name)
            for _ in range(100):
                await anyio.sleep(0.02)
                if value(text(), "syncd_inbox_backlog_events", factory="f4") == 1:
                    break
            got = text()
            assert value(got, "syncd_service_paused", factory="f3", service="katana") == 1
            assert value(got, "syncd_service_paused", factory="f2", service="katana") == 0
            assert value(got, "syncd_orders", factory="f5", state="received") == 0
            assert (
                value(
                    got,
                    "syncd_poll_last_success_timestamp_seconds",
                    factory="f1",
                    source="tradegecko",
                )
                == 123.0
            )
            # Grouped: once all six run, a refresh is 4 queries for the 6 factories, not 24.
            queries.clear()
            await anyio.sleep(0.2)
            seen = list(queries)
            refreshes = sum("FROM inbox" in q for q in seen)
            assert refreshes >= 2 and len(seen) <= 4 * (refreshes + 1), seen
            assert all("WHERE factory = ?" not in q for q in seen), seen
            leader = metrics._refresher
            assert leader is not None
            scopes[leader].cancel()
            metrics.forget_factory(leader)
            await anyio.sleep(0.05)
            await views["f0" if leader != "f0" else "f1"].set_meta("paused.tradegecko", "401")
            survivor = "f0" if leader != "f0" else "f1"
            for _ in range(100):
                await anyio.sleep(0.02)
                got = text()
                if value(got, "syncd_service_paused", factory=survivor, service="tradegecko"):
                    break
            assert metrics._refresher not in (None, leader)
            assert value(got, "syncd_service_paused", factory=survivor, service="tradegecko") == 1
            assert value(got, "syncd_inbox_backlog_events", factory=leader) is None
            tg.cancel_scope.cancel()
        assert metrics._refreshing == {}
    finally:
        await store.close()
