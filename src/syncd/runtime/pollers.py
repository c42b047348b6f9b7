"""The pollers: what TradeGecko and Katana say, turned into inbox events.

The TradeGecko poller lists the POs of the configured supplier updated since its cursor and
created after activation (history is never imported): a new active PO becomes a
``po_discovered`` event carrying its first snapshot; a linked PO that was voided or deleted
becomes an observation. The Katana poller lists the sales orders and manufacturing orders
updated since its cursors and reports the followed sales orders' progress. Every event
carries a de-duplication key, so polling the same window twice changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import anyio
import msgspec

from syncd.adapters._http import Priority, request_priority
from syncd.adapters.katana import KatanaClient, ManufacturingOrder
from syncd.adapters.katana import SalesOrder as KatanaSalesOrder
from syncd.adapters.tradegecko import PurchaseOrder, PurchaseOrderLineItem, TradeGeckoClient
from syncd.config import Config
from syncd.domain.orders import (
    LinkedOrder,
    PurchaseOrderLine,
    PurchaseOrderSnapshot,
    SalesOrderFacts,
    SalesOrderRowFacts,
)
from syncd.domain.rules import purchase_order_drift, purchase_order_trigger
from syncd.domain.statechart import Statechart
from syncd.errors import AuthError, Retries, SyncdError, is_transient
from syncd.runtime import inbox
from syncd.runtime.crashpoints import crash_point
from syncd.runtime.effects import ECOMMERCE_ORDER_TYPE
from syncd.runtime.pauses import PAUSED_PREFIX, pause_service
from syncd.store import ImportResult as Import
from syncd.store import InboxEvent, Store

__all__ = [
    "BEFORE_ACTIVATION",
    "IMPORTABLE_STATUSES",
    "OTHER_SUPPLIER",
    "OVERLAP",
    "KatanaPoller",
    "TradeGeckoPoller",
    "facts_of",
    "parse_time",
    "report_sales_order",
    "snapshot_of",
    "supplier_matches",
    "utcnow",
]

log = logging.getLogger("syncd.pollers")

#: Each poll looks this far behind its cursor: records updated in the same second as the last
#: one seen, or committed late, are caught; de-duplication keys absorb the overlap.
OVERLAP = timedelta(seconds=5)
#: POs that are not yet issued (drafts) wait; these are imported.
IMPORTABLE_STATUSES = frozenset({"active"})
_SUPPLIER_CACHE_SECONDS = 600.0
#: Why a seen PO is not linked, as recorded for ``syncctl explain`` (which matches on them).
BEFORE_ACTIVATION = "created before activation"
OTHER_SUPPLIER = "another supplier"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


class _Poller:
    name = "poller"
    #: How far polls that find nothing stretch the interval (at most this many times it);
    #: a kick or a poll that finds something brings it back. 1: never stretched.
    idle_stretch = 1.0
    #: The priority of the work a poll feeds, at which its requests go while polls are the
    #: way changes arrive (:meth:`priority`).
    feeds = Priority.START

    def __init__(
        self, store: Store, config: Config, interval: float, wake: Callable[[], None]
    ) -> None:
        self.store = store
        #: Seconds between polls: the configured interval, or the reconcile interval once
        #: webhooks bring the changes (:meth:`reconcile`).
        self.interval = interval
        self._reconcile_interval = config.webhooks.reconcile_interval
        self._wake = wake
        self.last_success: float | None = None
        self.kick = anyio.Event()
        #: Polls in a row that found nothing (and were not kicked).
        self.idle_polls = 0
        #: The wait for the next poll under way, and when it began (the last poll's end).
        self._waiting: anyio.CancelScope | None = None
        self._polled_at = 0.0

    async def poll_once(self) -> int:
        raise NotImplementedError

    def reconcile(self) -> None:
        """Webhooks bring the changes now: poll only to catch what a delivery missed, the
        next time one reconcile interval after the last poll."""
        self.interval = max(self.interval, self._reconcile_interval)
        if self._waiting is not None:
            # The wait under way was set for the poll interval: at start, 1,000 factories'
            # second polls came 30 s later, inside the first minutes of idling.
            self._waiting.deadline = self._polled_at + self.next_wait()

    def _moved(self, added: int) -> bool:
        """Whether the poll found something that may move (``added``: new events)."""
        return bool(added)

    @property
    def reconciling(self) -> bool:
        """Whether webhooks bring the changes and polls only catch what they missed."""
        return self.interval >= self._reconcile_interval

    def priority(self, *, kicked: bool = False) -> Priority:
        """The priority of a poll's requests: that of the work it feeds (:attr:`feeds`);
        background only for a due (not ``kicked``) reconcile poll, the webhooks' safety
        net. A poll at background starved while a burst of receipts aged out of
        TradeGecko's window: the POs it would have found sat unseen for 90-150 s."""
        if self.reconciling and not kicked:
            return Priority.BACKGROUND
        return self.feeds

    def next_wait(self) -> float:
        """Seconds until the next poll: the interval, stretched (doubling, up to
        :attr:`idle_stretch` times) after the second poll in a row that found nothing. The
        reconcile interval is never stretched: it is the webhooks' safety net."""
        if self.reconciling or self.idle_polls < 2:
            return self.interval
        return self.interval * min(self.idle_stretch, 2.0 ** (self.idle_polls - 1))

    async def _pause(self, error: AuthError) -> None:
        await pause_service(self.store, error.service or self.name, error)

    async def _resume(self) -> None:
        key = f"{PAUSED_PREFIX}{self.name}"
        try:
            if await self.store.get_meta(key) is not None:
                await self.store.delete_meta(key)
                log.warning("%s accepts the token again: orders resume", self.name)
        except SyncdError as exc:
            log.warning("cannot clear the pause: %s", exc)

    async def _paused(self) -> bool:
        try:
            return await self.store.get_meta(f"{PAUSED_PREFIX}{self.name}") is not None
        except SyncdError:
            return False

    async def run(self, *, first: Callable[[], Awaitable[None]] | None = None) -> None:
        """Poll forever; a failed poll is logged and tried again next interval.

        :param first: awaited before the first poll (a daemon spreading many factories'
            first polls); only the polls wait for it.
        """
        if first is not None:
            await first()
        kicked = False
        while True:
            try:
                with request_priority(self.priority(kicked=kicked)):
                    added = await self.poll_once()
            except AuthError as exc:
                await self._pause(exc)
            except SyncdError as exc:
                log.warning("%s poll failed: %s", self.name, exc)
            else:
                await self._resume()
                self.last_success = time.time()
                self.idle_polls = 0 if self._moved(added) else self.idle_polls + 1
                if added:
                    self._wake()
                try:
                    # For `syncctl status`, which reads the database, not the daemon.
                    await self.store.set_meta(f"last_poll.{self.name}", str(self.last_success))
                except SyncdError as exc:
                    log.warning("cannot record the %s poll: %s", self.name, exc)
            self._polled_at = anyio.current_time()
            self._waiting = anyio.move_on_after(self.next_wait())
            with self._waiting:
                await self.kick.wait()
            self._waiting = None
            kicked = self.kick.is_set()
            if kicked:
                self.idle_polls = 0  # asked to look now: something may move
            self.kick = anyio.Event()


