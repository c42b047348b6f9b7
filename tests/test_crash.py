"""Nothing lost, nothing done twice: the daemon as a real process, killed with SIGKILL again
and again (and at each crash point), against simulators running as their own processes.

The harness is in ``crash_harness.py``; ``bench/crash.py`` runs a longer version.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from crash_harness import AUTO_POINTS, CRASH_POINTS, WEBHOOK_POINTS, CrashHarness
from syncd.runtime.crashpoints import EXIT_CODE
from syncd.store import Store

#: The short version `make test` runs.
KILLS = 24
ORDERS = 12


def test_the_daemon_killed_again_and_again_loses_nothing_and_does_nothing_twice(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("SYNCD_CRASH_SEED", "7"))
    harness = CrashHarness(tmp_path, seed=seed)
    with harness.running():
        report = harness.chaos(orders=ORDERS, kills=KILLS, seconds=40.0)
        assert not report.unexpected_exits, (report, harness.daemon_log_tail())
        assert report.kills >= 20, report
        assert harness.finish(orders=ORDERS, seconds=30.0), (
            harness.states(),
            harness.daemon_log_tail(),
        )
        verdict = harness.verdict()
    assert verdict.orders == ORDERS
    assert verdict.duplicate_sales_orders == {}, verdict
    assert verdict.duplicate_receipts == {}, verdict
    assert verdict.lost == {}, verdict
    assert verdict.invalid_histories == {}, verdict
    assert verdict.customers_created == 1 and verdict.products_created == 1, verdict
    assert verdict.ok


@pytest.mark.parametrize("point", sorted(set(CRASH_POINTS) - WEBHOOK_POINTS - AUTO_POINTS))
def test_a_crash_at_each_point_still_ends_received_exactly_once(tmp_path: Path, point: str) -> None:
    harness = CrashHarness(tmp_path, seed=1)
    with harness.running():
        status = harness.aim(point)
        assert status == EXIT_CODE, f"crash point {point} was never reached (exit {status})"
        assert harness.finish(orders=1, seconds=20.0), harness.daemon_log_tail()
        verdict = harness.verdict()
        (costs,) = harness.recorded_costs().values()
    # Whichever run did the receipt, the record says what it did: each line's cost before
    # (the price as imported: nobody edits these POs) and after (what TradeGecko holds); the
    # known SKUs were re-costed.
    assert costs and all(None not in (before, after) for _, _, before, after, _ in costs), costs
    assert all(before == imported for _, imported, before, _, _ in costs), costs
    assert all(after == now for _, _, _, after, now in costs), costs
    assert any(before != after for _, _, before, after, _ in costs), costs
    # Not lost: its SO and its receipt exist; not twice: no order_no or PO counted twice.
    assert len(harness.pos) == 1
    assert verdict.duplicate_sales_orders == {} and verdict.duplicate_receipts == {}, verdict
    assert verdict.lost == {} and verdict.received == 1, verdict
    assert verdict.invalid_histories == {}, verdict
    assert verdict.customers_created == 1 and verdict.products_created == 1, verdict


#: Kills around the make-to-order call (``katana.make_to_order = "auto"``, a PO of two
#: known SKUs and one without a recipe): the so_created transition is committed and no MO
#: made yet; the first MO made and nothing recorded; both made; the outcome written and not
#: applied (the import's outcome is the first).
AROUND_MAKE_TO_ORDER = ["transition_applied:1", "mo_made:1", "mo_made:2", "outcome_written:2"]


@pytest.mark.parametrize("point", AROUND_MAKE_TO_ORDER)
def test_a_crash_around_make_to_order_makes_exactly_one_mo_per_row(
    tmp_path: Path, point: str
) -> None:
    harness = CrashHarness(tmp_path, seed=1, make_to_order="auto")
    with harness.running():
        status = harness.aim(point, known=2)
        assert status == EXIT_CODE, f"crash point {point} was never reached (exit {status})"
        assert harness.finish(orders=1, seconds=20.0), harness.daemon_log_tail()
        verdict = harness.verdict()
        katana, _ = harness.counters()
        (number,) = harness.pos.values()
        history = anyio.run(_history, harness, number)
    # Two rows with a recipe: one MO each; the shelf's row (no recipe) none.
    assert sorted(katana["manufacturing_orders_per_row"].values()) == [1, 1], katana
    assert verdict.duplicate_mos == {} and verdict.rows_without_mo == [], verdict
    assert verdict.lost == {} and verdict.received == 1, verdict
    assert verdict.invalid_histories == {}, verdict
    assert verdict.ok, verdict
    assert ("discovered", "making_to_order", "so_created") in history, history


async def _history(harness: CrashHarness, po_number: str) -> list[tuple[str | None, str, str]]:
    store = await Store.open(harness.database, readonly=True)
    try:
        link = await store.link_by_po_number(po_number)
        assert link is not None
        return [(h.from_state, h.to_state, h.trigger) for h in await store.history(link.id)]
    finally:
        await store.close()


def test_the_daemon_killed_again_and_again_in_auto_mode_makes_each_mo_once(
    tmp_path: Path,
) -> None:
    harness = CrashHarness(tmp_path, seed=11, make_to_order="auto")
    with harness.running():
        report = harness.chaos(orders=6, kills=12, seconds=25.0)
        assert not report.unexpected_exits, (report, harness.daemon_log_tail())
        assert harness.finish(orders=6, seconds=30.0), (
            harness.states(),
            harness.daemon_log_tail(),
        )
        verdict = harness.verdict()
    assert verdict.duplicate_mos == {} and verdict.rows_without_mo == [], verdict
    assert verdict.ok, verdict


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.05)


def test_the_daemon_killed_right_after_acknowledging_a_webhook_processes_it_after_restart(
    tmp_path: Path,
) -> None:
    # Polls (once at start, then every 30 s) cannot be what processes the delivery before the
    # crash; after the restart either may find the PO, so the inbox row is what is checked.
    harness = CrashHarness(
        tmp_path, seed=1, webhooks=True, poll_interval=30.0, reconcile_interval=30.0
    )
    with harness.running():
        proc = harness.start_daemon("webhook_acknowledged:1")
        wait_until(
            lambda: harness.webhooks_registered() or proc.poll() is not None,
            20.0,
            "the daemon's webhooks registered",
        )
        assert proc.poll() is None, harness.daemon_log_tail()
        po_id, _ = harness.create_po()
        try:
            status = proc.wait(timeout=20)
        except Exception:
            status = harness.kill_daemon()
        assert status == EXIT_CODE, (status, harness.daemon_log_tail())
        assert "crash point webhook_acknowledged" in harness.daemon_log_tail()
        # TradeGecko had its 200: it will not send the delivery again.
        wait_until(
            lambda: harness.webhook_counters("tradegecko").get("delivered", 0) >= 1,
            5.0,
            "TradeGecko's sender counted the delivery",
        )
        sent = harness.webhook_counters("tradegecko")
        assert sent["delivered"] == 1 and sent.get("failed_attempts", 0) == 0, sent
        (row,) = harness.inbox("webhook_received")
        row_id, dedup_key, processed_at, _ = row
        assert dedup_key is not None and dedup_key.startswith("webhook:tradegecko:"), row
        assert processed_at is None, row

        assert harness.finish(orders=1, seconds=30.0), (
            harness.states(),
            harness.daemon_log_tail(),
        )
        rows = {r[0]: r for r in harness.inbox("webhook_received")}
        assert rows[row_id][2] is not None, rows[row_id]
        verdict = harness.verdict()
    assert list(harness.pos) == [po_id]
    assert verdict.duplicate_sales_orders == {} and verdict.duplicate_receipts == {}, verdict
    assert verdict.lost == {} and verdict.received == 1, verdict
    assert verdict.invalid_histories == {}, verdict
    assert verdict.ok, verdict


def test_crash_at_names_points_and_hits() -> None:
    from syncd.runtime.crashpoints import _armed

    assert _armed("") == {}
    assert _armed("so_created, price_updated:3") == {"so_created": 1, "price_updated": 3}
    with pytest.raises(ValueError, match="no crash point is called 'nowhere'"):
        _armed("nowhere")
