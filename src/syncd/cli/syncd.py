"""``syncd``: run the daemon, check a config, run the demo, serve a simulator.

Exit codes: 0 success; 1 the demo did not receive every order; 2 bad usage or a broken
configuration or statechart; 3 the database cannot be opened or is damaged; 4 a service
rejected the tokens at start; 5 a service could not be reached at start.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

import anyio
import click
import msgspec

from syncd import __version__
from syncd.config import Config, load_config
from syncd.errors import ApiError, AuthError, ConfigError, StatechartError, StoreError
from syncd.ops.logging import configure_logging

if TYPE_CHECKING:
    from syncd.sim.faults import Faults

__all__ = ["EXIT_AUTH", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_STORE", "EXIT_UNREACHABLE", "main"]

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_AUTH = 4
EXIT_UNREACHABLE = 5


def _fail(message: str, code: int) -> None:
    click.echo(f"syncd: {message}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(__version__, prog_name="syncd")
def main() -> None:
    """Link TradeGecko purchase orders with Katana MRP sales orders."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--no-register", is_flag=True, help="Do not make sure the webhooks exist on both services."
)
def run(config_path: str, no_register: bool) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    if no_register:
        config.webhooks.register = False
    configure_logging(config.daemon.log_level)
    try:
        anyio.run(_run, config)
    except (ConfigError, StatechartError) as exc:
        _fail(str(exc), EXIT_CONFIG)
    except StoreError as exc:
        _fail(str(exc), EXIT_STORE)
    except AuthError as exc:
        _fail(f"a token was rejected: {exc}", EXIT_AUTH)
    except ApiError as exc:
        _fail(f"cannot start: {exc}", EXIT_UNREACHABLE)


async def _run(config: Config) -> None:
    from syncd.ops.notify import notify, watchdog
    from syncd.runtime.daemon import running_daemon

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # check: a wrong URL or token is said at once, not buried in retrying pollers;
        # systemd's Restart=on-failure tries again later after an outage.
        async with running_daemon(config, check=True), anyio.create_task_group() as tg:
            tg.start_soon(watchdog)
            notify("READY=1", "STATUS=running")
            async for _ in signals:
                break
            # Leaving the block cancels intake and in-flight effects (idempotent: they run
            # again at the next start) and closes the database; systemd waits meanwhile.
            notify("STOPPING=1", "STATUS=stopping")
            tg.cancel_scope.cancel()


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate a config file, the statechart and the database; say what is wrong."""
    from syncd.domain.statechart import load_statechart

    try:
        config = load_config(config_path)
        chart = load_statechart(config.daemon.statechart)
    except (ConfigError, StatechartError) as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    try:
        problems = anyio.run(_check_store, config.daemon.database)
    except StoreError as exc:
        _fail(str(exc), EXIT_STORE)
        return
    if problems:
        _fail(f"database {config.daemon.database} is damaged: {'; '.join(problems)}", EXIT_STORE)
    click.echo(
        f"{config_path}: ok (supplier {config.tradegecko.supplier_name!r}, customer "
        f"{config.katana.customer_name!r}, {len(chart.states)} states, database "
        f"{config.daemon.database})"
    )


async def _check_store(path: str) -> list[str]:
    from pathlib import Path

    from syncd.store import Store

    if not Path(path).exists():  # noqa: ASYNC240 - one stat, before anything runs
        return []
    store = await Store.open(path, readonly=True)
    try:
        return await store.integrity_check()
    finally:
        await store.close()


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
    )
    progress = sys.stderr if as_json else sys.stdout
    summary = anyio.run(lambda: run_demo(options, out=progress))
    if as_json:
        click.echo(msgspec.json.encode(summary).decode())
    else:
        render_summary(summary, sys.stdout)
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


@sim.command("tradegecko")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8701, show_default=True, type=int)
@click.option("--no-rate-limit", is_flag=True, help="Turn the real 300/300 s limit off.")
@_fault_options
def sim_tradegecko(host: str, port: int, no_rate_limit: bool, **fault_flags: Any) -> None:
    """Serve the TradeGecko simulator (token: tradegecko-sim-token)."""
    from syncd.sim import tradegecko

    faults = _faults(fault_flags)
    configure_logging("info")
    click.echo(f"TradeGecko simulator on http://{host}:{port} (API: /, control: /_sim/)")
    _serve_sim(
        host, port, lambda: tradegecko.run(host, port, rate_limit=not no_rate_limit, faults=faults)
    )


@sim.command("katana")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8702, show_default=True, type=int)
@click.option("--no-rate-limit", is_flag=True, help="Turn the real 60/60 s limit off.")
@click.option("--play-factory", is_flag=True, help="Make, finish and deliver orders by itself.")
@_fault_options
def sim_katana(
    host: str, port: int, no_rate_limit: bool, play_factory: bool, **fault_flags: Any
) -> None:
    """Serve the Katana simulator (token: katana-sim-token)."""
    from syncd.sim import katana

    faults = _faults(fault_flags)
    configure_logging("info")
    click.echo(
        f"Katana simulator on http://{host}:{port} (API: {katana.API_PREFIX}, control: /_sim/)"
    )
    _serve_sim(
        host,
        port,
        lambda: katana.run(
            host, port, rate_limit=not no_rate_limit, play_factory=play_factory, faults=faults
        ),
    )


def _serve_sim(host: str, port: int, serve: Any) -> None:
    """Run a simulator; an address it cannot listen on is a usage error (exit 2)."""
    try:
        anyio.run(serve)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_CONFIG)