class TradeGeckoPoller(_Poller):
    """Finds new purchase orders for the supplier, and withdrawn ones."""

    name = "tradegecko"
    cursor_name = "tradegecko.purchase_orders"

    def __init__(
        self,
        store: Store,
        client: TradeGeckoClient,
        config: Config,
        activated_at: datetime,
        wake: Callable[[], None],
        *,
        watch: inbox.InboxWatch | None = None,
    ) -> None:
        super().__init__(store, config, config.tradegecko.poll_interval, wake)
        #: The daemon's look at the inbox, which wakes the import watcher when ``syncctl
        #: import`` wrote a request; without one it looks every ``retry.backfill.initial``.
        self.watch = watch
        self._imports = anyio.Event()
        self.client = client
        self.supplier_name = config.tradegecko.supplier_name
        self.supplier_match = config.tradegecko.supplier_match
        self.activated_at = activated_at
        self._suppliers: list[int] = []
        self._suppliers_at = -1e18
        self._suppliers_lock = anyio.Lock()
        self.retry = config.retry()
        self._import_retries: Retries[int] = Retries(self.retry.backfill)
        #: When the last poll that skipped no PO was answered (monotonic), or ``None``.
        self._seen_at: float | None = None

    def changes_seen_at(self, created_at: datetime) -> float | None:
        """When every change to a PO created at ``created_at`` was last seen (monotonic):
        the answer of the last poll that skipped none. ``None`` before the first, or when
        the polls never list it (a PO made before activation, imported on purpose)."""
        return None if created_at < self.activated_at else self._seen_at

    async def supplier_ids(self) -> list[int]:
        """The ids of the TradeGecko suppliers named like the configured supplier (read
        once for all who ask while it is read: the poll and the webhook deliveries)."""
        read_at = self._suppliers_at
        if time.monotonic() - read_at <= _SUPPLIER_CACHE_SECONDS and self._suppliers:
            return self._suppliers
        async with self._suppliers_lock:
            if self._suppliers_at != read_at:
                return self._suppliers  # read by another while this one waited
            companies = await self.client.list_companies(company_type="supplier")
            self._suppliers = sorted(
                c.id
                for c in companies
                if supplier_matches(c.name, self.supplier_name, self.supplier_match)
            )
            self._suppliers_at = time.monotonic()
            if not self._suppliers:
                log.warning("no TradeGecko supplier is named %r", self.supplier_name)
        return self._suppliers

    async def poll_once(self) -> int:
        suppliers = await self.supplier_ids()
        if not suppliers:
            return 0
        stored = await self.store.get_cursor(self.cursor_name)
        cursor = parse_time(stored) if stored else self.activated_at
        # A record changed while the pages were walked may sit on a page already read: the
        # cursor never passes the moment this poll began.
        ceiling = datetime.now(UTC)
        orders = await self.client.list_purchase_orders(
            company_ids=suppliers,
            created_at_min=self.activated_at,
            updated_at_min=cursor - OVERLAP,
        )
        answered, skipped = time.monotonic(), False
        linked = await self.store.linked_po_ids([po.id for po in orders])
        lines = await self._lines_of_new(orders, linked)
        added = 0
        for po in sorted(orders, key=lambda po: (po.created_at, po.id)):
            if po.created_at < self.activated_at:
                continue
            try:
                added += await self.consider(po, linked=po.id in linked, lines=lines.get(po.id))
            except SyncdError as exc:
                # One PO that cannot be read must not stop the others; the cursor stays
                # before it so that the next poll tries it again.
                log.warning(
                    "PO %s skipped this poll: %s",
                    po.order_number or po.id,
                    exc,
                    extra={"po": po.order_number, "po_id": po.id},
                )
                ceiling = min(ceiling, po.updated_at - timedelta(microseconds=1))
                skipped = True
        if orders:
            newest = min(max(po.updated_at for po in orders), ceiling)
            if newest > cursor:
                await self.store.set_cursor(self.cursor_name, newest.isoformat())
        if not skipped:
            # Every change up to the answer is in the inbox now (a drift as its event).
            self._seen_at = answered
        return added

    async def _lines_of_new(
        self, orders: Sequence[PurchaseOrder], linked: set[int]
    ) -> dict[int, list[PurchaseOrderLineItem]]:
        """The lines of the POs this poll may discover, read together when there are several
        (one read for all instead of one each). A PO whose lines came back other than its
        ``purchase_order_line_item_ids`` say is left out: it is read by itself."""
        new = [
            po
            for po in orders
            if po.id not in linked
            and po.status in IMPORTABLE_STATUSES
            and po.created_at >= self.activated_at
        ]
        if len(new) < 2:
            return {}
        try:
            found = await self.client.lines_of_purchase_orders([po.id for po in new])
        except SyncdError as exc:
            log.warning("PO lines not read together, one PO at a time instead: %s", exc)
            return {}
        whole: dict[int, list[PurchaseOrderLineItem]] = {}
        for po in new:
            order = {line_id: i for i, line_id in enumerate(po.purchase_order_line_item_ids)}
            lines = found.get(po.id, [])
            if {line.id for line in lines} == set(order):
                whole[po.id] = sorted(lines, key=lambda line: order[line.id])
        return whole

    async def consider(
        self,
        po: PurchaseOrder,
        *,
        linked: bool,
        lines: list[PurchaseOrderLineItem] | None = None,
    ) -> int:
        """Turn one PO of the supplier into its inbox event, if any; returns how many new.

        Shared by the poll and the webhook consumer: both write the same events under the
        same de-duplication keys, so a webhook and a poll of one change count once.

        :param lines: the PO's lines when already fetched with it.
        """
        if po.created_at < self.activated_at:
            await self.note_not_linked(po, BEFORE_ACTIVATION)
            return 0
        if linked:
            return await self._observe(po)
        if po.status in IMPORTABLE_STATUSES:
            return await self._discover(po, lines)
        await self.note_not_linked(po, f"{po.status}: only active POs are imported")
        return 0

    async def note_not_linked(
        self, po: PurchaseOrder, reason: str, *, supplier: str | None = None
    ) -> None:
        """Record why a seen PO is not linked, for ``syncctl explain`` (best effort: the
        poll goes on without it)."""
        try:
            await self.store.observe_purchase_order(
                po.id,
                po.order_number or f"#{po.id}",
                status=po.status,
                reason=reason,
                supplier=supplier or self.supplier_name,
                po_created_at=po.created_at,
            )
        except SyncdError as exc:
            log.warning("cannot record PO %s: %s", po.order_number or po.id, exc)

    async def _discover(
        self,
        po: PurchaseOrder,
        lines: list[PurchaseOrderLineItem] | None = None,
        *,
        source: str = "tradegecko",
    ) -> int:
        if lines is None:
            po, lines = await self.client.get_purchase_order(po.id)
        snapshot = snapshot_of(po, lines)
        event = await self.store.add_event(
            source,
            inbox.PO_DISCOVERED,
            inbox.encode(snapshot),
            dedup_key=f"po:{po.id}",
            po_id=po.id,
        )
        if event is not None:
            crash_point("po_discovered")
            log.info("new purchase order", extra={"po": snapshot.po_number, "po_id": po.id})
        return int(event is not None)

    # -- imports on purpose (syncctl import) ---------------------------------------------

    async def run(self, *, first: Callable[[], Awaitable[None]] | None = None) -> None:
        """Poll forever, and serve the operators' import requests as they come (from the
        start: a delayed ``first`` poll delays no import)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_imports)
            await super().run(first=first)

    def wake_imports(self) -> None:
        """Tell the import watcher an import request waits in the inbox."""
        self._imports.set()

    async def _serve_imports(self) -> None:
        kinds = (inbox.IMPORT_REQUESTED,)
        # syncctl writes requests from another process: the watch wakes this while one
        # waits (a request that failed for now is tried again at each look); alone, it
        # looks every retry.backfill.initial.
        with inbox.watched(
            self.watch,
            self.store.factory,
            self.wake_imports,
            kinds=kinds,
            alone=self.retry.backfill.initial,
        ) as patience:
            while True:
                try:
                    for event in await self.store.pending_events(kinds=kinds):
                        await self._import_requested(event)
                except SyncdError as exc:
                    log.warning("import requests not read: %s", exc)
                with anyio.move_on_after(patience):
                    await self._imports.wait()
                self._imports = anyio.Event()

    async def _import_requested(self, event: InboxEvent) -> None:
        try:
            request = inbox.decode(event.kind, event.payload)
        except msgspec.DecodeError as exc:
            await self.store.mark_processed(event.id, f"unreadable: {exc}")
            return
        assert isinstance(request, inbox.ImportRequest)
        try:
            if await self.backfill(event.id, request):
                self._wake()
        except SyncdError as exc:
            if is_transient(exc):
                # TradeGecko or the database is down for now: the request waits.
                log.warning("import of PO %s waits: %s", request.po_number, exc)
                return
            attempt = self._import_retries.failed(event.id)
            if attempt.delay is not None:
                log.warning(
                    "import of PO %s failed (try %d): %s", request.po_number, attempt.number, exc
                )
                return
            log.error("import of PO %s set aside: %s", request.po_number, exc)
            await self.store.mark_processed(event.id, f"failed: {exc}")
        self._import_retries.succeeded(event.id)

    async def backfill(self, event_id: int, request: inbox.ImportRequest) -> bool:
        """``syncctl import``: fetch the PO by number and discover it, even if it was made
        before activation; another supplier's is refused unless forced. Each outcome is
        recorded with the request (``event_id``) for ``syncctl import --wait`` and
        ``syncctl explain``; returns whether a discovery was written."""
        number = request.po_number
        settle = self.store.record_import_outcome
        if await self.store.link_by_po_number(number) is not None:
            await settle(event_id, number, Import.ALREADY_LINKED, f"PO {number} is already linked")
            return False
        found = [
            po
            for po in await self.client.list_purchase_orders(order_number=number)
            if po.order_number == number
        ]
        if not found:
            log.warning("backfill: no PO %s in TradeGecko", number, extra={"po": number})
            await settle(event_id, number, Import.NOT_FOUND, f"no PO {number} in TradeGecko")
            return False
        po = min(found, key=lambda po: po.id)
        supplier = next(
            (
                c.name
                for c in await self.client.list_companies(company_type="supplier")
                if c.id == po.company_id
            ),
            f"company {po.company_id}",
        )
        if not request.force and not supplier_matches(
            supplier, self.supplier_name, self.supplier_match
        ):
            why = f"PO {number} is {supplier}'s, not {self.supplier_name}'s: not imported"
            await self.store.observe_purchase_order(
                po.id, number, status=po.status, reason=OTHER_SUPPLIER, supplier=supplier
            )
            await settle(event_id, number, Import.OTHER_SUPPLIER, why, po_id=po.id)
            return False
        if po.status not in IMPORTABLE_STATUSES:
            why = f"PO {number} is {po.status} in TradeGecko: not imported"
            await settle(event_id, number, Import.NOT_ACTIVE, why, po_id=po.id)
            return False
        order, lines = await self.client.get_purchase_order(po.id)
        why = f": {request.reason}" if request.reason else ""
        await self._discover(order, lines, source=f"backfill by {request.who()}{why}")
        await settle(
            event_id, number, Import.DISCOVERED, f"PO {number} (id {po.id}) discovered", po_id=po.id
        )
        return True

    async def _observe(self, po: PurchaseOrder) -> int:
        if purchase_order_trigger(po.status) is None:
            return await self._drift(po)
        event = await self.store.add_event(
            "tradegecko",
            inbox.PO_OBSERVED,
            inbox.encode(inbox.PurchaseOrderObserved(po_id=po.id, status=po.status)),
            dedup_key=f"po:{po.id}:status:{po.status}",
            po_id=po.id,
        )
        return int(event is not None)

    async def _drift(self, po: PurchaseOrder) -> int:
        """An edit of a linked PO after import: its lines, if they differ from the snapshot."""
        if po.status not in IMPORTABLE_STATUSES:
            # Received (re-costed by syncd itself) or a draft again: nothing to compare.
            return 0
        link = await self.store.link_by_po(po.id)
        if link is None or link.snapshot is None or po.updated_at <= link.snapshot.updated_at:
            return 0
        order, lines = await self.client.get_purchase_order(po.id)
        current = snapshot_of(order, lines).lines
        if not purchase_order_drift(link.snapshot, current):
            return 0
        event = await self.store.add_event(
            "tradegecko",
            inbox.PO_OBSERVED,
            inbox.encode(
                inbox.PurchaseOrderObserved(po_id=po.id, status=order.status, lines=current)
            ),
            dedup_key=f"po:{po.id}:updated:{order.updated_at.isoformat()}",
            po_id=po.id,
            link_id=link.id,
        )
        return int(event is not None)


def supplier_matches(name: str | None, wanted: str, how: str = "exact") -> bool:
    """Whether a TradeGecko supplier called ``name`` is the configured ``wanted`` one."""
    if name is None:
        return False
    if how == "exact":
        return name == wanted
    folded, target = name.strip().casefold(), wanted.strip().casefold()
    if how == "prefix":
        return folded.startswith(target)
    return folded == target


def snapshot_of(po: PurchaseOrder, lines: list[PurchaseOrderLineItem]) -> PurchaseOrderSnapshot:
    """The domain's view of a PO as first seen."""
    return PurchaseOrderSnapshot(
        po_id=po.id,
        po_number=po.order_number or f"#{po.id}",
        status=po.status,
        company_id=po.company_id,
        currency_id=po.currency_id,
        created_at=po.created_at,
        updated_at=po.updated_at,
        lines=tuple(
            PurchaseOrderLine(
                line_id=line.id,
                variant_id=line.variant_id,
                quantity=line.quantity,
                price=line.price,
                freeform=bool(line.freeform),
                label=line.label,
                landed_cost=line.extra_cost_value,
                position=line.position,
            )
            for line in lines
        ),
    )


