"""The configuration file: defaults, every error naming its key, and where tokens come from."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from syncd.config import (
    DEFAULT_FACTORY,
    LIVE_SETTINGS,
    RETRY,
    Config,
    ConfigChange,
    FactoryWebhooks,
    KatanaConfig,
    TradeGeckoConfig,
    WebhooksConfig,
    config_change,
    config_problems,
    factory_credentials,
    load_config,
    parse_config,
    read_config,
    reload_config,
)
from syncd.errors import ConfigError, RetryPolicy

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
    assert (config.daemon.lease_ttl, config.daemon.lease_renew) == (10.0, 3.0)
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
    assert (config.katana.reserve, config.tradegecko.reserve) == (10, 30)
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
        pytest.param("[daemon]\nretry_settle = -1", "daemon.retry_settle", id="negative-settle"),
        pytest.param(
            "[metrics]\nrefresh_interval = 0", "metrics.refresh_interval", id="zero-refresh"
        ),
        pytest.param("[katana]\nrate_limit = 0", "katana.rate_limit", id="zero-rate-limit"),
        pytest.param(
            "[tradegecko]\nrate_limit = 0", "tradegecko.rate_limit", id="zero-rate-limit-tg"
        ),
        pytest.param("[katana]\nreserve = 60", "katana.reserve", id="reserve-whole-limit"),
        pytest.param("[tradegecko]\nreserve = -1", "tradegecko.reserve", id="negative-reserve"),
        pytest.param("[katana]\nrate_limit = 8", "katana.reserve", id="limit-below-reserve"),
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
    # The daemon's keys first, then each factory's.
    assert keys == [
        "daemon.log_level",
        "daemon.concurrency",
        "metrics.listen",
        "katana.poll_interval",
        "tradegecko.token",
        "katana.token",
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "daemon.log_level"  # load_config stops at the first
    assert (
        config_problems(read_config(path), require_tokens=False)[-1].key == "katana.poll_interval"
    )
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


# -- factories ----------------------------------------------------------------------------

TWO_FACTORIES = """
[tradegecko]
supplier_name = "Katana MRP"
poll_interval = 10.0

[katana]
order_no_prefix = "TG-"

[factories.north-mill.tradegecko]
token = "tg-north"
[factories.north-mill.katana]
token = "kt-north"
order_no_prefix = "NM-"

[factories.acme.tradegecko]
token = "tg-acme"
supplier_name = "Katana (Acme)"
[factories.acme.katana]
token = "kt-acme"
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _read(tmp_path: Path, text: str) -> Config:
    """The config of ``text``, its values not checked (as ``syncd check`` reads it)."""
    return read_config(_write(tmp_path / "syncd.toml", text))


def _keys(config: Config, *, require_tokens: bool = True) -> list[str | None]:
    return [problem.key for problem in config_problems(config, require_tokens=require_tokens)]


def test_todays_file_is_the_one_factory_default() -> None:
    config = parse_config(TOKENS + '[webhooks]\npath_token = "p"\n')
    assert list(config.factories) == [DEFAULT_FACTORY] == ["default"]
    factory = config.factories["default"]
    # The same settings the single-factory runtime reads from config.tradegecko/katana.
    assert factory.tradegecko is config.tradegecko
    assert factory.katana is config.katana
    assert factory.webhooks == FactoryWebhooks(path_token="p")
    assert (factory.file, factory.key_prefix, factory.where()) == ("", "", "the top level")


def test_a_config_built_in_code_is_the_factory_default() -> None:
    # The tests and the demo build Config(...) directly: it has its one factory too.
    config = Config(
        tradegecko=TradeGeckoConfig(token="t"),
        katana=KatanaConfig(token="k"),
        webhooks=WebhooksConfig(tradegecko_secret="s"),
    )
    assert list(config.factories) == ["default"]
    assert config.factories["default"].katana is config.katana
    assert config.factories["default"].webhooks.tradegecko_secret == "s"
    assert config_problems(config) == []


