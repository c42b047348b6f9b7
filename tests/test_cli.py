"""The command-line tools as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from syncd.domain.statechart import load_statechart
from test_flow import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from test_flow import sims as sims  # the fixture

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
    no_credentials = {"SYNCD_CREDENTIALS_DIRECTORY": str(tmp_path / "no-credentials")}
    good = tmp_path / "good.toml"
    good.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "x.db"}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        '[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
    )
    result = run("syncd", "check", "--config", str(good), env=no_credentials)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert not (tmp_path / "x.db").exists()  # check creates nothing

    bad = tmp_path / "bad.toml"
    bad.write_text('[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\npoll_interval = "often"\n')
    result = run("syncd", "check", "--config", str(bad), env=no_credentials)
    assert result.returncode == 2
    assert "katana.poll_interval" in result.stderr
    assert "Traceback" not in result.stderr

    no_token = tmp_path / "no_token.toml"
    no_token.write_text('[katana]\ntoken = "k"\n')
    result = run(
        "syncd",
        "check",
        "--config",
        str(no_token),
        env={"SYNCD_TRADEGECKO_TOKEN": "", **no_credentials},
    )
    assert result.returncode == 2
    assert "tradegecko.token" in result.stderr

    result = run("syncd", "check", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml" in result.stderr


def _hold_port() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def _refusal_cases(tmp_path: Path, taken_port: int) -> dict[str, tuple[str, int, str]]:
    """Configs that `run` refuses: name -> (extra TOML, exit code, what stderr says)."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "not-sqlite.db").write_text("hello, I am not a database\n")
    (tmp_path / "a-folder.db").mkdir()
    return {
        "database under a regular file": (
            f'[daemon]\ndatabase = "{tmp_path / "a-file" / "sub" / "syncd.db"}"\n',
            3,
            f"cannot open database {tmp_path / 'a-file' / 'sub' / 'syncd.db'}",
        ),
        "database is a folder": (
            f'[daemon]\ndatabase = "{tmp_path / "a-folder.db"}"\n',
            3,
            "a-folder.db",
        ),
        "database is not SQLite": (
            f'[daemon]\ndatabase = "{tmp_path / "not-sqlite.db"}"\n',
            3,
            "file is not a database",
        ),
        "statechart missing": (
            f'[daemon]\nstatechart = "{tmp_path / "nowhere.toml"}"\n',
            2,
            "statechart file not found",
        ),
        "metrics address in use": (
            f'[metrics]\nlisten = "127.0.0.1:{taken_port}"\n',
            2,
            "metrics.listen: cannot listen on",
        ),
        "webhook address in use": (
            f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{taken_port}"\n'
            'tradegecko_secret = "s"\nregister = false\n',
            2,
            "webhooks.listen: cannot listen on",
        ),
        "a wrong value": ("[katana]\nrate_limit = 0\n", 2, "katana.rate_limit: must be"),
    }


def _sims_config(sims: Sims, tmp_path: Path, extra: str, name: str = "syncd.toml") -> Path:
    """A config for the simulators; a key in ``extra`` replaces the default one."""
    defaults = {
        "daemon": {"database": f'"{tmp_path / "syncd.db"}"'},
        "metrics": {"listen": '"127.0.0.1:0"'},
        "tradegecko": {"base_url": f'"{sims.tradegecko_url}"'},
        "katana": {"base_url": f'"{sims.katana_url}/v1"'},
    }
    text = extra
    for table, keys in defaults.items():
        given = extra.split(f"[{table}]\n")[1].split("[")[0] if f"[{table}]\n" in extra else None
        body = "".join(
            f"{key} = {value}\n"
            for key, value in keys.items()
            if given is None or f"{key} =" not in given
        )
        if given is None:
            text += f"[{table}]\n{body}"
        else:
            text = text.replace(f"[{table}]\n", f"[{table}]\n{body}")
    path = tmp_path / name
    path.write_text(text)
    return path


async def _process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process(
            [str(BIN / args[0]), *args[1:]], env={**os.environ, **env}, check=False
        )


SIM_TOKENS = {
    "SYNCD_TRADEGECKO_TOKEN": TRADEGECKO_TOKEN,
    "SYNCD_KATANA_TOKEN": KATANA_TOKEN,
}


