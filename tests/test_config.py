"""The configuration file: defaults, every error naming its key, and where tokens come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.config import Config, config_problems, load_config, parse_config, read_config
from syncd.errors import ConfigError

TOKENS = """
[tradegecko]
token = "tg-file"

[katana]
token = "kt-file"
"""


SECRETS = {
    # environment variable, credential, attribute
    "SYNCD_TRADEGECKO_TOKEN": ("tradegecko-token", "tradegecko.token"),
    "SYNCD_KATANA_TOKEN": ("katana-token", "katana.token"),
    "SYNCD_TRADEGECKO_WEBHOOK_SECRET": ("tradegecko-webhook-secret", "webhooks.tradegecko_secret"),
    "SYNCD_KATANA_WEBHOOK_TOKEN": ("katana-webhook-token", "webhooks.katana_token"),
    "SYNCD_WEBHOOK_PATH_TOKEN": ("webhook-path-token", "webhooks.path_token"),
}


EVERY_SECRET_IN_FILE = """
[tradegecko]
token = "in-file"
[katana]
token = "in-file"
[webhooks]
tradegecko_secret = "in-file"
katana_token = "in-file"
path_token = "in-file"
"""


@pytest.fixture(autouse=True)
def host_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty stand-in for /etc/syncd/credentials: the machine's own is never read."""
    for name in (*SECRETS, "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    directory = tmp_path / "etc-credentials"
    directory.mkdir()
    monkeypatch.setenv("SYNCD_CREDENTIALS_DIRECTORY", str(directory))
    return directory


def _secret(config: Config, attribute: str) -> str:
    table, key = attribute.split(".")
    value = getattr(getattr(config, table), key)
    assert isinstance(value, str)
    return value


def test_defaults() -> None:
    config = parse_config(TOKENS)
    assert isinstance(config, Config)
    assert config.daemon.database == "/var/lib/syncd/syncd.db"
    assert config.daemon.log_level == "info"
    assert config.daemon.concurrency == 4
    assert (config.daemon.retry_initial, config.daemon.retry_max) == (5.0, 300.0)
    assert config.daemon.statechart is None
    assert config.tradegecko.base_url == "https://api.tradegecko.com"
    assert config.tradegecko.supplier_name == "Katana"
    assert (config.tradegecko.rate_limit, config.tradegecko.rate_period) == (300, 300.0)
    assert config.katana.base_url == "https://api.katanamrp.com/v1"
    assert config.katana.order_no_prefix == "TG-"
    assert config.katana.customer_name == "Tradegecko"
    assert config.katana.make_to_order == "manual"
    assert config.katana.create_subassemblies is False
    assert (config.katana.rate_limit, config.katana.rate_period) == (60, 60.0)
    assert config.tradegecko.poll_interval == config.katana.poll_interval == 30.0
    assert config.metrics.enabled is True
    assert config.metrics.address() == ("127.0.0.1", 9464)
    assert (config.tradegecko.token, config.katana.token) == ("tg-file", "kt-file")


def test_values_from_the_file_are_used() -> None:
    config = parse_config(
        TOKENS
        + """
[daemon]
database = "/tmp/x.db"
log_level = "debug"
concurrency = 2

[metrics]
listen = "[::1]:0"
"""
    )
    assert config.daemon.database == "/tmp/x.db"
    assert config.daemon.log_level == "debug"
    assert config.daemon.concurrency == 2
    assert config.metrics.address() == ("::1", 0)


def test_make_to_order_auto_with_subassemblies() -> None:
    text = '[katana]\nmake_to_order = "auto"\ncreate_subassemblies = true'
    config = parse_config(text, require_tokens=False)
    assert (config.katana.make_to_order, config.katana.create_subassemblies) == ("auto", True)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param('[daemon]\nconcurrency = "four"', "daemon.concurrency", id="wrong-type"),
        pytest.param("[daemon]\nconcurrency = 2.5", "daemon.concurrency", id="float-for-int"),
        pytest.param('[katana]\npoll_interval = "often"', "katana.poll_interval", id="str-num"),
        pytest.param("daemon = 3", "daemon", id="table-is-a-number"),
        pytest.param("[katana]\ntokn = 'x'", "katana.tokn", id="unknown-key-in-table"),
        pytest.param("[metrics]\nport = 1", "metrics.port", id="unknown-key-in-metrics"),
        pytest.param("[katna]\ntoken = 'x'", "katna", id="unknown-top-level-table"),
        pytest.param("verbose = true", "verbose", id="unknown-top-level-key"),
        pytest.param(
            "[tradegecko]\npoll_interval = -1", "tradegecko.poll_interval", id="negative-interval"
        ),
        pytest.param("[katana]\npoll_interval = 0", "katana.poll_interval", id="zero-interval"),
        pytest.param("[daemon]\nretry_max = -5", "daemon.retry_max", id="negative-retry"),
        pytest.param(
            "[metrics]\nrefresh_interval = 0", "metrics.refresh_interval", id="zero-refresh"
        ),
        pytest.param("[katana]\nrate_limit = 0", "katana.rate_limit", id="zero-rate-limit"),
        pytest.param(
            "[tradegecko]\nrate_limit = 0", "tradegecko.rate_limit", id="zero-rate-limit-tg"
        ),
        pytest.param("[daemon]\nconcurrency = 0", "daemon.concurrency", id="zero-concurrency"),
        pytest.param("[katana]\nbase_url = 'ftp://katana'", "katana.base_url", id="bad-url"),
        pytest.param(
            "[tradegecko]\nbase_url = 'api.tradegecko.com'", "tradegecko.base_url", id="no-scheme"
        ),
        pytest.param("[daemon]\nlog_level = 'loud'", "daemon.log_level", id="bad-log-level"),
        pytest.param("[daemon]\nlog_level = 'INFO'", "daemon.log_level", id="log-level-case"),
        pytest.param("[metrics]\nlisten = '9464'", "metrics.listen", id="bad-listen"),
        pytest.param("[metrics]\nlisten = 'localhost:70000'", "metrics.listen", id="big-port"),
        pytest.param(
            "[tradegecko]\nsupplier_name = '  '", "tradegecko.supplier_name", id="blank-supplier"
        ),
        pytest.param(
            "[katana]\nmake_to_order = 'always'", "katana.make_to_order", id="bad-make-to-order"
        ),
        pytest.param(
            "[katana]\ncreate_subassemblies = 'yes'",
            "katana.create_subassemblies",
            id="subassemblies-not-bool",
        ),
    ],
)
def test_every_error_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="syncd.toml", require_tokens=False)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[katana]\ntoken = "kt"', "tradegecko.token"),
        ('[tradegecko]\ntoken = "tg"', "katana.token"),
        ("", "tradegecko.token"),
    ],
)
def test_a_missing_token_names_its_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_tokens_are_not_required_when_asked_not_to() -> None:
    config = parse_config("", require_tokens=False)
    assert (config.tradegecko.token, config.katana.token) == ("", "")


