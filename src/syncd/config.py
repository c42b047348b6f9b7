"""The daemon's configuration: one TOML file, tokens also from the environment or systemd.

A *factory* is one TradeGecko account and one Katana account with their own settings
(:class:`Factory`). Today's file, with top-level ``[tradegecko]`` and ``[katana]``, is one
factory named ``default``. More are ``[factories.NAME]`` tables in the file or one
``NAME.toml`` each in ``daemon.factories_dir`` (``factories.d`` beside the file when it
exists); the top-level tables' keys (never their tokens) are every factory's defaults.

A token or webhook secret is taken from, in order: the environment (``SYNCD_TRADEGECKO_TOKEN``,
``SYNCD_KATANA_TOKEN``, ...; ``SYNCD_ACME_KATANA_TOKEN`` for the factory ``acme``), a
credential file (``tradegecko-token``, ``katana-token``, ...; ``acme-katana-token``) in
``$CREDENTIALS_DIRECTORY`` under systemd, else in ``/etc/syncd/credentials``
(``SYNCD_CREDENTIALS_DIRECTORY``), then the file's key. Every error names the key that is
wrong, and the file when a factory has its own.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import msgspec

from syncd.errors import ConfigError, RetryPolicy

__all__ = [
    "CREDENTIALS",
    "DEFAULT_CONFIG",
    "DEFAULT_CREDENTIALS_DIRECTORY",
    "DEFAULT_FACTORY",
    "FACTORY_NAME",
    "LIVE_SETTINGS",
    "MAKE_TO_ORDER_MODES",
    "RETRY",
    "SUPPLIER_MATCHES",
    "Config",
    "ConfigChange",
    "DaemonConfig",
    "Factory",
    "FactoryWebhooks",
    "KatanaConfig",
    "MetricsConfig",
    "RetryPolicies",
    "TradeGeckoConfig",
    "WebhooksConfig",
    "config_change",
    "config_problems",
    "credentials_directory",
    "default_config_path",
    "factory_credentials",
    "load_config",
    "parse_config",
    "parse_listen",
    "read_config",
    "reload_config",
    "shadow_database",
]


#: Where ``syncd`` and ``syncctl`` look for the config when none is named.
DEFAULT_CONFIG = "/etc/syncd/syncd.toml"
#: Where credentials are read outside systemd (``SYNCD_CREDENTIALS_DIRECTORY`` overrides).
DEFAULT_CREDENTIALS_DIRECTORY = "/etc/syncd/credentials"


def default_config_path() -> Path:
    """The config file to use when no ``--config`` is given: ``$SYNCD_CONFIG`` or
    ``/etc/syncd/syncd.toml``."""
    return Path(os.environ.get("SYNCD_CONFIG") or DEFAULT_CONFIG)


class RetryPolicies(NamedTuple):
    """Every retry syncd makes, one :class:`~syncd.errors.RetryPolicy` per kind of work.

    Only what :func:`syncd.errors.is_transient` calls passing is retried; anything else goes
    to a person at once (or, for an inbox event, after ``event.attempts`` tries).
    """

    #: One HTTP request, inside the client (idempotent ones only; a POST is never retried).
    request: RetryPolicy = RetryPolicy(initial=0.2, maximum=10.0, attempts=5)
    #: An effect (import, receipt): until it works. ``daemon.retry_initial``/``retry_max``;
    #: after an uncertain create, no look (and no new create) before its start + the
    #: client's timeout + ``settle`` (``daemon.retry_settle``).
    effect: RetryPolicy = RetryPolicy(initial=5.0, maximum=300.0, settle=5.0)
    #: An inbox event the dispatcher cannot apply: set aside (with why) after its attempts.
    event: RetryPolicy = RetryPolicy(initial=0.1, maximum=2.0, attempts=5)
    #: The database locked past its busy timeout, or the disk failing: until it works.
    store: RetryPolicy = RetryPolicy(initial=1.0, maximum=1.0)
    #: A webhook delivery's re-fetch; after its attempts the pollers reconcile instead.
    webhook: RetryPolicy = RetryPolicy(initial=1.0, maximum=1.0, attempts=5)
    #: An ``syncctl import`` request that fails for a lasting reason: set aside after these.
    backfill: RetryPolicy = RetryPolicy(initial=1.0, maximum=1.0, attempts=5)
    #: Registering the webhooks with both services: until it works.
    registration: RetryPolicy = RetryPolicy(initial=5.0, maximum=300.0)
    #: The start-up check of each service, within ``daemon.start_timeout``.
    start: RetryPolicy = RetryPolicy(initial=0.5, maximum=10.0)
    #: A factory whose work failed (a bug), started again by its daemon: until it works.
    #: ``daemon.restart_initial``/``restart_max``; each wait jittered down by up to a
    #: quarter; a run as long as ``maximum`` makes the next failure the first again.
    restart: RetryPolicy = RetryPolicy(initial=5.0, maximum=300.0)


#: The retry policies as shipped; :meth:`Config.retry` applies the config's keys to them.
RETRY = RetryPolicies()


class DaemonConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    database: str = "/var/lib/syncd/syncd.db"
    log_level: str = "info"
    #: At most this many effects (imports, receipts) run at once.
    concurrency: int = 4
    #: Seconds between retries of an effect that failed for a passing reason, doubling.
    retry_initial: float = 5.0
    retry_max: float = 300.0
    #: Seconds past a create's timeout (``katana.timeout``) before a retry of a create whose
    #: outcome is uncertain looks for it again, and only then creates.
    retry_settle: float = 5.0
    #: Seconds the start-up check keeps retrying a service that fails for a passing reason
    #: (5xx, timeout, cut body); a refusal (401, 404) ends the start at once.
    start_timeout: float = 60.0
    statechart: str | None = None
    #: A folder of one ``NAME.toml`` per factory; relative to the config file's folder.
    #: Unset: ``factories.d`` beside the config file, when there is one.
    factories_dir: str | None = None
    #: ``live``: syncd writes to both services; ``shadow``: it reads both, decides as a
    #: live run would and writes to neither, recording what it would have sent (its plan,
    #: ``syncctl plan``) in its own database (``shadow_database``).
    mode: str = "live"
    #: A shadow run's database; unset: ``database`` with ``.shadow`` before its suffix
    #: (``syncd.db`` → ``syncd.shadow.db``). Required when ``database`` is PostgreSQL.
    shadow_database: str | None = None
    #: Seconds a factory's lease lasts (several daemons on one PostgreSQL database): a
    #: daemon that stops renewing loses its factories to the others after this long, and
    #: stops their work a tenth of it earlier. With ``lease_renew``, failover within
    #: ``lease_ttl + lease_renew`` (13 s by default).
    lease_ttl: float = 10.0
    #: Seconds between renewals of the leases (and the daemon's heartbeat); less than
    #: half of ``lease_ttl``, so that one failed renewal loses nothing.
    lease_renew: float = 3.0
    #: Seconds before a factory whose work failed (a bug: logged with its traceback) is
    #: started again, doubling at each failure in a row up to ``restart_max``; the other
    #: factories run on meanwhile. A run of ``restart_max`` seconds resets the wait.
    restart_initial: float = 5.0
    restart_max: float = 300.0


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
    #: Requests per window syncd never takes from the key: its other users' room.
    reserve: int = 30
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
    #: Requests per window syncd never takes from the key (a factory's Shopify link and
    #: scripts share it): one every 6 s, or a burst of 10, always left to them.
    reserve: int = 10
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
    #: Seconds the consumer gathers deliveries for one object before it looks at it once
    #: (Katana sends ``updated`` and ``delivered`` for one delivery, and retries).
    coalesce: float = 0.5
    #: Objects whose deliveries are handled at the same time (one object's in order).
    concurrency: int = 8

    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` of :attr:`listen`."""
        return parse_listen(self.listen, key="webhooks.listen")