@pytest.mark.anyio
async def test_check_finds_what_run_refuses_with_the_same_exit_code(
    sims: Sims, tmp_path: Path
) -> None:
    # Services reachable, tokens right: whatever run refuses is refused for the case alone.
    env = {**SIM_TOKENS, "SYNCD_CREDENTIALS_DIRECTORY": str(tmp_path / "none")}
    with _hold_port() as taken:
        cases = _refusal_cases(tmp_path, taken.getsockname()[1])
        for name, (extra, code, says) in cases.items():
            config = _sims_config(sims, tmp_path, extra, name=f"{name.replace(' ', '-')}.toml")
            results = {
                "check": await _process(
                    "syncd", "check", "--online", "--config", str(config), env=env
                )
            }
            # On this branch run binds the webhook socket inside its task group and dies
            # with a traceback (exit 1); binding it before start is the daemon's change.
            if name != "webhook address in use":
                results["run"] = await _process("syncd", "run", "--config", str(config), env=env)
            for what, result in results.items():
                stderr = result.stderr.decode()
                assert result.returncode == code, f"{name}: {what}: {stderr}"
                assert says in stderr, f"{name}: {what}: {stderr}"
                assert "Traceback" not in stderr
                assert TRADEGECKO_TOKEN not in stderr and KATANA_TOKEN not in stderr


def test_check_lists_every_problem_and_exits_as_run_would_for_the_first(tmp_path: Path) -> None:
    with _hold_port() as taken:
        (tmp_path / "a-file").write_text("")
        config = tmp_path / "syncd.toml"
        config.write_text(
            f'[daemon]\ndatabase = "{tmp_path / "a-file" / "syncd.db"}"\n'
            f'statechart = "{tmp_path / "nowhere.toml"}"\nconcurrency = 0\n'
            f'[metrics]\nlisten = "127.0.0.1:{taken.getsockname()[1]}"\n'
            "[katana]\nrate_limit = 0\n"
        )
        result = run(
            "syncd",
            "check",
            "--config",
            str(config),
            env={"SYNCD_CREDENTIALS_DIRECTORY": str(tmp_path), "SYNCD_KATANA_TOKEN": "k"},
        )
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr  # the config comes first, as in run
    assert lines[-1] == f"syncd: {config}: 6 problems"
    expected = [
        "daemon.concurrency: must be at least 1",
        "katana.rate_limit: must be at least 1",
        "tradegecko.token: no token",
        "statechart file not found",
        f"cannot open database {tmp_path / 'a-file' / 'syncd.db'}: {tmp_path / 'a-file'} is "
        "not a directory",
        "metrics.listen: cannot listen on",
    ]
    assert len(lines) == len(expected) + 1
    for line, says in zip(lines, expected, strict=False):
        assert says in line, result.stderr

    # The database alone wrong: the exit code is the database's.
    config.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "a-file" / "syncd.db"}"\n'
        '[metrics]\nenabled = false\n[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
    )
    result = run("syncd", "check", "--config", str(config))
    assert result.returncode == 3, result.stderr
    assert "is not a directory" in result.stderr


@pytest.mark.anyio
async def test_check_online_asks_both_services_with_runs_exit_codes(
    sims: Sims, tmp_path: Path
) -> None:
    config = _sims_config(sims, tmp_path, "")
    env = {**SIM_TOKENS, "SYNCD_CREDENTIALS_DIRECTORY": str(tmp_path / "none")}
    ok = await _process("syncd", "check", "--online", "--config", str(config), env=env)
    assert ok.returncode == 0, ok.stderr.decode()
    assert "both services accept their tokens" in ok.stdout.decode()
    offline = await _process("syncd", "check", "--config", str(config), env=env)
    assert offline.returncode == 0 and "services" not in offline.stdout.decode()

    wrong = {**env, "SYNCD_KATANA_TOKEN": "not-the-token"}
    offline = await _process("syncd", "check", "--config", str(config), env=wrong)
    assert offline.returncode == 0  # offline, a token is only looked for
    for command in (("check", "--online"), ("run",)):
        rejected = await _process("syncd", *command, "--config", str(config), env=wrong)
        assert rejected.returncode == 4, rejected.stderr.decode()
        assert "a token was rejected: katana GET /factory: 401" in rejected.stderr.decode()
        assert "not-the-token" not in rejected.stderr.decode()

    revoked = await sims.control.post(f"{sims.tradegecko_url}/_sim/token", json={"revoked": True})
    assert revoked.status_code == 200, revoked.text
    rejected = await _process("syncd", "check", "--online", "--config", str(config), env=env)
    assert rejected.returncode == 4, rejected.stderr.decode()
    assert "a token was rejected: tradegecko GET" in rejected.stderr.decode()

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    unreachable = _sims_config(
        sims, tmp_path, f'[katana]\nbase_url = "http://127.0.0.1:{port}/v1"\n', name="off.toml"
    )
    # (run's own exit 5 is test_run_says_which_service_cannot_be_reached.)
    result = await _process("syncd", "check", "--online", "--config", str(unreachable), env=env)
    assert result.returncode == 5, result.stderr.decode()
    assert "cannot reach the service: katana GET /factory" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
    # run asks the services before it binds the webhook address: 5 comes first, both listed.
    with _hold_port() as taken:
        both = _sims_config(
            sims,
            tmp_path,
            f'[katana]\nbase_url = "http://127.0.0.1:{port}/v1"\n[webhooks]\nenabled = true\n'
            f'listen = "127.0.0.1:{taken.getsockname()[1]}"\ntradegecko_secret = "s"\n',
            name="both.toml",
        )
        result = await _process("syncd", "check", "--online", "--config", str(both), env=env)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 5, lines
    assert "katana GET /factory" in lines[0] and "webhooks.listen" in lines[1]

    # A config with problems: the services are not asked with what may be wrong.
    broken = _sims_config(sims, tmp_path, "[katana]\ntimeout = 0\n", name="broken.toml")
    result = await _process("syncd", "check", "--online", "--config", str(broken), env=env)
    assert result.returncode == 2
    assert "katana.timeout" in result.stderr.decode()
    assert "services not asked: the config has problems" in result.stderr.decode()