def test_factory_tables_take_the_top_levels_keys_as_defaults() -> None:
    config = parse_config(TWO_FACTORIES)
    # No top-level token: the top-level tables are only defaults, not a factory.
    assert list(config.factories) == ["north-mill", "acme"]  # the file's order
    north, acme = config.factories["north-mill"], config.factories["acme"]
    assert (north.tradegecko.token, north.katana.token) == ("tg-north", "kt-north")
    assert north.tradegecko.supplier_name == "Katana MRP"  # inherited
    assert north.tradegecko.poll_interval == 10.0
    assert north.katana.order_no_prefix == "NM-"  # its own
    assert acme.tradegecko.supplier_name == "Katana (Acme)"
    assert acme.katana.order_no_prefix == "TG-"
    assert acme.katana.rate_limit == 60  # the built-in default
    assert north.key_prefix == "factories.north-mill."
    assert north.where() == "[factories.north-mill]"
    # What the single-factory runtime reads is the first factory.
    assert config.tradegecko is north.tradegecko and config.katana is north.katana


def test_the_default_factory_stays_beside_others_while_it_has_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_tokens = TWO_FACTORIES.replace("[tradegecko]\n", '[tradegecko]\ntoken = "tg-file"\n', 1)
    config = parse_config(with_tokens.replace("[katana]\n", '[katana]\ntoken = "kt-file"\n', 1))
    assert list(config.factories) == ["default", "north-mill", "acme"]
    assert config.tradegecko.token == "tg-file"
    # A token from the environment keeps it too: today's daemon gains a second factory by
    # adding one, without moving its own.
    monkeypatch.setenv("SYNCD_TRADEGECKO_TOKEN", "tg-env")
    monkeypatch.setenv("SYNCD_KATANA_TOKEN", "kt-env")
    config = parse_config(TWO_FACTORIES)
    assert list(config.factories) == ["default", "north-mill", "acme"]
    assert config.factories["default"].katana.token == "kt-env"


def test_a_factory_never_inherits_a_token(tmp_path: Path) -> None:
    config = _read(tmp_path, TOKENS + "[factories.acme.katana]\ntoken = 'kt-acme'\n")
    assert config.factories["acme"].tradegecko.token == ""
    problem = config_problems(config)[0]
    assert problem.key == "factories.acme.tradegecko.token"
    assert "SYNCD_ACME_TRADEGECKO_TOKEN" in str(problem)
    assert "acme-tradegecko-token" in str(problem)


def test_an_explicit_default_factory_table_uses_todays_credential_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SYNCD_KATANA_TOKEN", "kt-env")
    config = _read(
        tmp_path, "[factories.default.tradegecko]\ntoken = 'tg'\n[factories.default.katana]\n"
    )
    # The environment's token makes the top level a factory "default": two of that name.
    assert _keys(config)[0] == "factories.default"
    assert "already the top-level" in str(config_problems(config)[0])
    monkeypatch.delenv("SYNCD_KATANA_TOKEN")
    monkeypatch.setenv("SYNCD_TRADEGECKO_TOKEN", "")  # empty counts as none
    config = _read(tmp_path, "[factories.default.tradegecko]\ntoken = 'tg'\n")
    assert list(config.factories) == ["default"]
    assert "SYNCD_KATANA_TOKEN" in str(config_problems(config)[0])


def test_factories_d_beside_the_config_file(tmp_path: Path) -> None:
    main = _write(tmp_path / "syncd.toml", '[katana]\ncustomer_name = "Gecko"\n')
    folder = tmp_path / "factories.d"
    _write(folder / "zeta.toml", '[tradegecko]\ntoken = "tg-z"\n[katana]\ntoken = "kt-z"\n')
    _write(
        folder / "acme.toml",
        '[tradegecko]\ntoken = "tg-a"\n[katana]\ntoken = "kt-a"\norder_no_prefix = "AC-"\n'
        '[webhooks]\npath_token = "acme-path"\n',
    )
    # Not factories: other suffixes (a way to switch one off), hidden files, backups.
    _write(folder / "old.toml.off", "not toml at all [")
    _write(folder / ".acme.toml.swp", "not toml at all [")
    _write(folder / "acme.toml~", "not toml at all [")
    _write(folder / "README", "one NAME.toml per factory")
    config = load_config(main)
    assert list(config.factories) == ["acme", "zeta"]  # by file name
    acme = config.factories["acme"]
    assert acme.katana.order_no_prefix == "AC-"
    assert acme.katana.customer_name == "Gecko"  # the main file's default
    assert acme.webhooks.path_token == "acme-path"
    assert acme.file == str(folder / "acme.toml") == acme.where()
    assert acme.key_prefix == ""


