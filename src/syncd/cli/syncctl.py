"""``syncctl``: look at linked orders in the store (read-only unless a command changes one).

``retry``, ``cancel`` and ``replay`` never call TradeGecko or Katana and never move an order
themselves: they write an *operator* event to the inbox, and the daemon's dispatcher applies
it through the statechart, in order with everything else it sees. When the daemon is not
running the event waits in the inbox for its next start.

Exit codes: 0 success; 2 bad usage or config; 3 the database cannot be opened (or written,
for the commands that queue an event); 5 the order asked for does not exist; 6 the order's
state does not allow the command (e.g. ``retry`` of an order that does not need attention).
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import click
import msgspec

from syncd.config import load_config
from syncd.domain.statechart import Statechart, load_statechart
from syncd.errors import ConfigError, StatechartError, StoreError
from syncd.runtime import inbox
from syncd.store import Store

__all__ = [
    "EXIT_CONFIG",
    "EXIT_NOT_ALLOWED",
    "EXIT_NOT_FOUND",
    "EXIT_STORE",
    "cancel",
    "history",
    "import_",
    "inspect",
    "main",
    "parse_duration",
    "replay",
    "retry",
    "statechart",
    "status",
]

EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_NOT_FOUND = 5
EXIT_NOT_ALLOWED = 6

T = TypeVar("T")


def _fail(message: str, code: int) -> None:
    click.echo(f"syncctl: {message}", err=True)
    sys.exit(code)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(epoch: float) -> str:
    seconds = max(0.0, time.time() - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


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


@click.group()
@click.option("--db", "db_path", default=None, help="The syncd database file.")
@click.option("--config", "config_path", default=None, help="Take the database from a config.")
@click.pass_context
def main(ctx: click.Context, db_path: str | None, config_path: str | None) -> None:
    """Inspect and steer syncd's linked orders."""
    if db_path is None and config_path is not None:
        try:
            db_path = load_config(config_path, require_tokens=False).daemon.database
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
    ctx.obj = db_path
    ctx.meta["syncctl.statechart"] = None
    if config_path is not None:
        try:
            config = load_config(config_path, require_tokens=False)
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
            return
        ctx.meta["syncctl.statechart"] = config.daemon.statechart


def _chart(ctx: click.Context) -> Statechart:
    try:
        return load_statechart(ctx.meta.get("syncctl.statechart"))
    except StatechartError as exc:
        _fail(str(exc), EXIT_CONFIG)
        raise


