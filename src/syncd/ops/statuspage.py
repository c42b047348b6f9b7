"""The status page: what the daemon is doing, as HTML, for a person away from a terminal.

Served beside ``/metrics`` on the metrics listener, so it follows ``[metrics] listen``
(127.0.0.1:9464 by default): ``/`` is the overview (orders per state on the statechart, the
orders that need attention with the ``syncctl`` command that resolves each, the last poll and
webhook per service, paused services, recent orders), ``/orders/{po_number}`` one order's
timeline. Rendered on the server with the standard library: no script, a meta refresh, a
viewport for phones.

Read-only by construction: the page reads the database through its own ``mode=ro``
connection, never the daemon's, so nothing here can write and no read lands inside another
task's open transaction. Everything that comes from the services or the database goes
through :func:`html.escape`; the commands shown are shell-quoted as well.
"""

from __future__ import annotations

import html
import logging
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from syncd.config import FACTORY_NAME
from syncd.domain.orders import LinkedOrder
from syncd.domain.statechart import Statechart
from syncd.errors import StoreError
from syncd.runtime.inbox import WEBHOOK_RECEIVED
from syncd.store import Store, TransitionRecord

__all__ = [
    "REFRESH_SECONDS",
    "AttentionItem",
    "FactorySummary",
    "OrderView",
    "Overview",
    "ServiceStatus",
    "StatusPage",
    "TimelineStep",
    "iso",
    "render_order",
    "render_overview",
]

log = logging.getLogger("syncd.statuspage")

#: The page reloads itself this often (seconds).
REFRESH_SECONDS = 10
#: The services whose polls and webhooks the page reports, always shown (``never`` if so).
_SERVICES = ("tradegecko", "katana")
_RECENT_ORDERS = 50
_ATTENTION_SHOWN = 200
_DOT_TIMEOUT = 10.0
#: Orders that entered attention by one of these triggers are not helped by ``retry`` (the
#: cause would be seen again): the way out is cancelling. Everything else: fix, then retry.
_CANCEL_ADVISED = {"po_withdrawn": "the PO was withdrawn in TradeGecko after its SO was made"}

_ASGI = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


# -- what the page shows ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    last_poll: float | None
    last_webhook: float | None
    #: Why the service is paused (its token was rejected), ``None`` when it is not.
    paused: str | None


@dataclass(frozen=True)
class AttentionItem:
    link: LinkedOrder
    #: The trigger that moved the order into attention, from its history.
    entered_by: str | None


@dataclass(frozen=True)
class FactorySummary:
    """One factory's line on the page of several: its orders by state, how many need a
    person, and its paused services."""

    counts: dict[str, int]
    attention: int
    paused: list[str]


@dataclass(frozen=True)
class Overview:
    now: float
    database: str
    #: Every state of the statechart in its file's order (then any the file no longer has).
    counts: dict[str, int]
    attention_states: tuple[str, ...]
    attention: list[AttentionItem]
    recent: list[LinkedOrder]
    services: list[ServiceStatus]
    webhooks_enabled: bool
    #: The statechart as inline SVG with the counts, or ``None`` with :attr:`chart_note`.
    chart_svg: str | None
    chart_note: str | None
    descriptions: dict[str, str]
    #: Each factory's summary when there are several (in their order); empty for one.
    factories: dict[str, FactorySummary] = field(default_factory=dict)
    #: The factory of each order shown (by link id) when there are several.
    factory_of: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TimelineStep:
    record: TransitionRecord
    #: The inbox event behind the transition: who saw it (``tradegecko``, ``katana``,
    #: ``effect``, ``syncctl``, ...) and what it was.
    source: str | None
    kind: str | None


@dataclass(frozen=True)
class OrderView:
    now: float
    database: str
    link: LinkedOrder
    steps: list[TimelineStep]
    paused: list[str]
    attention: bool
    #: Its factory, when the database has several (its commands then name it).
    factory: str | None = None


# -- the page --------------------------------------------------------------------------------


