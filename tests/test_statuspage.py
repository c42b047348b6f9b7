"""The status page: its rendering on a real SQLite store, served on loopback, and what a
person sees of a daemon that ran the flow, loaded by headless Chromium."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import pytest

from conftest import Sims
from syncd.domain.orders import LineLink, LinkedOrder, PurchaseOrderLine, PurchaseOrderSnapshot
from syncd.domain.statechart import load_statechart
from syncd.ops.asgi import serving
from syncd.ops.statuspage import StatusPage, iso, render_order, render_overview
from syncd.runtime.inbox import WEBHOOK_RECEIVED
from syncd.store import Store
from test_flow import is_state, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
CHART = load_statechart()
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
HOSTILE = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>$(touch /tmp/pwned)"
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z


# -- reading what the page says ----------------------------------------------------------


class Page(HTMLParser):
    """The page as a person reads it: the text of each section, state row and service row,
    and every element's tag (to see that nothing was injected)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.states: dict[str, str] = {}
        self.services: dict[str, str] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.codes: list[str] = []
        self._open: list[tuple[str, str, str]] = []  # (tag, kind, key)
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "section" and attributes.get("id"):
            self._open.append((tag, "sections", str(attributes["id"])))
        elif tag == "tr" and attributes.get("data-state"):
            self._open.append((tag, "states", str(attributes["data-state"])))
        elif tag == "tr" and attributes.get("data-service"):
            self._open.append((tag, "services", str(attributes["data-service"])))
        elif tag == "code":
            self.codes.append("")
            self._open.append((tag, "code", ""))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for _, kind, key in self._open:
            if kind == "code":
                self.codes[-1] += data
                continue
            table: dict[str, str] = getattr(self, kind)
            table[key] = " ".join((table.get(key, "") + " " + data).split())

    def count(self, state: str) -> int:
        return int(self.states[state].split()[1])


# -- a store with orders in it -------------------------------------------------------------


def snapshot(po_id: int, po_number: str) -> PurchaseOrderSnapshot:
    when = datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
    return PurchaseOrderSnapshot(
        po_id=po_id,
        po_number=po_number,
        status="active",
        company_id=7,
        currency_id=3,
        created_at=when,
        updated_at=when,
        lines=(
            PurchaseOrderLine(
                line_id=po_id * 10, variant_id=5, quantity=Decimal("2"), price=Decimal("150")
            ),
        ),
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def walk(
    store: Store, po_id: int, po_number: str, steps: list[tuple[str, str]], **last: object
) -> LinkedOrder:
    """Create a link and move it through ``(trigger, cause)`` steps; ``last`` goes with the
    final step (e.g. its ``reason``)."""
    link = await store.create_link(
        snapshot(po_id, po_number),
        state=CHART.initial,
        trigger="po_discovered",
        cause="new PO in TradeGecko",
        event_id=await store.add_event("tradegecko", "po_discovered", b"{}", po_id=po_id),
    )
    assert link is not None
    for index, (trigger, cause) in enumerate(steps):
        decision = CHART.decide(link.state, trigger, resume_state=link.resume_state)
        assert decision is not None, (link.state, trigger)
        extra: dict[str, object] = {}
        if trigger == "so_created":
            extra = {"so_id": po_id + 900, "so_number": f"TG-{po_number}"}
        if index == len(steps) - 1:
            extra.update(last)
        source = "effect" if trigger in {"so_created", "po_received", "import_failed"} else "katana"
        event = await store.add_event(source, "effect_outcome", b"{}", link_id=link.id)
        link = await store.apply(link, decision, cause=cause, event_id=event, **extra)  # type: ignore[arg-type]
    return link


@asynccontextmanager
async def filled_store(path: Path, *, po_number: str = "PO0002") -> AsyncIterator[Store]:
    """One order received, one stuck at import (retry resolves it), one whose PO was
    withdrawn after import (cancel resolves it); polls, a webhook, a paused service."""
    store = await Store.open(path)
    store._clock = Clock(NOW - 600)
    try:
        await walk(
            store,
            1,
            "PO0001",
            [
                ("so_created", "Katana SO TG-PO0001 created"),
                ("production_started", "MO 4 linked"),
                ("so_delivered", "SO delivered, production DONE"),
                ("po_received", "PO received at Katana's average cost"),
            ],
            lines=(
                LineLink(
                    line_id=10,
                    sku="CHAIR-OAK",
                    katana_variant_id=5,
                    quantity=Decimal("2"),
                    price=Decimal("150"),
                    cost_before=Decimal("150"),
                    cost_after=Decimal("91.50"),
                ),
            ),
        )
        await walk(
            store,
            2,
            po_number,
            [("import_failed", "the import gave up")],
            reason=f"line 20: cannot match without a SKU <b>{po_number}</b>",
        )
        await walk(
            store,
            3,
            "PO0003",
            [
                ("so_created", "Katana SO TG-PO0003 created"),
                ("po_withdrawn", "TradeGecko PO is void"),
            ],
            reason="TradeGecko PO is void: an SO exists in Katana",
        )
        await store.set_meta("last_poll.tradegecko", str(NOW - 5))
        await store.set_meta("last_poll.katana", str(NOW - 3))
        await store.set_meta(
            "paused.katana", "katana rejected the token (401) since 2024-05-01T11:58:00+00:00"
        )
        await store.add_event("katana", WEBHOOK_RECEIVED, b"{}", dedup_key="hook-1")
        yield store
    finally:
        await store.close()


def page_for(path: Path, **kwargs: object) -> StatusPage:
    return StatusPage(str(path), CHART, clock=lambda: NOW, **kwargs)  # type: ignore[arg-type]


# -- rendering -----------------------------------------------------------------------------


async def test_the_overview_shows_states_attention_with_its_commands_and_services(
    tmp_path: Path,
) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db):
        status = page_for(db, webhooks_enabled=True)
        try:
            overview = await status.overview()
        finally:
            await status.close()
    text = render_overview(overview)
    page = Page(text)

    # Every state of the chart, with its count.
    assert set(page.states) == set(CHART.states)
    assert page.count("received") == 1
    assert page.count("needs_attention") == 2
    assert page.count("discovered") == 0
    # Needs attention: each reason, and the command that resolves it.
    attention = page.sections["attention"]
    assert "line 20: cannot match without a SKU <b>PO0002</b>" in attention
    assert f"syncctl --db {db} retry PO0002" in attention
    assert "TradeGecko PO is void" in attention
    assert f"syncctl --db {db} cancel PO0003 --reason 'PO withdrawn in TradeGecko'" in attention
    # The last poll and webhook per service, and the paused one.
    assert page.services["tradegecko"].startswith(f"tradegecko running {iso(NOW - 5)}")
    assert "never" in page.services["tradegecko"]  # no webhook from TradeGecko yet
    assert page.services["katana"].startswith(f"katana paused {iso(NOW - 3)}")
    assert "2 orders need a person" in text
    assert "Paused: katana rejected the token (401)" in text
    # It refreshes itself and fits a phone.
    assert "<meta http-equiv='refresh' content='10'>" in text
    assert "name=viewport content='width=device-width, initial-scale=1'" in text
    # Recent orders link to their timelines.
    hrefs = {a.get("href") for tag, a in page.tags if tag == "a"}
    assert {"/orders/PO0001", "/orders/PO0002", "/orders/PO0003"} <= hrefs


