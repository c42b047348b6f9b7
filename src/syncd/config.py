"""The daemon's configuration: one TOML file, tokens also from the environment or systemd.

A token or webhook secret is taken from, in order: the environment (``SYNCD_TRADEGECKO_TOKEN``,
``SYNCD_KATANA_TOKEN``, ...), a credential file (``tradegecko-token``, ``katana-token``, ...)
in ``$CREDENTIALS_DIRECTORY`` under systemd, else in ``/etc/syncd/credentials``
(``SYNCD_CREDENTIALS_DIRECTORY``), then the file's key. Every error names the key that is
wrong.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import msgspec

from syncd.errors import ConfigError

__all__ = [
    "CREDENTIALS",
    "DEFAULT_CONFIG",
    "DEFAULT_CREDENTIALS_DIRECTORY",
    "MAKE_TO_ORDER_MODES",
    "SUPPLIER_MATCHES",
    "Config",
    "DaemonConfig",
    "KatanaConfig",
    "MetricsConfig",
    "TradeGeckoConfig",
    "WebhooksConfig",
    "config_problems",
    "credentials_directory",
    "default_config_path",
    "load_config",
    "parse_config",
    "parse_listen",
    "read_config",
]


#: Where ``syncd`` and ``syncctl`` look for the config when none is named.
DEFAULT_CONFIG = "/etc/syncd/syncd.toml"
#: Where credentials are read outside systemd (``SYNCD_CREDENTIALS_DIRECTORY`` overrides).
DEFAULT_CREDENTIALS_DIRECTORY = "/etc/syncd/credentials"


def default_config_path() -> Path:
    """The config file to use when no ``--config`` is given: ``$SYNCD_CONFIG`` or
    ``/etc/syncd/syncd.toml``."""
    return Path(os.environ.get("SYNCD_CONFIG") or DEFAULT_CONFIG)


class DaemonConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    database: str = "/var/lib/syncd/syncd.db"
    log_level: str = "info"
    #: At most this many effects (imports, receipts) run at once.
    concurrency: int = 4
    #: Seconds between retries of an effect that failed for a passing reason, doubling.
    retry_initial: float = 5.0
    retry_max: float = 300.0
    #: Seconds the start-up check keeps retrying a service that fails for a passing reason
    #: (5xx, timeout, cut body); a refusal (401, 404) ends the start at once.
    start_timeout: float = 60.0
    statechart: str | None = None


class TradeGeckoConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    base_url: str = "https://api.tradegecko.com"
    token: str = ""
    supplier_name: str = "Katana"
    #: How a supplier's name must match ``supplier_name``: ``exact``, ``casefold`` (ignoring
    #: case and surrounding spaces) or ``prefix`` (case-folded, e.g. "Katana MRP Ltd").
    supplier_match: str = "exact"
    poll_interval: float = 30.0
    rate_limit: int = 300
    rate_period: float = 300.0
    #: Seconds a request may take before it counts as failed (retried when safe).
    timeout: float = 30.0


class KatanaConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    base_url: str = "https://api.katanamrp.com/v1"
    token: str = ""
    customer_name: str = "Tradegecko"
    #: Katana customer ``reference_id`` that marks the customer syncd made, even if renamed.
    customer_reference: str = "syncd-tradegecko"
    order_no_prefix: str = "TG-"
    #: ``manual``: a person presses "Make to order" in Katana; ``auto``: syncd makes a
    #: manufacturing order for each row with a recipe once the sales order exists.
    make_to_order: str = "manual"
    #: With ``auto``: Katana also makes orders for the subassemblies.
    create_subassemblies: bool = False
    poll_interval: float = 30.0
    rate_limit: int = 60
    rate_period: float = 60.0
    timeout: float = 30.0


class MetricsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The Prometheus endpoint (``/metrics``)."""

    enabled: bool = True
    #: ``host:port`` to serve on; ``[::1]:9464`` for IPv6; port 0 picks a free one.
    listen: str = "127.0.0.1:9464"
    #: Seconds between refreshes of the gauges read from the database.
    refresh_interval: float = 5.0

    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` of :attr:`listen`."""
        return parse_listen(self.listen)


class WebhooksConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The webhook listener: near-instant sync; the pollers then only reconcile.

    Secrets (``tradegecko_secret``, ``katana_token``, ``path_token``) are also read from
    ``SYNCD_TRADEGECKO_WEBHOOK_SECRET``, ``SYNCD_KATANA_WEBHOOK_TOKEN``,
    ``SYNCD_WEBHOOK_PATH_TOKEN`` or the systemd credentials ``tradegecko-webhook-secret``,
    ``katana-webhook-token``, ``webhook-path-token``.
    """

    enabled: bool = False
    #: ``host:port`` the listener binds; port 0 picks a free one.
    listen: str = "127.0.0.1:8780"
    #: The ``https://`` address the services reach the listener at (a reverse proxy); empty
    #: means the listener's own address (tests, the demo).
    public_base_url: str = ""
    #: The OAuth application secret that signs TradeGecko's deliveries.
    tradegecko_secret: str = ""
    #: The Katana webhook's token, when it was registered by hand; registration keeps the
    #: token Katana returns in the database.
    katana_token: str = ""
    #: The unguessable last segment of Katana's webhook path; generated and kept in the
    #: database when empty.
    path_token: str = ""
    #: Bodies larger than this are refused with 413.
    max_body_bytes: int = 65536
    #: Seconds between polls while webhooks are healthy (the pollers only reconcile).
    reconcile_interval: float = 300.0
    #: Make sure the webhooks exist on both services at start (``syncd run --no-register``).
    register: bool = True
    #: Check ``X-Gecko-Signature`` and ``X-Sha2-Signature``; ``false`` (behind a proxy that
    #: verifies, or for tests) accepts unsigned deliveries and logs a warning at every start.
    verify_signatures: bool = True
    #: Seconds a TradeGecko delivery's ``timestamp`` may be old (4 days: TradeGecko retries
    #: for up to 3); older, or more than 5 minutes ahead, is refused with 401. A delivery
    #: without a timestamp is accepted.
    replay_window: float = 345600.0

    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` of :attr:`listen`."""
        return parse_listen(self.listen, key="webhooks.listen")


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    tradegecko: TradeGeckoConfig = msgspec.field(default_factory=TradeGeckoConfig)
    katana: KatanaConfig = msgspec.field(default_factory=KatanaConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)

    def statechart_conditions(self) -> frozenset[str]:
        """The statechart's conditions this configuration makes hold (see ``[conditions]``
        in ``statecharts/linked_order.toml``)."""
        return frozenset({"make_to_order_auto"} if self.katana.make_to_order == "auto" else ())


_LOG_LEVELS = {"debug", "info", "warning", "error"}
#: The ways ``tradegecko.supplier_match`` compares supplier names.
SUPPLIER_MATCHES = ("exact", "casefold", "prefix")
#: The values of ``katana.make_to_order``.
MAKE_TO_ORDER_MODES = ("manual", "auto")
_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def _key_from_msgspec(message: str) -> str | None:
    match = _PATH_RE.search(message)
    # An unknown top-level table has no path: msgspec says only "unknown field `x`".
    key = match.group(1) if match else ""
    unknown = re.search(r"unknown field `([^`]+)`", message)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
    return key or None


def parse_listen(value: str, *, key: str = "metrics.listen") -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` → ``(host, port)``.

    :raises ConfigError: not a ``host:port`` with a port in 0..65535.
    """
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if match is None or int(match.group(2) or match.group(4)) > 65535:
        raise ConfigError(f"must be host:port, got {value!r}", key=key)
    return (match.group(1) or match.group(3)), int(match.group(2) or match.group(4))