class KatanaPoller(_Poller):
    """Follows the sales orders of linked orders, and the manufacturing orders behind them.

    Production takes hours: a cycle that finds nothing is common, and the key is shared. So
    the interval stretches to twice itself while polls find nothing (the same followed
    orders, nothing new), and the manufacturing order list, which only finds followed SOs
    whose MO changed without the SO's ``updated_at`` moving, is read only when the SO list
    left a followed order unseen and at most once per :attr:`mo_every` seconds. Its cursor
    stays put between reads, so a skipped read loses nothing: the next one covers it.
    """

    name = "katana"
    so_cursor = "katana.sales_orders"
    mo_cursor = "katana.manufacturing_orders"
    idle_stretch = 2.0
    #: What it finds (production done, an SO delivered) moves orders under way to receipt.
    feeds = Priority.FINISH
    #: The MO list, in poll intervals: at most once per this many.
    MO_EVERY_POLLS = 4

    def __init__(
        self,
        store: Store,
        client: KatanaClient,
        config: Config,
        chart: Statechart,
        activated_at: datetime,
        wake: Callable[[], None],
    ) -> None:
        super().__init__(store, config, config.katana.poll_interval, wake)
        self.client = client
        self.followed_states = chart.followed_states()
        self.activated_at = activated_at
        #: When the MO list was last read (monotonic); ``None``: due at the next poll. Not
        #: due at start: the SO list's cursor catches what changed while syncd was down,
        #: and the MO list's, kept in the store, what changed behind an SO one read later.
        self.mo_listed_at: float | None = time.monotonic()
        self._followed: set[int] = set()
        self._grown = False
        #: Called with a followed order and a live SO that carries syncd's key for its PO
        #: but is not its SO (a create that landed late): the effects settle it
        #: (:meth:`~syncd.runtime.effects.Effects.settle_duplicate`). ``None``: not looked at.
        self.on_duplicate: Callable[[LinkedOrder, KatanaSalesOrder], Awaitable[None]] | None = None

    @property
    def mo_every(self) -> float:
        """Seconds between two reads of the manufacturing order list, at most."""
        return self.MO_EVERY_POLLS * self.interval

    async def _cursor(self, name: str) -> datetime:
        stored = await self.store.get_cursor(name)
        return parse_time(stored) if stored else self.activated_at

    async def poll_once(self) -> int:
        followed = await self.store.so_ids_in_states(self.followed_states)
        if not followed:
            if await self._paused():
                # Nothing to follow, but an effect met a 401: ask once, so that the pause
                # ends when the token works again (one call per interval, only while paused).
                await self.client.get_factory()
            return 0
        # A newly followed order (an import just made its SO) is something that may move.
        grown = not set(followed) <= self._followed
        self._followed = set(followed)
        so_since = await self._cursor(self.so_cursor)
        mo_since = await self._cursor(self.mo_cursor)
        ceiling = datetime.now(UTC)
        orders = await self.client.list_sales_orders(
            updated_at_min=so_since - OVERLAP, include_deleted=True
        )
        seen = {so.id for so in orders}
        manufacturing: list[ManufacturingOrder] = []
        due = (
            self.mo_listed_at is None
            or time.monotonic() - self.mo_listed_at >= self.mo_every
            or self.reconciling
        )
        if due and not set(followed) <= seen:
            manufacturing = await self.client.list_manufacturing_orders(
                updated_at_min=mo_since - OVERLAP, include_deleted=True
            )
            self.mo_listed_at = time.monotonic()
        behind = sorted(
            {
                mo.sales_order_id
                for mo in manufacturing
                if mo.sales_order_id in followed and mo.sales_order_id not in seen
            }
        )
        # Only the time-windowed lists move the cursors: an SO fetched by id afterwards may
        # carry a newer stamp than changes to others not yet listed.
        windowed = [so.updated_at for so in orders]
        if behind:
            orders += await self.client.list_sales_orders(ids=behind, include_deleted=True)
        added = await self.report(orders, followed)
        await self._advance(self.so_cursor, so_since, windowed, ceiling)
        await self._advance(
            self.mo_cursor, mo_since, [mo.updated_at for mo in manufacturing], ceiling
        )
        self._grown = grown
        return added

    def _moved(self, added: int) -> bool:
        return bool(added) or self._grown

    async def report(self, orders: Sequence[KatanaSalesOrder], followed: dict[int, int]) -> int:
        """Report the followed ones among ``orders`` (``followed``: SO id → link id).

        Shared by the poll and the webhook consumer, under the same de-duplication keys.
        """
        added = 0
        for so in orders:
            if so.id in followed:
                added += await self._report(so, followed[so.id])
            elif self.on_duplicate is not None and _keyed_by_syncd(so):
                link = await self.store.link_by_po(int(so.ecommerce_order_id or 0))
                if link is not None and link.so_id is not None and link.so_id != so.id:
                    await self.on_duplicate(link, so)
        return added

    async def _advance(
        self, name: str, since: datetime, seen: Sequence[datetime | None], ceiling: datetime
    ) -> None:
        # Never past the moment the poll began: changes made while it walked the pages are
        # picked up by the next one.
        stamps = [stamp for stamp in seen if stamp is not None]
        if stamps and min(max(stamps), ceiling) > since:
            await self.store.set_cursor(name, min(max(stamps), ceiling).isoformat())

    async def _report(self, so: KatanaSalesOrder, link_id: int) -> int:
        stamp = so.updated_at.isoformat() if so.updated_at else ""
        return await report_sales_order(self.store, facts_of(so), stamp, link_id)