async def test_webhooks_off_say_polling_only(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db):
        status = page_for(db, webhooks_enabled=False)
        try:
            page = Page(render_overview(await status.overview()))
        finally:
            await status.close()
    assert "off (polling only)" in page.services["tradegecko"]
    # A webhook that did arrive is still shown.
    assert "off" not in page.services["katana"]


async def test_one_orders_timeline_lists_every_transition_with_cause_time_and_both_ids(
    tmp_path: Path,
) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db) as store:
        link = await store.link_by_po_number("PO0001")
        assert link is not None
        history = await store.history(link.id)
        status = page_for(db)
        try:
            view = await status.order("PO0001")
            by_id = await status.order(str(link.id))
            assert await status.order("PO9999") is None
        finally:
            await status.close()
    assert view is not None and by_id is not None and by_id.link.id == link.id
    page = Page(render_order(view))
    timeline = page.sections["timeline"]
    assert len(history) == 5
    for step in history:
        assert iso(step.at) in timeline
        assert step.cause in timeline
        assert step.trigger in timeline
    assert "effect (effect_outcome)" in timeline  # who saw what caused it
    facts = page.sections["facts"]
    assert "PO0001 (id 1)" in facts and "TG-PO0001 (id 901)" in facts
    assert "CHAIR-OAK" in page.sections["lines"] and "150 → 91.50" in page.sections["lines"]
    assert "paused" not in facts  # a received order is not held by a pause


async def test_an_order_that_needs_attention_says_how_to_resolve_it(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db):
        status = page_for(db)
        try:
            view = await status.order("PO0002")
        finally:
            await status.close()
    assert view is not None
    facts = Page(render_order(view)).sections["facts"]
    assert "cannot match without a SKU" in facts
    assert f"syncctl --db {db} retry PO0002" in facts
    assert "paused katana rejected the token" in facts