def _with_store(
    ctx: click.Context, work: Callable[[Store], Awaitable[T]], *, write: bool = False
) -> T:
    path: str | None = ctx.obj
    if path is None:
        if ctx.invoked_subcommand == "statechart" or ctx.info_name == "statechart":
            raise AssertionError("statechart needs no store")
        _fail("name the database with --db PATH or --config PATH", EXIT_CONFIG)
    assert path is not None

    if write and not Path(path).exists():
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


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Orders per state, the oldest in each, inbox backlog, last polls."""

    chart = _chart(ctx)

    async def work(store: Store) -> dict[str, Any]:
        counts = await store.counts_by_state()
        oldest = await store.oldest_by_state()
        backlog, oldest_event = await store.inbox_backlog()
        cursors = await store.cursors()
        return {
            "states": {
                state: {
                    "orders": count,
                    "oldest_po": oldest.get(state, ("", 0.0))[0],
                    "oldest_since": _when(oldest.get(state, ("", None))[1]),
                }
                for state, count in sorted(counts.items())
            },
            "total": sum(counts.values()),
            "needs_attention": sum(counts.get(s, 0) for s in chart.attention_states()),
            "inbox_backlog": backlog,
            "inbox_oldest": _when(oldest_event),
            "last_successful_poll": {
                source: _when(float(value))
                for source, value in sorted((await store.meta_with_prefix("last_poll.")).items())
            },
            "cursors": {
                name: {"value": v, "updated": _when(t)} for name, (v, t) in cursors.items()
            },
        }

    data = _with_store(ctx, work)
    if as_json:
        _emit(data)
        return
    click.echo(f"{'state':<18} {'orders':>7}  oldest")
    for state, info in data["states"].items():
        click.echo(
            f"{state:<18} {info['orders']:>7}  {info['oldest_po']} since {info['oldest_since']}"
        )
    click.echo(f"{'total':<18} {data['total']:>7}")
    click.echo(f"needs attention: {data['needs_attention']}")
    click.echo(f"inbox backlog: {data['inbox_backlog']} (oldest {data['inbox_oldest']})")
    for source, when in data["last_successful_poll"].items():
        click.echo(f"last successful poll of {source}: {when}")
    for name, info in data["cursors"].items():
        click.echo(f"cursor {name}: {info['value']} (updated {info['updated']})")


@main.command()
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
    """One order by PO number or link id (ids, lines, history), or the list."""
    open_states = _chart(ctx).open_states()

    async def one(store: Store) -> dict[str, Any] | None:
        assert key is not None
        link = await store.find_link(key)
        if link is None:
            return None
        history = await store.history(link.id)
        paused = await store.meta_with_prefix("paused.") if link.state in open_states else {}
        return {
            "link": msgspec.to_builtins(link),
            "paused": sorted(paused.values()),
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
        return [
            {
                "id": link.id,
                "po": link.po_number,
                "so": link.so_number,
                "state": link.state,
                "since": _when(link.state_since.timestamp() if link.state_since else None),
                "reason": link.reason,
            }
            for link in links
        ]

    if key is None:
        rows = _with_store(ctx, many)
        if as_json:
            _emit(rows)
            return
        for row in rows:
            click.echo(
                f"{row['id']:>6} {row['po']:<12} {row['so'] or '-':<14} {row['state']:<16} "
                f"{row['since']:<19}  {row['reason'] or ''}"
            )
        return

    data = _with_store(ctx, one)
    if data is None:
        _fail(f"no linked order {key!r}", EXIT_NOT_FOUND)
        return
    if as_json:
        _emit(data)
        return
    link = data["link"]
    click.echo(f"PO {link['po_number']} (TradeGecko id {link['po_id']})")
    click.echo(f"SO {link['so_number'] or '-'} (Katana id {link['so_id'] or '-'})")
    click.echo(f"state {link['state']}" + (f" — {link['reason']}" if link["reason"] else ""))
    if link["currency"]:
        click.echo(f"currency {link['currency']}")
    if link["last_error"]:
        click.echo(f"last error: {link['last_error']}")
    for pause in data["paused"]:
        click.echo(f"paused: {pause}")
    for line in link["lines"]:
        click.echo(
            f"  line {line['line_id']}: {line['sku']} x {line['quantity']} → Katana variant "
            f"{line['katana_variant_id']}, price {line['price']}, cost "
            f"{line['cost_before']} → {line['cost_after']}"
        )
    for note in link["notes"]:
        click.echo(f"  note: {note}")
    click.echo("history:")
    for step in data["history"]:
        click.echo(
            f"  {step['at']}  {step['from'] or '·':>15} → {step['to']:<15} "
            f"[{step['trigger']}] {step['cause']}"
        )


@main.command()
@click.option("--limit", default=30, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent transitions across all orders."""

    async def work(store: Store) -> list[dict[str, Any]]:
        return [
            {
                "at": _when(t.at),
                "po": t.po_number,
                "from": t.from_state,
                "to": t.to_state,
                "trigger": t.trigger,
                "cause": t.cause,
            }
            for t in await store.recent_transitions(limit)
        ]

    rows = _with_store(ctx, work)
    if as_json:
        _emit(rows)
        return
    for row in rows:
        click.echo(
            f"{row['at']}  {row['po']:<12} {row['from'] or '·':>15} → {row['to']:<15} "
            f"{row['cause']}"
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
    from syncd.runtime.dispatcher import Dispatcher
    from syncd.runtime.effects import Effects

    chart = _chart(ctx)

    async def work(store: Store) -> dict[str, Any] | None:
        link = await store.find_link(key)
        if link is None:
            return None
        data: dict[str, Any] = {
            "id": link.id,
            "po": link.po_number,
            "so": link.so_number,
            "state": link.state,
            "action": action,
            "reason": reason,
        }
        if action == inbox.REPLAY:
            # Planning reads the store and the statechart only: no effect runs here.
            planner = Dispatcher(store, chart, cast(Effects, None))
            data["plan"] = (await planner.plan_replay(link)).describe()
        else:
            decision = chart.decide(link.state, action, resume_state=link.resume_state)
            if decision is None:
                data["allowed"] = False
                return data
            data["to"] = decision.dest
        data["allowed"] = True
        if dry_run:
            return data
        command = inbox.OperatorCommand(
            link_id=link.id, action=action, reason=reason, operator=_operator()
        )
        data["event_id"] = await store.add_event(
            "syncctl", inbox.OPERATOR, inbox.encode(command), link_id=link.id, po_id=link.po_id
        )
        return data

    data = _with_store(ctx, work, write=not dry_run)
    if data is None:
        _fail(f"no linked order {key!r}", EXIT_NOT_FOUND)
        return
    if not data["allowed"]:
        _fail(f"order {data['po']} is {data['state']}: {action} does not apply", EXIT_NOT_ALLOWED)
        return
    if as_json:
        _emit(data)
        return
    what = data.get("plan") or f"{data['state']} → {data['to']}"
    if dry_run:
        click.echo(f"{action} {data['po']} would: {what}")
    else:
        click.echo(
            f"queued {action} of {data['po']} ({what}) as inbox event {data['event_id']}; "
            "the daemon applies it (at its next start if it is not running)"
        )


@main.command()
@click.argument("key")
@click.option("--reason", default=None, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retry(ctx: click.Context, key: str, reason: str | None, as_json: bool) -> None:
    """Send an order that needs attention back to where it was."""
    _queue(ctx, key, "retry", reason, as_json)


@main.command()
@click.argument("key")
@click.option("--reason", required=True, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cancel(ctx: click.Context, key: str, reason: str, as_json: bool) -> None:
    """Cancel an order: syncd stops following it and never receives its PO."""
    _queue(ctx, key, "cancel", reason, as_json)


@main.command()
@click.argument("key")
@click.option("--dry-run", is_flag=True, help="Only say what the replay would do.")
@click.option("--reason", default=None, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay(ctx: click.Context, key: str, dry_run: bool, reason: str | None, as_json: bool) -> None:
    """Re-drive an order from its state: re-run the state's effect, or re-process the
    order's stored inbox events."""
    _queue(ctx, key, inbox.REPLAY, reason, as_json, dry_run=dry_run)


@main.command(name="import")
@click.argument("po_number")
@click.option("--reason", default=None, help="Why, for the order's history.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_(ctx: click.Context, po_number: str, reason: str | None, as_json: bool) -> None:
    """Import one PO on purpose (backfill), e.g. one created before syncd's activation.

    The daemon fetches it from TradeGecko by number and discovers it like a new one.
    """

    async def work(store: Store) -> dict[str, Any]:
        link = await store.link_by_po_number(po_number)
        if link is not None:
            return {"po": po_number, "allowed": False, "state": link.state, "id": link.id}
        request = inbox.ImportRequest(po_number=po_number, reason=reason, operator=_operator())
        event_id = await store.add_event("syncctl", inbox.IMPORT_REQUESTED, inbox.encode(request))
        return {"po": po_number, "allowed": True, "event_id": event_id}

    data = _with_store(ctx, work, write=True)
    if not data["allowed"]:
        _fail(
            f"PO {po_number} is already linked (link {data['id']}, {data['state']})",
            EXIT_NOT_ALLOWED,
        )
        return
    if as_json:
        _emit(data)
        return
    click.echo(
        f"queued import of {po_number} as inbox event {data['event_id']}; the daemon fetches "
        "it from TradeGecko (at its next start if it is not running)"
    )


@main.command()
@click.option("--format", "fmt", type=click.Choice(["mermaid", "svg"]), default="mermaid")
def statechart(fmt: str) -> None:
    """Print the linked-order statechart as a mermaid diagram, or as SVG (needs Graphviz)."""
    try:
        chart = load_statechart()
    except StatechartError as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    if fmt == "mermaid":
        click.echo(chart.mermaid(), nl=False)
        return
    import graphviz

    try:
        svg: bytes = chart.graph("graphviz").draw(None, format="svg", prog="dot")
    except graphviz.ExecutableNotFound:
        _fail("--format svg needs Graphviz's `dot` program (Debian: apt install graphviz)", 2)
        return
    click.echo(svg.decode(), nl=False)