def test_tables_and_files_together_tables_first(tmp_path: Path) -> None:
    main = _write(
        tmp_path / "syncd.toml",
        TOKENS + "[factories.mid.tradegecko]\ntoken = 'tg-m'\n"
        "[factories.mid.katana]\ntoken = 'kt-m'\n",
    )
    _write(
        tmp_path / "factories.d" / "aaa.toml",
        "[tradegecko]\ntoken='tg-a'\n[katana]\ntoken='kt-a'\n",
    )
    assert list(load_config(main).factories) == ["default", "mid", "aaa"]


def test_a_wrong_key_in_a_factory_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    main = _write(tmp_path / "syncd.toml", "")
    acme = _write(
        tmp_path / "factories.d" / "acme.toml",
        "[tradegecko]\ntoken = 'tg'\n[katana]\ntoken = 'kt'\norder_no_prefix = 5\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert caught.value.key == "katana.order_no_prefix"
    assert str(caught.value).startswith(f"{acme}: katana.order_no_prefix: Expected `str`")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[katana]\ntokn = 'x'", "katana.tokn", id="unknown-key"),
        pytest.param("[katna]\ntoken = 'x'", "katna", id="unknown-table"),
        pytest.param("[katana]\npoll_interval = 0", "katana.poll_interval", id="zero-interval"),
        pytest.param("[katana]\nbase_url = 'ftp://k'", "katana.base_url", id="bad-url"),
        pytest.param("[tradegecko]\nrate_limit = 0", "tradegecko.rate_limit", id="rate-limit"),
        pytest.param(
            "[tradegecko]\nsupplier_match = 'fuzzy'", "tradegecko.supplier_match", id="match"
        ),
        pytest.param("[webhooks]\nlisten = ':1'", "webhooks.listen", id="daemon-wide-key"),
    ],
)
def test_every_factory_error_names_its_key_in_a_table_or_its_file(
    tmp_path: Path, text: str, key: str
) -> None:
    tokens = "\n[tradegecko]\ntoken = 'tg'\n[katana]\ntoken = 'kt'\n"
    # The same text as a table of the main file and as a file of its own.
    table = "\n".join(
        line.replace("[", "[factories.acme.", 1) if line.startswith("[") else line
        for line in (text + tokens).splitlines()
    )
    # TOML refuses a table twice: the tokens go into the same tables where they meet.
    in_main = _write(tmp_path / "a" / "syncd.toml", _merge_tables(table))
    problems = config_problems(read_config(in_main), require_tokens=False)
    assert [p.key for p in problems] == [f"factories.acme.{key}"], problems
    in_dir = _write(tmp_path / "b" / "factories.d" / "acme.toml", _merge_tables(text + tokens))
    problems = config_problems(read_config(_write(tmp_path / "b" / "syncd.toml", "")))
    assert [p.key for p in problems] == [key], problems
    assert str(problems[0]).startswith(f"{in_dir}: {key}: ")


def _merge_tables(text: str) -> str:
    """``[a]\\nx=1\\n[a]\\ny=2`` → one ``[a]`` with both keys."""
    tables: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line
            tables.setdefault(current, [])
        elif line.strip():
            tables.setdefault(current, []).append(line)
    return "\n".join(f"{name}\n" + "\n".join(lines) for name, lines in tables.items()) + "\n"