async def test_a_hostile_po_number_is_shown_as_text_and_quoted_in_commands(
    tmp_path: Path,
) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db, po_number=HOSTILE):
        status = page_for(db)
        try:
            overview_html = render_overview(await status.overview())
            view = await status.order(HOSTILE)
            assert view is not None
            order_html = render_order(view)
        finally:
            await status.close()
    for text in (overview_html, order_html):
        page = Page(text)
        assert "script" not in {tag for tag, _ in page.tags}
        assert "img" not in {tag for tag, _ in page.tags}
        assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # The command copies back to exactly the PO number: the shell runs nothing of it.
    for text in (overview_html, order_html):
        command = next(c for c in Page(text).codes if c.startswith("syncctl"))
        assert shlex.split(command) == ["syncctl", "--db", str(db), "retry", HOSTILE]
    # Its link is percent-encoded: the timeline is one click away.
    assert ("a", {"href": "/orders/" + quote(HOSTILE, safe="")}) in Page(overview_html).tags


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot (apt graphviz)")
async def test_the_statechart_is_drawn_inline_with_each_states_count(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db):
        status = page_for(db)
        try:
            overview = await status.overview()
            again = await status.overview()
        finally:
            await status.close()
    svg = overview.chart_svg
    assert svg is not None and overview.chart_note is None
    assert again.chart_svg is svg  # the same counts are not drawn twice
    # Drawn wide (left to right) and narrow (top to bottom, for phones); the page sizes it.
    charts = [attrs for tag, attrs in Page(svg).tags if tag == "div"]
    assert [c["class"] for c in charts] == ["chart wide", "chart narrow"]
    openings = [attrs for tag, attrs in Page(svg).tags if tag == "svg"]
    assert len(openings) == 2 and not any("width" in o or "height" in o for o in openings)
    assert all("viewbox" in o for o in openings)
    # Each state is drawn with its count under it.
    for state in CHART.states:
        assert svg.count(f">{state}</text>") == 2
    assert svg.count(">2</text>") == 2 and svg.count(">1</text>") == 2
    assert "<script" not in svg and "<?xml" not in svg


async def test_without_graphviz_the_chart_is_a_list_and_the_page_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on it
    db = tmp_path / "syncd.db"
    async with filled_store(db):
        status = page_for(db)
        try:
            overview = await status.overview()
        finally:
            await status.close()
    assert overview.chart_svg is None
    text = render_overview(overview)
    assert "Graphviz&#x27;s dot is not installed (Debian: apt install graphviz)" in text
    assert "<svg" not in text
    assert Page(text).count("needs_attention") == 2


# -- served --------------------------------------------------------------------------------


async def test_served_pages_and_their_answers(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db, po_number="PO/0002?x#y"):
        status = page_for(db)

        async def metrics(scope: object, receive: object, send: object) -> None:
            # Stands in for the Prometheus app: only which route answered matters.
            await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": b"metrics here"})  # type: ignore[operator]

        try:
            async with serving(status.app(metrics_app=metrics)) as url, httpx.AsyncClient() as c:
                root = await c.get(f"{url}/")
                order = await c.get(f"{url}/orders/{quote('PO/0002?x#y', safe='')}")
                missing = await c.get(f"{url}/orders/{quote(HOSTILE, safe='')}")
                scraped = await c.get(f"{url}/metrics")
                posted = await c.post(f"{url}/")
        finally:
            await status.close()
    assert root.status_code == 200 and root.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in root.headers["content-security-policy"]
    assert root.headers["cache-control"] == "no-store"
    assert order.status_code == 200 and "PO/0002?x#y" in Page(order.text).sections["facts"]
    assert missing.status_code == 404 and "&lt;script&gt;" in missing.text
    assert "<script>" not in missing.text
    assert scraped.text == "metrics here"
    assert posted.status_code == 405  # read-only


async def test_a_database_that_cannot_be_read_is_a_503_naming_it(tmp_path: Path) -> None:
    status = page_for(tmp_path / "gone.db")
    async with serving(status.app()) as url, httpx.AsyncClient() as client:
        response = await client.get(f"{url}/")
    await status.close()
    assert response.status_code == 503
    assert "Cannot read the database" in response.text
    assert f"database not found: {tmp_path / 'gone.db'}" in response.text


# -- in a real browser ---------------------------------------------------------------------


async def chromium(*args: str) -> str:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="syncd-chromium-") as profile:
        done = await anyio.run_process(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium)")
@pytest.mark.timeout(180)
async def test_a_person_sees_the_daemon_in_a_browser(sims: Sims, tmp_path: Path) -> None:
    # A short database path: the screenshot shows it in the commands a person would copy.
    scratch = Path(tempfile.mkdtemp(prefix="syncd-"))
    try:
        await _browse(sims, scratch / "syncd.db", tmp_path)
    finally:
        shutil.rmtree(scratch)