#: Every secret read from outside the file: credential name -> (environment variable, key).
CREDENTIALS: dict[str, tuple[str, str]] = {
    "tradegecko-token": ("SYNCD_TRADEGECKO_TOKEN", "tradegecko.token"),
    "katana-token": ("SYNCD_KATANA_TOKEN", "katana.token"),
    "tradegecko-webhook-secret": ("SYNCD_TRADEGECKO_WEBHOOK_SECRET", "webhooks.tradegecko_secret"),
    "katana-webhook-token": ("SYNCD_KATANA_WEBHOOK_TOKEN", "webhooks.katana_token"),
    "webhook-path-token": ("SYNCD_WEBHOOK_PATH_TOKEN", "webhooks.path_token"),
}


def credentials_directory() -> Path:
    """Where credentials are read outside systemd: ``$SYNCD_CREDENTIALS_DIRECTORY`` or
    ``/etc/syncd/credentials`` (the files the unit's ``LoadCredential=`` lines name)."""
    return Path(os.environ.get("SYNCD_CREDENTIALS_DIRECTORY") or DEFAULT_CREDENTIALS_DIRECTORY)


def _read_secret(env: str, credential: str, *, key: str, required: bool) -> str | None:
    """The secret from ``$env``, else the credential file, else ``None`` (the file's key).

    Under systemd (``$CREDENTIALS_DIRECTORY`` set) only the unit's credentials count: the
    host's directory is root's and unreadable by the service's dynamic user. Elsewhere
    (``syncd check`` run by hand) the host's directory stands in for it. An empty value
    counts as none, so that the unit's empty ``SetCredential=`` defaults fall through.

    :raises ConfigError: the credential file exists but cannot be read (when ``required``).
    """
    value = os.environ.get(env, "").strip()
    if value:
        return value
    systemd = os.environ.get("CREDENTIALS_DIRECTORY")
    file = (Path(systemd) if systemd else credentials_directory()) / credential
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        if not required:  # syncctl reads the config for the database path only
            return None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        hint = " (run as root?)" if isinstance(exc, PermissionError) else ""
        raise ConfigError(f"cannot read credential {file}: {reason}{hint}", key=key) from None
    return text or None