@pytest.mark.parametrize(
    ("name", "good"),
    [
        ("acme", True),
        ("0", True),
        ("north-mill-2", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("Acme", False),
        ("-acme", False),
        ("acme_mill", False),
        ("acme.mill", False),
        ("", False),
    ],
)
def test_a_factorys_name_is_a_slug(tmp_path: Path, name: str, good: bool) -> None:
    tables = "[tradegecko]\ntoken = 'tg'\n[katana]\ntoken = 'kt'\n"
    main = _write(tmp_path / "syncd.toml", "")
    _write(tmp_path / "factories.d" / f"{name}.toml", tables)
    config = read_config(main)
    if good:
        assert list(config.factories) == [name]
        assert config_problems(config) == []
        return
    if name:  # ".toml" is a hidden file, not a factory
        assert config.factories == {}
        [problem] = config_problems(config)
        assert str(problem).startswith(f"{tmp_path / 'factories.d' / name}.toml: ")
        assert "must be a factory name" in str(problem)
    quoted = name.replace(".", "\\u002e")
    table = f'[factories."{quoted}".tradegecko]\ntoken = "tg"\n[factories."{quoted}".katana]\n'
    with pytest.raises(ConfigError, match="a factory's name must be") as caught:
        parse_config(table, require_tokens=False)
    assert caught.value.key == f"factories.{name}"


def test_one_name_twice_is_refused_naming_both_places(tmp_path: Path) -> None:
    main = _write(
        tmp_path / "syncd.toml",
        "[factories.acme.tradegecko]\ntoken = 'tg-1'\n[factories.acme.katana]\ntoken = 'kt-1'\n",
    )
    twice = _write(tmp_path / "factories.d" / "acme.toml", "[tradegecko]\ntoken = 'tg-2'\n")
    config = read_config(main)
    assert list(config.factories) == ["acme"]
    assert config.factories["acme"].tradegecko.token == "tg-1"  # the table: it comes first
    [problem] = config_problems(config)
    assert str(problem) == (
        f"{twice}: the factory 'acme' is already defined by [factories.acme] in {main}"
    )


@pytest.mark.parametrize(
    ("service", "other", "token"),
    [("tradegecko", "katana", "tg-file"), ("katana", "tradegecko", "kt-file")],
)
def test_one_account_in_two_factories_is_refused(
    tmp_path: Path, service: str, other: str, token: str
) -> None:
    main = _write(tmp_path / "syncd.toml", TOKENS)  # the default factory's tokens
    twice = _write(
        tmp_path / "factories.d" / "acme.toml",
        f"[{service}]\ntoken = '{token}'\n[{other}]\ntoken = 'own'\n",
    )
    [problem] = config_problems(read_config(main))
    assert problem.key == f"{service}.token"
    label = {"tradegecko": "TradeGecko", "katana": "Katana"}[service]
    assert str(problem) == (
        f"{twice}: {service}.token: the same {label} token as the factory 'default': one "
        "account served twice would double every call"
    )
    assert "-file" not in str(problem)  # the token itself is never said


def test_per_factory_credentials_in_todays_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host_credentials: Path
) -> None:
    text = "[factories.north-mill.tradegecko]\ntoken = 'in-file'\n[factories.north-mill.katana]\n"
    text += "token = 'in-file'\n[factories.north-mill.webhooks]\npath_token = 'in-file'\n"

    def katana() -> str:
        return parse_config(text).factories["north-mill"].katana.token

    assert katana() == "in-file"
    # Today's names are the default factory's (which they make one): not north-mill's.
    (host_credentials / "katana-token").write_text("default's", encoding="utf-8")
    (host_credentials / "tradegecko-token").write_text("default's too", encoding="utf-8")
    assert katana() == "in-file"
    assert parse_config(text).factories["default"].katana.token == "default's"
    (host_credentials / "north-mill-katana-token").write_text("host", encoding="utf-8")
    assert katana() == "host"
    systemd = tmp_path / "run-credentials"
    systemd.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(systemd))
    assert katana() == "in-file"  # under systemd only the unit's credentials count
    (systemd / "north-mill-katana-token").write_text("systemd\n", encoding="utf-8")
    assert katana() == "systemd"
    monkeypatch.setenv("SYNCD_NORTH_MILL_KATANA_TOKEN", "env")
    assert katana() == "env"
    monkeypatch.setenv("SYNCD_NORTH_MILL_WEBHOOK_PATH_TOKEN", "path-env")
    assert parse_config(text).factories["north-mill"].webhooks.path_token == "path-env"


def test_each_factorys_credentials_have_names_of_their_own() -> None:
    names = ["default", "acme", "katana", "tradegecko", "webhook", "a-katana", "katana-webhook"]
    envs = [env for name in names for env, _ in factory_credentials(name).values()]
    credentials = [credential for name in names for credential in factory_credentials(name)]
    assert len(set(envs)) == len(envs) == 5 * len(names)
    assert len(set(credentials)) == len(credentials)
    assert factory_credentials("north-mill")["north-mill-katana-token"] == (
        "SYNCD_NORTH_MILL_KATANA_TOKEN",
        "katana.token",
    )


