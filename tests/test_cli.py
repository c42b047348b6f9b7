"""The command-line tools as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crash_harness import CrashHarness, free_port
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
    assert order["link"]["po_number"] == "PO0002"
    assert order["link"]["so_number"] == "TG-PO0002"
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
    assert sorted(row["po"] for row in listing) == ["PO0001", "PO0002", "PO0003"]
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
        f'[daemon]\ndatabase = "{tmp_path / "x.db"}"\nstart_timeout = 1.0\n'
        "[metrics]\nenabled = false\n"
        f'[tradegecko]\ntoken = "t"\nbase_url = "http://127.0.0.1:{port}"\n'
        f'[katana]\ntoken = "k"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
    )
    started = time.monotonic()
    result = run("syncd", "run", "--config", str(config))
    # Refused connections are retried for start_timeout, then it gives up.
    assert 1.0 <= time.monotonic() - started < 10.0
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


# -- `syncd run` as a process against simulator processes ---------------------------------


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashHarness]:
    """Both simulators as processes (Katana plays the factory), shared by the run tests;
    each test sets the faults it needs and the fixture clears them."""
    harness = CrashHarness(tmp_path_factory.mktemp("sims"))
    with harness.running():
        yield harness


@pytest.fixture
def world(sims: CrashHarness) -> Iterator[CrashHarness]:
    yield sims
    for url in (sims.tradegecko_url, sims.katana_url):
        sims.http.delete(f"{url}/_sim/faults").raise_for_status()


def _faults(url: str, *rules: dict[str, object]) -> None:
    httpx.put(f"{url}/_sim/faults", json={"seed": 1, "rules": list(rules)}).raise_for_status()


def _run_config(
    tmp_path: Path, world: CrashHarness, *, katana_token: str = "katana-sim-token", extra: str = ""
) -> Path:
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "syncd.db"}"\nretry_initial = 0.1\n'
        "retry_max = 0.5\nstart_timeout = 20.0\n"
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[tradegecko]\nbase_url = "{world.tradegecko_url}"\ntoken = "tradegecko-sim-token"\n'
        "poll_interval = 0.2\nrate_limit = 100000\n"
        f'[katana]\nbase_url = "{world.katana_url}/v1"\ntoken = "{katana_token}"\n'
        "poll_interval = 0.2\nrate_limit = 100000\n" + extra
    )
    return config


class Daemon:
    """``syncd run`` as a process whose log lines are read as they come."""

    def __init__(self, config: Path) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "syncd"), "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_sim_env(),
        )
        self.lines: list[str] = []
        self._stderr: str | None = None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(stdout.readline, "")), daemon=True
        )
        self._reader.start()

    def wait_for(self, text: str, seconds: float = 20.0) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if text in line]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r}; stderr: {self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``sig``; the exit status and the seconds it took to exit."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        status = self.proc.wait(timeout=30)
        return status, time.monotonic() - sent

    def wait(self, seconds: float = 60.0) -> int:
        return self.proc.wait(timeout=seconds)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(running)"
        if self._stderr is None:
            self._stderr = self.proc.stderr.read()
        return self._stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.close()


def _sim_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SYNCD_TRADEGECKO_TOKEN", "SYNCD_KATANA_TOKEN", "SYNCD_CRASH_AT"):
        env.pop(name, None)
    return env


def test_sigterm_while_a_service_hangs_at_start_stops_at_once_with_exit_0(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    _faults(
        world.tradegecko_url,
        {"path": "/accounts/current", "timeout_rate": 1.0, "timeout_seconds": 60.0},
    )
    daemon = Daemon(_run_config(tmp_path, world))
    daemons.append(daemon)
    daemon.wait_for("syncd starting")
    time.sleep(2.0)
    assert daemon.proc.poll() is None, daemon.stderr()
    status, took = daemon.stop()
    assert status == 0, daemon.stderr()
    assert took < 2.0, took
    assert "syncd stopped" in daemon.wait_for("syncd stopped")
    assert "Traceback" not in daemon.stderr()


def test_sigterm_while_webhook_registration_hangs_at_start_exits_0_at_once(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    _faults(world.katana_url, {"path": "/webhooks", "timeout_rate": 1.0})
    port = free_port()
    extra = (
        f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
        f'public_base_url = "https://127.0.0.1:{port}"\nverify_signatures = false\n'
    )
    daemon = Daemon(_run_config(tmp_path, world, extra=extra))
    daemons.append(daemon)
    daemon.wait_for("webhook listener on")
    time.sleep(1.0)
    assert daemon.proc.poll() is None, daemon.stderr()
    status, took = daemon.stop()
    assert status == 0, daemon.stderr()
    assert took < 2.0, took


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_start_retries_a_failing_service_exits_0(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon], sig: int
) -> None:
    _faults(world.katana_url, {"path": "/factory", "error_rate": 1.0, "error_status": 503})
    daemon = Daemon(_run_config(tmp_path, world))
    daemons.append(daemon)
    daemon.wait_for("not ready at start (try 2")
    status, took = daemon.stop(sig)
    assert status == 0, daemon.stderr()
    assert took < 2.0, took


def test_a_cut_body_and_a_5xx_at_start_are_retried_and_the_daemon_runs(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    _faults(world.katana_url, {"path": "/factory", "truncate_rate": 1.0, "times": 2})
    _faults(
        world.tradegecko_url,
        {"path": "/accounts/current", "error_rate": 1.0, "error_status": 500, "times": 2},
    )
    daemon = Daemon(_run_config(tmp_path, world))
    daemons.append(daemon)
    running = daemon.wait_for("syncd running")
    assert "metrics=http://127.0.0.1:" in running and "webhooks=off" in running, running
    retried = [line for line in daemon.lines if "not ready at start" in line]
    assert any("katana GET /factory" in line for line in retried), retried
    assert any("tradegecko GET /accounts/current: 500" in line for line in retried), retried
    status, took = daemon.stop()
    assert status == 0 and took < 2.0, (status, took, daemon.stderr())


def test_a_service_down_for_the_whole_start_timeout_exits_5(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    _faults(world.katana_url, {"path": "/factory", "error_rate": 1.0, "error_status": 502})
    config = _run_config(tmp_path, world)
    config.write_text(config.read_text().replace("start_timeout = 20.0", "start_timeout = 2.0"))
    daemon = Daemon(config)
    daemons.append(daemon)
    status = daemon.wait(30)
    took = time.monotonic() - daemon.started
    stderr = daemon.stderr()
    assert status == 5, stderr
    assert "cannot start: katana GET /factory: 502" in stderr
    assert 2.0 <= took < 10.0, took
    assert "Traceback" not in stderr


def test_a_rejected_token_at_start_exits_4_without_retrying(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    daemon = Daemon(_run_config(tmp_path, world, katana_token="wrong"))
    daemons.append(daemon)
    status = daemon.wait(30)
    assert status == 4, daemon.stderr()
    assert time.monotonic() - daemon.started < 10.0
    assert not [line for line in daemon.lines if "not ready at start" in line]


def test_a_webhook_port_in_use_is_a_clean_exit_2(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = (
            f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{port}"\nverify_signatures = false\n'
        )
        daemon = Daemon(_run_config(tmp_path, world, extra=extra))
        daemons.append(daemon)
        status = daemon.wait(30)
    stderr = daemon.stderr()
    assert status == 2, stderr
    assert f"webhooks.listen: cannot listen on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


def test_the_log_says_what_started_names_the_order_on_every_line_and_says_it_stopped(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    config = _run_config(tmp_path, world)
    daemon = Daemon(config)
    daemons.append(daemon)
    daemon.wait_for("syncd running")
    _, number = world.create_po()
    daemon.wait_for(f"po={number} so=TG-{number} from=delivered to=received", 60.0)
    status, _ = daemon.stop()
    assert status == 0, daemon.stderr()
    daemon.wait_for("syncd stopped")
    lines = list(daemon.lines)
    starting = next(line for line in lines if "syncd starting" in line)
    from syncd import __version__

    for field in (f"version={__version__}", f"config={config}", f"database={tmp_path}/syncd.db"):
        assert field in starting, starting
    assert "signal=SIGTERM" in lines[-1] and "syncd stopped" in lines[-1], lines[-1]
    assert not [line for line in lines if "logger=transitions" in line], lines
    moved = [line for line in lines if 'msg="order moved"' in line]
    assert len(moved) >= 4 and all(f"po={number}" in line for line in moved), moved


# -- `syncd demo` as a process --------------------------------------------------------------


def test_rerunning_the_demo_on_its_database_reports_only_this_runs_orders(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = run("syncd", "demo", "--orders", "3", "--json", "--db", str(db))
    assert first.returncode == 0, first.stderr
    second = run("syncd", "demo", "--orders", "2", "--json", "--db", str(db))
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["orders"], summary["received"]) == (2, 2)
    assert (summary["sales_orders_created"], summary["receipts"]) == (2, 2)
    assert [order["po"] for order in summary["order_details"]] == ["PO0001", "PO0002"]
    # The earlier run's database is kept beside it, whole.
    assert f"moved the previous run's database to {db}.previous" in second.stderr
    for path, count in ((db, 2), (Path(f"{db}.previous"), 3)):
        listing = run("syncctl", "--db", str(path), "inspect", "--json")
        assert listing.returncode == 0, listing.stderr
        assert len(json.loads(listing.stdout)) == count, listing.stdout


def test_ctrl_c_in_the_demo_exits_130_with_the_summary_so_far(
    world: CrashHarness,
) -> None:
    # Katana never answers the SO's creation: the demo waits until it is interrupted.
    _faults(world.katana_url, {"path": "/sales_orders", "method": "POST", "timeout_rate": 1.0})
    proc = subprocess.Popen(
        [
            str(BIN / "syncd"),
            "demo",
            "--orders",
            "2",
            "--json",
            "--katana-url",
            f"{world.katana_url}/v1",
            "--tradegecko-url",
            world.tradegecko_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_sim_env(),
    )
    try:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, ""):
            if line.startswith("created 2 purchase orders"):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    assert summary["orders"] == 2 and summary["received"] == 0
    assert {order["state"] for order in summary["order_details"]} == {"discovered"}
    assert "Traceback" not in stderr and "Aborted" not in stderr


def test_ctrl_c_while_the_demo_starts_exits_130() -> None:
    proc = subprocess.Popen(
        [str(BIN / "syncd"), "demo", "--orders", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_sim_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "starting the simulators and the daemon\n"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    # Interrupted before or after the orders were made: 130 either way, no traceback.
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stdout and "Traceback" not in stderr
