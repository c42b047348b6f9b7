"""``syncctl``: look at linked orders in the store (read-only unless a command changes one).

``retry``, ``cancel``, ``replay`` and ``import`` never call TradeGecko or Katana and never move
an order themselves: they write an *operator* event to the inbox, and the daemon's dispatcher
applies it through the statechart, in order with everything else it sees. When the daemon is
not running the event waits in the inbox for its next start. ``explain`` reads what the
daemon recorded of a PO it saw and did not link.

The database comes from ``--db PATH``, else from the config named by ``--config PATH``, else
from ``$SYNCD_CONFIG`` or ``/etc/syncd/syncd.toml``. Both options go before or after the
command.

``--factory NAME`` (before or after the command) looks at one factory; by default every
factory: ``status`` then says each one's, ``inspect`` and ``history`` list every factory's
orders (each row naming its factory), and a command naming an order finds it in whichever
factory has it (an order in several is refused until ``--factory`` names one). A command
that needs a factory and cannot tell which (``import`` with several) asks for
``--factory``. JSON output: one shape per thing (an order is the same object in every command),
times in ISO 8601 UTC (``2026-12-01T14:58:23Z``), ``null`` for nothing.

Exit codes: 0 success; 2 bad usage or config (an unknown ``--state``, say); 3 the database
cannot be opened (or written, for the commands that queue an event); 5 the order or PO asked
for does not exist; 6 the order's state does not allow the command (e.g. ``retry`` of an order
that does not need attention; ``import`` of a PO already linked or not active); 7 ``import``
refused: the PO is another supplier's (``--force`` imports it anyway); 8 ``import --wait``:
the daemon reported no outcome in time (is it running?) or gave up on the request; 9
``adopt`` refused: the live database already has orders or a daemon runs on it.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import click
import msgspec

from syncd import __version__
from syncd.cli._entry import run_command
from syncd.config import (
    FACTORY_NAME,
    Config,
    DaemonConfig,
    default_config_path,
    load_config,
    shadow_database,
)
from syncd.domain.orders import LinkedOrder
from syncd.domain.statechart import Statechart, load_statechart
from syncd.errors import ConfigError, StatechartError, StoreError, StoreInUse
from syncd.runtime import inbox
from syncd.runtime.pauses import PAUSED_PREFIX
from syncd.runtime.pollers import BEFORE_ACTIVATION, OTHER_SUPPLIER
from syncd.store import (
    DEFAULT_FACTORY,
    ImportOutcome,
    ImportResult,
    LeaseRecord,
    PlannedWrite,
    PurchaseOrderObservation,
    Store,
    is_postgres_url,
)

__all__ = [
    "DEFAULT_WAIT",
    "EXIT_CONFIG",
    "EXIT_IN_USE",
    "EXIT_NOT_ALLOWED",
    "EXIT_NOT_FOUND",
    "EXIT_NO_OUTCOME",
    "EXIT_OTHER_SUPPLIER",
    "EXIT_STORE",
    "adopt",
    "cancel",
    "describe_plan",
    "entry",
    "explain",
    "history",
    "import_",
    "inspect",
    "main",
    "parse_duration",
    "plan",
    "replay",
    "retry",
    "statechart",
    "status",
]

EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_NOT_FOUND = 5
EXIT_NOT_ALLOWED = 6
EXIT_OTHER_SUPPLIER = 7
EXIT_NO_OUTCOME = 8
#: ``adopt``: the live database already has orders, or a daemon runs on it.
EXIT_IN_USE = 9

#: ``import --wait`` without a number waits this long (seconds).
DEFAULT_WAIT = 60.0

T = TypeVar("T")


def _fail(message: str, code: int) -> None:
    click.echo(f"syncctl: {message}", err=True)
    sys.exit(code)


def _when(epoch: float | None) -> str | None:
    """ISO 8601 UTC to the second, ``…Z``; ``None`` for nothing."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when_dt(moment: datetime | None) -> str | None:
    return None if moment is None else _when(moment.timestamp())


def _text(value: Any) -> str:
    """A value for the text output: ``-`` for nothing, never ``None``."""
    return "-" if value is None else str(value)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d12h"``, ``"1w"`` → seconds.

    :raises ValueError: anything else.
    """
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not text or _DURATION_RE.sub("", text) != "":
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d12h)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_RE.findall(text))


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _operator() -> str | None:
    """Who runs syncctl, for the order's history (the real user under sudo)."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return None


def _emit(data: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(data)).decode())


# -- where the database is -------------------------------------------------------------------


