"""The command-line tools as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest

from conftest import KATANA_TOKEN, TRADEGECKO_TOKEN, Sims
from crash_harness import CrashHarness
from pg_server import PASSWORD, PostgresServer, pg_server_fixture  # noqa: F401 - pytest's
from syncd.domain.statechart import load_statechart
from syncd.sim import CHAIR_LINE, free_port
from syncd.sim._frame import ACCOUNT_HEADER

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


def test_a_reader_that_goes_away_ends_the_demo_quietly(tmp_path: Path) -> None:
    """``syncd demo | head -1``: the pipe closes mid-run; exit 141 (SIGPIPE's), no traceback."""
    process = subprocess.Popen(
        [str(BIN / "syncd"), "demo", "--orders", "2", "--db", str(tmp_path / "d.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    with process.stdout, process.stderr:
        assert process.stdout.readline()  # the first line, then the reader goes away
        process.stdout.close()
        stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr


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

    lease = tmp_path / "lease.toml"
    lease.write_text(good.read_text().replace("[daemon]\n", "[daemon]\nlease_renew = 10\n"))
    result = run("syncd", "check", "--config", str(lease), env=no_credentials)
    assert result.returncode == 2
    assert "daemon.lease_renew: must be less than half of daemon.lease_ttl (10.0)" in result.stderr

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


def test_check_of_a_postgres_database_connects_and_checks_its_schema(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    from syncd.store import Store

    url = pg_server.create_database()
    env = {"SYNCD_CREDENTIALS_DIRECTORY": str(tmp_path / "no-credentials")}

    def check(database: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "syncd.toml"
        config.write_text(
            f'[daemon]\ndatabase = "{database}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
            '[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
        )
        result = run("syncd", "check", "--config", str(config), env=env)
        assert PASSWORD not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result

    def tables() -> list[tuple[object, ...]]:
        with psycopg.connect(url) as con:
            return con.execute(
                "SELECT to_regclass('links'), to_regclass('syncd_schema')"
            ).fetchall()

    try:
        # Empty: fine (run creates the schema), and check creates nothing.
        result = check(url)
        assert result.returncode == 0, result.stderr
        first = result.stdout.splitlines()[0]
        assert first.endswith(f"database {url.replace(PASSWORD, '***')})"), result.stdout
        assert tables() == [(None, None)]

        async def migrate() -> None:
            await (await Store.open(url)).close()

        anyio.run(migrate)
        assert check(url).returncode == 0
        with psycopg.connect(url, autocommit=True) as con:
            con.execute("DROP TRIGGER transitions_no_delete ON transitions")
            con.execute("DROP INDEX inbox_link")
        result = check(url)
        assert result.returncode == 3, result.stderr
        assert "database postgresql://syncd:***@" in result.stderr
        assert "is damaged: index inbox_link is missing; trigger transitions_no_delete is" in (
            result.stderr
        )
        result = check(pg_server.url(url.rsplit("/", 1)[1], password="wrong"))
        assert result.returncode == 3, result.stderr
        assert "cannot connect to database" in result.stderr
        assert "password authentication failed" in result.stderr
    finally:
        pg_server.drop_database(url)


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
    chart = (ROOT / "statecharts" / "linked_order.toml").read_text()
    (tmp_path / "typo.toml").write_text(chart.replace('"so_created"', '"so_creatd"'))
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
        "statechart names a trigger the code does not fire": (
            f'[daemon]\nstatechart = "{tmp_path / "typo.toml"}"\n',
            2,
            "syncd fires trigger 'so_created', which no transition has",
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


def test_check_says_when_metrics_and_webhooks_share_an_address(tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "syncd.db"}"\n[tradegecko]\ntoken = "t"\n'
        f'[katana]\ntoken = "k"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[webhooks]\nenabled = true\nlisten = "127.0.0.1:{port}"\ntradegecko_secret = "s"\n'
    )
    result = run("syncd", "check", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"webhooks.listen: 127.0.0.1:{port} is also metrics.listen" in result.stderr
    assert "already running" not in result.stderr


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
    # Both services are asked at once: a refusal would outrank the unreachable one below.
    restored = await sims.control.post(f"{sims.tradegecko_url}/_sim/token", json={"revoked": False})
    assert restored.status_code == 200, restored.text

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


@pytest.mark.anyio
async def test_check_reads_every_factory_and_asks_each_ones_services(
    sims: Sims, tmp_path: Path
) -> None:
    # Three factories: today's top level (the default), a table, a file in factories.d; the
    # top level's base URLs are every factory's.
    config = _sims_config(
        sims, tmp_path, '[factories.north-mill.katana]\norder_no_prefix = "NM-"\n'
    )
    acme = tmp_path / "factories.d" / "acme.toml"
    acme.parent.mkdir()
    acme.write_text('[tradegecko]\nsupplier_name = "Katana (Acme)"\n')
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "acme-tradegecko-token").write_text("tg-acme")
    (credentials / "acme-katana-token").write_text("kt-acme")
    env = {
        **SIM_TOKENS,
        "SYNCD_NORTH_MILL_TRADEGECKO_TOKEN": "tg-north",
        "SYNCD_NORTH_MILL_KATANA_TOKEN": "kt-north",
        "SYNCD_CREDENTIALS_DIRECTORY": str(credentials),
    }
    # Each factory is right, and listed: one daemon runs them all.
    offline = await _process("syncd", "check", "--config", str(config), env=env)
    assert offline.returncode == 0, offline.stderr.decode()
    assert offline.stderr.decode() == ""
    summary, *lines = offline.stdout.decode().splitlines()
    assert summary.startswith(f"{config}: ok (3 factories, ")
    assert lines == [
        "factory default (the top level): supplier 'Katana', customer 'Tradegecko', "
        "order_no_prefix 'TG-'",
        "factory north-mill ([factories.north-mill]): supplier 'Katana', customer "
        "'Tradegecko', order_no_prefix 'NM-'",
        f"factory acme ({acme}): supplier 'Katana (Acme)', customer 'Tradegecko', "
        "order_no_prefix 'TG-'",
    ]

    # The simulators know one account each: the other two factories' tokens are refused,
    # each said with its factory's name, none of them printed.
    online = await _process("syncd", "check", "--online", "--config", str(config), env=env)
    stderr = online.stderr.decode()
    assert online.returncode == 4, stderr
    assert "factory default:" not in stderr
    assert "syncd: factory north-mill: a token was rejected: " in stderr
    assert "syncd: factory acme: a token was rejected: " in stderr
    for token in ("tg-north", "kt-north", "tg-acme", "kt-acme", KATANA_TOKEN):
        assert token not in stderr

    # Every problem of every factory, each naming its key and, for a file, the file.
    config.write_text(config.read_text().replace('order_no_prefix = "NM-"', "order_no_prefix = 5"))
    (acme.parent / "Bad_Name.toml").write_text("")
    (credentials / "acme-katana-token").write_text(KATANA_TOKEN)  # the default's account
    for command in ("check", "run"):
        result = await _process("syncd", command, "--config", str(config), env=env)
        stderr = result.stderr.decode()
        assert result.returncode == 2, stderr
        assert "Traceback" not in stderr and KATANA_TOKEN not in stderr
    listed = await _process("syncd", "check", "--config", str(config), env=env)
    assert listed.stderr.decode().splitlines() == [
        f"syncd: {acme.parent / 'Bad_Name.toml'}: the file's name must be a factory name, a "
        "lowercase letter or digit, then up to 62 lowercase letters, digits or '-'",
        "syncd: factories.north-mill.katana.order_no_prefix: Expected `str`, got `int` "
        f"(in {config})",
        f"syncd: {acme}: katana.token: the same Katana token as the factory 'default': one "
        "account served twice would double every call",
        f"syncd: {config}: 3 problems",
    ]


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


# -- `syncd run` as a process against simulator processes ---------------------------------


@pytest.fixture(scope="module")
def sim_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashHarness]:
    """Both simulators as processes (Katana plays the factory), shared by the run tests;
    each test sets the faults it needs and the fixture clears them."""
    harness = CrashHarness(tmp_path_factory.mktemp("sims"))
    with harness.running():
        yield harness


@pytest.fixture
def world(sim_processes: CrashHarness) -> Iterator[CrashHarness]:
    yield sim_processes
    for url in (sim_processes.tradegecko_url, sim_processes.katana_url):
        sim_processes.http.delete(f"{url}/_sim/faults").raise_for_status()


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


def test_a_second_daemon_on_the_database_file_exits_6_and_the_first_runs_on(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    config = _run_config(tmp_path, world)
    first = Daemon(config)
    daemons.append(first)
    first.wait_for("syncd running")
    second = Daemon(config)
    daemons.append(second)
    status = second.wait(30)
    stderr = second.stderr()
    assert status == 6, stderr
    assert stderr == (
        f"syncd: database {tmp_path / 'syncd.db'} is in use by another syncd (pid "
        f"{first.proc.pid}); one daemon per database file (syncctl can still read it)\n"
    )
    # Refused before it decided or asked anything, and the first never noticed.
    assert not [line for line in second.lines if "syncd running" in line], second.lines
    _, number = world.create_po()
    first.wait_for(f"po={number} so=TG-{number} from=delivered to=received", 60.0)
    # A daemon that dies without cleaning up takes its lock with it: the next one starts.
    first.proc.kill()
    first.wait(10)
    third = Daemon(config)
    daemons.append(third)
    third.wait_for("syncd running")
    status, _ = third.stop()
    assert status == 0, third.stderr()


# -- `syncd demo` as a process --------------------------------------------------------------


def test_the_demo_on_a_database_a_daemon_holds_exits_6(tmp_path: Path) -> None:
    from syncd.store import Store

    database = tmp_path / "syncd.db"

    async def hold_and_run_the_demo() -> subprocess.CompletedProcess[str]:
        store = await Store.open(database, exclusive=True)
        try:
            return await anyio.to_thread.run_sync(
                lambda: run("syncd", "demo", "--db", str(database), "--orders", "1")
            )
        finally:
            await store.close()

    result = anyio.run(hold_and_run_the_demo)
    assert result.returncode == 6, result.stderr
    assert result.stderr.endswith(
        f"syncd: database {database} is in use by another syncd (pid {os.getpid()}); one "
        "daemon per database file (syncctl can still read it)\n"
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_rerunning_the_demo_on_its_database_reports_only_this_runs_orders(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = run("syncd", "demo", "--orders", "3", "--json", "--db", str(db))
    assert first.returncode == 0, first.stderr
    second = run("syncd", "demo", "--orders", "2", "--json", "--db", str(db))
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["orders"], summary["received"]) == (2, 2)
    assert (summary["sales_orders_created"], summary["receipts"]) == (2, 2)
    assert [order["po_number"] for order in summary["order_details"]] == ["PO0001", "PO0002"]
    # The earlier run's database is kept beside it, whole.
    assert f"moved the previous run's database to {db}.previous" in second.stderr
    for path, count in ((db, 2), (Path(f"{db}.previous"), 3)):
        listing = run("syncctl", "--db", str(path), "inspect", "--json")
        assert listing.returncode == 0, listing.stderr
        assert len(json.loads(listing.stdout)) == count, listing.stdout


def test_the_demo_replaces_only_its_own_databases(tmp_path: Path) -> None:
    """--db naming something an earlier demo did not make (a file, a directory, a daemon's
    database) is refused and left as it was."""
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    daemons = tmp_path / "syncd.db"
    with sqlite3.connect(daemons) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for path in (notes, folder, daemons):
        result = run("syncd", "demo", "--orders", "1", "--db", str(path))
        assert result.returncode == 3, result.stderr
        assert "an earlier demo did not make" in result.stderr
        assert "Traceback" not in result.stderr
        assert not Path(f"{path}.previous").exists()
    assert notes.read_text() == "precious" and folder.is_dir()


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


def test_demo_with_make_to_order_auto(tmp_path: Path) -> None:
    """syncd makes the manufacturing orders; the factory only starts and finishes them. The
    second PO's SHELF-WALNUT (created by syncd: no recipe) is noted and left alone."""
    db = tmp_path / "demo.db"
    result = run(
        "syncd", "demo", "--orders", "2", "--make-to-order", "auto", "--json", "--db", str(db)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["received"] == 2
    with sqlite3.connect(db) as conn:
        entered = {row[0] for row in conn.execute("SELECT to_state FROM transitions")}
    assert "making_to_order" in entered
    shelf = summary["order_details"][1]
    assert any("(SHELF-WALNUT) has no recipe" in note for note in shelf["notes"]), shelf


def test_demo_refuses_an_unknown_make_to_order_mode() -> None:
    result = run("syncd", "demo", "--make-to-order", "always")
    assert result.returncode == 2
    assert "'--make-to-order'" in result.stderr and "Traceback" not in result.stderr


def _account(world: CrashHarness, name: str) -> tuple[str, str]:
    """A new account in each simulator process for the factory ``name``: its tokens."""
    suffix = os.urandom(4).hex()  # the simulators outlive the test: fresh tokens each time
    katana, tradegecko = f"kt-{name}-{suffix}", f"tg-{name}-{suffix}"
    world.http.post(f"{world.katana_url}/_sim/accounts", json={"token": katana}).raise_for_status()
    world.http.post(
        f"{world.tradegecko_url}/_sim/accounts", json={"token": tradegecko}
    ).raise_for_status()
    return katana, tradegecko


def _syncctl_json(*args: str) -> object:
    result = subprocess.run(
        [str(BIN / "syncctl"), *args, "--json"], capture_output=True, text=True, timeout=30
    )
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_sighup_starts_an_added_factory_stops_a_removed_one_and_keeps_a_broken_config_out(
    tmp_path: Path, world: CrashHarness, daemons: list[Daemon]
) -> None:
    tokens = {name: _account(world, name) for name in ("north", "acme")}
    config = _run_config(tmp_path, world)
    folder = tmp_path / "factories.d"
    folder.mkdir()

    def add(name: str, extra: str = "") -> None:
        katana, tradegecko = tokens[name]
        (folder / f"{name}.toml").write_text(
            f'[tradegecko]\ntoken = "{tradegecko}"\n[katana]\ntoken = "{katana}"\n{extra}'
        )

    add("north")
    daemon = Daemon(config)
    daemons.append(daemon)
    daemon.wait_for("syncd running")
    assert "factory north running" in daemon.wait_for("factory north running")
    # A PO in north's account is linked by north.
    created = world.http.post(
        f"{world.tradegecko_url}/_sim/purchase_orders",
        json={"supplier": "Katana", "currency": "USD", "lines": [CHAIR_LINE]},
        headers={ACCOUNT_HEADER: tokens["north"][1]},
    )
    created.raise_for_status()
    number = created.json()["purchase_order"]["order_number"]
    inspect = ["--config", str(config), "--factory", "north", "inspect", number]
    deadline = time.monotonic() + 30
    while (order := _syncctl_json(*inspect)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert isinstance(order, dict) and order["factory"] == "north", daemon.stderr()

    # Added: started without a restart.
    add("acme")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("factory acme running")
    assert "acme" in daemon.wait_for("reload applied")

    # Removed (switched off): stopped, its history kept.
    (folder / "north.toml").rename(folder / "north.toml.off")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("factory north stopped")
    kept = _syncctl_json(*inspect)
    assert isinstance(kept, dict) and kept["po_number"] == number

    # A broken factory file: refused, said, the running factories go on.
    add("acme", "order_no_prefix = 5\n")
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_for("reload refused")
    assert "katana.order_no_prefix" in refused and "nothing was reloaded" in refused
    # A daemon-wide key that needs a restart: said, nothing applied.
    add("acme")
    config.write_text(config.read_text().replace("retry_max = 0.5", "retry_max = 0.7"))
    daemon.proc.send_signal(signal.SIGHUP)
    restart = daemon.wait_for("needs a restart")
    assert "daemon.retry_max" in restart
    assert daemon.proc.poll() is None
    assert not [line for line in daemon.lines if "factory acme stopped" in line]

    status, _ = daemon.stop()
    assert status == 0, daemon.stderr()