def test_check_and_run_read_the_default_config_and_credentials(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tradegecko-token").write_text("t-secret")
    (credentials / "katana-token").write_text("k-secret\n")
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "x.db"}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    env = {
        "SYNCD_CONFIG": str(config),
        "SYNCD_CREDENTIALS_DIRECTORY": str(credentials),
        "SYNCD_TRADEGECKO_TOKEN": "",
        "SYNCD_KATANA_TOKEN": "",
    }
    result = run("syncd", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok")

    (credentials / "katana-token").unlink()
    result = run("syncd", "check", env=env)
    assert result.returncode == 2
    assert "katana.token: no token" in result.stderr and str(credentials) in result.stderr

    config.write_text("[daemon\n")
    result = run("syncd", "run", env=env)
    assert result.returncode == 2
    assert f"{config} is not valid TOML" in result.stderr

    env["SYNCD_CONFIG"] = str(tmp_path / "absent.toml")
    for command in ("run", "check"):
        result = run("syncd", command, env=env)
        assert result.returncode == 2
        assert f"no config file at {tmp_path / 'absent.toml'}" in result.stderr
        assert "--config" in result.stderr and "SYNCD_CONFIG" in result.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
@pytest.mark.parametrize("command", ["syncd", "syncctl"])
def test_shell_completion_scripts(command: str, shell: str) -> None:
    variable = f"_{command.upper()}_COMPLETE"
    result = run(command, env={variable: f"{shell}_source"})
    assert result.returncode == 0, result.stderr
    # Each script defines the command's completion function, which calls the command back
    # with the variable set.
    assert f"_{command}_completion" in result.stdout
    assert f"{variable}={shell}_complete" in result.stdout
    assert result.stderr == ""


BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize(
    ("command", "words", "expected"),
    [
        ("syncd", [""], {"run", "check", "demo", "sim"}),
        ("syncd", ["check", "--"], {"--config", "--online", "--help"}),
        ("syncctl", ["ret"], {"retry"}),
    ],
)
def test_bash_completes_with_the_sourced_script(
    command: str, words: list[str], expected: set[str]
) -> None:
    assert BASH is not None
    script = (
        f'eval "$(_{command.upper()}_COMPLETE=bash_source {command})"\n'
        f"COMP_WORDS=({command} {' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words)}\n"
        f"_{command}_completion {command}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [BASH, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert expected <= set(result.stdout.split()), result.stdout


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
        for command in ("run", "check"):
            result = run("syncd", command, "--config", str(_config(tmp_path, database)))
            assert result.returncode == 3, result.stderr
            assert str(database) in result.stderr
            assert "read-only" in result.stderr
            assert "Traceback" not in result.stderr
        # A database yet to be made on it: run could not create it either.
        result = run("syncd", "check", "--config", str(_config(tmp_path, mountpoint / "new.db")))
        assert result.returncode == 3, result.stderr
        assert f"the file system holding {mountpoint} is read-only" in result.stderr
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def _config(tmp_path: Path, database: Path) -> Path:
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{database}"\n[metrics]\nenabled = false\n'
        '[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
    )
    return config


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    # Its database and metrics address are the machine's: this test points them at its own
    # (check binds the address and looks at the database's folder); every other key is as
    # shipped.
    example = (ROOT / "systemd" / "syncd.toml.example").read_text()
    lines = {
        'database = "/var/lib/syncd/syncd.db"': f'database = "{tmp_path / "syncd.db"}"',
        'listen = "127.0.0.1:9464"': 'listen = "127.0.0.1:0"',
    }
    for line, replacement in lines.items():
        assert line in example
        example = example.replace(line, replacement)
    config = tmp_path / "syncd.toml"
    config.write_text(example)
    result = run(
        "syncd",
        "check",
        "--config",
        str(config),
        env={
            "SYNCD_TRADEGECKO_TOKEN": "t",
            "SYNCD_KATANA_TOKEN": "k",
            "SYNCD_CREDENTIALS_DIRECTORY": str(tmp_path),
        },
    )
    assert result.returncode == 0, result.stderr
    assert "supplier 'Katana'" in result.stdout