#: The factory today's single-factory file describes; it keeps today's credential names.
DEFAULT_FACTORY = "default"
#: A factory's name: it appears in webhook paths, metrics labels and ``syncctl --factory``.
FACTORY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class FactoryWebhooks(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A factory's webhook secrets (see :class:`WebhooksConfig`); the listener itself, its
    address and its rules are the daemon's ``[webhooks]``."""

    tradegecko_secret: str = ""
    katana_token: str = ""
    path_token: str = ""


class Factory(msgspec.Struct, kw_only=True):
    """One TradeGecko account linked with one Katana account: its tokens, secrets, names,
    prefixes, addresses, rate limits and poll intervals."""

    name: str = DEFAULT_FACTORY
    tradegecko: TradeGeckoConfig = msgspec.field(default_factory=TradeGeckoConfig)
    katana: KatanaConfig = msgspec.field(default_factory=KatanaConfig)
    webhooks: FactoryWebhooks = msgspec.field(default_factory=FactoryWebhooks)
    #: Its own file in ``daemon.factories_dir``; empty when it is in the config file.
    file: str = ""
    #: What its keys are called in the config file: ``""`` at the top level or in its own
    #: file, ``"factories.NAME."`` in a table.
    key_prefix: str = ""

    def settings(self) -> tuple[TradeGeckoConfig, KatanaConfig, FactoryWebhooks]:
        """What it runs with: two factories with equal settings behave the same, wherever
        they are written."""
        return self.tradegecko, self.katana, self.webhooks

    def where(self) -> str:
        """Where it is defined, for people: its file, or its table."""
        if self.file:
            return self.file
        return f"[{self.key_prefix.rstrip('.')}]" if self.key_prefix else "the top level"


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The daemon's settings and its factories.

    ``tradegecko``, ``katana`` and the secrets in ``webhooks`` are the first factory's (the
    ``default`` one when there is one): what the single-factory runtime runs. Built with
    no ``factories``, the config is the one factory ``default`` made of them.
    """

    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    tradegecko: TradeGeckoConfig = msgspec.field(default_factory=TradeGeckoConfig)
    katana: KatanaConfig = msgspec.field(default_factory=KatanaConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    #: Every factory by name: ``default`` first, then the file's tables in their order, then
    #: ``factories_dir``'s files by name.
    factories: dict[str, Factory] = msgspec.field(default_factory=dict)
    #: Factories that could not be read (not TOML, wrong shape, bad or taken name):
    #: :func:`config_problems` lists these first; the others are still read and checked.
    load_problems: list[ConfigError] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.factories:
            if not self.load_problems:  # factories were declared: none of them is "default"
                self.factories = {DEFAULT_FACTORY: _factory_of(self)}
            return
        default = self.factories.get(DEFAULT_FACTORY)
        if default is not None and (default.file, default.key_prefix) == ("", ""):
            # The top-level tables are this default factory's: a copy of the config with other
            # ``tradegecko``/``katana`` (msgspec.structs.replace) changes that factory too.
            derived = _factory_of(self)
            if (derived.tradegecko, derived.katana) != (default.tradegecko, default.katana):
                self.factories = {
                    name: msgspec.structs.replace(
                        factory, tradegecko=derived.tradegecko, katana=derived.katana
                    )
                    if name == DEFAULT_FACTORY
                    else factory
                    for name, factory in self.factories.items()
                }
        first = next(iter(self.factories.values()))
        self.tradegecko, self.katana = first.tradegecko, first.katana
        self.webhooks = msgspec.structs.replace(
            self.webhooks,
            tradegecko_secret=first.webhooks.tradegecko_secret,
            katana_token=first.webhooks.katana_token,
            path_token=first.webhooks.path_token,
        )

    def retry(self) -> RetryPolicies:
        """Every retry policy, with the configured ones (``daemon.retry_*``,
        ``daemon.restart_*``) applied."""
        return RETRY._replace(
            effect=replace(
                RETRY.effect,
                initial=self.daemon.retry_initial,
                maximum=self.daemon.retry_max,
                settle=self.daemon.retry_settle,
            ),
            restart=replace(
                RETRY.restart,
                initial=self.daemon.restart_initial,
                maximum=self.daemon.restart_max,
            ),
        )

    @property
    def shadow(self) -> bool:
        """Whether this is a shadow run: read both services, write to neither."""
        return self.daemon.mode == "shadow"

    def as_shadow(self) -> Config:
        """This config as a shadow run's (``syncd run --shadow``): ``daemon.mode = "shadow"``
        on its own database, and no webhook registration (that is a write).

        :raises ConfigError: ``daemon.database`` is PostgreSQL and ``shadow_database`` unset.
        """
        daemon = msgspec.structs.replace(
            self.daemon, mode="shadow", database=shadow_database(self.daemon)
        )
        hooks = msgspec.structs.replace(self.webhooks, register=False)
        return msgspec.structs.replace(self, daemon=daemon, webhooks=hooks)

    def for_factory(self, name: str) -> Config:
        """This config with only the factory ``name``: what a single-factory runtime (or
        check's service calls) runs for it.

        :raises KeyError: there is no such factory.
        """
        return msgspec.structs.replace(self, factories={name: self.factories[name]})

    def statechart_conditions(self) -> frozenset[str]:
        """The statechart's conditions this configuration makes hold (see ``[conditions]``
        in ``statecharts/linked_order.toml``): the first factory's, which the runtime runs."""
        return frozenset({"make_to_order_auto"} if self.katana.make_to_order == "auto" else ())


