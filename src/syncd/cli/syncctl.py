"""``syncctl``: look at linked orders in the store (read-only unless a command changes one).

Exit codes: 0 success; 2 bad usage or config; 3 the database cannot be opened; 5 the order
asked for does not exist.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import click
import msgspec

from syncd.config import load_config
from syncd.domain.statechart import load_statechart
from syncd.errors import ConfigError, StatechartError, StoreError
from syncd.store import Store

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_NOT_FOUND = 5

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


def _with_store(ctx: click.Context, work: Callable[[Store], Awaitable[T]]) -> T:
    path: str | None = ctx.obj
    if path is None:
        if ctx.invoked_subcommand == "statechart" or ctx.info_name == "statechart":
            raise AssertionError("statechart needs no store")
        _fail("name the database with --db PATH or --config PATH", EXIT_CONFIG)
    assert path is not None

    async def go() -> T:
        store = await Store.open(path, readonly=True)
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
            "inbox_backlog": backlog,
            "inbox_oldest": _when(oldest_event),
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
    click.echo(f"inbox backlog: {data['inbox_backlog']} (oldest {data['inbox_oldest']})")
    for name, info in data["cursors"].items():
        click.echo(f"cursor {name}: {info['value']} (updated {info['updated']})")


@main.command()
@click.argument("key", required=False)
@click.option("--state", default=None, help="Only orders in this state.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def inspect(ctx: click.Context, key: str | None, state: str | None, as_json: bool) -> None:
    """One order by PO number or link id (ids, lines, history), or the list."""

    async def one(store: Store) -> dict[str, Any] | None:
        assert key is not None
        link = await store.find_link(key)
        if link is None:
            return None
        history = await store.history(link.id)
        return {
            "link": msgspec.to_builtins(link),
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
        if state is not None:
            links = await store.links_in_states([state])
        else:
            links = await store.all_links()
        return [
            {
                "id": link.id,
                "po": link.po_number,
                "so": link.so_number,
                "state": link.state,
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
                f"{row['reason'] or ''}"
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


@main.command()
@click.option("--format", "fmt", type=click.Choice(["mermaid"]), default="mermaid")
def statechart(fmt: str) -> None:
    """Print the linked-order statechart as a mermaid diagram."""
    try:
        chart = load_statechart()
    except StatechartError as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    click.echo(chart.mermaid(), nl=False)