class StatusPage:
    """Reads what the page shows from the database at ``database``; :meth:`app` serves it.

    :param webhooks_enabled: whether the daemon listens for webhooks (else the page says
        "polling only" instead of "never").
    :param factories: the factories the daemon runs; with several (running, or with rows in
        the database) the page sums them, adds a line per factory, and names the factory
        of each order and service.
    """

    def __init__(
        self,
        database: str,
        chart: Statechart,
        *,
        webhooks_enabled: bool = False,
        refresh: int = REFRESH_SECONDS,
        clock: Callable[[], float] = time.time,
        factories: Callable[[], list[str]] | None = None,
    ) -> None:
        self.database = database
        #: The factories the daemon runs (besides those the database has rows of).
        self.factories = factories
        self.chart = chart
        self.webhooks_enabled = webhooks_enabled
        self.refresh = refresh
        self._clock = clock
        self._store: Store | None = None
        self._opening = anyio.Lock()
        self._drawn: tuple[tuple[tuple[str, int], ...], str | None, str | None] | None = None

    async def _reader(self) -> Store:
        async with self._opening:
            if self._store is None:
                self._store = await Store.open(self.database, readonly=True)
            return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    # -- reads ---------------------------------------------------------------------------

    async def _factory_names(self, store: Store) -> list[str]:
        running = self.factories() if self.factories is not None else []
        return running + [name for name in await store.factories() if name not in running]

    async def overview(self) -> Overview:
        store = await self._reader()
        names = await self._factory_names(store)
        several = len(names) > 1
        views = [store.for_factory(name) for name in names] if names else [store]
        stored: dict[str, int] = {}
        attention_states = tuple(self.chart.attention_states())
        attention: list[AttentionItem] = []
        recent: list[LinkedOrder] = []
        services: list[ServiceStatus] = []
        factories: dict[str, FactorySummary] = {}
        factory_of: dict[int, str] = {}
        for view in views:
            own = await view.counts_by_state()
            for state, n in own.items():
                stored[state] = stored.get(state, 0) + n
            waiting = []
            for link in await view.links_in_states(attention_states, limit=_ATTENTION_SHOWN):
                history = await view.history(link.id)
                trigger = history[-1].trigger if history else None
                waiting.append(AttentionItem(link, trigger))
            attention += waiting
            mine = await view.all_links(limit=_RECENT_ORDERS)
            recent += mine
            if several:
                factory_of.update({item.link.id: view.factory for item in waiting})
                factory_of.update({link.id: view.factory for link in mine})
            polls = await view.meta_with_prefix("last_poll.")
            paused = await view.meta_with_prefix("paused.")
            hooks = await view.last_event_by_source(WEBHOOK_RECEIVED)
            found = set(polls) | set(paused) | set(hooks)
            services += [
                ServiceStatus(
                    f"{view.factory} {name}" if several else name,
                    _float(polls.get(name)),
                    hooks.get(name),
                    paused.get(name),
                )
                for name in list(_SERVICES) + sorted(found - set(_SERVICES))
            ]
            if several:
                factories[view.factory] = FactorySummary(own, len(waiting), sorted(paused))
        counts = {name: stored.get(name, 0) for name in self.chart.states}
        counts.update({s: n for s, n in sorted(stored.items()) if s not in counts})
        if several:  # the newest across factories (link ids are global and grow)
            recent.sort(key=lambda link: link.id, reverse=True)
        svg, note = await self.draw_chart(counts)
        return Overview(
            now=self._clock(),
            database=self.database,
            counts=counts,
            attention_states=attention_states,
            attention=attention[:_ATTENTION_SHOWN],
            recent=recent[:_RECENT_ORDERS],
            services=services,
            webhooks_enabled=self.webhooks_enabled,
            chart_svg=svg,
            chart_note=note,
            descriptions={name: s.description for name, s in self.chart.states.items()},
            factories=factories,
            factory_of=factory_of,
        )

    async def order(self, key: str, factory: str | None = None) -> OrderView | None:
        """One order by PO number (or link id), of ``factory`` or else the first factory
        that has one; ``None`` when there is none."""
        root = await self._reader()
        names = [factory] if factory is not None else await self._factory_names(root)
        link: LinkedOrder | None = None
        store = root
        for name in names or [root.factory]:
            store = root.for_factory(name)
            link = await store.find_link(key)
            if link is not None:
                break
        if link is None:
            return None
        steps = [TimelineStep(r, source, kind) for r, source, kind in await store.timeline(link.id)]
        open_states = self.chart.open_states()
        paused = await store.meta_with_prefix("paused.") if link.state in open_states else {}
        return OrderView(
            now=self._clock(),
            database=self.database,
            link=link,
            steps=steps,
            paused=sorted(paused.values()),
            attention=link.state in self.chart.attention_states(),
            factory=store.factory if factory is not None or len(names) > 1 else None,
        )

    async def draw_chart(self, counts: Mapping[str, int]) -> tuple[str | None, str | None]:
        """The statechart as inline SVG with each state's count, by Graphviz's ``dot``;
        ``(None, why)`` when it cannot be drawn. The last drawing is kept while the counts
        stay the same (a refresh every few seconds would otherwise run ``dot`` each time)."""
        key = tuple(sorted(counts.items()))
        if self._drawn is not None and self._drawn[0] == key:
            return self._drawn[1], self._drawn[2]
        dot = shutil.which("dot")
        if dot is None:
            svg, note = None, "Graphviz's dot is not installed (Debian: apt install graphviz)"
        else:
            try:
                svg, note = await anyio.to_thread.run_sync(_draw, dot, self.chart, counts), None
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("cannot draw the statechart: %s", exc)
                svg, note = None, f"Graphviz's dot failed: {exc}"
        self._drawn = (key, svg, note)
        return svg, note

    # -- serving -------------------------------------------------------------------------

    def app(self, metrics_app: _ASGI | None = None) -> _ASGI:
        """The page's ASGI app; with ``metrics_app``, that app answers ``/metrics``."""

        async def overview(request: Request) -> HTMLResponse:
            return await self._respond(lambda: self._overview_html())

        async def order(request: Request) -> HTMLResponse:
            key = request.path_params["po_number"]
            factory = request.query_params.get("factory")
            if factory is not None and not FACTORY_NAME.fullmatch(factory):
                factory = "-"  # no factory has this name: the page says "no order"
            return await self._respond(lambda: self._order_html(key, factory))

        pages = Starlette(
            routes=[
                Route("/", overview, methods=["GET"]),
                Route("/orders/{po_number:path}", order, methods=["GET"]),
            ]
        )
        if metrics_app is None:
            return pages

        async def app(
            scope: MutableMapping[str, Any],
            receive: Callable[[], Awaitable[Any]],
            send: Callable[[Any], Awaitable[None]],
        ) -> None:
            if scope["type"] == "http" and scope["path"] == "/metrics":
                await metrics_app(scope, receive, send)
            else:
                await pages(scope, receive, send)

        return app

    async def _overview_html(self) -> tuple[int, str]:
        return 200, render_overview(await self.overview(), refresh=self.refresh)

    async def _order_html(self, key: str, factory: str | None = None) -> tuple[int, str]:
        view = await self.order(key, factory)
        if view is None:
            body = (
                f"<p class=muted><a href='/'>← syncd status</a></p>"
                f"<h1>No order {_e(key)}</h1><p>No linked order has this PO number or id.</p>"
            )
            return 404, _page("no such order", body, refresh=None)
        return 200, render_order(view, refresh=self.refresh)

    async def _respond(self, make: Callable[[], Awaitable[tuple[int, str]]]) -> HTMLResponse:
        try:
            status, text = await make()
        except (StoreError, sqlite3.Error) as exc:
            log.warning("status page: cannot read the database: %s", exc)
            await self.close()  # open afresh next time: the file may be back
            status, text = (
                503,
                _page(
                    "database unavailable",
                    f"<h1>Cannot read the database</h1><p>{_e(str(exc))}</p>",
                    refresh=self.refresh,
                ),
            )
        return HTMLResponse(text, status_code=status, headers=_HEADERS)