def shadow_database(daemon: DaemonConfig) -> str:
    """Where a shadow run keeps its state: ``shadow_database``, else ``database`` with
    ``.shadow`` before its suffix, apart from a live run's so that going live starts clean.

    :raises ConfigError: ``database`` is PostgreSQL and ``shadow_database`` unset.
    """
    if daemon.shadow_database:
        return daemon.shadow_database
    if daemon.database.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "must name a database of its own for a shadow run when daemon.database is PostgreSQL",
            key="daemon.shadow_database",
        )
    path = Path(daemon.database)
    if path.stem.endswith(".shadow"):
        return daemon.database  # already the shadow's (as_shadow of a shadow config)
    return str(path.with_name(f"{path.stem}.shadow{path.suffix}"))


def _factory_of(config: Config) -> Factory:
    hooks = config.webhooks
    secrets = FactoryWebhooks(
        tradegecko_secret=hooks.tradegecko_secret,
        katana_token=hooks.katana_token,
        path_token=hooks.path_token,
    )
    return Factory(tradegecko=config.tradegecko, katana=config.katana, webhooks=secrets)


class _File(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The config file's tables, ``[factories.*]`` aside."""

    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    tradegecko: TradeGeckoConfig = msgspec.field(default_factory=TradeGeckoConfig)
    katana: KatanaConfig = msgspec.field(default_factory=KatanaConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)


class _FactoryTables(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A factory's tables: ``[factories.NAME]`` or its own file."""

    tradegecko: TradeGeckoConfig = msgspec.field(default_factory=TradeGeckoConfig)
    katana: KatanaConfig = msgspec.field(default_factory=KatanaConfig)
    webhooks: FactoryWebhooks = msgspec.field(default_factory=FactoryWebhooks)


_LOG_LEVELS = {"debug", "info", "warning", "error"}
_MODES = {"live", "shadow"}
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


def factory_credentials(name: str) -> dict[str, tuple[str, str]]:
    """The factory ``name``'s secrets: credential name -> (environment variable, its key).

    ``default`` keeps today's names (:data:`CREDENTIALS`); ``acme`` reads
    ``SYNCD_ACME_KATANA_TOKEN`` or the credential ``acme-katana-token``, and so on (``-`` in
    a name is ``_`` in its variables). No name's variables or credentials are another's:
    none of today's names ends with another of them.
    """
    if name == DEFAULT_FACTORY:
        return dict(CREDENTIALS)
    upper = name.upper().replace("-", "_")
    return {
        f"{name}-{credential}": (f"SYNCD_{upper}_{env.removeprefix('SYNCD_')}", key)
        for credential, (env, key) in CREDENTIALS.items()
    }


def _located(message: str, *, key: str | None, file: str = "") -> ConfigError:
    """The error for ``key``, led by ``file`` when the key is in a factory's own file: its
    ``key`` stays the key within that file (``katana.token``)."""
    error = ConfigError(message, key=key)
    if file:
        error.args = (f"{file}: {error}",)
    return error


def _read_secrets(
    tables: _File | _FactoryTables, name: str, *, key_prefix: str, file: str, required: bool
) -> None:
    """Put the factory's secrets from the environment or credentials over its file's keys."""
    for credential, (env, key) in factory_credentials(name).items():
        table, attribute = key.split(".")
        try:
            secret = _read_secret(env, credential, key=key_prefix + key, required=required)
        except ConfigError as exc:
            if file:
                exc.args = (f"{file}: {exc}",)
            raise
        if secret:
            setattr(getattr(tables, table), attribute, secret)


def _toml(text: str, source: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None


def _shape_error(exc: msgspec.ValidationError, *, source: str, prefix: str = "") -> ConfigError:
    message = str(exc)
    key = _key_from_msgspec(message)
    reason = message.split(" - at ")[0]
    return ConfigError(f"{reason} (in {source})", key=prefix + key if key else prefix[:-1] or None)


class _Declared(msgspec.Struct):
    """A factory as written: its name, its tables, and where they are."""

    name: str
    tables: dict[str, object]
    file: str
    key_prefix: str


_NAME_RULE = "a lowercase letter or digit, then up to 62 lowercase letters, digits or '-'"


def _declared_factories(
    tables: object,
    factories_dir: str | None,
    *,
    source: str,
    folder: Path | None,
    problems: list[ConfigError],
) -> tuple[list[_Declared], bool]:
    """The ``[factories.NAME]`` tables, then the files of ``factories_dir``, and whether any
    factory was written at all (even one that cannot be read)."""
    declared: list[_Declared] = []
    where: dict[str, str] = {}
    written = False
    if tables is not None and not isinstance(tables, dict):
        problems.append(
            ConfigError(f"must be [factories.NAME] tables (in {source})", key="factories")
        )
    elif tables is not None:
        for name, table in tables.items():
            written = True
            key = f"factories.{name}"
            if not FACTORY_NAME.fullmatch(name):
                problems.append(
                    ConfigError(f"a factory's name must be {_NAME_RULE}, got {name!r}", key=key)
                )
            elif not isinstance(table, dict):
                problems.append(ConfigError(f"must be a table (in {source})", key=key))
            else:
                where[name] = f"[{key}] in {source}"
                declared.append(_Declared(name, table, "", f"{key}."))
    directory = _factories_dir(factories_dir, folder, problems)
    if directory is None:
        return declared, written
    try:
        # Only NAME.toml counts: editors' backups and "acme.toml.off" are left alone.
        files = sorted(
            path
            for path in directory.iterdir()
            if path.suffix == ".toml" and not path.name.startswith(".")
        )
    except OSError as exc:
        problems.append(
            ConfigError(
                f"cannot list {directory}: {exc.strerror or exc}", key="daemon.factories_dir"
            )
        )
        return declared, written
    for path in files:
        written = True
        name, file = path.stem, str(path)
        if not FACTORY_NAME.fullmatch(name):
            problems.append(
                _located(
                    f"the file's name must be a factory name, {_NAME_RULE}", key=None, file=file
                )
            )
            continue
        if name in where:
            problems.append(
                _located(
                    f"the factory {name!r} is already defined by {where[name]}", key=None, file=file
                )
            )
            continue
        try:
            data = _toml(_read_text(path), file)
        except ConfigError as exc:
            problems.append(exc)
            continue
        where[name] = file
        declared.append(_Declared(name, data, file, ""))
    return declared, written


def _factories_dir(
    setting: str | None, folder: Path | None, problems: list[ConfigError]
) -> Path | None:
    if setting is None:
        beside = folder / "factories.d" if folder is not None else None
        return beside if beside is not None and beside.is_dir() else None
    directory = Path(setting)
    if folder is not None and not directory.is_absolute():
        directory = folder / directory
    if not directory.is_dir():
        why = "is not a directory" if directory.exists() else "does not exist"
        problems.append(ConfigError(f"{directory} {why}", key="daemon.factories_dir"))
        return None
    return directory


def _factory(
    declared: _Declared,
    defaults: dict[str, object],
    top: _File,
    *,
    source: str,
    require_tokens: bool,
) -> Factory:
    """A written factory over the top level's keys (never its tokens).

    :raises ConfigError: a key of the wrong shape, or an unreadable credential.
    """
    data = dict(declared.tables)
    for table in ("tradegecko", "katana"):
        inherited = defaults.get(table)
        own = data.get(table, {})
        if isinstance(inherited, dict) and isinstance(own, dict):
            data[table] = {k: v for k, v in inherited.items() if k != "token"} | own
    try:
        tables = msgspec.convert(data, _FactoryTables)
    except msgspec.ValidationError as exc:
        if declared.file:
            message = str(exc)
            reason = message.split(" - at ")[0]
            raise _located(reason, key=_key_from_msgspec(message), file=declared.file) from None
        raise _shape_error(exc, source=source, prefix=declared.key_prefix) from None
    _read_secrets(
        tables,
        declared.name,
        key_prefix=declared.key_prefix,
        file=declared.file,
        required=require_tokens,
    )
    # One OAuth application commonly serves many accounts: its secret is shared by default.
    tables.webhooks.tradegecko_secret = (
        tables.webhooks.tradegecko_secret or top.webhooks.tradegecko_secret
    )
    return Factory(
        name=declared.name,
        tradegecko=tables.tradegecko,
        katana=tables.katana,
        webhooks=tables.webhooks,
        file=declared.file,
        key_prefix=declared.key_prefix,
    )


def _decode(text: str, *, source: str, require_tokens: bool, folder: Path | None) -> Config:
    """TOML and types only; then the secrets from the environment or credentials."""
    data = _toml(text, source)
    tables = data.pop("factories", None)
    try:
        top = msgspec.convert(data, _File)
    except msgspec.ValidationError as exc:
        raise _shape_error(exc, source=source) from None
    _read_secrets(top, DEFAULT_FACTORY, key_prefix="", file="", required=require_tokens)

    problems: list[ConfigError] = []
    declared, written = _declared_factories(
        tables, top.daemon.factories_dir, source=source, folder=folder, problems=problems
    )
    factories: dict[str, Factory] = {}
    # Today's file is the factory "default"; beside others it is one while it has a token.
    if not written or top.tradegecko.token or top.katana.token:
        factories[DEFAULT_FACTORY] = Factory(
            tradegecko=top.tradegecko,
            katana=top.katana,
            webhooks=FactoryWebhooks(
                tradegecko_secret=top.webhooks.tradegecko_secret,
                katana_token=top.webhooks.katana_token,
                path_token=top.webhooks.path_token,
            ),
        )
    for factory in declared:
        if factory.name in factories:
            problems.append(
                _located(
                    "the factory 'default' is already the top-level [tradegecko] and [katana] "
                    "(they have a token): move their tokens here, or name this one otherwise",
                    key=factory.key_prefix.rstrip(".") or None,
                    file=factory.file,
                )
            )
            continue
        try:
            factories[factory.name] = _factory(
                factory, data, top, source=source, require_tokens=require_tokens
            )
        except ConfigError as exc:
            problems.append(exc)
    return Config(
        daemon=top.daemon,
        tradegecko=top.tradegecko,
        katana=top.katana,
        metrics=top.metrics,
        webhooks=top.webhooks,
        factories=factories,
        load_problems=problems,
    )


def config_problems(config: Config, *, require_tokens: bool = True) -> list[ConfigError]:
    """Every value of a decoded config that is wrong: the factories that could not be
    read, the daemon's keys, then each factory's; empty when it is right."""
    problems: list[ConfigError] = list(config.load_problems)
    daemon, hooks = config.daemon, config.webhooks

    def problem(message: str, key: str) -> None:
        problems.append(ConfigError(message, key=key))

    if daemon.log_level not in _LOG_LEVELS:
        problem(
            f"must be one of {sorted(_LOG_LEVELS)}, got {daemon.log_level!r}", "daemon.log_level"
        )
    for key, number in (
        ("daemon.retry_initial", daemon.retry_initial),
        ("daemon.retry_max", daemon.retry_max),
        ("daemon.start_timeout", daemon.start_timeout),
        ("daemon.lease_ttl", daemon.lease_ttl),
        ("daemon.lease_renew", daemon.lease_renew),
        ("daemon.restart_initial", daemon.restart_initial),
        ("daemon.restart_max", daemon.restart_max),
        ("metrics.refresh_interval", config.metrics.refresh_interval),
        ("webhooks.reconcile_interval", hooks.reconcile_interval),
        ("webhooks.replay_window", hooks.replay_window),
    ):
        if number <= 0:
            problem(f"must be a positive number of seconds, got {number}", key)
    if daemon.retry_settle < 0:
        problem(
            f"must be zero or a positive number of seconds, got {daemon.retry_settle}",
            "daemon.retry_settle",
        )
    if daemon.concurrency < 1:
        problem(f"must be at least 1, got {daemon.concurrency}", "daemon.concurrency")
    if 0 < daemon.restart_max < daemon.restart_initial:
        problem(
            f"must be at least daemon.restart_initial ({daemon.restart_initial}), "
            f"got {daemon.restart_max}",
            "daemon.restart_max",
        )
    if 0 < daemon.lease_ttl / 2 <= daemon.lease_renew:
        problem(
            f"must be less than half of daemon.lease_ttl ({daemon.lease_ttl}), "
            f"got {daemon.lease_renew}",
            "daemon.lease_renew",
        )
    if daemon.mode not in _MODES:
        problem(f"must be one of {sorted(_MODES)}, got {daemon.mode!r}", "daemon.mode")
    elif daemon.mode == "shadow":
        try:
            if shadow_database(daemon) == daemon.database and daemon.shadow_database:
                problem("must differ from daemon.database", "daemon.shadow_database")
        except ConfigError as exc:
            problems.append(exc)
    if hooks.coalesce < 0:
        problem(f"must be 0 or more seconds, got {hooks.coalesce}", "webhooks.coalesce")
    if hooks.concurrency < 1:
        problem(f"must be at least 1, got {hooks.concurrency}", "webhooks.concurrency")
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
    for factory in config.factories.values():
        problems += _factory_problems(factory, hooks, require_tokens=require_tokens)
    problems += _accounts_served_twice(config)
    return problems


def _factory_problems(
    factory: Factory, hooks: WebhooksConfig, *, require_tokens: bool
) -> list[ConfigError]:
    problems: list[ConfigError] = []
    tg, kt = factory.tradegecko, factory.katana

    def problem(message: str, key: str) -> None:
        problems.append(_located(message, key=factory.key_prefix + key, file=factory.file))

    for key, url in (("tradegecko.base_url", tg.base_url), ("katana.base_url", kt.base_url)):
        if not re.match(r"^https?://[^/\s]+", url):
            problem(f"must be an http(s) URL, got {url!r}", key)
    for key, number in (
        ("tradegecko.poll_interval", tg.poll_interval),
        ("tradegecko.rate_period", tg.rate_period),
        ("tradegecko.timeout", tg.timeout),
        ("katana.poll_interval", kt.poll_interval),
        ("katana.rate_period", kt.rate_period),
        ("katana.timeout", kt.timeout),
    ):
        if number <= 0:
            problem(f"must be a positive number of seconds, got {number}", key)
    for key, count in (
        ("tradegecko.rate_limit", tg.rate_limit),
        ("katana.rate_limit", kt.rate_limit),
    ):
        if count < 1:
            problem(f"must be at least 1, got {count}", key)
    for key, reserve, limit in (
        ("tradegecko.reserve", tg.reserve, tg.rate_limit),
        ("katana.reserve", kt.reserve, kt.rate_limit),
    ):
        if limit >= 1 and not 0 <= reserve < limit:  # a rate_limit below 1 is its own problem
            problem(f"must be at least 0 and below rate_limit ({limit}), got {reserve}", key)
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
    if require_tokens:
        names = {
            key: (env, credential)
            for credential, (env, key) in factory_credentials(factory.name).items()
        }
        for key, value in (("tradegecko.token", tg.token), ("katana.token", kt.token)):
            if not value:
                problem(_nowhere("token", *names[key]), key)
        secret = "webhooks.tradegecko_secret"
        if hooks.enabled and hooks.verify_signatures and not factory.webhooks.tradegecko_secret:
            problem(_nowhere("secret", *names[secret]), secret)
    return problems


def _accounts_served_twice(config: Config) -> list[ConfigError]:
    """Two factories with one token would serve one account twice: every call doubled."""
    problems: list[ConfigError] = []
    for service, label in (("tradegecko", "TradeGecko"), ("katana", "Katana")):
        holders: dict[str, str] = {}
        for factory in config.factories.values():
            token = getattr(factory, service).token
            if not token:
                continue
            if token in holders:
                problems.append(
                    _located(
                        f"the same {label} token as the factory {holders[token]!r}: one account "
                        "served twice would double every call",
                        key=f"{factory.key_prefix}{service}.token",
                        file=factory.file,
                    )
                )
            else:
                holders[token] = factory.name
    return problems


def _nowhere(what: str, env: str, credential: str) -> str:
    return (
        f"no {what}: set it here, in {env}, or as the credential {credential} "
        f"($CREDENTIALS_DIRECTORY under systemd, else {credentials_directory()})"
    )


def parse_config(text: str, *, source: str = "<config>", require_tokens: bool = True) -> Config:
    """Parse and check configuration text (a relative ``daemon.factories_dir`` is the
    current directory's).

    :raises ConfigError: naming the key that is wrong (the first, when several are).
    """
    return _checked(
        _decode(text, source=source, require_tokens=require_tokens, folder=None), require_tokens
    )


def _checked(config: Config, require_tokens: bool) -> Config:
    problems = config_problems(config, require_tokens=require_tokens)
    if problems:
        raise problems[0]
    return config


def read_config(path: str | Path) -> Config:
    """Read the TOML file at ``path`` and its factories without checking their values: for
    ``syncd check``, which lists every problem (:func:`config_problems`) rather than the
    first. A factory that cannot be read is left out, its problem kept for
    :func:`config_problems`.

    :raises ConfigError: the file is missing or unreadable, not TOML, or of the wrong shape.
    """
    file = Path(path)
    return _decode(_read_text(file), source=str(file), require_tokens=True, folder=file.parent)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None


def load_config(path: str | Path, *, require_tokens: bool = True) -> Config:
    """Read the TOML file at ``path`` and its factories.

    :raises ConfigError: the file is missing or unreadable, or a key is wrong.
    """
    file = Path(path)
    config = _decode(
        _read_text(file), source=str(file), require_tokens=require_tokens, folder=file.parent
    )
    return _checked(config, require_tokens)


#: Daemon-wide keys a reload applies; any other daemon-wide change needs a restart.
LIVE_SETTINGS = frozenset({"daemon.log_level", "daemon.start_timeout", "daemon.factories_dir"})
_FACTORY_SECRETS = frozenset(field.name for field in msgspec.structs.fields(FactoryWebhooks))


class ConfigChange(msgspec.Struct, frozen=True, kw_only=True):
    """What a reload changes: the factories to start, to stop, to restart with their new
    settings, and the daemon-wide keys to apply."""

    #: The config to run from now on.
    config: Config
    added: tuple[str, ...] = ()
    #: To stop; their orders and history stay in the database.
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    #: Daemon-wide keys of :data:`LIVE_SETTINGS` that changed.
    settings: tuple[str, ...] = ()
    #: Daemon-wide keys that changed and cannot be applied without a restart.
    needs_restart: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to do: the files say what the daemon already runs."""
        return not (
            self.added or self.removed or self.changed or self.settings or self.needs_restart
        )


def config_change(current: Config, new: Config) -> ConfigChange:
    """What going from ``current`` to ``new`` changes; pure."""
    before, after = current.factories, new.factories
    daemon_wide = _daemon_wide_changes(current, new)
    return ConfigChange(
        config=new,
        added=tuple(name for name in after if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(
            name
            for name, factory in after.items()
            if name in before and factory.settings() != before[name].settings()
        ),
        settings=tuple(key for key in daemon_wide if key in LIVE_SETTINGS),
        needs_restart=tuple(key for key in daemon_wide if key not in LIVE_SETTINGS),
    )


def _daemon_wide_changes(current: Config, new: Config) -> list[str]:
    keys: list[str] = []
    for table in ("daemon", "metrics", "webhooks"):
        old_table, new_table = getattr(current, table), getattr(new, table)
        for field in msgspec.structs.fields(old_table):
            if table == "webhooks" and field.name in _FACTORY_SECRETS:
                continue  # the first factory's, compared with it
            if getattr(old_table, field.name) != getattr(new_table, field.name):
                keys.append(f"{table}.{field.name}")
    return keys


def reload_config(path: str | Path, current: Config) -> ConfigChange:
    """Read the config at ``path`` again and say what changes from ``current``.

    :raises ConfigError: the new config has a problem (the first is named, with how many
        more), or a daemon-wide key that needs a restart changed (naming it): nothing of it
        is to be applied, ``current`` runs on.
    """
    new = read_config(path)
    problems = config_problems(new)
    if problems:
        first = problems[0]
        more = (
            f" (and {len(problems) - 1} more: `syncd check` lists them)"
            if len(problems) > 1
            else ""
        )
        error = ConfigError(f"{first}{more}; nothing was reloaded")
        error.key = first.key
        raise error
    change = config_change(current, new)
    if change.needs_restart:
        first_key, *others = change.needs_restart
        also = f" (so do {', '.join(others)})" if others else ""
        raise ConfigError(
            f"changed: it needs a restart of syncd{also}; nothing was reloaded", key=first_key
        )
    return change