def _decode(text: str, *, source: str, require_tokens: bool) -> Config:
    """TOML and types only; then the secrets from the environment or credentials."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        message = str(exc)
        key = _key_from_msgspec(message)
        reason = message.split(" - at ")[0]
        raise ConfigError(f"{reason} (in {source})", key=key) from None

    for credential, (env, key) in CREDENTIALS.items():
        table, attribute = key.split(".")
        section = getattr(config, table)
        secret = _read_secret(env, credential, key=key, required=require_tokens)
        if secret:
            setattr(section, attribute, secret)
    return config


def config_problems(config: Config, *, require_tokens: bool = True) -> list[ConfigError]:
    """Every value of a decoded config that is wrong, in file order; empty when it is right."""
    problems: list[ConfigError] = []
    tg, kt, daemon, hooks = config.tradegecko, config.katana, config.daemon, config.webhooks

    def problem(message: str, key: str) -> None:
        problems.append(ConfigError(message, key=key))

    if daemon.log_level not in _LOG_LEVELS:
        problem(f"must be one of {sorted(_LOG_LEVELS)}", "daemon.log_level")
    for key, url in (("tradegecko.base_url", tg.base_url), ("katana.base_url", kt.base_url)):
        if not re.match(r"^https?://[^/\s]+", url):
            problem(f"must be an http(s) URL, got {url!r}", key)
    for key, number in (
        ("daemon.retry_initial", daemon.retry_initial),
        ("daemon.retry_max", daemon.retry_max),
        ("daemon.start_timeout", daemon.start_timeout),
        ("tradegecko.poll_interval", tg.poll_interval),
        ("tradegecko.rate_period", tg.rate_period),
        ("tradegecko.timeout", tg.timeout),
        ("katana.poll_interval", kt.poll_interval),
        ("katana.rate_period", kt.rate_period),
        ("katana.timeout", kt.timeout),
        ("metrics.refresh_interval", config.metrics.refresh_interval),
        ("webhooks.reconcile_interval", hooks.reconcile_interval),
        ("webhooks.replay_window", hooks.replay_window),
    ):
        if number <= 0:
            problem(f"must be a positive number of seconds, got {number}", key)
    for key, count in (
        ("daemon.concurrency", daemon.concurrency),
        ("tradegecko.rate_limit", tg.rate_limit),
        ("katana.rate_limit", kt.rate_limit),
    ):
        if count < 1:
            problem(f"must be at least 1, got {count}", key)
    if not tg.supplier_name.strip():
        problem("must name the supplier", "tradegecko.supplier_name")
    if tg.supplier_match not in SUPPLIER_MATCHES:
        problem(
            f"must be one of {', '.join(SUPPLIER_MATCHES)}, got {tg.supplier_match!r}",
            "tradegecko.supplier_match",
        )
    if not kt.customer_name.strip():
        problem("must name the customer", "katana.customer_name")
    if kt.make_to_order not in MAKE_TO_ORDER_MODES:
        problem(
            f"must be one of {', '.join(MAKE_TO_ORDER_MODES)}, got {kt.make_to_order!r}",
            "katana.make_to_order",
        )
    for listen in (config.metrics.address, hooks.address):
        try:
            listen()
        except ConfigError as exc:
            problems.append(exc)
    if hooks.public_base_url and not re.match(r"^https?://[^/\s]+", hooks.public_base_url):
        problem(
            f"must be an http(s) URL, got {hooks.public_base_url!r}", "webhooks.public_base_url"
        )
    if hooks.max_body_bytes < 1024:
        problem(f"must be at least 1024, got {hooks.max_body_bytes}", "webhooks.max_body_bytes")
    if require_tokens:
        for key, value, env, credential in (
            ("tradegecko.token", tg.token, "SYNCD_TRADEGECKO_TOKEN", "tradegecko-token"),
            ("katana.token", kt.token, "SYNCD_KATANA_TOKEN", "katana-token"),
        ):
            if not value:
                problem(_nowhere("token", env, credential), key)
        if hooks.enabled and hooks.verify_signatures and not hooks.tradegecko_secret:
            problem(
                _nowhere("secret", "SYNCD_TRADEGECKO_WEBHOOK_SECRET", "tradegecko-webhook-secret"),
                "webhooks.tradegecko_secret",
            )
    return problems


def _nowhere(what: str, env: str, credential: str) -> str:
    return (
        f"no {what}: set it here, in {env}, or as the credential {credential} "
        f"($CREDENTIALS_DIRECTORY under systemd, else {credentials_directory()})"
    )


def parse_config(text: str, *, source: str = "<config>", require_tokens: bool = True) -> Config:
    """Parse and check configuration text.

    :raises ConfigError: naming the key that is wrong (the first, when several are).
    """
    config = _decode(text, source=source, require_tokens=require_tokens)
    problems = config_problems(config, require_tokens=require_tokens)
    if problems:
        raise problems[0]
    return config


def read_config(path: str | Path) -> Config:
    """Read the TOML file at ``path`` without checking its values: for ``syncd check``,
    which lists every problem (:func:`config_problems`) rather than the first.

    :raises ConfigError: the file is missing or unreadable, not TOML, or of the wrong shape.
    """
    file = Path(path)
    return _decode(_read_text(file), source=str(file), require_tokens=True)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None


def load_config(path: str | Path, *, require_tokens: bool = True) -> Config:
    """Read the TOML file at ``path``.

    :raises ConfigError: the file is missing or unreadable, or a key is wrong.
    """
    file = Path(path)
    return parse_config(_read_text(file), source=str(file), require_tokens=require_tokens)
