"""The command-line tools as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.domain.statechart import load_statechart

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    result = run("syncd", "demo", "--orders", "3", "--json", "--db", str(db))
    assert result.returncode == 0, result.stderr
    return db, json.loads(result.stdout)


def test_demo_receives_every_order_and_reports_json(
    demo_db: tuple[Path, dict[str, object]],
) -> None:
    _, summary = demo_db
    assert summary["orders"] == 3
    assert summary["received"] == 3
    assert summary["sales_orders_created"] == 3
    assert summary["receipts"] == 3
    assert isinstance(summary["elapsed_s"], float) and summary["elapsed_s"] < 30


def test_syncctl_status_and_inspect(demo_db: tuple[Path, dict[str, object]]) -> None:
    db, _ = demo_db
    status = run("syncctl", "--db", str(db), "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["states"]["received"]["orders"] == 3
    assert data["inbox_backlog"] == 0
    assert set(data["last_successful_poll"]) == {"katana", "tradegecko"}

    inspect = run("syncctl", "--db", str(db), "inspect", "PO0002", "--json")
    assert inspect.returncode == 0, inspect.stderr
    order = json.loads(inspect.stdout)
    assert order["po_number"] == "PO0002"
    assert order["so_number"] == "TG-PO0002"
    assert [step["to"] for step in order["history"]] == [
        "discovered",
        "imported",
        "in_production",
        "delivered",
        "received",
    ]
    human = run("syncctl", "--db", str(db), "inspect", "PO0002")
    assert "TG-PO0002" in human.stdout and "history:" in human.stdout

    listing = json.loads(run("syncctl", "--db", str(db), "inspect", "--json").stdout)
    assert sorted(row["po_number"] for row in listing) == ["PO0001", "PO0002", "PO0003"]
    history = json.loads(run("syncctl", "--db", str(db), "history", "--json").stdout)
    assert len(history) == 15

    missing = run("syncctl", "--db", str(db), "inspect", "PO9999")
    assert missing.returncode == 5
    assert "PO9999" in missing.stderr


def test_syncctl_on_a_missing_database_says_so(tmp_path: Path) -> None:
    result = run("syncctl", "--db", str(tmp_path / "nope.db"), "status")
    assert result.returncode == 3
    assert "nope.db" in result.stderr
    assert "Traceback" not in result.stderr


def test_committed_diagrams_are_current() -> None:
    drawn = load_statechart().mermaid()
    printed = run("syncctl", "statechart")
    assert printed.returncode == 0
    assert printed.stdout == drawn
    committed = (ROOT / "statecharts" / "linked_order.mmd").read_text()
    assert committed == drawn, "statecharts/linked_order.mmd is stale: run `syncctl statechart`"
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- statechart:begin -->\n```mermaid\n")[1].split("```\n<!--")[0]
    assert block == drawn, "the README's statechart is stale"


def test_check_accepts_a_good_config_and_names_the_wrong_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "x.db"}"\n'
        '[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
    )
    result = run("syncd", "check", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\npoll_interval = "often"\n')
    result = run("syncd", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "katana.poll_interval" in result.stderr
    assert "Traceback" not in result.stderr

    no_token = tmp_path / "no_token.toml"
    no_token.write_text('[katana]\ntoken = "k"\n')
    result = run("syncd", "check", "--config", str(no_token), env={"SYNCD_TRADEGECKO_TOKEN": ""})
    assert result.returncode == 2
    assert "tradegecko.token" in result.stderr

    result = run("syncd", "check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml" in result.stderr


def test_run_with_a_broken_config_exits_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    result = run("syncd", "run", "--config", str(bad))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_says_which_service_cannot_be_reached(tmp_path: Path) -> None:
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "x.db"}"\n[metrics]\nenabled = false\n'
        f'[tradegecko]\ntoken = "t"\nbase_url = "http://127.0.0.1:{port}"\n'
        f'[katana]\ntoken = "k"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
    )
    result = run("syncd", "run", "--config", str(config))
    assert result.returncode == 5, result.stderr
    assert "katana GET /factory" in result.stderr
    assert "Traceback" not in result.stderr


def test_statechart_as_svg() -> None:
    result = run("syncctl", "statechart", "--format", "svg")
    if result.returncode == 2 and "Graphviz" in result.stderr:
        pytest.skip("Graphviz's dot is not installed (CI installs it)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("<?xml") and "<svg" in result.stdout
    for state in load_statechart().states:
        assert state in result.stdout


def test_a_read_only_database_is_a_clear_exit_3(tmp_path: Path) -> None:
    mountpoint = tmp_path / "ro"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a file system here: {mounted.stderr.decode().strip()}")
    try:
        database = mountpoint / "syncd.db"
        sqlite3.connect(database).close()
        subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
        result = run("syncd", "run", "--config", str(_config(tmp_path, database)))
        assert result.returncode == 3, result.stderr
        assert str(database) in result.stderr
        assert "read-only" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def _config(tmp_path: Path, database: Path) -> Path:
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{database}"\n[metrics]\nenabled = false\n'
        '[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
    )
    return config


def test_the_example_config_is_valid() -> None:
    result = run(
        "syncd",
        "check",
        "--config",
        str(ROOT / "systemd" / "syncd.toml.example"),
        env={"SYNCD_TRADEGECKO_TOKEN": "t", "SYNCD_KATANA_TOKEN": "k"},
    )
    assert result.returncode == 0, result.stderr
    assert "supplier 'Katana'" in result.stdout
