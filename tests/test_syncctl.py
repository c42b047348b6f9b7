"""syncctl's operator commands: they queue an event, and the dispatcher applies it.

With a running daemon the commands run as real processes beside it (two writers on one
SQLite file); without one the event waits in the inbox until a dispatcher drains it.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from click.testing import CliRunner

from conftest import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from syncd.cli.syncctl import main as syncctl
from syncd.cli.syncctl import parse_duration
from syncd.domain.orders import PurchaseOrderSnapshot
from syncd.domain.statechart import load_statechart
from syncd.runtime.dispatcher import Dispatcher
from syncd.runtime.effects import Effects
from syncd.store import Store
from test_flow import is_state, wait_for

SYNCCTL = str(Path(sys.executable).parent / "syncctl")


async def syncctl_process(*args: str) -> tuple[int, Any, str]:
    result = await anyio.run_process([SYNCCTL, *args], check=False)
    out = result.stdout.decode()
    try:
        data = json.loads(out)
    except ValueError:
        data = out
    return result.returncode, data, result.stderr.decode()


@pytest.mark.anyio
async def test_a_running_daemon_applies_retry_replay_and_cancel(sims: Sims, tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with sims.daemon(db) as daemon:
        po = await sims.create_po(
            [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "150.00"}]
        )
        number = po["order_number"]
        daemon.poll_now()
        await wait_for(daemon, [number], is_state("imported"))
        voided = await sims.control.patch(
            f"{sims.tradegecko_url}/_sim/purchase_orders/{po['id']}", json={"status": "void"}
        )
        assert voided.status_code == 200, voided.text
        daemon.poll_now()
        await wait_for(daemon, [number], is_state("needs_attention"))

        code, status, _ = await syncctl_process("--db", str(db), "status", "--json")
        assert code == 0 and status["needs_attention"] == 1
        code, old, _ = await syncctl_process(
            "--db", str(db), "inspect", "--older-than", "0s", "--json"
        )
        assert code == 0 and [row["po"] for row in old] == [number]
        code, old, _ = await syncctl_process(
            "--db", str(db), "inspect", "--older-than", "1h", "--json"
        )
        assert code == 0 and old == []

        code, queued, err = await syncctl_process(
            "--db", str(db), "retry", number, "--reason", "PO restored", "--json"
        )
        assert code == 0, err
        assert queued["to"] == "imported" and queued["event_id"] > 0
        daemon.dispatcher.wake()
        (link,) = await wait_for(daemon, [number], is_state("imported"))
        last = (await daemon.store.history(link.id))[-1]
        assert last.trigger == "retry" and "PO restored" in last.cause
        assert last.cause.startswith("operator ")

        # The PO is still void in TradeGecko: re-processing its stored events says so again.
        code, plan, err = await syncctl_process("--db", str(db), "replay", number, "--dry-run")
        assert code == 0, err
        assert "imported → needs_attention [po_withdrawn]" in plan
        assert (await daemon.store.inbox_backlog())[0] == 0  # a dry run writes nothing
        code, _, err = await syncctl_process("--db", str(db), "replay", number)
        assert code == 0, err
        daemon.dispatcher.wake()
        await wait_for(daemon, [number], is_state("needs_attention"))

        code, queued, err = await syncctl_process(
            "--db", str(db), "cancel", number, "--reason", "customer withdrew", "--json"
        )
        assert code == 0, err
        daemon.dispatcher.wake()
        (link,) = await wait_for(daemon, [number], is_state("cancelled"))
        last = (await daemon.store.history(link.id))[-1]
        assert last.trigger == "cancel" and "customer withdrew" in last.cause

        code, _, err = await syncctl_process("--db", str(db), "retry", number)
        assert code == 6 and "cancelled" in err
        code, _, err = await syncctl_process("--db", str(db), "cancel", "PO9999", "--reason", "x")
        assert code == 5 and "PO9999" in err


async def _order_needing_attention(db: Path) -> str:
    """A store with one order that was imported, then its PO was withdrawn."""
    chart = load_statechart()
    store = await Store.open(db)
    try:
        snapshot = PurchaseOrderSnapshot(
            po_id=7,
            po_number="PO0007",
            status="active",
            company_id=1,
            currency_id=1,
            created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
            lines=(),
        )
        link = await store.create_link(
            snapshot, state=chart.initial, trigger="po_discovered", cause="test", event_id=None
        )
        assert link is not None
        for trigger in ("so_created", "po_withdrawn"):
            decision = chart.decide(link.state, trigger, resume_state=link.resume_state)
            assert decision is not None
            link = await store.apply(link, decision, cause=f"test: {trigger}")
        assert link.state == "needs_attention" and link.resume_state == "imported"
    finally:
        await store.close()
    return "PO0007"


async def _drain(db: Path) -> str:
    """What a daemon does at its next start: drain the inbox."""
    store = await Store.open(db)
    try:
        # Moving to ``imported`` runs no effect, so the dispatcher needs none here.
        dispatcher = Dispatcher(store, load_statechart(), cast(Effects, None))
        await dispatcher.drain()
        link = await store.link_by_po_number("PO0007")
        assert link is not None
        return link.state
    finally:
        await store.close()


def test_without_a_daemon_the_command_waits_in_the_inbox(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    number = anyio.run(_order_needing_attention, db)
    runner = CliRunner()

    result = runner.invoke(syncctl, ["--db", str(db), "retry", number])
    assert result.exit_code == 0, result.output
    assert "queued retry of PO0007 (needs_attention → imported)" in result.output

    status = json.loads(runner.invoke(syncctl, ["--db", str(db), "status", "--json"]).output)
    assert status["inbox_backlog"] == 1
    assert status["states"] == {
        "needs_attention": {
            "orders": 1,
            "oldest_po": "PO0007",
            "oldest_since": status["states"]["needs_attention"]["oldest_since"],
        }
    }
    assert anyio.run(_drain, db) == "imported"
    status = json.loads(runner.invoke(syncctl, ["--db", str(db), "status", "--json"]).output)
    assert status["inbox_backlog"] == 0 and status["needs_attention"] == 0


def test_usage_and_store_errors_have_their_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "nowhere.db"
    result = runner.invoke(syncctl, ["--db", str(missing), "retry", "PO1"])
    assert result.exit_code == 3 and "database not found" in result.output
    assert not missing.exists()  # syncctl never creates a database
    result = runner.invoke(syncctl, ["--db", str(missing), "cancel", "PO1"])
    assert result.exit_code == 2 and "--reason" in result.output
    result = runner.invoke(syncctl, ["--db", str(missing), "inspect", "--older-than", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output


def test_syncctl_never_prints_the_tokens(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    anyio.run(_order_needing_attention, db)
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{db}"\n'
        f'[tradegecko]\ntoken = "{TRADEGECKO_TOKEN}"\n[katana]\ntoken = "{KATANA_TOKEN}"\n'
    )
    runner = CliRunner()
    output = ""
    for args in (
        ["status"],
        ["status", "--json"],
        ["inspect"],
        ["inspect", "PO0007", "--json"],
        ["history"],
        ["replay", "PO0007", "--dry-run"],
        ["retry", "PO0007", "--json"],
    ):
        result = runner.invoke(syncctl, ["--config", str(config), *args])
        assert result.exit_code == 0, (args, result.output)
        output += result.output
    assert "PO0007" in output
    assert TRADEGECKO_TOKEN not in output and KATANA_TOKEN not in output


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d12h", 129600), ("1w", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "h", "-5m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