def _keyed_by_syncd(so: KatanaSalesOrder) -> bool:
    """Whether ``so`` is live and carries a key of syncd's kind (``ecommerce_order_type``
    ``"tradegecko"``, a PO id): the effects check the whole key."""
    return (
        so.deleted_at is None
        and so.ecommerce_order_type == ECOMMERCE_ORDER_TYPE
        and (so.ecommerce_order_id or "").isdigit()
    )


async def report_sales_order(store: Store, facts: SalesOrderFacts, stamp: str, link_id: int) -> int:
    """Write what was seen of an SO as an observation event of its order; 1 if new, 0 if
    the same ``stamp`` (the SO's ``updated_at``, or what signed deliveries said) saw the same
    before."""
    event = await store.add_event(
        "katana",
        inbox.SO_OBSERVED,
        inbox.encode(facts),
        dedup_key=(
            f"so:{facts.so_id}:{stamp}:{facts.status}:{facts.production_status}"
            f":{facts.deleted}:{len(facts.manufacturing_order_ids)}"
        ),
        so_id=facts.so_id,
        link_id=link_id,
    )
    return int(event is not None)


def facts_of(so: KatanaSalesOrder) -> SalesOrderFacts:
    """The domain's view of a Katana sales order."""
    return SalesOrderFacts(
        so_id=so.id,
        order_no=so.order_no,
        status=so.status,
        production_status=so.production_status,
        deleted=so.deleted_at is not None,
        manufacturing_order_ids=tuple(
            row.linked_manufacturing_order_id
            for row in so.sales_order_rows
            if row.linked_manufacturing_order_id is not None
        ),
        updated_at=so.updated_at,
        rows=tuple(
            SalesOrderRowFacts(
                variant_id=row.variant_id, quantity=row.quantity, price=row.price_per_unit
            )
            for row in so.sales_order_rows
            if row.deleted_at is None
        ),
    )


def utcnow() -> datetime:
    return datetime.now(UTC)