def test_the_tradegecko_app_secret_is_shared_and_the_path_token_is_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One OAuth application signs every account's deliveries.
    monkeypatch.setenv("SYNCD_TRADEGECKO_WEBHOOK_SECRET", "app-secret")
    text = (
        "[webhooks]\nenabled = true\npath_token = 'default-path'\n"
        "[factories.a.tradegecko]\ntoken = 'tg-a'\n[factories.a.katana]\ntoken = 'kt-a'\n"
        "[factories.b.tradegecko]\ntoken = 'tg-b'\n[factories.b.katana]\ntoken = 'kt-b'\n"
        "[factories.b.webhooks]\ntradegecko_secret = 'b-app'\n"
    )
    config = parse_config(text)
    a, b = config.factories["a"], config.factories["b"]
    assert (a.webhooks.tradegecko_secret, b.webhooks.tradegecko_secret) == ("app-secret", "b-app")
    assert a.webhooks.path_token == b.webhooks.path_token == ""
    monkeypatch.delenv("SYNCD_TRADEGECKO_WEBHOOK_SECRET")
    # With signatures checked, a factory without a secret is a problem of its own.
    assert _keys(parse_config(text, require_tokens=False), require_tokens=False) == []
    problems = config_problems(read_config(_write(tmp_path / "syncd.toml", text)))
    assert [p.key for p in problems] == ["factories.a.webhooks.tradegecko_secret"]
    assert "SYNCD_A_TRADEGECKO_WEBHOOK_SECRET" in str(problems[0])


def test_factories_dir_is_a_daemon_key_relative_to_the_config_file(tmp_path: Path) -> None:
    tables = "[tradegecko]\ntoken = 'tg'\n[katana]\ntoken = 'kt'\n"
    _write(tmp_path / "factories.d" / "beside.toml", tables)  # not used: another is named
    _write(tmp_path / "conf" / "mine" / "acme.toml", tables)
    main = _write(tmp_path / "conf" / "syncd.toml", "[daemon]\nfactories_dir = 'mine'\n")
    assert list(load_config(main).factories) == ["acme"]
    absolute = tmp_path / "conf" / "mine"
    main.write_text(f"[daemon]\nfactories_dir = '{absolute}'\n", encoding="utf-8")
    assert list(load_config(main).factories) == ["acme"]
    main.write_text("[daemon]\nfactories_dir = 'missing'\n" + TOKENS, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert caught.value.key == "daemon.factories_dir"
    assert str(caught.value) == (
        f"daemon.factories_dir: {tmp_path / 'conf' / 'missing'} does not exist"
    )
    main.write_text("[daemon]\nfactories_dir = 'syncd.toml'\n" + TOKENS, encoding="utf-8")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(main)


def test_an_empty_factories_d_leaves_todays_file_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "factories.d").mkdir()
    config = load_config(_write(tmp_path / "syncd.toml", TOKENS))
    assert list(config.factories) == ["default"]
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path / "syncd.toml", ""))
    assert caught.value.key == "tradegecko.token"  # today's error, as before


def test_every_factorys_problems_are_listed_and_one_broken_file_hides_none(
    tmp_path: Path,
) -> None:
    main = _write(
        tmp_path / "syncd.toml",
        "[daemon]\nconcurrency = 0\n"
        "[factories.table.tradegecko]\ntoken = 'tg-t'\n[factories.table.katana]\ntoken = 'kt-t'\n"
        "rate_limit = 0\n",
    )
    folder = tmp_path / "factories.d"
    broken = _write(folder / "broken.toml", "[katana\n")
    _write(folder / "fine.toml", "[tradegecko]\ntoken = 'tg-f'\n[katana]\ntoken = 'kt-f'\n")
    wrong = _write(folder / "wrong.toml", "[tradegecko]\npoll_interval = -1\n")
    config = read_config(main)
    assert list(config.factories) == ["table", "fine", "wrong"]
    messages = [str(problem) for problem in config_problems(config)]
    assert messages[0].startswith(f"{broken} is not valid TOML")
    assert messages[1] == "daemon.concurrency: must be at least 1, got 0"
    assert messages[2] == "factories.table.katana.rate_limit: must be at least 1, got 0"
    assert (
        messages[3]
        == f"{wrong}: tradegecko.poll_interval: must be a positive number of seconds, got -1.0"
    )
    assert messages[4].startswith(
        f"{wrong}: tradegecko.token: no token: set it here, in "
        "SYNCD_WRONG_TRADEGECKO_TOKEN, or as the credential wrong-tradegecko-token"
    )
    assert messages[5].startswith(f"{wrong}: katana.token: no token")
    assert len(messages) == 6
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(main)  # run stops at the first