def _remember(key: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """Keep ``--db`` / ``--config`` given before or after the command: ``ctx.meta`` is shared
    by the group's context and the command's, and the one given last wins."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.meta[key] = value

    return callback


def _location_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--factory",
        default=None,
        expose_value=False,
        callback=_remember("syncctl.factory"),
        help="Only this factory; default every one.",
    )(command)
    command = click.option(
        "--config",
        default=None,
        expose_value=False,
        callback=_remember("syncctl.config"),
        help="Take the database (and statechart) from this config; default $SYNCD_CONFIG "
        "or /etc/syncd/syncd.toml.",
    )(command)
    return click.option(
        "--db",
        default=None,
        expose_value=False,
        callback=_remember("syncctl.db"),
        help="The syncd database file.",
    )(command)


def _config(ctx: click.Context) -> Config | None:
    """The config in force: ``--config``, else the default file unless ``--db`` names the
    database; ``None`` when there is none to read."""
    if "syncctl.loaded" in ctx.meta:
        return cast(Config | None, ctx.meta["syncctl.loaded"])
    named: str | None = ctx.meta.get("syncctl.config")
    config: Config | None = None
    path: Path | None = Path(named) if named is not None else None
    if path is None and ctx.meta.get("syncctl.db") is None:
        default = default_config_path()
        if default.exists() or os.environ.get("SYNCD_CONFIG"):
            path = default
    if path is not None:
        try:
            config = load_config(path, require_tokens=False)
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
    ctx.meta["syncctl.loaded"] = config
    return config


def _db_path(ctx: click.Context) -> str:
    named: str | None = ctx.meta.get("syncctl.db")
    if named is not None:
        return named
    config = _config(ctx)
    if config is None:
        _fail(
            f"name the database with --db PATH or --config PATH (no config at "
            f"{default_config_path()}; set SYNCD_CONFIG to read another)",
            EXIT_CONFIG,
        )
        raise AssertionError("unreachable")
    return config.daemon.database


@click.group()
@click.version_option(__version__, prog_name="syncctl")
@_location_options
def main() -> None:
    """Inspect and steer syncd's linked orders."""


def _chart(ctx: click.Context) -> Statechart:
    config = _config(ctx)
    try:
        if config is None:
            return load_statechart()
        # Decided as the daemon decides: with the conditions its configuration holds (the
        # factory's own, with --factory).
        named = ctx.meta.get("syncctl.factory")
        if named in config.factories:
            config = config.for_factory(named)
        return load_statechart(config.daemon.statechart, holding=config.statechart_conditions())
    except StatechartError as exc:
        _fail(str(exc), EXIT_CONFIG)
        raise


class _Refused(Exception):
    """Said inside the store's run, exited with outside it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def _factory_names(ctx: click.Context, store: Store) -> list[str]:
    """The factories a command looks at: ``--factory``, else every one the config names or
    the database has rows of (config order first); ``default`` when there are none."""
    config = _config(ctx)
    configured = list(config.factories) if config is not None else []
    known = configured + [name for name in await store.factories() if name not in configured]
    named: str | None = ctx.meta.get("syncctl.factory")
    if named is None:
        return known or [DEFAULT_FACTORY]
    if not FACTORY_NAME.fullmatch(named):
        raise _Refused(
            f"--factory: {named!r} is not a factory name (lowercase letters, digits, '-')",
            EXIT_CONFIG,
        )
    if named not in known and named != DEFAULT_FACTORY:
        there = ", ".join(known) or "none"
        raise _Refused(f"--factory: no factory {named!r} (there are: {there})", EXIT_CONFIG)
    return [named]


def _run_store(
    ctx: click.Context, work: Callable[[Store], Awaitable[T]], *, write: bool = False
) -> T:
    path = _db_path(ctx)
    # A URL names a PostgreSQL database, which Store.open reaches or names the problem of.
    if write and not is_postgres_url(path) and not Path(path).exists():
        _fail(f"database not found: {path}", EXIT_STORE)

    async def go() -> T:
        store = await Store.open(path, readonly=not write)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return anyio.run(go)
    except StoreError as exc:
        _fail(str(exc), EXIT_STORE)
        raise
    except _Refused as exc:
        _fail(str(exc), exc.code)
        raise


def _with_store(
    ctx: click.Context,
    work: Callable[[Store], Awaitable[T]],
    *,
    write: bool = False,
    has: Callable[[Store], Awaitable[bool]] | None = None,
) -> T:
    """Run ``work`` on one factory's store: ``--factory``'s, the only one, or the one that
    ``has`` what the command names (an order, a PO).

    :raises SystemExit: several factories and none could be chosen (exit 2).
    """

    async def one(store: Store) -> T:
        names = await _factory_names(ctx, store)
        if len(names) > 1 and has is not None:
            holders = [n for n in names if await has(store.for_factory(n))]
            if len(holders) > 1:
                raise _Refused(
                    f"it is in several factories ({', '.join(holders)}): name one with --factory",
                    EXIT_CONFIG,
                )
            names = holders or names[:1]  # none has it: any one says "not found"
        if len(names) > 1:
            raise _Refused(
                f"{len(names)} factories ({', '.join(names)}): name one with --factory",
                EXIT_CONFIG,
            )
        return await work(store.for_factory(names[0]))

    return _run_store(ctx, one, write=write)


def _has_link(key: str) -> Callable[[Store], Awaitable[bool]]:
    async def has(store: Store) -> bool:
        return await store.find_link(key) is not None

    return has


def _per_factory(ctx: click.Context, work: Callable[[Store], Awaitable[T]]) -> dict[str, T]:
    """Run ``work`` on each factory looked at (``--factory``'s, else every one)."""

    async def each(store: Store) -> dict[str, T]:
        return {
            name: await work(store.for_factory(name)) for name in await _factory_names(ctx, store)
        }

    return _run_store(ctx, each)


# -- the shapes of things --------------------------------------------------------------------


def _owner(lease: LeaseRecord | None) -> dict[str, Any] | None:
    """The daemon holding a factory's lease (``None``: no daemon ever took one)."""
    if lease is None:
        return None
    return {
        "daemon": lease.owner,
        "fence": lease.fence,
        "held": lease.held,
        "expires_in_s": round(lease.remaining, 1),
    }


def _owner_text(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "none"
    if owner["held"]:
        return f"{owner['daemon']} (fence {owner['fence']}, expires in {owner['expires_in_s']} s)"
    return f"none (lease of {owner['daemon']} expired {-owner['expires_in_s']} s ago)"


_PAUSED_SINCE = re.compile(r" since (\S+):(?: |$)")


async def _paused(store: Store) -> list[dict[str, Any]]:
    """Services whose token was rejected: ``{"service", "since", "message"}``."""
    return _pauses(await store.meta_with_prefix(PAUSED_PREFIX))


def _pauses(meta: dict[str, str]) -> list[dict[str, Any]]:
    """:func:`_paused` of a factory's ``paused.`` meta keys (without the prefix)."""
    result = []
    for service, message in sorted(meta.items()):
        since: str | None = None
        found = _PAUSED_SINCE.search(message)
        if found:
            try:
                since = _when(datetime.fromisoformat(found.group(1)).timestamp())
            except ValueError:
                since = None
        result.append({"service": service, "since": since, "message": message})
    return result


def _order(link: LinkedOrder, factory: str) -> dict[str, Any]:
    """An order as every command shows it (``inspect PO`` adds its details)."""
    return {
        "factory": factory,
        "id": link.id,
        "po_number": link.po_number,
        "po_id": link.po_id,
        "so_number": link.so_number,
        "so_id": link.so_id,
        "state": link.state,
        "since": _when_dt(link.state_since),
        "reason": link.reason,
        "resume_state": link.resume_state,
        "currency": link.currency,
        "last_error": link.last_error,
        "created_at": _when_dt(link.created_at),
        "updated_at": _when_dt(link.updated_at),
    }


def _number(value: Any) -> str | None:
    return None if value is None else str(value)


def _observation(seen: PurchaseOrderObservation) -> dict[str, Any]:
    return {
        "po_number": seen.po_number,
        "po_id": seen.po_id,
        "supplier": seen.supplier,
        "status": seen.status,
        "reason": seen.reason,
        "po_created_at": _when(seen.po_created_at),
        "first_seen_at": _when(seen.first_seen_at),
        "seen_at": _when(seen.seen_at),
    }


def _import(outcome: ImportOutcome) -> dict[str, Any]:
    return {
        "event_id": outcome.event_id,
        "po_number": outcome.po_number,
        "result": outcome.result.value,
        "detail": outcome.detail,
        "po_id": outcome.po_id,
        "decided_at": _when(outcome.decided_at),
    }


def _state_option(ctx: click.Context, state: str | None) -> None:
    """An unknown ``--state`` is a usage error naming the states there are."""
    if state is None:
        return
    chart = _chart(ctx)
    if state not in chart.states:
        _fail(
            f"--state: unknown state {state!r}; the statechart has {', '.join(chart.states)}",
            EXIT_CONFIG,
        )


def _poll_time(value: str) -> str | None:
    try:
        return _when(float(value))
    except ValueError:
        return None


# -- commands ------------------------------------------------------------------------------


@main.command()
@_location_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Orders per state, the oldest in each, paused services, inbox backlog, last polls."""

    chart = _chart(ctx)

    async def work(store: Store) -> dict[str, dict[str, Any]]:
        names = await _factory_names(ctx, store)
        # One grouped read of each kind for every factory, whatever their number (a read
        # per factory each was ~6,000 queries for 1,000 factories).
        leases = {r.factory: r for r in await store.leases()}
        counts = await store.counts_by_state_per_factory()
        oldest = await store.oldest_by_state_per_factory()
        backlogs = await store.inbox_backlog_per_factory()
        cursors = await store.cursors_per_factory()
        polls = await store.meta_with_prefix_per_factory("last_poll.")
        pauses = await store.meta_with_prefix_per_factory(PAUSED_PREFIX)
        return {
            name: _factory_status(
                chart,
                counts=counts.get(name, {}),
                oldest=oldest.get(name, {}),
                backlog=backlogs.get(name, (0, None)),
                cursors=cursors.get(name, {}),
                polls=polls.get(name, {}),
                pauses=pauses.get(name, {}),
                lease=leases.get(name),
            )
            for name in names
        }

    each = _run_store(ctx, work)
    if len(each) > 1:
        _status_of_factories(each, as_json)
        return
    ((name, data),) = each.items()
    data = {"factory": name, **data}
    if as_json:
        _emit(data)
        return
    click.echo(f"{'state':<18} {'orders':>7}  {'oldest_po_number':<16}  oldest_since")
    for state, info in data["states"].items():
        click.echo(
            f"{state:<18} {info['orders']:>7}  {_text(info['oldest_po_number']):<16}  "
            f"{_text(info['oldest_since'])}"
        )
    click.echo(f"{'total':<18} {data['total']:>7}")
    click.echo(f"needs_attention: {_plural(data['needs_attention'], 'order')}")
    if not data["paused"]:
        click.echo("paused: none")
    for pause in data["paused"]:
        click.echo(f"paused: {pause['service']} since {_text(pause['since'])}: {pause['message']}")
    click.echo(
        f"inbox_backlog: {_plural(data['inbox_backlog'], 'event')}"
        + (f" (oldest since {data['inbox_oldest_since']})" if data["inbox_oldest_since"] else "")
    )
    if data["owner"] is not None:  # daemons sharing factories on PostgreSQL
        click.echo(f"owner: {_owner_text(data['owner'])}")
    for source, when in data["last_successful_poll"].items():
        click.echo(f"last_successful_poll of {source}: {_text(when)}")
    for name, info in data["cursors"].items():
        click.echo(f"cursor {name}: {info['value']} (updated_at {_text(info['updated_at'])})")


def _factory_status(
    chart: Statechart,
    *,
    counts: dict[str, int],
    oldest: dict[str, tuple[str, float]],
    backlog: tuple[int, float | None],
    cursors: dict[str, tuple[str, float]],
    polls: dict[str, str],
    pauses: dict[str, str],
    lease: LeaseRecord | None,
) -> dict[str, Any]:
    """One factory's ``status --json`` (without its name) from the store's reads of it."""
    waiting, oldest_event = backlog
    return {
        "states": {
            state: {
                "orders": count,
                "oldest_po_number": oldest[state][0] if state in oldest else None,
                "oldest_since": _when(oldest[state][1]) if state in oldest else None,
            }
            for state, count in sorted(counts.items())
        },
        "total": sum(counts.values()),
        "needs_attention": sum(counts.get(s, 0) for s in chart.attention_states()),
        "paused": _pauses(pauses),
        "inbox_backlog": waiting,
        "inbox_oldest_since": _when(oldest_event),
        "last_successful_poll": {
            source: _poll_time(value) for source, value in sorted(polls.items())
        },
        "cursors": {
            name: {"value": v, "updated_at": _when(t)} for name, (v, t) in sorted(cursors.items())
        },
        "owner": _owner(lease),
    }


def _status_of_factories(each: dict[str, dict[str, Any]], as_json: bool) -> None:
    """``status`` of several factories: a line each (``--factory NAME`` says one's all)."""
    if as_json:
        _emit(
            {
                "factories": each,
                "total": sum(data["total"] for data in each.values()),
                "needs_attention": sum(data["needs_attention"] for data in each.values()),
            }
        )
        return
    width = max(len("factory"), *(len(name) for name in each))
    # The owner column only where daemons share the factories through leases.
    owners = {name: _owner_text(data["owner"]) for name, data in each.items()}
    owned = any(data["owner"] for data in each.values())
    o_width = max(len("owner"), *(len(o) for o in owners.values())) if owned else 0
    owner_head = f"  {'owner':<{o_width}}" if owned else ""
    click.echo(
        f"{'factory':<{width}} {'orders':>7} {'attention':>9} {'inbox':>6}  {'paused':<18}"
        f"{owner_head}  states"
    )
    for name, data in each.items():
        paused = ",".join(p["service"] for p in data["paused"]) or "none"
        states = ", ".join(f"{state} {info['orders']}" for state, info in data["states"].items())
        owner = f"  {owners[name]:<{o_width}}" if owned else ""
        click.echo(
            f"{name:<{width}} {data['total']:>7} {data['needs_attention']:>9} "
            f"{data['inbox_backlog']:>6}  {paused:<18}{owner}  {states or '-'}".rstrip()
        )
    click.echo(f"{'total':<{width}} {sum(data['total'] for data in each.values()):>7}")


def _line(line: Any) -> dict[str, Any]:
    return {
        "line_id": line.line_id,
        "sku": line.sku,
        "quantity": _number(line.quantity),
        "katana_variant_id": line.katana_variant_id,
        "created_variant": line.created_variant,
        "price": _number(line.price),
        "cost_before": _number(line.cost_before),
        "cost_after": _number(line.cost_after),
    }


_LIST_HEADER = f"{'id':>6} {'po_number':<12} {'so_number':<14} {'state':<16} {'since':<20}  reason"


def _list_row(order: dict[str, Any]) -> str:
    return (
        f"{order['id']:>6} {order['po_number']:<12} {_text(order['so_number']):<14} "
        f"{order['state']:<16} {_text(order['since']):<20}  {order['reason'] or ''}"
    ).rstrip()


@main.command()
@_location_options
@click.argument("key", required=False)
@click.option("--state", default=None, help="Only orders in this state.")
@click.option(
    "--older-than",
    default=None,
    callback=_duration_option,
    help="Only orders that have sat in their state this long (90s, 15m, 2h, 1d); "
    "open states unless --state names one.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def inspect(
    ctx: click.Context,
    key: str | None,
    state: str | None,
    older_than: float | None,
    as_json: bool,
) -> None:
    """One order by PO number or link id (ids, lines, notes, history), or the list."""
    _state_option(ctx, state)
    open_states = _chart(ctx).open_states()

    async def one(store: Store) -> dict[str, Any] | None:
        assert key is not None
        link = await store.find_link(key)
        if link is None:
            return None
        history = await store.history(link.id)
        paused = await _paused(store) if link.state in open_states else []
        return {
            **_order(link, store.factory),
            "paused": paused,
            "lines": [_line(line) for line in link.lines],
            "notes": list(link.notes),
            "history": [
                {
                    "at": _when(h.at),
                    "from": h.from_state,
                    "to": h.to_state,
                    "trigger": h.trigger,
                    "cause": h.cause,
                }
                for h in history
            ],
        }

    async def many(store: Store) -> list[dict[str, Any]]:
        if older_than is not None:
            links = await store.links_in_states(
                [state] if state is not None else open_states, older_than=older_than
            )
        elif state is not None:
            links = await store.links_in_states([state])
        else:
            links = await store.all_links()
        return [_order(link, store.factory) for link in links]

    if key is None:
        each = _per_factory(ctx, many)
        rows = [row for found in each.values() for row in found]
        if as_json:
            _emit(rows)
            return
        where = f" in {state}" if state is not None else ""
        if not rows:
            click.echo(f"no linked orders{where}")
            return
        several = len(each) > 1
        click.echo(f"{'factory':<16} {_LIST_HEADER}" if several else _LIST_HEADER)
        for row in rows:
            click.echo(f"{row['factory']:<16} {_list_row(row)}" if several else _list_row(row))
        click.echo(f"{_plural(len(rows), 'order')}{where}")
        return

    data = _with_store(ctx, one, has=_has_link(key))
    if data is None:
        _fail(f"no linked order {key!r} (syncctl explain {key} says why)", EXIT_NOT_FOUND)
        return
    if as_json:
        _emit(data)
        return
    click.echo(f"po_number {data['po_number']} (po_id {data['po_id']}, id {data['id']})")
    click.echo(f"so_number {_text(data['so_number'])} (so_id {_text(data['so_id'])})")
    click.echo(
        f"state {data['state']} since {_text(data['since'])}"
        + (f": {data['reason']}" if data["reason"] else "")
    )
    for name in ("resume_state", "currency", "last_error"):
        if data[name] is not None:
            click.echo(f"{name} {data[name]}")
    for pause in data["paused"]:
        click.echo(f"paused: {pause['message']}")
    for line in data["lines"]:
        known = [
            f"{name} {line[name]}"
            for name in ("price", "cost_before", "cost_after")
            if line[name] is not None
        ]
        click.echo(
            f"  line {line['line_id']}: {line['sku']} x {line['quantity']} → katana_variant_id "
            f"{line['katana_variant_id']}" + "".join(f", {part}" for part in known)
        )
    for note in data["notes"]:
        click.echo(f"  note: {note}")
    click.echo("history:")
    for step in data["history"]:
        click.echo(
            f"  {step['at']}  {step['from'] or '·':>15} → {step['to']:<15} "
            f"[{step['trigger']}] {step['cause']}"
        )


@main.command()
@_location_options
@click.option("--limit", default=30, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent transitions across all orders, newest first."""

    async def work(store: Store) -> list[dict[str, Any]]:
        return [
            {
                "at": _when(t.at),
                "po_number": t.po_number,
                "from": t.from_state,
                "to": t.to_state,
                "trigger": t.trigger,
                "cause": t.cause,
            }
            for t in await store.recent_transitions(limit)
        ]

    each = _per_factory(ctx, work)
    # Newest first across factories (ISO times in UTC sort as text), at most --limit.
    rows = sorted(
        ({"factory": name, **row} for name, found in each.items() for row in found),
        key=lambda row: row["at"] or "",
        reverse=True,
    )[:limit]
    if as_json:
        _emit(rows)
        return
    if not rows:
        click.echo("no transitions yet")
    for row in rows:
        click.echo(
            (f"{row['factory']:<16} " if len(each) > 1 else "")
            + f"{row['at']}  {_text(row['po_number']):<12} {row['from'] or '·':>15} → "
            f"{row['to']:<15} [{row['trigger']}] {row['cause']}"
        )


def _queue(
    ctx: click.Context,
    key: str,
    action: str,
    reason: str | None,
    as_json: bool,
    *,
    dry_run: bool = False,
) -> None:
    """Queue an operator's command for the daemon (or, with ``dry_run``, only say what it
    would do)."""
    from syncd.domain.replay import plan_replay

    chart = _chart(ctx)

    async def work(store: Store) -> dict[str, Any] | None:
        link = await store.find_link(key)
        if link is None:
            return None
        data: dict[str, Any] = {
            "order": _order(link, store.factory),
            "action": action,
            "reason": reason,
            "dry_run": dry_run,
            "allowed": True,
            "to": None,
            "plan": None,
            "event_id": None,
        }
        if action == inbox.REPLAY:
            # Planning reads the store and the statechart only: no effect runs here.
            seen = inbox.replayable(await store.events_for_link(link.id))
            data["plan"] = plan_replay(chart, link, seen).describe()
        else:
            decision = chart.decide(link.state, action, resume_state=link.resume_state)
            if decision is None:
                data["allowed"] = False
                return data
            data["to"] = decision.dest
        if dry_run:
            return data
        command = inbox.OperatorCommand(
            link_id=link.id, action=action, reason=reason, operator=_operator()
        )
        data["event_id"] = await store.add_event(
            "syncctl", inbox.OPERATOR, inbox.encode(command), link_id=link.id, po_id=link.po_id
        )
        return data

    data = _with_store(ctx, work, write=not dry_run, has=_has_link(key))
    if data is None:
        _fail(f"no linked order {key!r}", EXIT_NOT_FOUND)
        return
    order = data["order"]
    if not data["allowed"]:
        _fail(
            f"order {order['po_number']} is {order['state']}: {action} does not apply",
            EXIT_NOT_ALLOWED,
        )
        return
    if as_json:
        _emit(data)
        return
    what = data["plan"] or f"{order['state']} → {data['to']}"
    if dry_run:
        click.echo(f"{action} {order['po_number']} would: {what}")
    else:
        click.echo(
            f"queued {action} of {order['po_number']} ({what}) as inbox event "
            f"{data['event_id']}; the daemon applies it (at its next start if it is not running)"
        )


@main.command()
@_location_options
@click.argument("key")
@click.option("--reason", default=None, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retry(ctx: click.Context, key: str, reason: str | None, as_json: bool) -> None:
    """Send an order that needs attention back to where it was."""
    _queue(ctx, key, "retry", reason, as_json)


@main.command()
@_location_options
@click.argument("key")
@click.option("--reason", required=True, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cancel(ctx: click.Context, key: str, reason: str, as_json: bool) -> None:
    """Cancel an order: syncd stops following it and never receives its PO."""
    _queue(ctx, key, "cancel", reason, as_json)


@main.command()
@_location_options
@click.argument("key")
@click.option("--dry-run", is_flag=True, help="Only say what the replay would do.")
@click.option("--reason", default=None, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay(ctx: click.Context, key: str, dry_run: bool, reason: str | None, as_json: bool) -> None:
    """Re-drive an order from its state: re-run the state's effect, or re-process the
    order's stored inbox events."""
    _queue(ctx, key, inbox.REPLAY, reason, as_json, dry_run=dry_run)


#: What ``import --wait`` exits with for each outcome the daemon records.
_IMPORT_EXIT = {
    ImportResult.DISCOVERED: 0,
    ImportResult.NOT_FOUND: EXIT_NOT_FOUND,
    ImportResult.NOT_ACTIVE: EXIT_NOT_ALLOWED,
    ImportResult.ALREADY_LINKED: EXIT_NOT_ALLOWED,
    ImportResult.OTHER_SUPPLIER: EXIT_OTHER_SUPPLIER,
}


async def _await_import(
    store: Store, event_id: int, po_number: str, seconds: float
) -> tuple[ImportOutcome | None, str | None, LinkedOrder | None]:
    """Wait for the daemon to settle the request: (its outcome, the inbox outcome, the link
    once created); all ``None`` when nothing came in ``seconds``."""
    with anyio.move_on_after(seconds):
        while True:
            settled = await store.event_outcome(event_id)
            if settled is not None and settled[0] is not None:
                break
            await anyio.sleep(0.1)
        outcome = await store.import_outcome(event_id)
        if outcome is None or outcome.result is not ImportResult.DISCOVERED:
            return outcome, settled[1], None
        # Discovered: the dispatcher links it when it processes the discovery, next. Another
        # process writes it: polling the file is the only way to hear of it.
        while True:
            link = await store.link_by_po_number(po_number)
            if link is not None:
                return outcome, settled[1], link
            await anyio.sleep(0.1)
    outcome = await store.import_outcome(event_id)
    return outcome, None, None


@main.command(name="import")
@_location_options
@click.argument("po_number")
@click.option("--reason", default=None, help="Why, for the order's history.")
@click.option("--force", is_flag=True, help="Import it even if it is another supplier's PO.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    is_flag=False,
    flag_value=DEFAULT_WAIT,
    default=None,
    metavar="[SECONDS]",
    help=f"Wait for the daemon's outcome (default {DEFAULT_WAIT:.0f} s) and exit with it.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_(
    ctx: click.Context,
    po_number: str,
    reason: str | None,
    force: bool,
    wait: float | None,
    as_json: bool,
) -> None:
    """Import one PO on purpose (backfill), e.g. one created before syncd's activation.

    The daemon fetches it from TradeGecko by number and discovers it like a new one. Another
    supplier's PO is refused unless --force. With --wait the command reports the daemon's
    outcome; without, `syncctl explain PO_NUMBER` shows it.
    """

    async def queue(store: Store) -> dict[str, Any]:
        link = await store.link_by_po_number(po_number)
        if link is not None:
            return {
                "refused": EXIT_NOT_ALLOWED,
                "why": f"already linked (order {link.id}, {link.state})",
            }
        seen = await store.purchase_order_observation(po_number)
        if not force and seen is not None and seen.reason == OTHER_SUPPLIER:
            return {
                "refused": EXIT_OTHER_SUPPLIER,
                "why": f"another supplier's ({_text(seen.supplier)}); --force imports it anyway",
            }
        request = inbox.ImportRequest(
            po_number=po_number, reason=reason, operator=_operator(), force=force
        )
        event_id = await store.add_event("syncctl", inbox.IMPORT_REQUESTED, inbox.encode(request))
        return {"refused": None, "event_id": event_id}

    queued = _with_store(ctx, queue, write=True)
    if queued["refused"] is not None:
        _fail(f"PO {po_number} is {queued['why']}", queued["refused"])
        return
    event_id: int = queued["event_id"]
    data: dict[str, Any] = {
        "po_number": po_number,
        "event_id": event_id,
        "force": force,
        "waited": wait is not None,
        "outcome": None,
        "order": None,
    }
    if wait is None:
        if as_json:
            _emit(data)
            return
        click.echo(
            f"queued import of {po_number} as inbox event {event_id}; the daemon fetches it "
            f"from TradeGecko (at its next start if it is not running); "
            f"`syncctl explain {po_number}` shows the outcome"
        )
        return

    seconds = wait

    waited_in: list[str] = []

    async def await_it(store: Store) -> tuple[ImportOutcome | None, str | None, LinkedOrder | None]:
        waited_in.append(store.factory)
        return await _await_import(store, event_id, po_number, seconds)

    outcome, settled, link = _with_store(ctx, await_it)
    data["outcome"] = _import(outcome) if outcome is not None else None
    data["order"] = _order(link, waited_in[0]) if link is not None else None
    if outcome is None:
        if as_json:
            _emit(data)
        if settled is not None:
            _fail(f"the daemon gave up on the import of {po_number}: {settled}", EXIT_NO_OUTCOME)
        _fail(
            f"no outcome for the import of {po_number} (inbox event {event_id}) after "
            f"{seconds:g} s: is the daemon running? `syncctl explain {po_number}` shows it later",
            EXIT_NO_OUTCOME,
        )
        return
    code = _IMPORT_EXIT[outcome.result]
    if as_json:
        _emit(data)
    elif code == 0:
        state = f"; order {link.id} is {link.state}" if link is not None else ""
        click.echo(f"imported: {outcome.detail}{state}")
    if code != 0:
        hint = "; --force imports it anyway" if code == EXIT_OTHER_SUPPLIER else ""
        _fail(f"not imported ({outcome.result.value}): {outcome.detail}{hint}", code)


async def _pending_imports(store: Store, po_number: str) -> list[int]:
    found = []
    for event in await store.pending_events(kinds=[inbox.IMPORT_REQUESTED]):
        try:
            request = inbox.decode(event.kind, event.payload)
        except (KeyError, msgspec.DecodeError):
            continue
        if isinstance(request, inbox.ImportRequest) and request.po_number == po_number:
            found.append(event.id)
    return found


@main.command()
@_location_options
@click.argument("po_number")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def explain(ctx: click.Context, po_number: str, as_json: bool) -> None:
    """Why a PO is or is not syncing: linked (state, reason), an import queued or refused,
    a draft, another supplier's, created before activation, not seen yet, or paused."""
    config = _config(ctx)
    chart = _chart(ctx)

    async def has(store: Store) -> bool:
        return (
            await store.link_by_po_number(po_number) is not None
            or await store.purchase_order_observation(po_number) is not None
        )

    async def work(store: Store) -> dict[str, Any]:
        # The supplier the factory looks for: its own settings.
        factory = config.factories.get(store.factory) if config is not None else None
        supplier = factory.tradegecko.supplier_name if factory is not None else None
        match = factory.tradegecko.supplier_match if factory is not None else None
        link = await store.link_by_po_number(po_number)
        seen = await store.purchase_order_observation(po_number)
        last = await store.last_import_outcome(po_number)
        activated = await store.get_meta("activated_at")
        poll = (await store.meta_with_prefix("last_poll.")).get("tradegecko")
        return {
            "po_number": po_number,
            "order": _order(link, store.factory) if link is not None else None,
            "observation": _observation(seen) if seen is not None else None,
            "import": _import(last) if last is not None else None,
            "import_queued": await _pending_imports(store, po_number),
            "paused": await _paused(store),
            "activated_at": _when(datetime.fromisoformat(activated).timestamp())
            if activated
            else None,
            "last_successful_poll": _poll_time(poll) if poll is not None else None,
            "supplier_name": supplier,
            "supplier_match": match,
        }

    data = _with_store(ctx, work, has=has)
    data["status"], data["explanation"] = _explain(data, chart)
    if as_json:
        _emit(data)
        return
    for line in data["explanation"]:
        click.echo(line)


def _explain(data: dict[str, Any], chart: Statechart) -> tuple[str, list[str]]:
    """``(status, lines)``: status is ``linked``, ``import_queued``, ``not_linked`` (seen and
    left), ``not_found`` (an import found no such PO) or ``not_seen``."""
    number = data["po_number"]
    order, seen, last = data["order"], data["observation"], data["import"]
    lines: list[str] = []
    if order is not None:
        status = "linked"
        state = chart.states.get(order["state"])
        lines.append(
            f"PO {number} is linked (order {order['id']}, SO {_text(order['so_number'])}): "
            f"{order['state']} since {_text(order['since'])}"
            + (f": {order['reason']}" if order["reason"] else "")
        )
        if state is not None and state.description:
            lines.append(f"  {order['state']}: {state.description}")
        if state is not None and state.terminal:
            return status, lines
    elif data["import_queued"]:
        status = "import_queued"
        events = ", ".join(str(e) for e in data["import_queued"])
        lines.append(
            f"PO {number}: an import is queued (inbox event {events}); the daemon has not "
            "handled it yet (is it running?)"
        )
    elif seen is not None:
        status = "not_linked"
        lines.append(
            f"PO {number} (po_id {seen['po_id']}) was seen at {seen['seen_at']}, not linked:"
        )
        reason = seen["reason"]
        if reason == BEFORE_ACTIVATION:
            lines.append(
                f"  created {_text(seen['po_created_at'])}, before syncd's activation "
                f"({_text(data['activated_at'])}): history is never imported; "
                f"`syncctl import {number}` imports it on purpose"
            )
        elif reason == OTHER_SUPPLIER:
            wanted = f"{data['supplier_name']!r}" if data["supplier_name"] else "the configured one"
            lines.append(
                f"  another supplier's ({_text(seen['supplier'])}, not {wanted}); "
                f"`syncctl import {number} --force` imports it anyway"
            )
        elif seen["status"] == "draft":
            lines.append("  a draft: it is imported once it is issued (status active)")
        else:
            lines.append(f"  status {seen['status']}: {reason}")
    elif last is not None and last["result"] == ImportResult.NOT_FOUND.value:
        status = "not_found"
    else:
        status = "not_seen"
        who = (
            f"of supplier {data['supplier_name']!r} (supplier_match {data['supplier_match']})"
            if data["supplier_name"]
            else "of the configured supplier"
        )
        since = (
            f"after its activation ({data['activated_at']})"
            if data["activated_at"]
            else "after its first start (it has not run on this database yet)"
        )
        lines.append(
            f"PO {number} has not been seen: syncd links the active POs {who} created {since}; "
            f"last successful TradeGecko poll {_text(data['last_successful_poll'])}. Another "
            f"supplier's PO or an older one is imported only on purpose: "
            f"`syncctl import {number}`"
        )
    if last is not None:
        lines.append(
            f"last import request (inbox event {last['event_id']}) at {last['decided_at']}: "
            f"{last['result']}: {last['detail']}"
        )
    lines.extend(f"paused: {pause['message']}" for pause in data["paused"])
    return status, lines


def _statechart_data(chart: Statechart) -> dict[str, Any]:
    """States, the declared conditions and every transition of the file with the conditions
    it needs (``back``: the retry that returns an order to where it was)."""
    transitions = chart.edges()
    return {
        "initial": chart.initial,
        "conditions": dict(chart.conditions),
        "states": [
            {
                "name": state.name,
                "description": state.description,
                "effect": state.effect,
                "follow": state.follow,
                "attention": state.attention,
                "terminal": state.terminal,
            }
            for state in chart.states.values()
        ],
        "transitions": transitions,
    }


@main.command()
@_location_options
@click.option("--format", "fmt", type=click.Choice(["mermaid", "svg"]), default="mermaid")
@click.option("--json", "as_json", is_flag=True, help="States and transitions as JSON.")
@click.pass_context
def statechart(ctx: click.Context, fmt: str, as_json: bool) -> None:
    """Print the linked-order statechart as a mermaid diagram, as SVG (needs Graphviz), or as
    JSON."""
    chart = _chart(ctx)
    if as_json:
        _emit(_statechart_data(chart))
        return
    if fmt == "mermaid":
        click.echo(chart.mermaid(), nl=False)
        return
    import graphviz

    try:
        svg: bytes = chart.graph("graphviz").draw(None, format="svg", prog="dot")
    except graphviz.ExecutableNotFound:
        _fail(
            "--format svg needs Graphviz's `dot` program (Debian: apt install graphviz)",
            EXIT_CONFIG,
        )
        return
    click.echo(svg.decode(), nl=False)


def entry() -> None:
    """The ``syncctl`` console script."""
    run_command(main)


# -- a shadow run's plan -------------------------------------------------------------------

#: What each planned request is, for the plan's summary: (effect, method, endpoint) → kind.
_PLAN_KINDS = {
    ("import_order", "POST", "/customers"): "customers",
    ("import_order", "POST", "/products"): "variants",
    ("import_order", "POST", "/sales_orders"): "sales_orders",
    ("make_to_order", "POST", "/manufacturing_order_make_to_order"): "manufacturing_orders",
    ("receive_order", "PUT", "/purchase_order_line_items/{id}"): "recosted_lines",
    ("receive_order", "POST", "/purchase_orders/{id}/actions/receive"): "receipts",
}


def _planned(plan: PlannedWrite) -> dict[str, Any]:
    return {
        "effect": plan.effect,
        "seq": plan.seq,
        "kind": _PLAN_KINDS.get((plan.effect, plan.method, plan.endpoint), "other"),
        "service": plan.service,
        "method": plan.method,
        "path": plan.path,
        "body": plan.body,
        # The placeholder answer the run went on with; null: withheld, the plan ends there.
        "answer": plan.answer,
        "detail": plan.detail,
        "planned_at": _when(plan.planned_at),
    }


def _plan_orders(plans: list[PlannedWrite]) -> list[dict[str, Any]]:
    """The plan as one entry per order, its requests in the order they would be sent."""
    orders: dict[int, dict[str, Any]] = {}
    for plan in plans:
        order = orders.setdefault(
            plan.link_id, {"po_number": plan.po_number, "link_id": plan.link_id, "requests": []}
        )
        order["requests"].append(_planned(plan))
    return list(orders.values())


def _amount(value: Any) -> str:
    """A quantity or price as a person writes it (``150.0`` → ``150``)."""
    try:
        return f"{Decimal(str(value)).normalize():f}"
    except ArithmeticError:
        return str(value)


def _described(request: dict[str, Any], new_skus: dict[int, str]) -> list[str]:
    """A planned request for a person: what it does, then its rows (an SO's)."""
    body = request["body"] if isinstance(request["body"], dict) else {}
    detail = request["detail"] if isinstance(request["detail"], dict) else {}
    kind = request["kind"]
    withheld = "" if request["answer"] is not None else " (withheld: the plan stops here)"
    if kind == "customers":
        return [f"create customer {body.get('name')!r} (reference {body.get('reference_id')})"]
    if kind == "variants":
        made = ", ".join(str(v.get("sku")) for v in body.get("variants", []))
        return [f"create product {body.get('name')!r} with variant {made}"]
    if kind == "sales_orders":
        customer = body.get("customer_id")
        who = "the new customer" if isinstance(customer, int) and customer < 0 else customer
        if not isinstance(customer, int) or customer >= 0:
            who = f"customer {customer}"
        lines = [f"create SO {body.get('order_no')} for {who}{withheld}"]
        skus: dict[str, str] = detail.get("skus", {})
        for row in body.get("sales_order_rows", []):
            variant = row.get("variant_id")
            if isinstance(variant, int) and variant in new_skus:
                named = f"new variant {new_skus[variant]}"
            else:
                named = f"{skus.get(str(variant), '?')} (variant {variant})"
            lines.append(
                f"  {named}: {_amount(row.get('quantity'))} at "
                f"{_amount(row.get('price_per_unit'))} "
                f"{body.get('currency') or ''}".rstrip()
            )
        return lines
    if kind == "recosted_lines":
        price = _amount(body.get("purchase_order_line_item", {}).get("price"))
        before = _amount(detail.get("before", "?"))
        line = detail.get("line_id", request["path"])
        return [f"re-cost line {line} ({detail.get('sku', '?')}): {before} → {price}"]
    if kind == "receipts":
        return [f"receive the PO ({request['path']}){withheld}"]
    if kind == "manufacturing_orders":
        return [f"make to order SO row {body.get('sales_order_row_id')}{withheld}"]
    return [f"{request['method']} {request['service']} {request['path']}{withheld}"]


def describe_plan(plans: list[PlannedWrite]) -> list[str]:
    """A shadow run's plan (:meth:`Store.plans`) as text lines: each order, then each
    request it would send (``syncctl plan``, ``syncd demo --shadow``)."""
    return _plan_lines(_plan_orders(plans))


def _plan_lines(orders: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for order in orders:
        lines.append(f"{order['po_number']}:")
        new_skus: dict[int, str] = {}
        for request in order["requests"]:
            answer = request["answer"] if isinstance(request["answer"], dict) else {}
            for variant in answer.get("variants", []) if request["kind"] == "variants" else []:
                new_skus[variant.get("id")] = str(variant.get("sku"))
            first, *rest = _described(request, new_skus)
            lines.append(f"  {request['effect']:<14} {first}")
            lines.extend(f"  {'':<14} {line}" for line in rest)
    return lines


@main.command()
@_location_options
@click.argument("po", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plan(ctx: click.Context, po: str | None, as_json: bool) -> None:
    """What a shadow run (``syncd run --shadow``) would have sent, per order and in sum.

    Reads the shadow run's database (``daemon.shadow_database``, by default ``database``
    with ``.shadow`` before its suffix), or the one ``--db`` names. Each order shows every
    writing request its effect would have sent, in order: new customers and variants (by
    SKU), the sales order with its rows, each re-costed line (price before → after), the
    receipt.
    """
    if ctx.meta.get("syncctl.db") is None:
        config = _config(ctx)
        if config is not None:
            try:
                ctx.meta["syncctl.db"] = config.as_shadow().daemon.database
            except ConfigError as exc:
                _fail(str(exc), EXIT_CONFIG)

    async def work(store: Store) -> tuple[list[dict[str, Any]], LinkedOrder | None]:
        orders = _plan_orders(await store.plans(po))
        return orders, None if po is None or orders else await store.link_by_po_number(po)

    orders, unplanned = _with_store(ctx, work)
    if po is not None and not orders:
        why = "" if unplanned is None else f" (its order is {unplanned.state}: nothing to send)"
        _fail(f"no plan for PO {po} in the shadow run's database{why}", EXIT_NOT_FOUND)
    requests = [r for order in orders for r in order["requests"]]
    summary: dict[str, int] = {"orders": len(orders)}
    for kind in [*dict.fromkeys(_PLAN_KINDS.values()), "other"]:
        summary[kind] = sum(1 for r in requests if r["kind"] == kind)
    if as_json:
        _emit({"orders": orders, "summary": summary})
        return
    for line in _plan_lines(orders):
        click.echo(line)
    click.echo(", ".join(f"{value} {key.replace('_', ' ')}" for key, value in summary.items()))


@main.command()
@_location_options
@click.option(
    "--shadow-db",
    default=None,
    help="The shadow run's database; default daemon.shadow_database, else the live "
    "database's name with .shadow before its suffix.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def adopt(ctx: click.Context, shadow_db: str | None, as_json: bool) -> None:
    """Before a first live start: take over what a shadow run saw.

    Copies into the live database (``--db``, else the config's ``daemon.database``; made if
    missing) the shadow run's activation time, so the live run imports every PO the shadow
    run planned, and each order the shadow run followed on a Katana sales order (with its
    history), so the live run follows it from where the shadow run was. Refused (exit 9)
    when the live database already has orders or a daemon has it open. Without ``adopt``
    a live start begins clean, with POs raised from then on.
    """
    config = _config(ctx)
    live_db = _db_path(ctx)
    if shadow_db is None:
        # Where the shadow run of this live database kept its state.
        daemon = config.daemon if config is not None else DaemonConfig(database=live_db)
        try:
            shadow_db = shadow_database(msgspec.structs.replace(daemon, database=live_db))
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
            raise
    if not is_postgres_url(shadow_db) and not Path(shadow_db).exists():
        _fail(f"shadow database not found: {shadow_db}", EXIT_STORE)
    if shadow_db == live_db:
        _fail(f"the shadow and the live database are the same: {live_db}", EXIT_CONFIG)
    try:
        adopted = anyio.run(_adopt, shadow_db, live_db)
    except _AdoptRefused as exc:
        _fail(f"{exc}; nothing adopted", EXIT_IN_USE)
        raise
    except StoreError as exc:
        _fail(str(exc), EXIT_STORE)
        raise
    if as_json:
        _emit(adopted)
        return
    for factory in adopted["factories"]:
        orders = factory["orders"]
        click.echo(
            f"{factory['factory']}: activated at {factory['activated_at'] or '-'}; adopted "
            f"{_plural(len(orders), 'order')}"
            + (f" ({', '.join(o['po_number'] for o in orders)})" if orders else "")
            + f"; {_plural(factory['left_to_import'], 'planned order')} left for the live "
            "run to import"
        )


class _AdoptRefused(Exception):
    """The live database is not one ``adopt`` may fill."""


async def _adopt(shadow_db: str, live_db: str) -> dict[str, Any]:
    shadow = await Store.open(shadow_db, readonly=True)
    try:
        try:
            live = await Store.open(live_db, exclusive=True)
        except StoreInUse:
            raise _AdoptRefused(f"a daemon runs on the live database {live_db}") from None
        try:
            running = [r.factory for r in await live.leases() if r.remaining > 0]
            if running:
                raise _AdoptRefused(f"a daemon runs on the live database {live_db} ({running[0]})")
            names = await shadow.factories() or [shadow.factory]
            for name in names:
                if await live.for_factory(name).all_links(limit=1):
                    raise _AdoptRefused(f"the live database already has orders (factory {name})")
            factories = [
                await _adopt_factory(shadow.for_factory(name), live.for_factory(name))
                for name in names
            ]
            return {"live_database": live_db, "factories": factories}
        finally:
            await live.close()
    finally:
        await shadow.close()


async def _adopt_factory(shadow: Store, live: Store) -> dict[str, Any]:
    links = list(reversed(await shadow.all_links(limit=1_000_000)))
    followed = [link for link in links if link.so_id is not None]
    activated = await shadow.get_meta("activated_at")
    if activated is not None:
        await live.set_meta("activated_at", activated)
    orders = []
    for link in followed:
        new_id = await live.adopt_link(link, await shadow.history(link.id))
        orders.append(
            {
                "po_number": link.po_number,
                "so_number": link.so_number,
                "link_id": new_id,
                "state": link.state,
            }
        )
    return {
        "factory": shadow.factory,
        "activated_at": activated,
        "orders": orders,
        "left_to_import": len(links) - len(followed),
    }