async def _browse(sims: Sims, db: Path, tmp_path: Path) -> None:
    blank = {"sku": "", "name": "Blank", "quantity": "1", "price": "5"}
    chair = {"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "2", "price": "150.00"}
    table = {"sku": "TABLE-OAK", "name": "Oak table", "quantity": "1", "price": "520.00"}
    async with sims.daemon(db) as daemon, sims.factory():
        assert daemon.metrics_url is not None
        good = [await sims.create_po([chair, table]), await sims.create_po([chair])]
        stuck = await sims.create_po([blank])
        daemon.poll_now()
        numbers = [po["order_number"] for po in good]
        await wait_for(daemon, numbers, is_state("received"), seconds=60)
        await wait_for(daemon, [stuck["order_number"]], is_state("needs_attention"))

        url = daemon.metrics_url
        page = Page(await chromium("--dump-dom", f"{url}/"))
        order = Page(await chromium("--dump-dom", f"{url}/orders/{numbers[0]}"))
        shot = tmp_path / "status-page.png"
        await chromium(f"--screenshot={shot}", "--window-size=1100,1500", f"{url}/")
        phone = tmp_path / "status-page-phone.png"
        await chromium(f"--screenshot={phone}", "--window-size=412,915", f"{url}/")
        order_shot = tmp_path / "status-page-order.png"
        await chromium(
            f"--screenshot={order_shot}", "--window-size=1100,900", f"{url}/orders/{numbers[0]}"
        )
        metrics = await sims.control.get(f"{url}/metrics")

    # States and counts, as drawn.
    assert page.count("received") == 2
    assert page.count("needs_attention") == 1
    # The reason, and what to type.
    attention = page.sections["attention"]
    assert stuck["order_number"] in attention
    assert "cannot match without a SKU" in attention
    assert f"syncctl --db {db} retry {stuck['order_number']}" in attention
    # Both services polled.
    for service in ("tradegecko", "katana"):
        assert page.services[service].startswith(f"{service} running 20")
    # One order's timeline: every step from discovery to receipt.
    timeline = order.sections["timeline"]
    for state in ("discovered", "imported", "delivered", "received"):
        assert state in timeline
    assert f"TG-{numbers[0]}" in order.sections["facts"]
    # The statechart is drawn when dot is there.
    if shutil.which("dot"):
        assert ("svg", {}) not in page.tags and any(tag == "svg" for tag, _ in page.tags)
    assert metrics.status_code == 200 and "syncd_orders" in metrics.text
    # A screenshot for review.
    assert all(p.stat().st_size > 10_000 for p in (shot, phone, order_shot))
    # SYNCD_SCREENSHOTS=docs refreshes the README's picture; a plain run leaves the tree clean.
    if target := os.environ.get("SYNCD_SCREENSHOTS"):
        (ROOT / target).mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / target / "status-page.png")


async def test_with_several_factories_the_page_sums_them_and_says_each_ones(
    tmp_path: Path,
) -> None:
    db = tmp_path / "syncd.db"
    async with filled_store(db) as store:
        # A second factory with the same PO number in its own account, its Katana paused.
        north = store.for_factory("north")
        await walk(north, 1, "PO0001", [("import_failed", "the import gave up")], reason="no SKU")
        await north.set_meta("paused.katana", "katana rejected the token (401) since ...")
        status = page_for(db, factories=lambda: ["default", "north"])
        try:
            overview = await status.overview()
            order = await status.order("PO0001", "north")
            first = await status.order("PO0001")
        finally:
            await status.close()
    assert list(overview.factories) == ["default", "north"]
    assert overview.factories["north"].counts == {"needs_attention": 1}
    assert overview.factories["north"].attention == 1
    assert overview.factories["north"].paused == ["katana"]
    assert overview.factories["default"].attention == 2
    text = render_overview(overview)
    page = Page(text)
    # The states are every factory's.
    assert page.count("needs_attention") == 3 and page.count("received") == 1
    factories = page.sections["factories"]
    assert "north 1 1 paused: katana needs_attention 1" in factories
    assert "default 3 2" in factories
    # Each order and service names its factory, and so do the commands.
    assert f"syncctl --db {db} --factory north retry PO0001" in page.codes
    assert "/orders/PO0001?factory=north" in text
    assert page.services["north katana"].startswith("north katana paused")
    # An order page by factory; without one, the first factory that has it.
    assert order is not None and order.factory == "north" and order.link.state == "needs_attention"
    assert first is not None and first.factory == "default" and first.link.state == "received"
    shown = render_order(order)
    assert "<dt>factory</dt><dd>north</dd>" in shown
    assert f"syncctl --db {db} --factory north retry PO0001" in shown
