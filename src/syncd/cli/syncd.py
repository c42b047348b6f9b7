"""``syncd``: run the daemon, check a config, run the demo, serve a simulator.

Exit codes: 0 success; 1 the demo did not receive every order; 2 bad usage or a broken
configuration or statechart; 3 the database cannot be opened or is damaged; 4 a service
rejected the tokens at start; 5 a service could not be reached at start; 6 another syncd
runs on the database file (SQLite: one daemon per file); 130 the demo was interrupted
(Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
import msgspec

from syncd import __version__
from syncd.cli._entry import run_command
from syncd.config import Config, default_config_path, load_config
from syncd.errors import (
    ApiError,
    AuthError,
    ConfigError,
    StatechartError,
    StoreError,
    StoreInUse,
    SyncdError,
    first_error,
)
from syncd.ops.logging import configure_logging

if TYPE_CHECKING:
    from syncd.sim.faults import Faults

__all__ = [
    "EXIT_AUTH",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_IN_USE",
    "EXIT_STORE",
    "EXIT_UNREACHABLE",
    "check",
    "demo",
    "entry",
    "main",
    "run",
    "sim",
    "sim_katana",
    "sim_tradegecko",
]

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_AUTH = 4
EXIT_UNREACHABLE = 5
#: Another syncd holds the SQLite file: a second copy was started, the database is fine.
EXIT_IN_USE = 6
#: The shell's convention for a run ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"syncd: {message}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(__version__, prog_name="syncd")
def main() -> None:
    """Link TradeGecko purchase orders with Katana MRP sales orders."""


_config_option = click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The config file  [default: $SYNCD_CONFIG, else /etc/syncd/syncd.toml]",
)


def _config_path(given: str | None) -> Path:
    if given is not None:
        return Path(given)
    path = default_config_path()
    if not path.exists():
        _fail(f"no config file at {path}: give --config PATH or set SYNCD_CONFIG", EXIT_CONFIG)
    return path


@main.command()
@_config_option
@click.option(
    "--no-register", is_flag=True, help="Do not make sure the webhooks exist on both services."
)
@click.option(
    "--shadow",
    is_flag=True,
    help="Read both services and decide, write to neither: record the plan (syncctl plan).",
)
def run(config_path: str | None, no_register: bool, shadow: bool) -> None:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reads the config again (factories
    added, removed or changed are started and stopped; a broken config is logged and the
    running one kept)."""
    path = _config_path(config_path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    if no_register:
        config.webhooks.register = False
    if shadow:
        try:
            config = config.as_shadow()
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
            return
    configure_logging(config.daemon.log_level)

    def adjust(new: Config) -> Config:
        """The command line's changes, made again to the config a reload (SIGHUP) reads."""
        if no_register:
            new.webhooks.register = False
        return new.as_shadow() if shadow else new

    try:
        anyio.run(_run, config, str(path), adjust)
    except BaseException as exc:  # a task group wraps what a task raised in a group
        error = first_error(exc, SyncdError)
        if error is None:
            raise
        _exit_for(error)


def _exit_for(error: SyncdError) -> None:
    if isinstance(error, ConfigError | StatechartError):
        _fail(str(error), EXIT_CONFIG)
    elif isinstance(error, StoreInUse):
        _fail(str(error), EXIT_IN_USE)
    elif isinstance(error, StoreError):
        _fail(str(error), EXIT_STORE)
    elif isinstance(error, AuthError):
        _fail(f"a token was rejected: {error}", EXIT_AUTH)
    elif isinstance(error, ApiError):
        _fail(f"cannot start: {error}", EXIT_UNREACHABLE)
    else:
        _fail(str(error), EXIT_FAILED)


async def _run(
    config: Config, config_path: str, adjust: Callable[[Config], Config] | None = None
) -> None:
    import logging

    from syncd.ops.notify import notify, watchdog
    from syncd.runtime.daemon import Daemon, running_daemon
    from syncd.store import redacted

    log = logging.getLogger("syncd.daemon")
    log.info(
        "syncd starting",
        extra={
            "version": __version__,
            "config": config_path,
            "database": redacted(config.daemon.database),
            "pid": os.getpid(),
        },
    )
    stopped_by = "nothing"
    running: Daemon | None = None
    # The signals are taken before anything starts: a stop must work at every moment,
    # start-up included (a hanging service, the start-up check's retries).
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                nonlocal stopped_by
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # Read the files again: factories added, removed or changed are
                        # started and stopped; a broken config is logged, the old one kept.
                        if running is None:
                            log.warning("SIGHUP while starting: nothing reloaded")
                            continue
                        # In a task of its own: a SIGTERM during a slow reload still stops.
                        tg.start_soon(reload, running)
                        continue
                    stopped_by = signal.Signals(signum).name
                    notify("STOPPING=1", "STATUS=stopping")
                    log.info("syncd stopping", extra={"signal": stopped_by})
                    # Cancels start-up, intake and in-flight effects (idempotent: they run
                    # again at the next start); the database is closed on the way out.
                    tg.cancel_scope.cancel()
                    return

            async def reload(daemon: Daemon) -> None:
                notify("RELOADING=1", "STATUS=reloading")
                log.info("syncd reloading", extra={"config": config_path})
                await daemon.reload(config_path)
                notify("READY=1", "STATUS=running")

            tg.start_soon(on_signal)
            # From the first moment: a start that retries a service must not look hung.
            tg.start_soon(watchdog)

            # check: a wrong URL or token is said at once, not buried in retrying pollers;
            # a passing failure is retried for daemon.start_timeout, then systemd's
            # Restart=on-failure tries again later.
            def waiting(what: str) -> None:
                notify(f"STATUS={what}")

            async with running_daemon(config, check=True, on_wait=waiting, adjust=adjust) as daemon:
                running = daemon
                notify("READY=1", "STATUS=running")
                await anyio.sleep_forever()
    log.info("syncd stopped", extra={"signal": stopped_by})


@main.command()
@_config_option
@click.option(
    "--online", is_flag=True, help="Also make one call to each service with its URL and token."
)
def check(config_path: str | None, online: bool) -> None:
    """Find everything `syncd run` would refuse: the config (every wrong key), the statechart,
    the database and its folder, the listen addresses; with --online the URLs and tokens.

    Lists every problem; exits with the code `run` would give for the first."""
    from syncd.cli.check import check as find_problems
    from syncd.cli.check import factory_lines
    from syncd.store import redacted

    path = _config_path(config_path)
    # The problems are the output: a retry the service check schedules is not news.
    configure_logging("error", stream=sys.stderr)
    report = anyio.run(lambda: find_problems(path, online=online))
    for problem in report.problems:
        click.echo(f"syncd: {problem.message}", err=True)
    if report.services_skipped:
        click.echo(f"syncd: services not asked: {report.services_skipped}", err=True)
    if report.problems:
        if report.config is not None and len(report.config.factories) > 1:
            for line in factory_lines(report.config):
                click.echo(line)
        count = len(report.problems)
        _fail(
            f"{path}: {count} problem{'s' if count > 1 else ''}",
            _CHECK_EXITS[report.problems[0].kind],
        )
    assert report.config is not None and report.chart is not None
    config = report.config
    services = "; both services accept their tokens" if report.services_ok else ""
    factories = (
        f"supplier {config.tradegecko.supplier_name!r}, customer {config.katana.customer_name!r}"
        if len(config.factories) == 1
        else f"{len(config.factories)} factories"  # each on its line below
    )
    click.echo(
        f"{path}: ok ({factories}, {len(report.chart.states)} states, database "
        f"{redacted(config.daemon.database)}{services})"
    )
    for line in factory_lines(config):
        click.echo(line)


_CHECK_EXITS = {
    "config": EXIT_CONFIG,
    "store": EXIT_STORE,
    "auth": EXIT_AUTH,
    "unreachable": EXIT_UNREACHABLE,
}


@main.command()
@click.option("--orders", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--db", default=None, help="Keep the demo's database at this path.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--katana-url", default=None, help="Katana API base the daemon uses.")
@click.option("--tradegecko-url", default=None, help="TradeGecko API base the daemon uses.")
@click.option("--katana-sim-url", default=None, help="Where Katana control calls go.")
@click.option("--tradegecko-sim-url", default=None, help="Where TradeGecko control calls go.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for orders.")
@click.option(
    "--webhooks", is_flag=True, help="Sync by the simulators' webhooks; polls only reconcile."
)
@click.option(
    "--make-to-order",
    type=click.Choice(["manual", "auto"]),
    default="manual",
    show_default=True,
    help="auto: syncd makes the manufacturing orders (katana.make_to_order).",
)
@click.option(
    "--shadow", is_flag=True, help="A shadow run: decide and show each order's plan, write nothing."
)
def demo(
    orders: int,
    db: str | None,
    as_json: bool,
    katana_url: str | None,
    tradegecko_url: str | None,
    katana_sim_url: str | None,
    tradegecko_sim_url: str | None,
    timeout: float,
    webhooks: bool,
    make_to_order: str,
    shadow: bool,
) -> None:
    """Run the whole flow on the simulators and summarise it."""
    from syncd.cli.demo import DemoOptions, render_summary, run_demo

    configure_logging("warning", stream=sys.stderr)
    options = DemoOptions(
        orders=orders,
        db=db,
        katana_url=katana_url,
        tradegecko_url=tradegecko_url,
        katana_sim_url=katana_sim_url,
        tradegecko_sim_url=tradegecko_sim_url,
        timeout=timeout,
        webhooks=webhooks,
        make_to_order=make_to_order,
        shadow=shadow,
    )
    progress = sys.stderr if as_json else sys.stdout
    try:
        summary = anyio.run(lambda: run_demo(options, out=progress))
    except KeyboardInterrupt:
        # Ctrl-C before the demo's own handler was installed.
        _fail("demo interrupted", EXIT_INTERRUPTED)
        return
    except BaseException as exc:  # its database in use (6) or unusable (3), as for run
        error = first_error(exc, SyncdError)
        if not isinstance(error, StoreError):
            raise
        _exit_for(error)
        return
    if as_json:
        click.echo(msgspec.json.encode(summary).decode())
    else:
        render_summary(summary, sys.stdout)
    if summary.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if summary.planned_writes is not None:
        # A shadow run receives nothing: it worked when every order has its plan.
        if summary.planned_writes < summary.orders:
            sys.exit(EXIT_FAILED)
        return
    if summary.received != summary.orders:
        sys.exit(EXIT_FAILED)


@main.group()
def sim() -> None:
    """Serve a simulator of TradeGecko or Katana."""


_FAULT_OPTIONS = (
    click.option("--error-rate", default=0.0, type=click.FloatRange(0, 1), help="5xx share."),
    click.option("--error-status", default=500, show_default=True, type=click.IntRange(400, 599)),
    click.option("--latency-ms", default=0.0, type=click.FloatRange(0), help="Added latency."),
    click.option("--jitter-ms", default=0.0, type=click.FloatRange(0), help="Up to this more."),
    click.option("--timeout-rate", default=0.0, type=click.FloatRange(0, 1), help="Hang share."),
    click.option("--drop-rate", default=0.0, type=click.FloatRange(0, 1), help="Drop share."),
    click.option(
        "--truncate-rate", default=0.0, type=click.FloatRange(0, 1), help="Cut 2xx body share."
    ),
    click.option("--fault-seed", default=0, show_default=True, type=int),
    click.option(
        "--faults",
        "faults_file",
        default=None,
        type=click.Path(dir_okay=False, exists=True),
        help="JSON fault settings (the body of PUT /_sim/faults); overrides the rate flags.",
    ),
)


_ACCOUNTS_OPTION = click.option(
    "--accounts",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Accounts served, one world per token: the default token, then <token>-1 ... -(N-1).",
)


def _fault_options(command: Any) -> Any:
    for option in reversed(_FAULT_OPTIONS):
        command = option(command)
    return command


def _faults(options: dict[str, Any]) -> Faults | None:
    """The fault settings the flags ask for, or ``None`` for none."""
    from pathlib import Path

    from syncd.sim.faults import Faults

    faults_file = options.pop("faults_file")
    seed = options.pop("fault_seed")
    if faults_file is not None:
        try:
            return msgspec.json.decode(Path(faults_file).read_bytes(), type=Faults)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise click.BadParameter(str(exc), param_hint="--faults") from None
    faults = Faults.everywhere(seed=seed, **options)
    return faults if faults.rules else None


def _sim_address(port: int, limit: str) -> Callable[[Any], Any]:
    """The options every simulator takes first: where it listens, and its rate limit."""

    def decorate(command: Any) -> Any:
        command = click.option(
            "--no-rate-limit", is_flag=True, help=f"Turn the real {limit} limit off."
        )(command)
        command = click.option(
            "--port", default=port, show_default=True, type=click.IntRange(0, 65535)
        )(command)
        return click.option("--host", default="127.0.0.1", show_default=True)(command)

    return decorate


@sim.command("tradegecko")
@_sim_address(8701, "300/300 s")
@_ACCOUNTS_OPTION
@_fault_options
def sim_tradegecko(
    host: str, port: int, no_rate_limit: bool, accounts: int, **fault_flags: Any
) -> None:
    """Serve the TradeGecko simulator (token: tradegecko-sim-token)."""
    from syncd.sim import tradegecko

    _serve_sim(
        tradegecko.run,
        lambda url: f"TradeGecko simulator on {url} (API: /, control: /_sim/)",
        fault_flags,
        host=host,
        port=port,
        rate_limit=not no_rate_limit,
        accounts=accounts,
    )


@sim.command("katana")
@_sim_address(8702, "60/60 s")
@click.option("--play-factory", is_flag=True, help="Make, finish and deliver orders by itself.")
@click.option(
    "--leave-make-to-order",
    is_flag=True,
    help="The factory never presses Make to order (syncd's katana.make_to_order = auto).",
)
@_ACCOUNTS_OPTION
@_fault_options
def sim_katana(
    host: str,
    port: int,
    no_rate_limit: bool,
    play_factory: bool,
    leave_make_to_order: bool,
    accounts: int,
    **fault_flags: Any,
) -> None:
    """Serve the Katana simulator (token: katana-sim-token)."""
    from syncd.sim import katana

    _serve_sim(
        katana.run,
        lambda url: f"Katana simulator on {url} (API: {katana.API_PREFIX}, control: /_sim/)",
        fault_flags,
        host=host,
        port=port,
        rate_limit=not no_rate_limit,
        play_factory=play_factory,
        make_to_order=not leave_make_to_order,
        accounts=accounts,
    )


def _serve_sim(
    run: Callable[..., Awaitable[None]],
    banner: Callable[[str], str],
    fault_flags: dict[str, Any],
    *,
    host: str,
    port: int,
    **options: Any,
) -> None:
    """Run a simulator with the faults the flags ask for; an address it cannot listen on
    is a usage error (exit 2)."""
    faults = _faults(fault_flags)
    configure_logging("info")

    async def serve() -> None:
        # The banner once listening: a script waiting for it may start calling.
        await run(
            host,
            port,
            faults=faults,
            on_ready=lambda url: click.echo(banner(url)),
            **options,
        )

    try:
        anyio.run(serve)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_CONFIG)


def entry() -> None:
    """The ``syncd`` console script."""
    run_command(main)
