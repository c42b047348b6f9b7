"""syncctl's operator commands: they queue an event, and the dispatcher applies it.

With a running daemon the commands run as real processes beside it (two writers on one
SQLite file); without one the event waits in the inbox until a dispatcher drains it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from conftest import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from pg_server import (  # noqa: F401 - fixtures, for pytest to find
    PASSWORD,
    PostgresServer,
    database_fixture,
    pg_server_fixture,
)
from syncd import __version__
from syncd.cli.syncctl import main as syncctl
from syncd.cli.syncctl import parse_duration
from syncd.domain.orders import LineLink, LinkedOrder, PurchaseOrderSnapshot
from syncd.domain.statechart import load_statechart
from syncd.runtime.dispatcher import Dispatcher
from syncd.runtime.effects import Outcome
from syncd.store import Store
from syncd.store._postgres import PostgresBackend
from syncd.store._sqlite import SQLiteBackend
from test_flow import is_state, wait_for

SYNCCTL = str(Path(sys.executable).parent / "syncctl")


async def syncctl_process(*args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    result = await anyio.run_process([SYNCCTL, *args], check=False, env=env)
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
        assert code == 0 and [row["po_number"] for row in old] == [number]
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


async def _order_needing_attention(db: Path | str) -> str:
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


class NoEffects:
    """The effects of a dispatcher that must run none."""

    async def run(self, effect: str, link: LinkedOrder) -> Outcome:
        raise AssertionError(f"no effect runs here, yet {effect} ran for {link.po_number}")


async def _drain(db: Path | str) -> str:
    """What a daemon does at its next start: drain the inbox."""
    store = await Store.open(db)
    try:
        # Moving to ``imported`` runs no effect, so the dispatcher needs none here.
        dispatcher = Dispatcher(store, load_statechart(), NoEffects())
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
            "oldest_po_number": "PO0007",
            "oldest_since": status["states"]["needs_attention"]["oldest_since"],
        }
    }
    assert anyio.run(_drain, db) == "imported"
    status = json.loads(runner.invoke(syncctl, ["--db", str(db), "status", "--json"]).output)
    assert status["inbox_backlog"] == 0 and status["needs_attention"] == 0


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def test_syncctl_reads_and_writes_a_postgres_database(pg_database: str) -> None:
    runner = CliRunner()
    # No schema yet: refused, not created (syncctl writes only what the daemon reads).
    result = runner.invoke(syncctl, ["--db", pg_database, "status"])
    assert result.exit_code == 3, result.output
    assert "has no syncd schema: run syncd on it once" in result.output
    assert PASSWORD not in result.output

    number = anyio.run(_order_needing_attention, pg_database)
    status = json.loads(runner.invoke(syncctl, ["--db", pg_database, "status", "--json"]).output)
    assert status["needs_attention"] == 1 and status["inbox_backlog"] == 0
    result = runner.invoke(syncctl, ["--db", pg_database, "inspect", number])
    assert result.exit_code == 0 and "needs_attention" in result.output, result.output
    # --write opens it for writing (not "database not found", as for a missing file).
    result = runner.invoke(syncctl, ["--db", pg_database, "retry", number])
    assert result.exit_code == 0, result.output
    assert "queued retry of PO0007 (needs_attention → imported)" in result.output
    status = json.loads(runner.invoke(syncctl, ["--db", pg_database, "status", "--json"]).output)
    assert status["inbox_backlog"] == 1
    assert anyio.run(_drain, pg_database) == "imported"


def test_syncctl_on_a_postgres_url_it_cannot_use_says_why_without_the_password(
    pg_server: PostgresServer,
) -> None:
    runner = CliRunner()
    for url, why in (
        (pg_server.url(password="not-the-password"), "password authentication failed"),
        (pg_server.url("nowhere"), 'database "nowhere" does not exist'),
    ):
        for args in (["status"], ["retry", "PO1"]):
            result = runner.invoke(syncctl, ["--db", url, *args])
            assert result.exit_code == 3, result.output
            assert why in result.output and "not-the-password" not in result.output
            assert "Traceback" not in result.output


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


# -- output shapes, options, exit codes ----------------------------------------------------

DEFAULT_CONFIG_EXISTS = Path("/etc/syncd/syncd.toml").exists()
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
CHAIR = {"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "150.00"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
    return {**env, **extra}


def _scalars(data: Any, key: str = "") -> list[tuple[str, Any]]:
    """Every (key, leaf value) of a JSON document."""
    if isinstance(data, dict):
        return [pair for k, v in data.items() for pair in _scalars(v, k)]
    if isinstance(data, list):
        return [pair for v in data for pair in _scalars(v, key)]
    return [(key, data)]


def _assert_clean_json(data: Any) -> None:
    for key, leaf in _scalars(data):
        assert leaf != "-", key  # null for nothing
        if key in ("at", "since", "oldest_since", "created_at", "updated_at", "decided_at"):
            assert leaf is None or ISO_UTC.fullmatch(leaf), (key, leaf)


async def _order_with_an_unpriced_line(db: Path) -> None:
    await _order_needing_attention(db)
    store = await Store.open(db)
    try:
        line = LineLink(
            line_id=70, sku="CHAIR-OAK", katana_variant_id=9, quantity=Decimal("1"), price=None
        )
        await store.note(1, lines=(line,), notes=["a note"])
    finally:
        await store.close()


@pytest.mark.anyio
async def test_one_json_shape_per_order_iso_times_and_no_none_in_text(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    await _order_with_an_unpriced_line(db)

    code, rows, err = await syncctl_process("inspect", "--db", str(db), "--json")
    assert code == 0, err
    code, one, err = await syncctl_process("inspect", "PO0007", "--json", "--db", str(db))
    assert code == 0, err
    (row,) = rows
    # The list's order is the single order's, which only adds its details.
    assert {k: one[k] for k in row} == row
    assert set(one) - set(row) == {"paused", "lines", "notes", "history"}
    assert row["po_number"] == "PO0007" and row["so_number"] is None
    assert ISO_UTC.fullmatch(row["since"])
    assert one["lines"] == [
        {
            "line_id": 70,
            "sku": "CHAIR-OAK",
            "quantity": "1",
            "katana_variant_id": 9,
            "created_variant": False,
            "price": None,
            "cost_before": None,
            "cost_after": None,
        }
    ]
    code, history, _ = await syncctl_process("--db", str(db), "history", "--json")
    assert code == 0 and {h["po_number"] for h in history} == {"PO0007"}
    code, status, _ = await syncctl_process("--db", str(db), "status", "--json")
    assert status["states"]["needs_attention"]["oldest_po_number"] == "PO0007"
    assert status["paused"] == [] and status["inbox_oldest_since"] is None
    code, queued, _ = await syncctl_process(
        "--db", str(db), "replay", "PO0007", "--dry-run", "--json"
    )
    assert code == 0 and queued["order"] == row and queued["event_id"] is None
    for data in (rows, one, history, status, queued):
        _assert_clean_json(data)

    texts = {}
    for args in (["inspect"], ["inspect", "PO0007"], ["history"], ["status"]):
        code, text, err = await syncctl_process("--db", str(db), *args)
        assert code == 0, err
        assert "None" not in text, (args, text)
        texts[args[-1]] = text
    assert "line 70: CHAIR-OAK x 1 → katana_variant_id 9\n" in texts["PO0007"]
    assert "price" not in texts["PO0007"]
    assert texts["inspect"].splitlines()[0].split() == [
        "id",
        "po_number",
        "so_number",
        "state",
        "since",
        "reason",
    ]
    assert texts["inspect"].splitlines()[-1] == "1 order"
    assert "needs_attention: 1 order\n" in texts["status"]
    assert "inbox_backlog: 0 events\n" in texts["status"]
    assert ISO_UTC.search(texts["history"])


@pytest.mark.anyio
async def test_an_unknown_state_is_a_usage_error_and_an_empty_list_says_so(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    await _order_needing_attention(db)
    code, out, err = await syncctl_process("--db", str(db), "inspect", "--state", "bogus")
    assert code == 2 and out == ""
    assert "unknown state 'bogus'" in err and "needs_attention" in err
    assert "Traceback" not in err
    code, out, err = await syncctl_process("--db", str(db), "inspect", "--state", "received")
    assert code == 0 and out == "no linked orders in received\n"
    code, out, _ = await syncctl_process(
        "--db", str(db), "inspect", "--state", "received", "--json"
    )
    assert code == 0 and out == []


@pytest.mark.anyio
async def test_statechart_as_json() -> None:
    code, chart, err = await syncctl_process("statechart", "--json")
    assert code == 0, err
    assert chart["initial"] == "discovered"
    assert [s["name"] for s in chart["states"]] == [
        "discovered",
        "making_to_order",
        "imported",
        "in_production",
        "delivered",
        "received",
        "needs_attention",
        "cancelled",
    ]
    assert set(chart["conditions"]) == {"make_to_order_auto"}
    created = {
        t["dest"]: (t["conditions"], t["unless"])
        for t in chart["transitions"]
        if (t["trigger"], t["source"]) == ("so_created", "discovered")
    }
    assert created == {
        "imported": ([], ["make_to_order_auto"]),
        "making_to_order": (["make_to_order_auto"], []),
    }
    backs = {t["dest"] for t in chart["transitions"] if t["back"]}
    assert backs == {"discovered", "making_to_order", "imported", "in_production", "delivered"}
    # The same edges as the mermaid drawing.
    code, mermaid, _ = await syncctl_process("statechart")
    drawn = set()
    for line in mermaid.splitlines():
        edge = re.fullmatch(r"\s*(\w+) --> (\w+): (.+)", line)
        if edge:
            source, dest, labels = edge.groups()
            for label in labels.split(" | "):
                trigger, _, back = label.partition(" ")
                drawn.add((source, dest, trigger, back == "(back)"))
    listed = {(t["source"], t["dest"], t["trigger"], t["back"]) for t in chart["transitions"]}
    assert listed == drawn and len(listed) == len(chart["transitions"])


@pytest.mark.anyio
async def test_default_config_options_after_the_command_and_version(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    await _order_needing_attention(db)
    config = tmp_path / "syncd.toml"
    config.write_text(f'[daemon]\ndatabase = "{db}"\n')

    code, status, err = await syncctl_process(
        "status", "--json", env=_env(SYNCD_CONFIG=str(config))
    )
    assert code == 0, err
    assert status["needs_attention"] == 1
    code, status, err = await syncctl_process(
        "status", "--config", str(config), "--json", env=_env()
    )
    assert code == 0 and status["total"] == 1, err
    code, _, err = await syncctl_process("status", env=_env(SYNCD_CONFIG=str(tmp_path / "no.toml")))
    assert code == 2 and "no.toml" in err
    if not DEFAULT_CONFIG_EXISTS:
        code, _, err = await syncctl_process("status", env=_env())
        assert code == 2 and "--db PATH" in err and "/etc/syncd/syncd.toml" in err
    # --db after the command wins over one before it.
    code, _, err = await syncctl_process(
        "--db", str(tmp_path / "other.db"), "status", "--db", str(db), env=_env()
    )
    assert code == 0, err
    code, out, _ = await syncctl_process("--version")
    assert code == 0 and __version__ in out and "syncctl" in out


@pytest.mark.anyio
async def test_import_without_a_daemon_says_how_to_see_the_outcome(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    await _order_needing_attention(db)
    code, out, err = await syncctl_process("--db", str(db), "import", "PO0100")
    assert code == 0, err
    assert "queued import of PO0100" in out and "syncctl explain PO0100" in out
    code, why, _ = await syncctl_process("--db", str(db), "explain", "PO0100", "--json")
    assert code == 0 and why["status"] == "import_queued"
    code, out, err = await syncctl_process("--db", str(db), "import", "PO0101", "--wait", "0.3")
    assert code == 8 and "is the daemon running?" in err
    code, _, err = await syncctl_process("--db", str(db), "import", "PO0007")
    assert code == 6 and "already linked" in err


@pytest.mark.anyio
async def test_import_reports_the_daemons_outcome_and_explain_says_why(
    sims: Sims, tmp_path: Path
) -> None:
    db = tmp_path / "syncd.db"
    config = tmp_path / "syncd.toml"
    config.write_text(f'[daemon]\ndatabase = "{db}"\n[tradegecko]\nsupplier_name = "Katana"\n')
    env = _env(SYNCD_CONFIG=str(config))  # every command below runs without flags

    async def ctl(*args: str) -> tuple[int, Any, str]:
        return await syncctl_process(*args, env=env)

    old = (await sims.create_po([CHAIR]))["order_number"]
    made = await sims.control.post(f"{sims.tradegecko_url}/_sim/companies", json={"name": "Acme"})
    assert made.status_code < 300, made.text
    acme = made.json()["company"]["id"]
    await anyio.sleep(0.05)
    async with sims.daemon(db) as daemon:
        other = (await sims.create_po([CHAIR], supplier_id=acme))["order_number"]
        draft = (await sims.create_po([CHAIR], status="draft"))["order_number"]
        for _ in range(3):
            daemon.poll_now()
            await anyio.sleep(0.15)

        code, why, err = await ctl("explain", old, "--json")
        assert code == 0, err
        assert why["status"] == "not_seen" and ISO_UTC.fullmatch(why["activated_at"])
        code, text, _ = await ctl("explain", old)
        assert f"syncctl import {old}" in text and "'Katana'" in text
        code, why, _ = await ctl("explain", draft, "--json")
        assert why["status"] == "not_linked" and why["observation"]["status"] == "draft"
        code, text, _ = await ctl("explain", draft)
        assert "a draft: it is imported once it is issued" in text

        # Another supplier's PO: refused by the daemon, then by syncctl itself.
        code, _, err = await ctl("import", other, "--wait", "20")
        assert code == 7 and "Acme" in err and "--force" in err
        code, why, _ = await ctl("explain", other, "--json")
        assert why["status"] == "not_linked" and why["import"]["result"] == "other_supplier"
        assert why["observation"]["supplier"] == "Acme"
        backlog = (await daemon.store.inbox_backlog())[0]
        code, _, err = await ctl("import", other)
        assert code == 7 and "--force" in err
        assert (await daemon.store.inbox_backlog())[0] == backlog  # nothing queued
        code, done, err = await ctl("import", other, "--force", "--wait", "20", "--json")
        assert code == 0, err
        assert done["outcome"]["result"] == "discovered"
        assert done["order"]["po_number"] == other

        code, out, err = await ctl("import", old, "--wait", "20", "--reason", "missed")
        assert code == 0, err
        assert out.startswith(f"imported: PO {old} (id ") and "; order " in out
        code, why, _ = await ctl("explain", old, "--json")
        assert why["status"] == "linked" and why["order"]["po_number"] == old

        code, missing, err = await ctl("import", "PO-NOPE", "--wait", "20", "--json")
        assert code == 5 and "no PO PO-NOPE in TradeGecko" in err
        assert missing["outcome"]["result"] == "not_found"
        code, why, _ = await ctl("explain", "PO-NOPE", "--json")
        assert why["status"] == "not_found" and why["explanation"]
        for data in (done, why, missing):
            _assert_clean_json(data)


async def _until_paused(store: Store, paused: bool, service: str = "tradegecko") -> None:
    with anyio.fail_after(10):
        # The poller writes the pause from the daemon's task; polling is all a test can do.
        while True:
            if (await store.get_meta(f"paused.{service}") is not None) == paused:
                return
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_katana_token_revoked_while_nothing_is_followed_pauses_and_resumes(
    sims: Sims, tmp_path: Path
) -> None:
    """No order is in production, so no poll calls Katana: the import's 401 pauses it, and
    the poller asks Katana while paused, so the pause ends when the token works again."""
    db = tmp_path / "syncd.db"
    token = f"{sims.katana_url}/_sim/token"
    async with sims.daemon(db) as daemon:
        assert (await sims.control.post(token, json={"revoked": True})).status_code < 300
        number = (await sims.create_po([CHAIR]))["order_number"]
        daemon.poll_now()
        await _until_paused(daemon.store, True, "katana")
        code, status, err = await syncctl_process("status", "--db", str(db), "--json")
        assert code == 0, err
        assert [pause["service"] for pause in status["paused"]] == ["katana"]
        assert (await sims.control.post(token, json={"revoked": False})).status_code < 300
        await _until_paused(daemon.store, False, "katana")
        await wait_for(daemon, [number], is_state("imported", "in_production"), seconds=20)


@pytest.mark.anyio
async def test_status_and_explain_show_a_paused_service(sims: Sims, tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    token = f"{sims.tradegecko_url}/_sim/token"
    async with sims.daemon(db) as daemon:
        assert (await sims.control.post(token, json={"revoked": True})).status_code < 300
        daemon.poll_now()
        await _until_paused(daemon.store, True)
        code, status, err = await syncctl_process("status", "--db", str(db), "--json")
        assert code == 0, err
        (pause,) = status["paused"]
        assert pause["service"] == "tradegecko" and ISO_UTC.fullmatch(pause["since"])
        # The moment of the pause, to the second (a regex once cut it at the hour's colon).
        stored = await daemon.store.get_meta("paused.tradegecko")
        assert stored is not None and pause["since"][:19] in stored
        code, text, _ = await syncctl_process("status", "--db", str(db))
        assert "paused: tradegecko since " in text and "(401)" in text
        code, text, _ = await syncctl_process("explain", "PO0001", "--db", str(db))
        assert "paused: tradegecko rejected the token (401)" in text
        assert (await sims.control.post(token, json={"revoked": False})).status_code < 300
        daemon.poll_now()
        await _until_paused(daemon.store, False)
        code, status, _ = await syncctl_process("status", "--db", str(db), "--json")
        assert status["paused"] == []


async def _factories_db(db: Path) -> None:
    """Three factories' orders in one database: north and south both have a PO 1001 (two
    accounts number their POs alike), east has 1002 only, the default factory none."""
    chart = load_statechart()
    store = await Store.open(db)
    try:
        for factory, po_id, number in (
            ("north", 11, "1001"),
            ("south", 11, "1001"),
            ("south", 12, "1003"),
            ("east", 13, "1002"),
        ):
            view = store.for_factory(factory)
            snapshot = PurchaseOrderSnapshot(
                po_id=po_id,
                po_number=number,
                status="active",
                company_id=1,
                currency_id=1,
                created_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
                lines=(),
            )
            link = await view.create_link(
                snapshot, state=chart.initial, trigger="po_discovered", cause="test", event_id=None
            )
            assert link is not None
        await store.for_factory("south").set_meta(
            "paused.katana", "katana rejected the token (401) since 2026-12-01T20:00:00Z: ..."
        )
    finally:
        await store.close()


@pytest.mark.anyio
async def test_factory_option_on_status_inspect_history_and_the_order_commands(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "syncd.db")
    await _factories_db(Path(db))

    # status: a line per factory by default.
    code, text, err = await syncctl_process("--db", db, "status")
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].split() == ["factory", "orders", "attention", "inbox", "paused", "states"]
    assert [line.split()[:5] for line in lines[1:4]] == [
        ["east", "1", "0", "0", "none"],
        ["north", "1", "0", "0", "none"],
        ["south", "2", "0", "0", "katana"],
    ]
    assert lines[4].split() == ["total", "4"]
    code, status, err = await syncctl_process("--db", db, "status", "--json")
    assert code == 0, err
    assert set(status["factories"]) == {"east", "north", "south"} and status["total"] == 4
    assert status["factories"]["south"]["paused"][0]["service"] == "katana"
    # One factory: today's whole status, naming it.
    code, south, err = await syncctl_process("--factory", "south", "--db", db, "status", "--json")
    assert code == 0, err
    assert south["factory"] == "south" and south["total"] == 2
    assert south == {"factory": "south", **status["factories"]["south"]}

    # inspect lists every factory's orders, each naming its own.
    code, rows, err = await syncctl_process("--db", db, "inspect", "--json")
    assert code == 0, err
    assert sorted((r["factory"], r["po_number"]) for r in rows) == [
        ("east", "1002"),
        ("north", "1001"),
        ("south", "1001"),
        ("south", "1003"),
    ]
    code, text, err = await syncctl_process("--db", db, "inspect")
    assert code == 0 and text.splitlines()[0].split()[0] == "factory"
    code, history, err = await syncctl_process("--db", db, "history", "--json", "--factory", "east")
    assert code == 0, err
    assert [(h["factory"], h["po_number"]) for h in history] == [("east", "1002")]

    # An order found in one factory is that one's; in two, --factory must choose.
    code, one, err = await syncctl_process("--db", db, "inspect", "1003", "--json")
    assert code == 0 and one["factory"] == "south", err
    code, _, err = await syncctl_process("--db", db, "inspect", "1001")
    assert code == 2
    assert "it is in several factories (north, south): name one with --factory" in err
    code, one, err = await syncctl_process("--db", db, "--factory", "north", "inspect", "1001")
    assert code == 0 and "po_number 1001 (po_id 11" in one, err
    code, _, err = await syncctl_process("--db", db, "--factory", "east", "inspect", "1001")
    assert code == 5 and "no linked order '1001'" in err
    code, queued, err = await syncctl_process(
        "--db", db, "cancel", "1002", "--reason", "test", "--json"
    )
    assert code == 0 and queued["order"]["factory"] == "east", err

    # A factory that is neither configured nor in the database, or not a name at all.
    code, _, err = await syncctl_process("--db", db, "--factory", "west", "status")
    assert code == 2 and "--factory: no factory 'west' (there are: east, north, south)" in err
    code, _, err = await syncctl_process("--db", db, "--factory", "West!", "status")
    assert code == 2 and "is not a factory name" in err


@pytest.mark.anyio
async def test_status_names_the_daemon_holding_each_factorys_lease(tmp_path: Path) -> None:
    db = str(tmp_path / "syncd.db")
    await _factories_db(Path(db))
    store = await Store.open(db)
    try:
        assert await store.acquire_lease("east", "host-a:101:aa", 60.0) is not None
        assert await store.acquire_lease("south", "host-b:202:bb", 0.05) is not None
        await anyio.sleep(0.2)  # south's lease expires; north never had one
    finally:
        await store.close()

    code, status, err = await syncctl_process("--db", db, "status", "--json")
    assert code == 0, err
    owners = {name: data["owner"] for name, data in status["factories"].items()}
    assert owners["north"] is None
    east = owners["east"]
    assert east["daemon"] == "host-a:101:aa" and east["fence"] == 1 and east["held"] is True
    assert 50 < east["expires_in_s"] <= 60
    assert owners["south"]["daemon"] == "host-b:202:bb" and owners["south"]["held"] is False

    code, text, err = await syncctl_process("--db", db, "status")
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].split() == [
        "factory",
        "orders",
        "attention",
        "inbox",
        "paused",
        "owner",
        "states",
    ]
    assert "host-a:101:aa (fence 1, expires in" in lines[1] and lines[1].startswith("east")
    assert lines[2].startswith("north") and "  none  " in lines[2]
    assert "none (lease of host-b:202:bb expired" in lines[3]
    code, text, err = await syncctl_process("--factory", "east", "--db", db, "status")
    assert code == 0, err
    assert "owner: host-a:101:aa (fence 1, expires in" in text


async def _busy_factories(db: str, first: int, count: int) -> list[str]:
    """``count`` factories from ``f{first}`` on, with orders in several states, cursors,
    last polls, and in some an inbox backlog, a pause or a lease."""
    chart = load_statechart()
    store = await Store.open(db)
    names = [f"f{i:02d}" for i in range(first, first + count)]
    try:
        for i, name in zip(range(first, first + count), names, strict=True):
            view = store.for_factory(name)
            for n in range(3):
                snapshot = PurchaseOrderSnapshot(
                    po_id=n + 1,
                    po_number=f"{name}-{n}",
                    status="active",
                    company_id=1,
                    currency_id=1,
                    created_at=datetime.now(UTC),
                    updated_at=datetime.now(UTC),
                    lines=(),
                )
                link = await view.create_link(
                    snapshot,
                    state=chart.initial,
                    trigger="po_discovered",
                    cause="test",
                    event_id=None,
                )
                assert link is not None
                for trigger in ("so_created", "po_withdrawn")[: (n + i) % 3]:
                    decision = chart.decide(link.state, trigger, resume_state=link.resume_state)
                    assert decision is not None
                    link = await view.apply(link, decision, cause=f"test: {trigger}")
            await view.set_cursor("tradegecko.po", f"{name}-cursor")
            await view.set_meta("last_poll.tradegecko", str(1764600000 + i))
            if i % 2:
                await view.add_event("tradegecko", "webhook", b"{}")
            if i % 3 == 0:
                await view.set_meta("paused.katana", f"katana rejected the token (401) since {i}")
        assert await store.acquire_lease(names[-1], "host-a:101:aa", 600.0) is not None
    finally:
        await store.close()
    return names


async def _status_read_factory_by_factory(db: str, names: list[str]) -> dict[str, Any]:
    """What ``status --json`` said of each factory when it read them one by one (the
    reads and shapes of syncctl before the grouped reads)."""

    def when(epoch: float | None) -> str | None:
        return None if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime(ISO)

    chart = load_statechart()
    store = await Store.open(db, readonly=True)
    found: dict[str, Any] = {}
    try:
        leases = {r.factory: r for r in await store.leases()}
        for name in names:
            view = store.for_factory(name)
            counts = await view.counts_by_state()
            oldest = await view.oldest_by_state()
            backlog, oldest_event = await view.inbox_backlog()
            lease = leases.get(name)
            found[name] = {
                "states": {
                    state: {
                        "orders": count,
                        "oldest_po_number": oldest[state][0],
                        "oldest_since": when(oldest[state][1]),
                    }
                    for state, count in sorted(counts.items())
                },
                "total": sum(counts.values()),
                "needs_attention": sum(counts.get(s, 0) for s in chart.attention_states()),
                "paused": [
                    {"service": service, "since": None, "message": message}
                    for service, message in sorted((await view.meta_with_prefix("paused.")).items())
                ],
                "inbox_backlog": backlog,
                "inbox_oldest_since": when(oldest_event),
                "last_successful_poll": {
                    source: when(float(value))
                    for source, value in sorted((await view.meta_with_prefix("last_poll.")).items())
                },
                "cursors": {
                    cursor: {"value": value, "updated_at": when(at)}
                    for cursor, (value, at) in sorted((await view.cursors()).items())
                },
                "owner": None
                if lease is None
                else {"daemon": lease.owner, "fence": lease.fence, "held": lease.held},
            }
    finally:
        await store.close()
    return found


ISO = "%Y-%m-%dT%H:%M:%SZ"


def test_status_of_many_factories_is_a_fixed_number_of_queries(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    backend: Any = SQLiteBackend if not database.startswith("postgresql") else PostgresBackend
    for method in ("fetchone", "fetchall", "execute"):
        real = getattr(backend, method)

        def counted(self: Any, sql: str, *args: Any, _real: Any = real) -> Any:
            statements.append(sql)
            return _real(self, sql, *args)

        monkeypatch.setattr(backend, method, counted)

    def status(*args: str) -> tuple[Any, int]:
        statements.clear()
        result = CliRunner().invoke(syncctl, ["--db", database, *args, "status", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output), len(statements)

    names = anyio.run(_busy_factories, database, 0, 2)
    _, two = status()
    names += anyio.run(_busy_factories, database, 2, 7)
    data, nine = status()
    assert two == nine <= 10, "statements for 2 factories, for 9"
    _, one = status("--factory", "f04")
    assert one == nine

    # The grouped reads say what reading each factory by itself said.
    assert list(data["factories"]) == names and data["total"] == 27
    for each in data["factories"].values():
        if each["owner"] is not None:
            assert 590 < each["owner"].pop("expires_in_s") <= 600
    assert data["factories"] == anyio.run(_status_read_factory_by_factory, database, names)
    assert {len(each["states"]) for each in data["factories"].values()} == {3}
    assert data["needs_attention"] == 9
    assert sum(each["inbox_backlog"] for each in data["factories"].values()) == 4
    assert [n for n, each in data["factories"].items() if each["paused"]] == ["f00", "f03", "f06"]
    f04, _ = status("--factory", "f04")
    assert f04 == {"factory": "f04", **data["factories"]["f04"]}
