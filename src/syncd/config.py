"""The daemon's configuration: one TOML file, tokens also from the environment or systemd.

A token is taken from, in order: the environment (``SYNCD_TRADEGECKO_TOKEN``,
``SYNCD_KATANA_TOKEN``), a systemd credential (``$CREDENTIALS_DIRECTORY/tradegecko-token``,
``katana-token``), then the file's ``token`` key. Every error names the key that is wrong.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import msgspec

from syncd.errors import ConfigError

__all__ = [
    "Config",
    "DaemonConfig",
    "KatanaConfig",
    "MetricsConfig",
    "TradeGeckoConfig",
    "WebhooksConfig",
    "default_config_path",
    "load_config",
    "parse_config",
]


#: Where ``syncd`` and ``syncctl`` look for the config when none is named.
DEFAULT_CONFIG = "/etc/syncd/syncd.toml"


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


_LOG_LEVELS = {"debug", "info", "warning", "error"}
#: The ways ``tradegecko.supplier_match`` compares supplier names.
SUPPLIER_MATCHES = ("exact", "casefold", "prefix")
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


def _read_secret(env: str, credential: str) -> str | None:
    value = os.environ.get(env)
    if value:
        return value.strip()
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / credential
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
    return None


def parse_config(text: str, *, source: str = "<config>", require_tokens: bool = True) -> Config:
    """Parse and check configuration text.

    :raises ConfigError: naming the key that is wrong.
    """
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

    tg, kt, daemon = config.tradegecko, config.katana, config.daemon
    tg.token = _read_secret("SYNCD_TRADEGECKO_TOKEN", "tradegecko-token") or tg.token
    kt.token = _read_secret("SYNCD_KATANA_TOKEN", "katana-token") or kt.token
    hooks = config.webhooks
    hooks.tradegecko_secret = (
        _read_secret("SYNCD_TRADEGECKO_WEBHOOK_SECRET", "tradegecko-webhook-secret")
        or hooks.tradegecko_secret
    )
    hooks.katana_token = (
        _read_secret("SYNCD_KATANA_WEBHOOK_TOKEN", "katana-webhook-token") or hooks.katana_token
    )
    hooks.path_token = (
        _read_secret("SYNCD_WEBHOOK_PATH_TOKEN", "webhook-path-token") or hooks.path_token
    )
    hooks.address()
    if hooks.public_base_url and not re.match(r"^https?://[^/\s]+", hooks.public_base_url):
        raise ConfigError(
            f"must be an http(s) URL, got {hooks.public_base_url!r}",
            key="webhooks.public_base_url",
        )
    if hooks.max_body_bytes < 1024:
        raise ConfigError(
            f"must be at least 1024, got {hooks.max_body_bytes}", key="webhooks.max_body_bytes"
        )
    if hooks.reconcile_interval <= 0:
        raise ConfigError(
            f"must be a positive number of seconds, got {hooks.reconcile_interval}",
            key="webhooks.reconcile_interval",
        )
    if hooks.replay_window <= 0:
        raise ConfigError(
            f"must be a positive number of seconds, got {hooks.replay_window}",
            key="webhooks.replay_window",
        )
    needs_secret = hooks.enabled and require_tokens and hooks.verify_signatures
    if needs_secret and not hooks.tradegecko_secret:
        raise ConfigError(
            "no secret: set it here, in SYNCD_TRADEGECKO_WEBHOOK_SECRET, or as the systemd "
            "credential tradegecko-webhook-secret",
            key="webhooks.tradegecko_secret",
        )

    for key, url in (("tradegecko.base_url", tg.base_url), ("katana.base_url", kt.base_url)):
        if not re.match(r"^https?://[^/\s]+", url):
            raise ConfigError(f"must be an http(s) URL, got {url!r}", key=key)
    for key, number in (
        ("tradegecko.poll_interval", tg.poll_interval),
        ("katana.poll_interval", kt.poll_interval),
        ("tradegecko.rate_period", tg.rate_period),
        ("katana.rate_period", kt.rate_period),
        ("daemon.retry_initial", daemon.retry_initial),
        ("tradegecko.timeout", tg.timeout),
        ("katana.timeout", kt.timeout),
        ("daemon.retry_max", daemon.retry_max),
        ("daemon.start_timeout", daemon.start_timeout),
        ("metrics.refresh_interval", config.metrics.refresh_interval),
    ):
        if number <= 0:
            raise ConfigError(f"must be a positive number of seconds, got {number}", key=key)
    for key, count in (
        ("tradegecko.rate_limit", tg.rate_limit),
        ("katana.rate_limit", kt.rate_limit),
        ("daemon.concurrency", daemon.concurrency),
    ):
        if count < 1:
            raise ConfigError(f"must be at least 1, got {count}", key=key)
    config.metrics.address()
    if daemon.log_level not in _LOG_LEVELS:
        raise ConfigError(f"must be one of {sorted(_LOG_LEVELS)}", key="daemon.log_level")
    if not tg.supplier_name.strip():
        raise ConfigError("must name the supplier", key="tradegecko.supplier_name")
    if tg.supplier_match not in SUPPLIER_MATCHES:
        raise ConfigError(
            f"must be one of {', '.join(SUPPLIER_MATCHES)}, got {tg.supplier_match!r}",
            key="tradegecko.supplier_match",
        )
    if not kt.customer_name.strip():
        raise ConfigError("must name the customer", key="katana.customer_name")
    if require_tokens:
        if not tg.token:
            raise ConfigError(
                "no token: set it here, in SYNCD_TRADEGECKO_TOKEN, or as the systemd "
                "credential tradegecko-token",
                key="tradegecko.token",
            )
        if not kt.token:
            raise ConfigError(
                "no token: set it here, in SYNCD_KATANA_TOKEN, or as the systemd "
                "credential katana-token",
                key="katana.token",
            )
    return config


def load_config(path: str | Path, *, require_tokens: bool = True) -> Config:
    """Read the TOML file at ``path``.

    :raises ConfigError: the file is missing or unreadable, or a key is wrong.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None
    return parse_config(text, source=str(file), require_tokens=require_tokens)