#: No script may run, whatever a PO number holds; styles and the inline SVG only.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


# -- drawing the statechart ------------------------------------------------------------------

_FILL = {
    "none": ("#ffffff", "#a7afbd"),
    "some": ("#e6f0ff", "#2f6fdf"),
    "bad": ("#fde7e6", "#c8372d"),
}


_EDGE_LABEL = re.compile(r'\blabel=(?:"(?:[^"\\]|\\.)*"|[^\s\]]+)')


def _draw(dot: str, chart: Statechart, counts: Mapping[str, int]) -> str:
    """The chart twice, left to right for wide screens and top to bottom for phones (the
    page's CSS shows one), each state labelled with its count. Blocking: runs ``dot``."""
    return "".join(
        f"<div class='chart {css}'>{_draw_one(dot, chart, counts, rankdir)}</div>"
        for css, rankdir in (("wide", "LR"), ("narrow", "TB"))
    )


def _draw_one(dot: str, chart: Statechart, counts: Mapping[str, int], rankdir: str) -> str:
    graph = chart.graph("graphviz")
    graph.graph_attr.update(
        label="", bgcolor="transparent", pad="0.1", nodesep="0.35", ranksep="0.55", rankdir=rankdir
    )
    graph.edge_attr.update(
        color="#9aa3b2", fontcolor="#5b6475", fontsize="9", fontname="Helvetica", arrowsize="0.6"
    )
    if rankdir == "TB":
        # A phone has no room for the triggers: the narrow drawing keeps only the arrows.
        graph.body[:] = [_EDGE_LABEL.sub("", line) if "->" in line else line for line in graph.body]
    for name, state in chart.states.items():
        count = counts.get(name, 0)
        tone = "bad" if count and state.attention else "some" if count else "none"
        fill, line = _FILL[tone]
        graph.node(
            name,
            label=(
                f'<<font point-size="17"><b>{count}</b></font><br/>'
                f'<font point-size="10">{html.escape(name)}</font>>'
            ),
            fillcolor=fill,
            color=line,
            fontcolor="#1d2433",
            fontname="Helvetica",
            peripheries="1",
            penwidth="1.6" if count else "1",
            margin="0.15,0.06",
        )
    done = subprocess.run(
        [dot, "-Tsvg"],
        input=graph.source.encode(),
        capture_output=True,
        timeout=_DOT_TIMEOUT,
        check=True,
    )
    svg = done.stdout.decode()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML
    # The page sizes it (width 100%); dot's fixed point size would not fit a phone.
    head, rest = svg.split(">", 1)
    head = re.sub(r'\s(?:width|height)="[^"]*"', "", head)
    return f'{head} role="img" aria-label="statechart with the orders in each state">{rest}'


