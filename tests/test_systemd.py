"""The systemd unit (hardening, syntax) and the daemon's life under it: notify protocol over a
real unix datagram socket, SIGTERM, exit codes, no token in its output."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from conftest import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from syncd.cli.syncd import EXIT_AUTH, EXIT_CONFIG, EXIT_IN_USE, EXIT_STORE, EXIT_UNREACHABLE
from syncd.config import CREDENTIALS, DEFAULT_CREDENTIALS_DIRECTORY
from syncd.ops.notify import notify, watchdog_interval

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "syncd.service"
SYNCD = Path(sys.executable).parent / "syncd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@needs_analyze
def test_unit_exposure_stays_low() -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for syncd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    # `verify` checks that ExecStart's program exists; /opt/syncd/bin/syncd exists only on an
    # installed machine, so a copy of the unit points at this venv's syncd instead. Nothing
    # else is changed.
    assert ANALYZE is not None
    unit = tmp_path / "syncd.service"
    unit.write_text(UNIT.read_text().replace("/opt/syncd/bin/syncd", str(SYNCD)))
    result = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    assert "Type=notify" in unit.read_text() and "WatchdogSec=" in unit.read_text()
    # A reload is SIGHUP, which `syncd run` takes as "read the config again".
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in unit.read_text()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert notify("READY=1", "STATUS=running")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=running"


def test_notify_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None


def _config(sims: Sims, db: Path, path: Path) -> Path:
    path.write_text(
        f'[daemon]\ndatabase = "{db}"\nretry_initial = 0.2\n'
        f'[tradegecko]\nbase_url = "{sims.tradegecko_url}"\npoll_interval = 0.2\n'
        f'[katana]\nbase_url = "{sims.katana_url}/v1"\npoll_interval = 0.2\n'
        'rate_limit = 100000\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    return path


@pytest.mark.anyio
async def test_daemon_under_systemd_notifies_and_stops_on_sigterm_within_10_s(
    sims: Sims, tmp_path: Path
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "1000000",
            "SYNCD_TRADEGECKO_TOKEN": TRADEGECKO_TOKEN,
            "SYNCD_KATANA_TOKEN": KATANA_TOKEN,
        }
        config = _config(sims, tmp_path / "syncd.db", tmp_path / "syncd.toml")
        process = await anyio.open_process([str(SYNCD), "run", "--config", str(config)], env=env)
        messages: list[bytes] = []

        async def receive_until(wanted: bytes) -> None:
            with anyio.fail_after(20):
                while not any(wanted in m for m in messages):
                    await anyio.wait_readable(sock)
                    messages.append(sock.recv(4096))

        try:
            await receive_until(b"READY=1")
            for _ in range(4):  # work in flight when the signal comes
                await sims.create_po(
                    [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "1"}]
                )
            await receive_until(b"WATCHDOG=1")
            await anyio.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await receive_until(b"STOPPING=1")
            with anyio.fail_after(10):
                code = await process.wait()
            elapsed = time.monotonic() - started
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.stdout is not None and process.stderr is not None
        out, errors = b"", b""
        with anyio.move_on_after(2):
            async for chunk in process.stdout:
                out += chunk
            async for chunk in process.stderr:
                errors += chunk
        output = out.decode(errors="replace")
        await process.aclose()
    print(f"SIGTERM → exit in {elapsed:.2f} s")
    assert code == 0, errors.decode()
    assert elapsed < 10
    assert "syncd running" in output
    assert "Traceback" not in output + errors.decode()
    assert TRADEGECKO_TOKEN not in output + errors.decode()
    assert KATANA_TOKEN not in output + errors.decode()


def test_unusable_database_at_start_is_a_clear_exit_3(tmp_path: Path) -> None:
    config = tmp_path / "syncd.toml"
    # A directory cannot be a database, not even for root.
    (tmp_path / "db").mkdir()
    config.write_text(f'[daemon]\ndatabase = "{tmp_path / "db"}"\n')
    result = subprocess.run(
        [str(SYNCD), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SYNCD_TRADEGECKO_TOKEN": "t-secret", "SYNCD_KATANA_TOKEN": "k-secret"},
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("syncd: cannot open database")
    assert "Traceback" not in result.stderr and "secret" not in result.stdout + result.stderr


def test_metrics_address_in_use_is_a_clear_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "syncd.toml"
        config.write_text(
            f'[daemon]\ndatabase = "{tmp_path / "syncd.db"}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        result = subprocess.run(
            [str(SYNCD), "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SYNCD_TRADEGECKO_TOKEN": "t", "SYNCD_KATANA_TOKEN": "k"},
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "metrics.listen: cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


def _unit_settings(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def test_unit_restarts_only_what_a_restart_can_fix() -> None:
    assert _unit_settings("Restart") == ["on-failure"]
    (prevented,) = _unit_settings("RestartPreventExitStatus")
    # A broken config, an unusable database, a rejected token: restarting calls both APIs
    # again for nothing. A service unreachable at start (5) may come back, and the other
    # syncd holding the database file (6) may stop.
    assert {int(code) for code in prevented.split()} == {EXIT_CONFIG, EXIT_STORE, EXIT_AUTH}
    assert not {EXIT_UNREACHABLE, EXIT_IN_USE} & {int(code) for code in prevented.split()}


def test_unit_hands_over_every_credential_syncd_reads_none_required() -> None:
    loaded = dict(setting.split(":", 1) for setting in _unit_settings("LoadCredential"))
    defaults = dict(setting.split(":", 1) for setting in _unit_settings("SetCredential"))
    assert set(loaded) == set(CREDENTIALS)
    for name, path in loaded.items():
        assert path == f"{DEFAULT_CREDENTIALS_DIRECTORY}/{name}"
    # systemd 252 fails the start when a LoadCredential= file is missing, unless the same
    # id has a SetCredential= default; it refuses an empty one, so the default is "\n".
    assert defaults == dict.fromkeys(CREDENTIALS, "\\n")


def test_check_under_the_units_credentials(tmp_path: Path) -> None:
    """The credential directory systemd would make from the unit: the files that exist in
    /etc/syncd/credentials (here a stand-in), the blank defaults for the others."""
    host = tmp_path / "etc-credentials"
    host.mkdir()
    (host / "tradegecko-token").write_text("t-secret\n")
    (host / "katana-token").write_text("k-secret")
    handed_over = tmp_path / "run-credentials"
    handed_over.mkdir()
    defaults = dict(setting.split(":", 1) for setting in _unit_settings("SetCredential"))
    for setting in _unit_settings("LoadCredential"):
        name, path = setting.split(":", 1)
        source = host / Path(path).relative_to(DEFAULT_CREDENTIALS_DIRECTORY)
        text = source.read_text() if source.exists() else defaults[name].replace("\\n", "\n")
        (handed_over / name).write_text(text)
    config = tmp_path / "syncd.toml"
    body = f'[daemon]\ndatabase = "{tmp_path / "syncd.db"}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    config.write_text(body)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")},
        "CREDENTIALS_DIRECTORY": str(handed_over),
    }

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SYNCD), "check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    result = check()
    assert result.returncode == 0, result.stderr
    # Webhooks on: the blank default for the secret falls through to the file's key...
    config.write_text(body + '[webhooks]\nenabled = true\nlisten = "127.0.0.1:0"\n')
    result = check()
    assert result.returncode == 2
    assert "webhooks.tradegecko_secret: no secret" in result.stderr
    config.write_text(
        body + '[webhooks]\nenabled = true\nlisten = "127.0.0.1:0"\ntradegecko_secret = "in-file"\n'
    )
    assert check().returncode == 0
    # ... and a blank token is no token: named, exit 2, and no restart (above).
    (handed_over / "katana-token").write_text("\n")
    result = check()
    assert result.returncode == 2
    assert "katana.token: no token" in result.stderr
    assert "t-secret" not in result.stdout + result.stderr
