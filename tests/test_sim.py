"""The simulators as a package: who may use them, the harness serving many factories, and
``syncd sim`` as a real process."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from syncd.ops.asgi import bind_socket
from syncd.sim import TRADEGECKO_WEBHOOK_SECRET, free_port, running_simulators

SRC = Path(__file__).resolve().parents[1] / "src" / "syncd"
BIN = Path(sys.executable).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_command_line_imports_the_simulators() -> None:
    # The daemon must never depend on a stand-in for the services.
    users = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "sim" not in path.relative_to(SRC).parts[:1]
        and any(name == "syncd.sim" or name.startswith("syncd.sim.") for name in _imports(path))
    }
    assert users and all(user.startswith("cli/") for user in users), sorted(users)


def test_the_simulators_do_not_use_syncds_api_clients() -> None:
    # They stand in for the services independently of the clients they are tested against.
    for path in (SRC / "sim").rglob("*.py"):
        bad = {name for name in _imports(path) if name.startswith("syncd.adapters")}
        assert not bad, (path.name, bad)


@pytest.mark.parametrize("service", ["katana", "tradegecko"])
def test_a_port_in_use_is_a_clear_usage_error(service: str) -> None:
    taken = bind_socket()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            [str(BIN / "syncd"), "sim", service, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    assert f"syncd: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    # The banner says it serves only once it does: a script may wait for it.
    assert "simulator on" not in done.stdout


@pytest.mark.parametrize("port", ["80000", "-5"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    done = subprocess.run(
        [str(BIN / "syncd"), "sim", "katana", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--port" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.anyio
async def test_running_simulators_serve_many_factories_apart() -> None:
    async with running_simulators(accounts=3) as sims:
        assert [f.katana_token for f in sims.factories] == [
            "katana-sim-token",
            "katana-sim-token-1",
            "katana-sim-token-2",
        ]
        assert [f.tradegecko_webhook_secret for f in sims.factories] == [
            TRADEGECKO_WEBHOOK_SECRET,
            "tradegecko-sim-token-1-webhook-secret",
            "tradegecko-sim-token-2-webhook-secret",
        ]
        default, second, idle = sims.factories
        po = await sims.create_po(2, factory=second)
        assert sims.tradegecko_world_of(second).purchase_orders.keys() == {po["id"]}
        assert sims.tradegecko_world.purchase_orders == {}
        async with httpx.AsyncClient() as http:
            for factory in (default, second):
                answer = await http.get(
                    f"{sims.katana_api_url}/factory",
                    headers={"Authorization": f"Bearer {factory.katana_token}"},
                )
                assert answer.status_code == 200
        katana_counts, tradegecko_counts = await sims.counters(second)
        assert katana_counts["requests"] == {"GET /factory": 1}
        assert tradegecko_counts["requests"] == {}
        assert (await sims.counters())[0]["requests"] == {"GET /factory": 1}
        assert not sims.katana_accounts[idle.katana_token].started


@pytest.mark.anyio
async def test_the_factory_player_can_be_told_which_factories_to_work() -> None:
    async with running_simulators(accounts=2) as sims:
        default, second = sims.factories
        orders = {}
        async with httpx.AsyncClient(base_url=sims.katana_api_url) as http:
            for factory in (default, second):
                auth = {"Authorization": f"Bearer {factory.katana_token}"}
                customer = await http.post("/customers", json={"name": "Shop"}, headers=auth)
                chair = await http.get("/variants", params={"sku": "CHAIR-OAK"}, headers=auth)
                rows = [{"variant_id": chair.json()["data"][0]["id"], "quantity": 1}]
                body = {"customer_id": customer.json()["id"], "sales_order_rows": rows}
                made = await http.post("/sales_orders", json=body, headers=auth)
                orders[factory.katana_token] = made.json()["id"]
            async with sims.factory(step_delay=0.02, only=[second]):
                with anyio.fail_after(10):
                    while True:
                        world = sims.katana_world_of(second)
                        if world.get_sales_order(orders[second.katana_token]).status == "DELIVERED":
                            break
                        await anyio.sleep(0.02)
        untouched = sims.katana_world.get_sales_order(orders[default.katana_token])
        assert untouched.status == "NOT_SHIPPED"
        assert sims.katana_world.mo_list() == []


@pytest.mark.anyio
async def test_running_simulators_want_at_least_one_factory() -> None:
    with pytest.raises(ValueError, match="accounts must be at least 1, not 0"):
        async with running_simulators(accounts=0):
            pass


@pytest.mark.parametrize(
    ("service", "token"), [("katana", "katana-sim-token"), ("tradegecko", "tradegecko-sim-token")]
)
def test_syncd_sim_serves_the_accounts_asked_for(service: str, token: str) -> None:
    port = free_port()
    with subprocess.Popen(
        [str(BIN / "syncd"), "sim", service, "--port", str(port), "--accounts", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            index = _wait_for(f"http://127.0.0.1:{port}/_sim/", process)
            assert index["accounts"] == [token, f"{token}-1", f"{token}-2"]
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.mark.parametrize("service", ["katana", "tradegecko"])
def test_syncd_sim_wants_at_least_one_account(service: str) -> None:
    done = subprocess.run(
        [str(BIN / "syncd"), "sim", service, "--accounts", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--accounts" in done.stderr
    assert "Traceback" not in done.stderr


def _wait_for(url: str, process: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr and process.stderr.read()
        try:
            return httpx.get(url, timeout=1.0).json()
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered at {url}")