def test_environment_tokens_override_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_TRADEGECKO_TOKEN", "tg-env\n")
    monkeypatch.setenv("SYNCD_KATANA_TOKEN", "kt-env")
    config = parse_config(TOKENS)
    assert (config.tradegecko.token, config.katana.token) == ("tg-env", "kt-env")


def test_environment_tokens_satisfy_the_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_TRADEGECKO_TOKEN", "tg-env")
    monkeypatch.setenv("SYNCD_KATANA_TOKEN", "kt-env")
    config = parse_config("")
    assert (config.tradegecko.token, config.katana.token) == ("tg-env", "kt-env")


def test_tokens_from_systemd_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "katana-token").write_text("kt-cred\n", encoding="utf-8")
    (tmp_path / "tradegecko-token").write_text("  tg-cred\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = parse_config(TOKENS)
    assert (config.tradegecko.token, config.katana.token) == ("tg-cred", "kt-cred")


def test_environment_beats_credentials_and_a_missing_credential_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "katana-token").write_text("kt-cred", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("SYNCD_KATANA_TOKEN", "kt-env")
    config = parse_config(TOKENS)
    assert config.katana.token == "kt-env"
    assert config.tradegecko.token == "tg-file"  # no tradegecko-token credential


def test_outside_systemd_every_secret_comes_from_the_host_directory(
    host_credentials: Path,
) -> None:
    for credential, _ in SECRETS.values():
        (host_credentials / credential).write_text(f"{credential}-host\n", encoding="utf-8")
    config = parse_config(TOKENS)
    for credential, attribute in SECRETS.values():
        assert _secret(config, attribute) == f"{credential}-host"


@pytest.mark.parametrize(("env", "credential_attribute"), list(SECRETS.items()))
def test_the_order_env_then_systemd_then_host_directory_then_file(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    host_credentials: Path,
    env: str,
    credential_attribute: tuple[str, str],
) -> None:
    credential, attribute = credential_attribute
    text = EVERY_SECRET_IN_FILE
    in_file = "in-file"
    assert _secret(parse_config(text), attribute) == in_file
    (host_credentials / credential).write_text("host", encoding="utf-8")
    assert _secret(parse_config(text), attribute) == "host"
    systemd = tmp_path / "run-credentials"
    systemd.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(systemd))
    # Under systemd only the unit's credentials count: the host's directory is root's.
    assert _secret(parse_config(text), attribute) == in_file
    (systemd / credential).write_text("systemd", encoding="utf-8")
    assert _secret(parse_config(text), attribute) == "systemd"
    monkeypatch.setenv(env, "from-env")
    assert _secret(parse_config(text), attribute) == "from-env"