def test_only_broken_factories_is_no_factory_at_all(tmp_path: Path) -> None:
    main = _write(tmp_path / "syncd.toml", "")
    _write(tmp_path / "factories.d" / "acme.toml", "[katana]\ntoken = 5\n")
    config = read_config(main)
    assert config.factories == {}
    # Not a "no token" for a default factory nobody wrote: only the file's own problem.
    assert _keys(config) == ["katana.token"]


def test_syncctl_reads_every_factory_without_tokens(tmp_path: Path) -> None:
    main = _write(tmp_path / "syncd.toml", "[factories.a.katana]\n[factories.b.katana]\n")
    assert list(load_config(main, require_tokens=False).factories) == ["a", "b"]


def test_for_factory_is_the_config_of_one_factory() -> None:
    config = parse_config(
        TWO_FACTORIES + "[webhooks]\nenabled = true\nverify_signatures = false\n"
        "[factories.acme.webhooks]\npath_token = 'acme-path'\n"
    )
    acme = config.for_factory("acme")
    assert list(acme.factories) == ["acme"]
    assert acme.tradegecko.token == "tg-acme" and acme.katana.token == "kt-acme"
    assert acme.webhooks.path_token == "acme-path"
    assert acme.webhooks.enabled is True  # the daemon's settings stay
    assert config.tradegecko.token == "tg-north"  # the config itself is left as it was
    with pytest.raises(KeyError):
        config.for_factory("nobody")


# -- reload -------------------------------------------------------------------------------

FACTORY = "[tradegecko]\ntoken = 'tg-{name}'\n[katana]\ntoken = 'kt-{name}'\n"


def _factories(tmp_path: Path, main: str = "", **files: str) -> Path:
    """The config file ``main`` beside a factories.d holding exactly ``files``."""
    folder = tmp_path / "factories.d"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, extra in files.items():
        _write(folder / f"{name}.toml", FACTORY.format(name=name) + extra)
    return _write(tmp_path / "syncd.toml", main)


def test_reload_says_which_factories_were_added_removed_and_changed(tmp_path: Path) -> None:
    path = _factories(tmp_path, a="", b="", c="")
    current = load_config(path)
    _factories(tmp_path, b="", c="order_no_prefix = 'C-'\n", d="")
    change = reload_config(path, current)
    assert (change.added, change.removed, change.changed) == (("d",), ("a",), ("c",))
    assert change.settings == change.needs_restart == ()
    assert list(change.config.factories) == ["b", "c", "d"]


def test_reload_sees_a_changed_key_and_a_changed_default(tmp_path: Path) -> None:
    path = _factories(tmp_path, a="", b="")
    current = load_config(path)
    (tmp_path / "factories.d" / "a.toml").write_text(
        FACTORY.format(name="a") + "order_no_prefix = 'A-'\n", encoding="utf-8"
    )
    change = reload_config(path, current)
    assert change.changed == ("a",)
    assert change.config.factories["a"].katana.order_no_prefix == "A-"
    # A default at the top level changes every factory that does not set the key itself.
    path.write_text("[katana]\norder_no_prefix = 'ALL-'\n", encoding="utf-8")
    change = reload_config(path, change.config)
    assert change.changed == ("b",)
    assert change.config.factories["b"].katana.order_no_prefix == "ALL-"


def test_a_token_from_a_credential_file_is_read_again(
    tmp_path: Path, host_credentials: Path
) -> None:
    path = _factories(tmp_path, a="")
    current = load_config(path)
    (host_credentials / "a-katana-token").write_text("rotated", encoding="utf-8")
    change = reload_config(path, current)
    assert change.changed == ("a",)
    assert change.config.factories["a"].katana.token == "rotated"


