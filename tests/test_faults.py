"""The simulators' fault layer: errors, latency, hangs, drops, cut bodies and 429 bursts, in
each service's own words, over real loopback sockets (a dropped connection needs one)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from syncd.adapters.katana import KatanaClient
from syncd.adapters.tradegecko import TradeGeckoClient
from syncd.cli.syncd import main
from syncd.errors import DecodeError, ServerError, TransportError
from syncd.ops.asgi import serving
from syncd.sim import katana as katana_sim
from syncd.sim import tradegecko as tradegecko_sim
from syncd.sim.faults import Burst, FaultLayer, FaultRule, Faults

pytestmark = pytest.mark.anyio

KATANA = {"Authorization": "Bearer katana-sim-token"}
TRADEGECKO = {"Authorization": "Bearer tradegecko-sim-token"}


@asynccontextmanager
async def katana(faults: Faults | None = None, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = katana_sim.create_app(rate_limit=None, faults=faults, **kwargs)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as http:
        yield http


@asynccontextmanager
async def tradegecko(faults: Faults | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = tradegecko_sim.create_app(rate_limit=None, faults=faults)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as http:
        yield http


def every(**rule: Any) -> Faults:
    return Faults(rules=[FaultRule(**rule)])


async def _new_order_body(http: httpx.AsyncClient, order_no: str) -> dict[str, Any]:
    customer = await http.post("/v1/customers", json={"name": "Acme"}, headers=KATANA)
    variants = await http.get("/v1/variants", params={"sku": "CHAIR-OAK"}, headers=KATANA)
    return {
        "customer_id": customer.json()["id"],
        "order_no": order_no,
        "sales_order_rows": [{"variant_id": variants.json()["data"][0]["id"], "quantity": 1}],
    }


# -- Katana -----------------------------------------------------------------------------


async def test_katana_errors_in_katanas_words_never_on_the_control_panel() -> None:
    faults = Faults(rules=[FaultRule(path="/factory", error_rate=1.0, error_status=503)])
    async with katana(faults) as http:
        answer = await http.get("/v1/factory", headers=KATANA)
        assert answer.status_code == 503
        assert answer.json() == {
            "statusCode": 503,
            "name": "ServiceUnavailable",
            "message": "Service Unavailable",
        }
        assert (await http.get("/v1/customers", headers=KATANA)).status_code == 200
        assert (await http.get("/_sim/state")).status_code == 200
        counters = (await http.get("/_sim/counters")).json()
    assert counters["faults_injected"] == {"error": 1}
    # The simulator never saw the failed request.
    assert "GET /factory" not in counters["requests"]


async def test_rules_match_templates_prefixes_and_methods() -> None:
    layer = FaultLayer("katana", api_prefix="/v1")
    layer.configure(
        Faults(
            rules=[
                FaultRule(path="/sales_orders/{id}", method="PATCH", error_rate=1.0),
                FaultRule(path="/manufacturing*", error_rate=1.0, error_status=502),
            ]
        )
    )
    assert layer.api_path("/_sim/state") is None
    assert layer.api_path("/v1/sales_orders/3") == "/sales_orders/3"
    assert layer.api_path("/elsewhere") is None
    assert layer.plan("PATCH", "/sales_orders/3").kind == "error"
    assert layer.plan("GET", "/sales_orders/3").kind is None
    assert layer.plan("PATCH", "/sales_orders").kind is None
    assert layer.plan("PATCH", "/sales_orders/3/extra").kind is None
    plan = layer.plan("GET", "/manufacturing_orders")
    assert (plan.kind, plan.status) == ("error", 502)


async def test_the_same_seed_injects_the_same_faults() -> None:
    def pattern(seed: int) -> list[str | None]:
        layer = FaultLayer("katana", Faults(seed=seed, rules=[FaultRule(error_rate=0.3)]))
        return [layer.plan("GET", "/factory").kind for _ in range(200)]

    first = pattern(7)
    assert first == pattern(7)
    assert first != pattern(8)
    assert 30 < first.count("error") < 90


async def test_a_rule_injects_at_most_times_faults() -> None:
    layer = FaultLayer("katana", every(error_rate=1.0, times=2))
    assert [layer.plan("GET", "/factory").kind for _ in range(4)] == ["error", "error", None, None]


async def test_latency_is_added() -> None:
    async with katana(every(latency_ms=150, jitter_ms=50)) as http:
        started = time.perf_counter()
        answer = await http.get("/v1/factory", headers=KATANA)
        took = time.perf_counter() - started
        counters = (await http.get("/_sim/counters")).json()
    assert answer.status_code == 200
    assert 0.15 <= took < 1.0
    assert counters["faults_injected"] == {"latency": 1}


async def test_a_hang_outlasts_the_clients_timeout() -> None:
    async with katana(every(timeout_rate=1.0, timeout_seconds=10)) as http:
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/v1/factory", headers=KATANA, timeout=0.3)
        assert time.perf_counter() - started < 2
        client = KatanaClient(
            str(http.base_url) + "/v1", "katana-sim-token", timeout=0.2, attempts=2
        )
        async with client:
            with pytest.raises(TransportError, match="timed out"):
                await client.get_factory()


async def test_a_dropped_connection_gets_no_answer() -> None:
    async with katana(every(drop_rate=1.0)) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/v1/factory", headers=KATANA)
        counters = (await http.get("/_sim/counters")).json()
    assert counters["faults_injected"] == {"drop": 1}


async def test_a_create_dropped_after_it_landed_exists_but_is_not_retried() -> None:
    faults = Faults(
        rules=[FaultRule(path="/sales_orders", method="POST", drop_rate=1.0, after=True)]
    )
    async with katana(faults) as http:
        body = await _new_order_body(http, "TG-PO1")
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/v1/sales_orders", json=body, headers=KATANA)
        counters = (await http.get("/_sim/counters")).json()
        assert counters["sales_orders_by_order_no"] == {"TG-PO1": 1}
        assert counters["faults_injected"] == {"drop_after": 1}

        # The client never retries a POST without an idempotency key.
        from syncd.adapters.katana import NewSalesOrder, NewSalesOrderRow

        order = NewSalesOrder(
            customer_id=body["customer_id"],
            order_no="TG-PO2",
            sales_order_rows=[
                NewSalesOrderRow(
                    variant_id=body["sales_order_rows"][0]["variant_id"], quantity=Decimal(1)
                )
            ],
        )
        async with KatanaClient(str(http.base_url) + "/v1", "katana-sim-token") as client:
            with pytest.raises(TransportError):
                await client.create_sales_order(order)
            found = await client.list_sales_orders(order_no="TG-PO2")
        counters = (await http.get("/_sim/counters")).json()
    assert [so.order_no for so in found] == ["TG-PO2"]
    assert counters["sales_orders_by_order_no"] == {"TG-PO1": 1, "TG-PO2": 1}


async def test_a_held_create_lands_after_the_client_gave_up() -> None:
    held = every(path="/sales_orders", method="POST", hold_rate=1.0, hold_seconds=0.6, times=1)
    async with katana(held) as http:
        body = await _new_order_body(http, "TG-PO1")
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/sales_orders", json=body, headers=KATANA, timeout=0.2)
        assert (await http.get("/_sim/counters")).json()["sales_orders_by_order_no"] == {}
        await anyio.sleep(0.8)
        counters = (await http.get("/_sim/counters")).json()
        # Held once: the next create is answered at once.
        second = await http.post("/v1/sales_orders", json=body, headers=KATANA, timeout=2)
    assert counters["sales_orders_by_order_no"] == {"TG-PO1": 1}
    assert counters["faults_injected"] == {"hold": 1}
    assert second.status_code == 200, second.text


async def test_an_error_after_the_work_is_done() -> None:
    faults = Faults(rules=[FaultRule(path="/customers", method="POST", error_rate=1.0, after=True)])
    async with katana(faults) as http:
        answer = await http.post("/v1/customers", json={"name": "Acme"}, headers=KATANA)
        assert answer.status_code == 500
        listed = await http.get("/v1/customers", headers=KATANA)
    assert [c["name"] for c in listed.json()["data"]] == ["Acme"]


async def test_a_truncated_body_is_a_decode_error() -> None:
    async with katana(every(path="/factory", truncate_rate=1.0)) as http:
        answer = await http.get("/v1/factory", headers=KATANA)
        assert answer.status_code == 200
        assert int(answer.headers["content-length"]) == len(answer.content) > 0
        with pytest.raises(json.JSONDecodeError):
            answer.json()
        async with KatanaClient(str(http.base_url) + "/v1", "katana-sim-token") as client:
            with pytest.raises(DecodeError):
                await client.get_factory()
        counters = (await http.get("/_sim/counters")).json()
    assert counters["faults_injected"] == {"truncate": 2}


async def test_katana_429_burst_with_its_real_headers_then_the_client_waits() -> None:
    faults = Faults(burst=Burst(requests=2, retry_after=1))
    async with katana(faults) as http:
        answer = await http.get("/v1/factory", headers=KATANA)
        assert answer.status_code == 429
        assert answer.json() == {
            "statusCode": 429,
            "name": "TooManyRequests",
            "message": "Too Many Requests",
        }
        assert answer.headers["Retry-After"] == "1"
        assert answer.headers["X-Ratelimit-Remaining"] == "0"
        assert answer.headers["X-Ratelimit-Limit"] == "60"
        assert int(answer.headers["X-Ratelimit-Reset"]) > time.time() * 1000
        # The client waits the announced second and gets through.
        async with KatanaClient(str(http.base_url) + "/v1", "katana-sim-token") as client:
            started = time.perf_counter()
            await client.get_factory()
            assert 0.9 <= time.perf_counter() - started < 5
        counters = (await http.get("/_sim/counters")).json()
    assert counters["faults_injected"] == {"rate_limited": 2}
    assert counters["responses_429"] == 0  # the real limiter was never reached


async def test_a_timed_burst_announces_what_is_left() -> None:
    async with katana(Faults(burst=Burst(seconds=3))) as http:
        answer = await http.get("/v1/factory", headers=KATANA)
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "3"
        await http.delete("/_sim/faults")
        assert (await http.get("/v1/factory", headers=KATANA)).status_code == 200


async def test_control_endpoint_get_put_delete() -> None:
    async with katana() as http:
        report = (await http.get("/_sim/faults")).json()
        assert report["faults"] == {"seed": 0, "rules": [], "burst": None}
        settings = {
            "seed": 3,
            "rules": [{"path": "/factory", "method": "GET", "error_rate": 1.0}],
            "burst": None,
        }
        answer = await http.put("/_sim/faults", json=settings)
        assert answer.status_code == 200
        assert answer.json()["faults"]["rules"][0]["error_rate"] == 1.0
        assert (await http.get("/v1/factory", headers=KATANA)).status_code == 500
        assert (await http.get("/_sim/faults")).json()["injected"] == {"error": 1}
        bad = await http.put("/_sim/faults", json={"rules": [{"error_rate": 2}]})
        assert bad.status_code == 400
        assert "error_rate" in bad.json()["error"]
        unknown = await http.put("/_sim/faults", json={"rules": [{"eror_rate": 1}]})
        assert unknown.status_code == 400
        assert (await http.delete("/_sim/faults")).json()["faults"]["rules"] == []
        assert (await http.get("/v1/factory", headers=KATANA)).status_code == 200


# -- TradeGecko -------------------------------------------------------------------------


async def _po(http: httpx.AsyncClient) -> dict[str, Any]:
    lines = [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "10"}]
    answer = await http.post("/_sim/purchase_orders", json={"supplier": "Katana", "lines": lines})
    assert answer.status_code == 201, answer.text
    po: dict[str, Any] = answer.json()["purchase_order"]
    return po


async def test_tradegecko_errors_and_429s_in_its_words() -> None:
    faults = Faults(rules=[FaultRule(path="/companies", error_rate=1.0)], burst=Burst(requests=1))
    async with tradegecko(faults) as http:
        limited = await http.get("/accounts/current", headers=TRADEGECKO)
        assert limited.status_code == 429
        assert "Retry-After" not in limited.headers
        assert limited.headers["X-Rate-Limit-Remaining"] == "0"
        assert limited.headers["X-Rate-Limit-Limit"] == "300"
        assert int(limited.headers["X-Rate-Limit-Reset"]) >= time.time()
        assert limited.headers["X-Request-Id"]
        assert limited.json()["type"] == "TooManyRequests"
        failed = await http.get("/companies", headers=TRADEGECKO)
        assert failed.status_code == 500
        assert failed.headers["X-Request-Id"]
        assert failed.json() == {"type": "InternalServerError", "message": "Internal Server Error"}
        assert (await http.get("/accounts/current", headers=TRADEGECKO)).status_code == 200
        counters = (await http.get("/_sim/counters")).json()
    assert counters["faults_injected"] == {"rate_limited": 1, "error": 1}
    assert counters["responses_429"] == 0


async def test_a_receipt_failing_after_it_landed_is_replayed_by_its_key() -> None:
    faults = Faults(
        rules=[
            FaultRule(path="/purchase_orders/{id}/actions/receive", error_rate=1.0, after=True),
            FaultRule(path="/purchase_order_line_items/{id}", method="PUT", truncate_rate=1.0),
        ]
    )
    async with tradegecko(faults) as http:
        po = await _po(http)
        async with TradeGeckoClient(str(http.base_url), "tradegecko-sim-token") as client:
            # Every attempt is received by the simulator, then answered 500.
            with pytest.raises(ServerError):
                await client.receive_purchase_order(po["id"], idempotency_key="k-1")
            await http.delete("/_sim/faults")
            procurement = await client.receive_purchase_order(po["id"], idempotency_key="k-1")
        counters = (await http.get("/_sim/counters")).json()
    assert procurement.id
    assert counters["receipts_per_po"] == {str(po["id"]): 1}
    assert counters["faults_injected"]["error_after"] >= 2


async def test_an_empty_answer_is_never_counted_as_cut() -> None:
    faults = every(path="/purchase_order_line_items/{id}", method="PUT", truncate_rate=1.0)
    async with tradegecko(faults) as http:
        po = await _po(http)
        line_id = po["purchase_order_line_item_ids"][0]
        body = {"purchase_order_line_item": {"price": "12.0"}}
        answer = await http.put(
            f"/purchase_order_line_items/{line_id}", json=body, headers=TRADEGECKO
        )
        assert answer.status_code == 204
        counters = (await http.get("/_sim/counters")).json()
    assert counters["faults_injected"] == {"truncate": 0}


# -- command line -----------------------------------------------------------------------


def test_cli_flags_and_file_build_faults(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from syncd.cli import syncd as cli

    seen: list[Faults | None] = []

    async def fake_run(*args: Any, faults: Faults | None = None, **kwargs: Any) -> None:
        seen.append(faults)

    monkeypatch.setattr(katana_sim, "run", fake_run)
    monkeypatch.setattr(tradegecko_sim, "run", fake_run)
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)
    runner = CliRunner()
    result = runner.invoke(
        main, ["sim", "katana", "--error-rate", "0.2", "--latency-ms", "50", "--fault-seed", "9"]
    )
    assert result.exit_code == 0, result.output
    settings = tmp_path / "faults.json"
    wanted = Faults(burst=Burst(seconds=5), rules=[FaultRule(path="/variants", drop_rate=0.5)])
    settings.write_bytes(msgspec.json.encode(wanted))
    result = runner.invoke(main, ["sim", "tradegecko", "--faults", str(settings)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["sim", "tradegecko"])
    assert result.exit_code == 0, result.output
    assert seen == [
        Faults(seed=9, rules=[FaultRule(error_rate=0.2, latency_ms=50)]),
        wanted,
        None,
    ]
