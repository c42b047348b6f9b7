"""The whole flow against the simulators at Katana's real limit, then under injected faults.

At 60 requests per 60 s the daemon's own budget keeps it under the limit: not one 429. With
20 % 5xx everywhere, a 429 burst, cut bodies, and sales-order creates whose connection drops
after Katana made the order, every PO is still received, with one SO and one receipt each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from conftest import Sims, running_sims
from syncd.config import Config
from syncd.runtime.daemon import running_daemon
from syncd.sim.factory import play_factory
from syncd.sim.faults import Burst, FaultRule, Faults
from test_effects import settling
from test_flow import is_state, wait_for

pytestmark = pytest.mark.anyio

LINES = [
    [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"}],
    [{"sku": "STOOL-PINE", "name": "Pine stool", "quantity": "4", "price": "30.00"}],
    [
        {"sku": "TABLE-OAK", "name": "Oak table", "quantity": "1", "price": "520.00"},
        {"sku": "SHELF-WALNUT", "name": "Walnut shelf", "quantity": "3", "price": "88.00"},
    ],
]


@asynccontextmanager
async def simulators(
    *,
    katana_limit: tuple[int, float] | None,
    tradegecko_limit: tuple[int, float] | None,
    katana_faults: Faults | None = None,
    tradegecko_faults: Faults | None = None,
) -> AsyncIterator[Sims]:
    async with running_sims(
        katana_rate_limit=katana_limit,
        tradegecko_rate_limit=tradegecko_limit,
        katana_faults=katana_faults,
        tradegecko_faults=tradegecko_faults,
    ) as sims:
        yield sims


def with_katana(config: Config, **changes: Any) -> Config:
    return msgspec.structs.replace(config, katana=msgspec.structs.replace(config.katana, **changes))


@asynccontextmanager
async def factory(sims: Sims, step_delay: float) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: play_factory(sims.katana_url, step_delay=step_delay))
        yield
        tg.cancel_scope.cancel()


async def run_flow(
    sims: Sims, config: Config, seconds: float, *, validate: bool, step_delay: float = 0.05
) -> list[dict[str, Any]]:
    transport = sims.katana_contract if validate else None
    async with (
        running_daemon(config, katana_transport=transport) as daemon,
        factory(sims, step_delay),
    ):
        pos = [await sims.create_po(lines) for lines in LINES]
        daemon.poll_now()
        await wait_for(daemon, [po["order_number"] for po in pos], is_state("received"), seconds)
    return pos


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_real_katana_limit_is_never_hit(tmp_path: Path) -> None:
    async with simulators(katana_limit=(60, 60.0), tradegecko_limit=(300, 300.0)) as sims:
        # The daemon's default budget (60 per 60 s). Polling every 0.2 s asks for at least
        # 150 Katana requests a minute while an order is followed (an SO list per poll, idle
        # polls stretched to 0.4 s), so the budget is spent within ~25 s and then sets the
        # pace: nothing more goes out until the first window rolls over at 60 s, where a
        # budget a hair out of step with the service would meet a 429.
        config = with_katana(sims.config(tmp_path / "syncd.db"), rate_limit=60, poll_interval=0.2)
        # TradeGecko at its real limit too (300 per 300 s): polled every 2 s, not every 0.1 s.
        config = msgspec.structs.replace(
            config, tradegecko=msgspec.structs.replace(config.tradegecko, poll_interval=2.0)
        )
        assert (config.katana.rate_limit, config.katana.rate_period) == (60, 60.0)
        started = anyio.current_time()
        async with (
            running_daemon(config, katana_transport=sims.katana_contract) as daemon,
            factory(sims, step_delay=3.0),
        ):
            pos = []
            for lines in LINES:
                pos.append(await sims.create_po(lines))
                daemon.poll_now()
                await anyio.sleep(8)
            numbers = [po["order_number"] for po in pos]
            await wait_for(daemon, numbers, is_state("received"), 90)
        took = anyio.current_time() - started
        katana_counts, tg_counts = await sims.counters()
    sent = sum(katana_counts["requests"].values())
    limited = katana_counts["responses_429"]
    print(f"\nreal limits: {sent} Katana requests in {took:.1f} s, 429s {limited}")
    assert sent > 60, "the run never went past Katana's first window"
    assert katana_counts["responses_429"] == 0
    assert tg_counts["responses_429"] == 0
    assert katana_counts["sales_orders_by_order_no"] == {
        f"TG-{po['order_number']}": 1 for po in pos
    }
    assert tg_counts["receipts_per_po"] == {str(po["id"]): 1 for po in pos}
    assert sims.katana_contract.violations == []


CHAOS_KATANA = Faults(
    seed=11,
    rules=[
        # The dangerous one: Katana made the SO, the answer never arrives (twice).
        FaultRule(path="/sales_orders", method="POST", drop_rate=1.0, after=True, times=2),
        FaultRule(error_rate=0.2, truncate_rate=0.1),
    ],
    burst=Burst(requests=6, retry_after=1),
)
CHAOS_TRADEGECKO = Faults(
    seed=12,
    rules=[
        # The receipt landed, the answer is a 500: the Idempotency-Key replays it.
        FaultRule(
            path="/purchase_orders/{id}/actions/receive", error_rate=1.0, after=True, times=1
        ),
        FaultRule(error_rate=0.2, error_status=503, truncate_rate=0.1),
    ],
    burst=Burst(requests=4),
)


@pytest.mark.slow
async def test_faults_lose_nothing_and_do_nothing_twice(tmp_path: Path) -> None:
    async with simulators(
        katana_limit=None,
        tradegecko_limit=None,
        katana_faults=CHAOS_KATANA,
        tradegecko_faults=CHAOS_TRADEGECKO,
    ) as sims:
        # The dropped creates are uncertain: each retry looks after katana.timeout + settle.
        config = settling(sims.config(tmp_path / "syncd.db"), timeout=5.0)
        started = anyio.current_time()
        pos = await run_flow(sims, config, 90, validate=False)
        took = anyio.current_time() - started
        # A second burst, mid-life, on both: a restarted daemon sees all done and changes
        # nothing.
        for url in (sims.katana_url, sims.tradegecko_url):
            await sims.control.put(f"{url}/_sim/faults", json={"burst": {"requests": 3}})
        async with running_daemon(config) as daemon:
            for _ in range(3):
                daemon.poll_now()
                await anyio.sleep(0.3)
            links = [await daemon.store.link_by_po_number(po["order_number"]) for po in pos]
        katana_counts, tg_counts = await sims.counters()
    print(
        f"\nfaults: {took:.1f} s; Katana injected {katana_counts['faults_injected']}, "
        f"TradeGecko injected {tg_counts['faults_injected']}"
    )
    assert [link.state if link else None for link in links] == ["received"] * len(pos)
    assert katana_counts["sales_orders_by_order_no"] == {
        f"TG-{po['order_number']}": 1 for po in pos
    }
    assert tg_counts["receipts_per_po"] == {str(po["id"]): 1 for po in pos}
    assert katana_counts["customers_created"] == 1
    katana_faults = katana_counts["faults_injected"]
    tg_faults = tg_counts["faults_injected"]
    assert katana_faults["drop_after"] == 2
    assert katana_faults["rate_limited"] >= 6
    assert katana_faults["error"] > 0 and katana_faults["truncate"] > 0
    assert tg_faults["error_after"] == 1
    assert tg_faults["rate_limited"] >= 4
    assert tg_faults["error"] > 0 and tg_faults["truncate"] > 0


SLOW_KATANA = Faults(
    seed=21,
    rules=[
        # Katana made the SO but answers too late: the client gives up, the order must not
        # get a second SO.
        FaultRule(
            path="/sales_orders",
            method="POST",
            timeout_rate=1.0,
            timeout_seconds=3.0,
            after=True,
            times=1,
        ),
        FaultRule(timeout_rate=0.1, timeout_seconds=3.0, latency_ms=50, jitter_ms=100),
    ],
)
SLOW_TRADEGECKO = Faults(
    seed=22,
    rules=[FaultRule(timeout_rate=0.1, timeout_seconds=3.0, latency_ms=50, jitter_ms=100)],
)


@pytest.mark.slow
async def test_slow_answers_and_hangs_lose_nothing_and_do_nothing_twice(tmp_path: Path) -> None:
    async with simulators(
        katana_limit=None,
        tradegecko_limit=None,
        katana_faults=SLOW_KATANA,
        tradegecko_faults=SLOW_TRADEGECKO,
    ) as sims:
        config = sims.config(tmp_path / "syncd.db")
        config = msgspec.structs.replace(
            with_katana(config, timeout=1.0),
            tradegecko=msgspec.structs.replace(config.tradegecko, timeout=1.0),
        )
        pos = await run_flow(sims, config, 90, validate=False)
        katana_counts, tg_counts = await sims.counters()
    print(
        f"\nslow: Katana injected {katana_counts['faults_injected']}, "
        f"TradeGecko injected {tg_counts['faults_injected']}"
    )
    assert katana_counts["sales_orders_by_order_no"] == {
        f"TG-{po['order_number']}": 1 for po in pos
    }
    assert tg_counts["receipts_per_po"] == {str(po["id"]): 1 for po in pos}
    assert katana_counts["faults_injected"].get("timeout_after") == 1
    hangs = sum(n for kind, n in katana_counts["faults_injected"].items() if "timeout" in kind)
    assert hangs + sum(n for k, n in tg_counts["faults_injected"].items() if "timeout" in k) > 1