# -- rendering -------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def iso(epoch: float) -> str:
    """ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _ago(epoch: float, now: float) -> str:
    seconds = max(0.0, now - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _when(epoch: float | None, now: float, *, missing: str = "never") -> str:
    if epoch is None:
        return f"<span class=muted>{_e(missing)}</span>"
    stamp = iso(epoch)
    return f"<time datetime='{stamp}'>{stamp}</time> <span class=muted>({_ago(epoch, now)})</span>"


def _order_href(link: LinkedOrder, factory: str | None = None) -> str:
    path = "/orders/" + quote(link.po_number, safe="")
    return path if factory is None else f"{path}?factory={quote(factory, safe='')}"


def _order_cell(link: LinkedOrder, factory: str | None = None) -> str:
    shown = _e(link.po_number) if factory is None else f"{_e(factory)} {_e(link.po_number)}"
    return f"<a href='{_e(_order_href(link, factory))}'>{shown}</a>"


def _state(name: str, attention: bool = False) -> str:
    return f"<span class='state{' bad' if attention else ''}'>{_e(name)}</span>"


def _syncctl(database: str, *args: str, factory: str | None = None) -> str:
    named = ["--factory", factory] if factory is not None else []
    return shlex.join(["syncctl", "--db", database, *named, *args])


def _resolution(item: AttentionItem, database: str, factory: str | None = None) -> tuple[str, str]:
    """What a person does about an order that needs attention: (advice, command)."""
    po = item.link.po_number
    why = _CANCEL_ADVISED.get(item.entered_by or "")
    if why is not None:
        return (
            f"{why}: delete the SO in Katana, or cancel it here",
            _syncctl(
                database, "cancel", po, "--reason", "PO withdrawn in TradeGecko", factory=factory
            ),
        )
    back = item.link.resume_state or "where it was"
    return f"fix the cause, then send it back to {back}", _syncctl(
        database, "retry", po, factory=factory
    )


_CSS = """
:root{color-scheme:light;--ink:#1d2433;--muted:#667085;--line:#e4e7ec;--bad:#c8372d;
--badbg:#fde7e6;--ok:#1f7a4d;--okbg:#e3f5ea;--accent:#2f6fdf}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:var(--ink);background:#f6f7f9}
main{max-width:980px;margin:0 auto;padding:14px}
header{display:flex;flex-wrap:wrap;align-items:baseline;justify-content:space-between;gap:4px 16px}
h1{font-size:1.35rem;margin:.2rem 0}
h2{font-size:1.05rem;margin:0 0 .6rem}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 14px;
margin:12px 0}
.muted{color:var(--muted)}
.small{font-size:.85rem}
.banner{border-radius:10px;padding:10px 14px;margin:12px 0;font-weight:600}
.banner.bad{background:var(--badbg);color:var(--bad);border:1px solid #f4b9b4}
.banner.ok{background:var(--okbg);color:var(--ok);border:1px solid #b5e3c7}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.8rem;text-transform:uppercase;letter-spacing:.03em;color:var(--muted);font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
tr.bad td{background:var(--badbg)}
.scroll{overflow-x:auto}
.state{display:inline-block;padding:1px 8px;border-radius:999px;background:#eef1f5;
font-size:.85rem;white-space:nowrap}
.state.bad{background:var(--badbg);color:var(--bad)}
.item{border-left:4px solid var(--bad);padding:6px 10px;margin:10px 0;background:#fffafa}
.reason{font-weight:600;margin:.2rem 0}
time{white-space:nowrap}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{margin:.3rem 0;padding:8px 10px;background:#1d2433;color:#f3f4f6;border-radius:6px;
overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.chart svg{width:100%;height:auto;display:block}
.chart.narrow{display:none}
.chart.narrow svg{max-width:420px;margin:0 auto}
ul.plain{list-style:none;padding:0;margin:0}
ul.plain li{padding:4px 0;border-bottom:1px solid var(--line)}
a{color:var(--accent)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dt{color:var(--muted)}
dd{margin:0}
@media (max-width:600px){main{padding:8px}section{padding:10px}th,td{padding:5px 4px}
.hide-sm{display:none}.chart.wide{display:none}.chart.narrow{display:block}}
"""


def _page(title: str, body: str, *, refresh: int | None) -> str:
    meta = f"<meta http-equiv='refresh' content='{int(refresh)}'>" if refresh else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"{meta}<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def _footer(now: float, database: str, refresh: int) -> str:
    return (
        f"<p class='muted small'>Read {iso(now)} from <code>{_e(database)}</code>; "
        f"this page reloads every {refresh} s. Read-only: to act, use the commands shown. "
        "Prometheus metrics: <a href='/metrics'>/metrics</a>.</p>"
    )


def render_overview(view: Overview, *, refresh: int = REFRESH_SECONDS) -> str:
    """The overview page's HTML."""
    now = view.now
    parts: list[str] = [
        f"<header><h1>syncd status</h1><span class='muted small'>as of {iso(now)}</span></header>"
    ]
    waiting = len(view.attention)
    paused = [s for s in view.services if s.paused]
    parts.extend(f"<div class='banner bad paused'>Paused: {_e(s.paused)}</div>" for s in paused)
    if waiting:
        what = "1 order needs" if waiting == 1 else f"{waiting} orders need"
        parts.append(f"<div class='banner bad' id=summary>{what} a person</div>")
    elif not paused:
        parts.append("<div class='banner ok' id=summary>Nothing needs attention</div>")

    # Orders by state, with the chart.
    rows = []
    for state, count in view.counts.items():
        bad = state in view.attention_states and count > 0
        rows.append(
            f"<tr class='{'bad' if bad else ''}' data-state='{_e(state)}'>"
            f"<td>{_state(state, state in view.attention_states)}</td>"
            f"<td class=n>{count}</td>"
            f"<td class='muted small hide-sm'>{_e(view.descriptions.get(state, ''))}</td></tr>"
        )
    total = sum(view.counts.values())
    rows.append(f"<tr><td><b>total</b></td><td class=n>{total}</td><td class=hide-sm></td></tr>")
    if view.chart_svg is not None:
        chart = view.chart_svg
    else:
        chart = (
            "<p class='muted small' id=chart-note>The statechart is shown as the list of its "
            f"states below: {_e(view.chart_note or '')}.</p>"
        )
    states = (
        "<section id=states><h2>Orders by state</h2>"
        f"{chart}<div class=scroll><table><thead><tr><th>state</th><th>orders</th>"
        f"<th class=hide-sm>meaning</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "</section>"
    )

    # Needs attention: first, it is what the person came for.
    items = []
    for item in view.attention:
        link = item.link
        factory = view.factory_of.get(link.id)
        advice, command = _resolution(item, view.database, factory)
        since = link.state_since.timestamp() if link.state_since else None
        error = (
            f"<div class='small muted'>last error: {_e(link.last_error)}</div>"
            if link.last_error
            else ""
        )
        items.append(
            "<div class=item>"
            f"<div>{_order_cell(link, factory)} "
            f"<span class=muted>SO {_e(link.so_number or '—')}</span> "
            f"<span class='muted small'>since {_when(since, now)}</span></div>"
            f"<div class=reason>{_e(link.reason or 'no reason recorded')}</div>{error}"
            f"<div class=small>{_e(advice)}:</div><pre><code>{_e(command)}</code></pre></div>"
        )
    parts.append(
        "<section id=attention><h2>Needs attention</h2>"
        + ("".join(items) or "<p class=muted>No order needs a person.</p>")
        + "</section>"
    )

    parts.append(states)
    if view.factories:
        parts.append(_factories_section(view))

    # Services.
    service_rows = []
    for service in view.services:
        hook = (
            _when(service.last_webhook, now)
            if view.webhooks_enabled or service.last_webhook is not None
            else "<span class=muted>off (polling only)</span>"
        )
        state = (
            "<span class='state bad'>paused</span>"
            if service.paused
            else "<span class=state>running</span>"
        )
        service_rows.append(
            f"<tr data-service='{_e(service.name)}'><td><b>{_e(service.name)}</b></td>"
            f"<td>{state}</td><td>{_when(service.last_poll, now)}</td><td>{hook}</td></tr>"
        )
    parts.append(
        "<section id=services><h2>Services</h2><div class=scroll><table><thead><tr>"
        "<th>service</th><th>status</th><th>last successful poll</th><th>last webhook</th>"
        f"</tr></thead><tbody>{''.join(service_rows)}</tbody></table></div></section>"
    )

    # Recent orders.
    recent = []
    for link in view.recent:
        since = link.state_since.timestamp() if link.state_since else None
        recent.append(
            f"<tr><td>{_order_cell(link, view.factory_of.get(link.id))}</td>"
            f"<td>{_e(link.so_number or '—')}</td>"
            f"<td>{_state(link.state, link.state in view.attention_states)}</td>"
            f"<td class='small'>{_when(since, now, missing='—')}</td></tr>"
        )
    parts.append(
        f"<section id=orders><h2>Recent orders <span class='muted small'>(newest "
        f"{_RECENT_ORDERS})</span></h2><div class=scroll><table><thead><tr><th>PO</th>"
        "<th>SO</th><th>state</th><th>since</th></tr></thead><tbody>"
        + ("".join(recent) or "<tr><td colspan=4 class=muted>No orders yet.</td></tr>")
        + "</tbody></table></div></section>"
    )
    parts.append(_footer(now, view.database, refresh))
    return _page(
        (f"syncd: {waiting} {'needs' if waiting == 1 else 'need'} attention")
        if waiting
        else "syncd status",
        "".join(parts),
        refresh=refresh,
    )


def _factories_section(view: Overview) -> str:
    """A line per factory: its orders by state, how many need a person, what is paused."""
    rows = []
    for name, summary in view.factories.items():
        states = (
            ", ".join(f"{_e(state)} {n}" for state, n in summary.counts.items() if n)
            or "<span class=muted>no orders</span>"
        )
        paused = (
            f"<span class='state bad'>paused: {_e(', '.join(summary.paused))}</span>"
            if summary.paused
            else "<span class=state>running</span>"
        )
        rows.append(
            f"<tr class='{'bad' if summary.attention else ''}' data-factory='{_e(name)}'>"
            f"<td><b>{_e(name)}</b></td><td class=n>{sum(summary.counts.values())}</td>"
            f"<td class=n>{summary.attention}</td><td>{paused}</td>"
            f"<td class=small>{states}</td></tr>"
        )
    return (
        "<section id=factories><h2>Factories</h2><div class=scroll><table><thead><tr>"
        "<th>factory</th><th>orders</th><th>need a person</th><th>status</th>"
        f"<th>orders by state</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "</section>"
    )


def render_order(view: OrderView, *, refresh: int = REFRESH_SECONDS) -> str:
    """One order's page: both sides' ids, its state, lines, notes and timeline."""
    link, now = view.link, view.now
    since = link.state_since.timestamp() if link.state_since else None
    facts = [
        ("TradeGecko PO", f"{_e(link.po_number)} <span class=muted>(id {link.po_id})</span>"),
        (
            "Katana SO",
            f"{_e(link.so_number or '—')} <span class=muted>(id {link.so_id or '—'})</span>",
        ),
        ("state", f"{_state(link.state, view.attention)} since {_when(since, now, missing='—')}"),
        ("link id", str(link.id)),
        *([("factory", _e(view.factory))] if view.factory is not None else []),
    ]
    if link.reason:
        facts.append(("reason", f"<b>{_e(link.reason)}</b>"))
    if link.last_error:
        facts.append(("last error", _e(link.last_error)))
    if link.currency:
        facts.append(("currency", _e(link.currency)))
    facts.extend(("paused", _e(pause)) for pause in view.paused)
    if view.attention:
        advice, command = _resolution(
            AttentionItem(link, view.steps[-1].record.trigger if view.steps else None),
            view.database,
            view.factory,
        )
        facts.append(("to resolve", f"{_e(advice)}:<pre><code>{_e(command)}</code></pre>"))
    parts = [
        "<p class='muted small'><a href='/'>← syncd status</a></p>"
        f"<header><h1>PO {_e(link.po_number)}</h1>"
        f"<span class='muted small'>as of {iso(now)}</span></header>",
        "<section id=facts><dl>"
        + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        + "</dl></section>",
    ]
    steps = []
    for step in view.steps:
        r = step.record
        seen = (
            _e(step.source) + (f" <span class=muted>({_e(step.kind)})</span>" if step.kind else "")
            if step.source
            else "<span class=muted>—</span>"
        )
        steps.append(
            f"<tr><td class=small><time datetime='{iso(r.at)}'>{iso(r.at)}</time></td>"
            f"<td>{_state(r.from_state) if r.from_state else '<span class=muted>·</span>'} → "
            f"{_state(r.to_state)}</td><td><code>{_e(r.trigger)}</code></td>"
            f"<td>{_e(r.cause)}</td><td class='small hide-sm'>{seen}</td></tr>"
        )
    parts.append(
        "<section id=timeline><h2>Timeline</h2><div class=scroll><table><thead><tr>"
        "<th>time (UTC)</th><th>transition</th><th>trigger</th><th>cause</th>"
        f"<th class=hide-sm>seen by</th></tr></thead><tbody>{''.join(steps)}</tbody></table>"
        "</div></section>"
    )
    if link.lines:
        lines = "".join(
            f"<tr><td>{_e(line.sku)}</td><td class=n>{_e(line.quantity)}</td>"
            f"<td class=n>{_e(line.price if line.price is not None else '—')}</td>"
            f"<td class=n>{_e(line.cost_before if line.cost_before is not None else '—')} → "
            f"{_e(line.cost_after if line.cost_after is not None else '—')}</td></tr>"
            for line in link.lines
        )
        parts.append(
            "<section id=lines><h2>Lines</h2><div class=scroll><table><thead><tr><th>SKU</th>"
            "<th>qty</th><th>price</th><th>cost before → after</th></tr></thead>"
            f"<tbody>{lines}</tbody></table></div></section>"
        )
    if link.notes:
        parts.append(
            "<section id=notes><h2>Notes</h2><ul class=plain>"
            + "".join(f"<li>{_e(note)}</li>" for note in link.notes)
            + "</ul></section>"
        )
    parts.append(_footer(now, view.database, refresh))
    return _page(f"syncd: PO {link.po_number}", "".join(parts), refresh=refresh)