def test_reloading_the_same_files_changes_nothing(tmp_path: Path) -> None:
    path = _factories(tmp_path, TOKENS, a="")
    current = load_config(path)
    change = reload_config(path, current)
    assert change.empty
    assert (change.added, change.removed, change.changed) == ((), (), ())
    assert isinstance(change, ConfigChange) and change.config == current


def test_moving_a_factory_from_a_table_to_its_own_file_is_no_change(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "syncd.toml",
        "[factories.a.tradegecko]\ntoken = 'tg-a'\n[factories.a.katana]\ntoken = 'kt-a'\n",
    )
    current = load_config(path)
    _factories(tmp_path, a="")
    assert reload_config(path, current).empty


def test_todays_daemon_gains_a_factory_and_keeps_its_own(tmp_path: Path) -> None:
    path = _write(tmp_path / "syncd.toml", TOKENS)
    current = load_config(path)
    _factories(tmp_path, TOKENS, acme="")
    change = reload_config(path, current)
    assert (change.added, change.removed, change.changed) == (("acme",), (), ())
    assert list(change.config.factories) == ["default", "acme"]


def test_live_settings_are_reported_and_applied_without_a_restart(tmp_path: Path) -> None:
    path = _factories(tmp_path, TOKENS)
    current = load_config(path)
    path.write_text(
        TOKENS + "[daemon]\nlog_level = 'debug'\nstart_timeout = 5.0\n", encoding="utf-8"
    )
    change = reload_config(path, current)
    assert change.settings == ("daemon.log_level", "daemon.start_timeout")
    assert set(change.settings) <= LIVE_SETTINGS
    assert not change.empty and change.added == change.changed == ()


@pytest.mark.parametrize(
    ("table", "line", "key"),
    [
        ("daemon", "database = '/elsewhere.db'", "daemon.database"),
        ("daemon", "concurrency = 9", "daemon.concurrency"),
        ("daemon", "retry_max = 60.0", "daemon.retry_max"),
        ("metrics", "listen = '127.0.0.1:9999'", "metrics.listen"),
        ("webhooks", "listen = '127.0.0.1:9999'", "webhooks.listen"),
        ("webhooks", "enabled = true\nverify_signatures = false", "webhooks.enabled"),
    ],
)
def test_a_daemon_wide_key_that_needs_a_restart_is_refused_naming_it(
    tmp_path: Path, table: str, line: str, key: str
) -> None:
    path = _factories(tmp_path, TOKENS, acme="")
    current = load_config(path)
    _factories(tmp_path, TOKENS + f"[{table}]\n{line}\n", acme="", added="")
    with pytest.raises(ConfigError) as caught:
        reload_config(path, current)
    assert caught.value.key == key
    assert "needs a restart" in str(caught.value)
    assert "nothing was reloaded" in str(caught.value)
    # What it would have done is still computed, for a log line that says so.
    change = config_change(current, read_config(path))
    assert change.added == ("added",)
    assert key in change.needs_restart