def test_an_empty_credential_counts_as_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The unit's empty SetCredential= defaults for the optional webhook secrets.
    (tmp_path / "tradegecko-webhook-secret").write_text("", encoding="utf-8")
    (tmp_path / "katana-token").write_text("\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = parse_config(TOKENS + '[webhooks]\ntradegecko_secret = "s-file"\n')
    assert config.webhooks.tradegecko_secret == "s-file"
    assert config.katana.token == "kt-file"


def test_an_unreadable_credential_names_its_file_and_key(host_credentials: Path) -> None:
    (host_credentials / "katana-token").mkdir()  # unreadable as a file, even for root
    with pytest.raises(ConfigError, match="cannot read credential") as caught:
        parse_config(TOKENS)
    assert caught.value.key == "katana.token"
    assert str(host_credentials / "katana-token") in str(caught.value)
    # syncctl needs no token: it is not stopped by one it cannot read.
    assert parse_config(TOKENS, require_tokens=False).katana.token == "kt-file"


def test_a_missing_token_says_where_it_was_looked_for(host_credentials: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("")
    assert "SYNCD_TRADEGECKO_TOKEN" in str(caught.value)
    assert str(host_credentials) in str(caught.value)


def test_config_problems_lists_every_wrong_value(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(
        "[daemon]\nconcurrency = 0\nlog_level = 'loud'\n"
        "[katana]\npoll_interval = -1\n[metrics]\nlisten = '9464'\n",
        encoding="utf-8",
    )
    keys = [problem.key for problem in config_problems(read_config(path))]
    assert keys == [
        "daemon.log_level",
        "katana.poll_interval",
        "daemon.concurrency",
        "metrics.listen",
        "tradegecko.token",
        "katana.token",
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "daemon.log_level"  # load_config stops at the first
    assert config_problems(read_config(path), require_tokens=False)[-1].key == "metrics.listen"
    assert config_problems(parse_config(TOKENS)) == []


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(TOKENS + '\n[daemon]\ndatabase = "/srv/syncd.db"\n', encoding="utf-8")
    config = load_config(path)
    assert config.daemon.database == "/srv/syncd.db"
    assert config.katana.token == "kt-file"


def test_load_config_on_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "syncd.toml"
    with pytest.raises(ConfigError, match="not found") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text("[daemon\nlog_level = 'info'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("token = ", require_tokens=False)


def test_errors_from_the_file_name_it(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text("[daemon]\nconcurrency = 'x'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, require_tokens=False)
    assert caught.value.key == "daemon.concurrency"
    assert str(path) in str(caught.value)