def test_every_key_that_needs_a_restart_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "syncd.toml", TOKENS)
    current = load_config(path)
    path.write_text(TOKENS + "[daemon]\nconcurrency = 9\ndatabase = 'x.db'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        reload_config(path, current)
    assert str(caught.value) == (
        "daemon.database: changed: it needs a restart of syncd (so do daemon.concurrency); "
        "nothing was reloaded"
    )


def test_a_reload_with_problems_is_refused_and_says_how_many(tmp_path: Path) -> None:
    path = _factories(tmp_path, TOKENS, a="")
    current = load_config(path)
    _factories(tmp_path, TOKENS, a="rate_limit = 0\n", b="timeout = 0\n", c="[broken\n")
    with pytest.raises(ConfigError) as caught:
        reload_config(path, current)
    assert str(caught.value).startswith(f"{tmp_path / 'factories.d' / 'c.toml'} is not valid TOML")
    assert str(caught.value).endswith(
        "(and 2 more: `syncd check` lists them); nothing was reloaded"
    )
    # The same account added twice is a problem like any other.
    _factories(tmp_path, TOKENS, a="", b="")
    (tmp_path / "factories.d" / "b.toml").write_text(FACTORY.format(name="a"), encoding="utf-8")
    with pytest.raises(ConfigError, match="one account served twice") as twice:
        reload_config(path, current)
    assert twice.value.key == "tradegecko.token"
    path.unlink()
    with pytest.raises(ConfigError, match="config file not found"):
        reload_config(path, current)


def test_the_example_configs_factory_is_valid_once_uncommented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    example = (Path(__file__).parents[1] / "systemd" / "syncd.toml.example").read_text()
    lines = [
        line.removeprefix("# ")
        if line.startswith(("# [factories.", "# supplier_name", "# order_no_prefix"))
        else line
        for line in example.splitlines()
    ]
    for variable in ("TRADEGECKO", "KATANA", "NORTH_MILL_TRADEGECKO", "NORTH_MILL_KATANA"):
        monkeypatch.setenv(f"SYNCD_{variable}_TOKEN", f"{variable.lower()}-token")
    config = parse_config("\n".join(lines))
    assert list(config.factories) == ["default", "north-mill"]
    north = config.factories["north-mill"]
    assert north.katana.order_no_prefix == "NM-"
    assert north.tradegecko.supplier_name == "Katana (North Mill)"
    assert north.tradegecko.supplier_match == "exact"  # the top level's


def test_the_lease_keys_are_positive_and_renew_well_before_the_ttl() -> None:
    config = parse_config("[daemon]\nlease_ttl = 30\nlease_renew = 10\n", require_tokens=False)
    assert (config.daemon.lease_ttl, config.daemon.lease_renew) == (30.0, 10.0)
    assert not config_problems(config, require_tokens=False)
    for toml, says in (
        ("lease_ttl = 0", "daemon.lease_ttl: must be a positive number of seconds, got 0.0"),
        ("lease_renew = -1", "daemon.lease_renew: must be a positive number of seconds, got -1.0"),
        (
            "lease_ttl = 10\nlease_renew = 5",
            "daemon.lease_renew: must be less than half of daemon.lease_ttl (10.0), got 5.0",
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(f"[daemon]\n{toml}\n", require_tokens=False)
        assert str(caught.value) == says


def test_every_retry_policy_is_in_one_place_and_the_daemon_keys_set_the_effects() -> None:
    config = parse_config(
        "[daemon]\nretry_initial = 0.5\nretry_max = 8\nretry_settle = 2\n", require_tokens=False
    )
    policies = config.retry()
    assert policies.effect == RetryPolicy(initial=0.5, maximum=8.0, settle=2.0)
    assert RETRY.effect.settle == 5.0
    assert policies._replace(effect=RETRY.effect) == RETRY  # the rest as shipped
    assert RETRY.request.attempts == 5 and RETRY.effect.attempts is None


def test_the_restart_keys_set_the_factories_restart_policy_and_are_checked() -> None:
    config = parse_config("[daemon]\nrestart_initial = 2\nrestart_max = 60\n", require_tokens=False)
    assert config.retry().restart == RetryPolicy(initial=2.0, maximum=60.0)
    assert RETRY.restart == RetryPolicy(initial=5.0, maximum=300.0)  # 5 s doubling to 5 min
    assert RETRY.restart.attempts is None  # a factory is never given up on
    for toml, says in (
        (
            "restart_initial = 0",
            "daemon.restart_initial: must be a positive number of seconds, got 0.0",
        ),
        ("restart_max = -1", "daemon.restart_max: must be a positive number of seconds, got -1.0"),
        (
            "restart_initial = 10\nrestart_max = 5",
            "daemon.restart_max: must be at least daemon.restart_initial (10.0), got 5.0",
        ),
        ('restart_max = "soon"', "daemon.restart_max"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(f"[daemon]\n{toml}\n", require_tokens=False)
        assert str(caught.value).startswith(says), str(caught.value)


def test_a_copy_with_other_service_settings_changes_the_default_factory() -> None:
    # Tests and the bench copy configs with msgspec.structs.replace: the top-level tables
    # are the default factory's, so the copy's factory follows (it once kept the old ones).
    config = parse_config(TOKENS)
    faster = msgspec.structs.replace(
        config, katana=msgspec.structs.replace(config.katana, rate_limit=7)
    )
    assert faster.katana.rate_limit == 7
    assert faster.factories["default"].katana.rate_limit == 7
    assert config.factories["default"].katana.rate_limit == 60  # the original is untouched
