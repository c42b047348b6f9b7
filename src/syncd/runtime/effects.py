"""The effects a linked order entails: importing the PO into Katana, making its sales order's
manufacturing orders (with ``katana.make_to_order = "auto"``), receiving the PO back.

All are safe to run again after a crash at any point. The import notes in the store that it
is about to create the sales order before the POST; an import that finds that note (a crash,
a timeout, a dropped answer, a retry: the POST may have landed) looks the order up first by
its natural key, which people cannot edit: the create-only ``ecommerce_order_id`` (the PO's
TradeGecko id) in ``ecommerce_store_name`` ``"TradeGecko <account id>"`` (see
:func:`natural_key`). A first attempt creates without looking. Variants are looked up by SKU,
the customer by reference id.
Make-to-order reads each row's ``linked_manufacturing_order_id`` before making one.
The receipt reads the PO first (a received PO is done), sets prices with PUTs (idempotent),
and receives with an ``Idempotency-Key`` that TradeGecko honours for 24 hours.

An effect returns an :class:`Outcome` naming the trigger to fire. A failure that a person must
fix (a rule the order breaks, a request the service refuses) is an outcome too; a passing
failure (5xx, timeout, 429 storm) is raised for the dispatcher to retry later.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Generic, Protocol, TypeVar

import anyio
import msgspec

from syncd.adapters._http import Priority, request_priority, slot_given_back
from syncd.adapters.katana import InventoryRecord, KatanaClient, NewSalesOrder, NewSalesOrderRow
from syncd.adapters.katana import SalesOrder as KatanaSalesOrder
from syncd.adapters.katana import Variant as KatanaVariant
from syncd.adapters.tradegecko import PurchaseOrder, PurchaseOrderLineItem, TradeGeckoClient
from syncd.config import Config
from syncd.domain import triggers
from syncd.domain.orders import LineLink, LinkedOrder, PurchaseOrderSnapshot
from syncd.domain.rules import (
    DELIVERED,
    PO_WITHDRAWN,
    PRODUCTION_DONE,
    cost_update,
    lines_to_import,
    order_number_for,
    pick_average_cost,
)
from syncd.errors import (
    ApiError,
    NotFound,
    RuleViolation,
    SyncdError,
    ValidationFailed,
    is_transient,
)
from syncd.runtime.crashpoints import crash_point
from syncd.store import Store

__all__ = [
    "ECOMMERCE_ORDER_TYPE",
    "EFFECTS",
    "IMPORT_ORDER",
    "MAKE_TO_ORDER",
    "RECEIPT_WINDOW",
    "RECEIVE_ORDER",
    "VARIANT_TRUST_SECONDS",
    "EffectRunner",
    "EffectSpec",
    "Effects",
    "InventoryReads",
    "Outcome",
    "PurchaseOrderReads",
    "SalesOrderKey",
    "attempts_since_meta",
    "natural_key",
    "note_attempts_since",
]

log = logging.getLogger("syncd.effects")

#: How long cached reference data (currencies, the factory, the customer) is trusted.
_CACHE_SECONDS = 600.0
#: How long a cached variant (SKU ↔ id) is trusted without a refusal or a webhook saying it
#: changed: a SKU renamed with webhooks off is picked up within this long.
VARIANT_TRUST_SECONDS = 24 * 3600.0
#: The variant cache's ``service`` names.
_KATANA = "katana"
_TRADEGECKO = "tradegecko"

#: ``ecommerce_order_type`` of every SO syncd makes: free-string in Katana (not one of its
#: own integrations, so not deep-linked), stored verbatim and filterable.
ECOMMERCE_ORDER_TYPE = "tradegecko"
#: Meta key (``+ link id``) noting that an import is about to create, or created, the SO.
_ATTEMPT_KEY = "import_attempt:"
#: Meta key (``+ link id``): until when an import's create whose outcome was uncertain (a
#: timeout, a dropped answer, a 5xx) may still land: its start + the client's timeout, or
#: when the client gave up if later.
_UNCERTAIN_KEY = "import_uncertain:"
#: How :data:`_UNCERTAIN_KEY`'s value begins once the attempt begun then was answered.
_ANSWERED = "answered:"
#: Meta key (``+ SO id``): the same for a make-to-order POST on one of the SO's rows.
_MTO_UNCERTAIN_KEY = "make_to_order_uncertain:"
#: Procurements made by syncd's receipts remembered, to know their deliveries as echoes.
_PROCUREMENTS_KEPT = 10_000
#: Meta key (``+ link id``) noting that a receipt began writing (a price, the receive).
_RECEIPT_KEY = "receipt_attempt:"
#: The inbox kind of a PO change the poller saw (``inbox.PO_OBSERVED``; inbox imports this
#: module, so the name is repeated, and a test checks the two agree).
_PO_OBSERVED = "purchase_order_observed"
#: The status of a sales order nobody has shipped: one a duplicate may be deleted in.
_NOT_SHIPPED = "NOT_SHIPPED"
#: Meta key: when syncd first noted attempts. A link made before it may have an SO from an
#: earlier syncd that noted nothing, so its import always looks first.
_ATTEMPTS_SINCE_KEY = "import_attempts_since"


def attempts_since_meta() -> tuple[str, str]:
    """The meta key and value :func:`note_attempts_since` sets if unset (a daemon sets it
    for many factories at once with :meth:`Store.setdefault_meta_of`)."""
    return _ATTEMPTS_SINCE_KEY, repr(time.time())


async def note_attempts_since(store: Store) -> None:
    """Note, once per database, when this syncd began noting import attempts: at its first
    start, before any import. Links made before (by an older syncd) look their SO up first;
    on a new database no link does (the first import then costs no look-up either)."""
    await store.setdefault_meta(*attempts_since_meta())


@dataclass(frozen=True)
class SalesOrderKey:
    """The natural key of a PO's Katana SO: create-only fields, so a person cannot edit
    them (``order_no`` stays the people's)."""

    order_type: str
    store_name: str
    order_id: str


def natural_key(tradegecko_account_id: int, po_id: int) -> SalesOrderKey:
    """The key syncd sets on the SO of TradeGecko PO ``po_id``: the PO's TradeGecko id in
    the store ``"TradeGecko <account id>"`` (the account's id, not its name: people rename
    accounts), so two TradeGecko accounts feeding one Katana never share a key."""
    return SalesOrderKey(
        order_type=ECOMMERCE_ORDER_TYPE,
        store_name=f"TradeGecko {tradegecko_account_id}",
        order_id=str(po_id),
    )


@dataclass(frozen=True)
class EffectSpec:
    """One effect as the statechart names it, and the triggers its outcome fires."""

    name: str
    #: Fired when the effect did its work (or found it done).
    done: str
    #: Fired when a person must look (a rule the order breaks, a refusal).
    failed: str
    #: Other outcomes the effect may end in, each its own trigger.
    other: tuple[str, ...] = ()

    @property
    def fires(self) -> tuple[str, ...]:
        """Every trigger the effect's outcome may fire."""
        return (self.done, self.failed, *self.other)


IMPORT_ORDER = EffectSpec("import_order", done=triggers.SO_CREATED, failed=triggers.IMPORT_FAILED)
RECEIVE_ORDER = EffectSpec(
    "receive_order", done=triggers.PO_RECEIVED, failed=triggers.RECEIVE_FAILED
)
MAKE_TO_ORDER = EffectSpec(
    "make_to_order",
    done=triggers.PRODUCTION_ORDERED,
    failed=triggers.MAKE_TO_ORDER_FAILED,
    # No row has a recipe; or the SO was delivered before anything was left to make.
    other=(triggers.NOTHING_TO_MAKE, triggers.FOUND_DELIVERED),
)
#: Every effect syncd has, by name: the registry checked against the statechart at start-up.
EFFECTS: Mapping[str, EffectSpec] = {
    spec.name: spec for spec in (IMPORT_ORDER, MAKE_TO_ORDER, RECEIVE_ORDER)
}


class Outcome(msgspec.Struct, kw_only=True):
    """What an effect did, as the event that records it."""

    effect: str
    trigger: str
    cause: str
    reason: str | None = None
    so_id: int | None = None
    so_number: str | None = None
    currency: str | None = None
    lines: tuple[LineLink, ...] | None = None
    notes: tuple[str, ...] = ()


class EffectRunner(Protocol):
    """What the dispatcher needs of the effects: run one by name (:class:`Effects`)."""

    async def run(self, effect: str, link: LinkedOrder) -> Outcome: ...


@dataclass
class _Cache:
    value: object = None
    at: float = field(default=-1e18)
    _loading: anyio.Lock = field(default_factory=anyio.Lock)

    def fresh(self) -> bool:
        return self.value is not None and time.monotonic() - self.at < _CACHE_SECONDS

    def set(self, value: object) -> None:
        self.value, self.at = value, time.monotonic()

    async def get(self, load: Callable[[], Awaitable[object]]) -> object:
        """The value, loaded by ``load`` when stale: once for all who ask meanwhile (when
        it expired under load, 24 imports at once each read the currencies)."""
        if self.fresh():
            return self.value
        # Waiting for another's load, hold no slot: the loader may need one to send.
        async with slot_given_back():
            await self._loading.acquire()
        try:
            if not self.fresh():
                self.set(await load())
        finally:
            self._loading.release()
        return self.value


#: Seconds the first receipt waits for others to share its read: short beside an order's hours.
RECEIPT_WINDOW = 0.2

_K = TypeVar("_K")
_V = TypeVar("_V")


class _SharedRead(Generic[_K, _V]):
    """Callers within ``window`` seconds of each other share one read of every key they
    asked for: the first waits the window (and then while ``linger()`` says to), reads
    with ``read_all``, and every caller gets the same answer. A failed read fails every
    caller that shared it (each retries as before); ``None`` tells a caller the first one
    was cancelled, so it reads alone."""

    def __init__(
        self,
        read_all: Callable[[set[_K]], Awaitable[_V]],
        window: float,
        linger: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._read_all = read_all
        self.window = window
        self._linger = linger
        self._batch: _Batch[_K, _V] | None = None

    async def read(self, keys: Iterable[_K]) -> _V | None:
        batch = self._batch
        if batch is not None:
            batch.keys.update(keys)
            async with slot_given_back():
                await batch.done.wait()
            if batch.result is None and batch.error is not None:
                raise batch.error
            return batch.result
        batch = self._batch = _Batch()
        batch.keys.update(keys)
        try:
            await anyio.sleep(self.window)
            if self._linger is not None:
                await self._linger()
            self._batch = None  # later callers start the next batch
            batch.result = await self._read_all(batch.keys)
        except BaseException as exc:
            if self._batch is batch:
                self._batch = None
            # The others must not wait for a read that never comes.
            batch.error = exc if isinstance(exc, Exception) else None
            raise
        finally:
            batch.done.set()
        return batch.result


@dataclass
class _Batch(Generic[_K, _V]):
    keys: set[_K] = field(default_factory=set)
    done: anyio.Event = field(default_factory=anyio.Event)
    result: _V | None = None
    error: Exception | None = None


class InventoryReads:
    """Receipts due within :attr:`window` seconds of each other share one inventory read.

    The first receipt to ask waits the window, then reads the stock of every variant asked
    for meanwhile (``GET /inventory``, chunked); each receipt gets the records of its own
    variants. A failed read fails every receipt that shared it (each retries as before).
    """

    def __init__(self, katana: KatanaClient) -> None:
        self.katana = katana
        self._shared = _SharedRead(self._read_all, RECEIPT_WINDOW)
        #: Reads made, and receipts they served (for tests and the benches).
        self.reads = 0
        self.served = 0

    async def read(self, variant_ids: Sequence[int]) -> list[InventoryRecord]:
        """The inventory records of ``variant_ids`` (every location)."""
        records = await self._shared.read(variant_ids)
        if records is None:
            # The first receipt was cancelled: read alone.
            return await self.katana.list_inventory(variant_ids)
        self.served += 1
        wanted = set(variant_ids)
        return [record for record in records if record.variant_id in wanted]

    @property
    def window(self) -> float:
        """Seconds the first receipt waits for others: short beside an order's hours."""
        return self._shared.window

    @window.setter
    def window(self, seconds: float) -> None:
        self._shared.window = seconds

    async def _read_all(self, variant_ids: set[int]) -> list[InventoryRecord]:
        self.reads += 1
        return await self.katana.list_inventory(sorted(variant_ids))


#: A PO as a receipt reads it: the order and its lines.
_PurchaseOrderRead = tuple[PurchaseOrder, list[PurchaseOrderLineItem]]


#: Seconds between looks at the budget while a batch waits for it (:class:`PurchaseOrderReads`).
_PATIENCE_STEP = 0.05


class PurchaseOrderReads:
    """Receipts due together share their PO reads (TradeGecko's budget is the receipts').

    The first receipt to ask waits :attr:`window` seconds, then reads, in one
    ``GET /purchase_orders?ids[]=`` and one ``GET /purchase_order_line_items?purchase_order_id[]=``,
    every PO asked for meanwhile and the POs of orders whose receipt is due (``due``: the
    orders waiting for it in the dispatcher's queue), up to a page of their lines and no
    more receipts than TradeGecko's budget can serve within :attr:`fresh_for` seconds (none
    while that many calls wait for it). A PO read ahead so serves its receipt once, if that
    receipt asks within :attr:`fresh_for` seconds of the answer; a retry reads again. A
    receipt whose PO is being read ahead waits for that read instead of reading again. A PO
    missing from the list, or whose lines came back other than its
    ``purchase_order_line_item_ids`` say, is read by itself (``GET /purchase_orders/{id}``),
    as is a batch of one. With ``patience``, a batch stays open up to that many seconds
    while TradeGecko's budget has callers waiting (its read would wait behind them anyway):
    for the webhook consumer's look-ups. Receipts use none: the read-ahead already serves
    most of them.
    A failed read fails every receipt that shared it (each retries as before).
    """

    #: How old a PO read ahead may be when its receipt uses it. At saturation a receipt's
    #: own read waits for the budget about as long between its read and its writes.
    fresh_for = 60.0
    #: Lines read ahead at most: one page of ``/purchase_order_line_items``.
    ahead_lines = 250
    #: TradeGecko calls a receipt makes after its read (a price PUT and the receive).
    calls_per_receipt = 2

    def __init__(
        self,
        tradegecko: TradeGeckoClient,
        due: Callable[[], Awaitable[Sequence[LinkedOrder]]] | None = None,
        *,
        patience: float = 0.0,
        window: float | None = None,
    ) -> None:
        self.tradegecko = tradegecko
        self.due = due
        #: Seconds at most a batch stays open while the budget has callers waiting.
        self.patience = patience
        self._shared = _SharedRead(
            self._read_together, RECEIPT_WINDOW if window is None else window, self._linger
        )
        self._ahead: dict[int, tuple[float, _PurchaseOrderRead]] = {}
        #: POs being read ahead now, each to the end of its read.
        self._reading: dict[int, anyio.Event] = {}
        #: Shared reads made, and receipts they served (for tests and the benches).
        self.reads = 0
        self.served = 0

    async def read(self, po_id: int) -> _PurchaseOrderRead:
        """The PO ``po_id`` and its lines.

        :raises syncd.errors.NotFound: the purchase order does not exist.
        """
        reading = self._reading.get(po_id)
        if reading is not None:
            # Read ahead by a batch still waiting for its answer: reading again would
            # spend a call on what is on its way (under a backlog, once per receipt).
            async with slot_given_back():
                await reading.wait()
        ahead = self.take_ahead(po_id)
        if ahead is not None:
            return ahead
        found = await self._shared.read([po_id])
        read = None if found is None else found.get(po_id)
        if read is None:
            # The first receipt was cancelled, or the list did not bring this PO whole.
            return await self.tradegecko.get_purchase_order(po_id)
        self.served += 1
        return read

    def take_ahead(self, po_id: int) -> _PurchaseOrderRead | None:
        """The PO ``po_id`` as read ahead, if it is fresh (it serves once), else ``None``."""
        ahead = self._ahead.pop(po_id, None)
        if ahead is None or time.monotonic() - ahead[0] > self.fresh_for:
            return None
        self.served += 1
        return ahead[1]

    @property
    def window(self) -> float:
        """Seconds the first receipt waits for others."""
        return self._shared.window

    @window.setter
    def window(self, seconds: float) -> None:
        self._shared.window = seconds

    async def _linger(self) -> None:
        waited, step = self.window, max(self.window, _PATIENCE_STEP)
        while waited < self.patience and self.tradegecko.budget.waiting:
            await anyio.sleep(step)
            waited += step

    async def _read_together(self, asked: set[int]) -> dict[int, _PurchaseOrderRead]:
        now = time.monotonic()
        for po_id, (at, _) in list(self._ahead.items()):
            if now - at > self.fresh_for:
                del self._ahead[po_id]
        ahead: list[int] = []
        room, receipts = self.ahead_lines, self._ahead_room(len(asked))
        due = await self.due() if self.due is not None and receipts > 0 else []
        for link in due:
            if len(ahead) >= receipts:
                break
            po_id = link.po_id
            if po_id in asked or po_id in self._ahead or po_id in self._reading:
                continue
            count = max(1, len(link.lines))
            if count <= room and po_id not in ahead:
                room -= count
                ahead.append(po_id)
        ids = sorted(asked.union(ahead))
        self.reads += 1
        if len(ids) == 1:
            # Alone: one read with its lines side-loaded (NotFound is the asker's).
            return {ids[0]: await self.tradegecko.get_purchase_order(ids[0])}
        answered = anyio.Event()
        self._reading.update(dict.fromkeys(ahead, answered))
        try:
            orders = await self.tradegecko.list_purchase_orders(ids=ids)
            lines_of = await self.tradegecko.lines_of_purchase_orders([po.id for po in orders])
            # Fresh from the answer: the wait for the budget before it is no age.
            at = time.monotonic()
            found: dict[int, _PurchaseOrderRead] = {}
            for po in orders:
                order = {line_id: i for i, line_id in enumerate(po.purchase_order_line_item_ids)}
                read = lines_of.get(po.id, [])
                if {line.id for line in read} == set(order):
                    found[po.id] = (po, sorted(read, key=lambda line: order[line.id]))
            for po_id in ahead:
                if po_id in found:
                    self._ahead[po_id] = (at, found[po_id])
        finally:
            for po_id in ahead:
                if self._reading.get(po_id) is answered:
                    del self._reading[po_id]
            answered.set()
        return found

    def _ahead_room(self, asked: int) -> int:
        """Receipts to read ahead for: those TradeGecko's budget can serve within
        :attr:`fresh_for` after the calls already waiting and the ``asked`` receipts'. A PO
        read ahead that its receipt cannot use in time is a call spent twice."""
        budget = self.tradegecko.budget
        calls = budget.share(self.fresh_for) - budget.waiting - asked * self.calls_per_receipt
        return max(0, int(calls // self.calls_per_receipt))


class Effects:
    """Runs effects by name against the two services."""

    def __init__(
        self,
        config: Config,
        katana: KatanaClient,
        tradegecko: TradeGeckoClient,
        store: Store | None = None,
    ) -> None:
        """``store``: where import attempts are noted; without one every import looks its
        SO up before creating it."""
        self.config = config
        self.katana = katana
        self.tradegecko = tradegecko
        self.store = store
        self._account_id: int | None = None
        self._attempts_since: float | None = None
        self._customer = _Cache()
        self._base_currency = _Cache()
        self._currencies = _Cache()
        # Find-or-create must not interleave: two imports at once would both find nothing
        # and both create the same customer or SKU.
        self._find_or_create = anyio.Lock()
        #: Receipts' inventory reads, shared by receipts due together.
        self.inventory = InventoryReads(katana)
        #: Receipts' PO reads, shared by receipts due together and read ahead for those due.
        self.purchase_orders = PurchaseOrderReads(tradegecko, self._receipts_due)
        #: When every change to a PO created at the given moment was last seen (monotonic),
        #: or ``None``: the TradeGecko poller's last poll that skipped none (the daemon sets
        #: it). Within :attr:`PurchaseOrderReads.fresh_for` of it, a first receipt of a PO
        #: with no drift seen takes the PO as imported instead of reading it.
        self.purchase_orders_seen: Callable[[datetime], float | None] = _never_seen
        #: Receipts that took their PO as imported, and those a refusal sent to read it.
        self.unread_receipts = 0
        self.unread_refused = 0
        #: The procurements syncd's receipts made lately (oldest first, bounded): their
        #: ``procurement.create`` deliveries are echoes. Lost on a restart: then a poll.
        self._procurements: dict[int, None] = {}
        self._registered: dict[str, Callable[[LinkedOrder], Awaitable[Outcome]]] = {
            IMPORT_ORDER.name: self.import_order,
            MAKE_TO_ORDER.name: self.make_to_order,
            RECEIVE_ORDER.name: self.receive_order,
        }
        assert set(self._registered) == set(EFFECTS), "EFFECTS and Effects disagree"

    async def run(self, effect: str, link: LinkedOrder) -> Outcome:
        """Run the effect called ``effect`` for ``link`` (a name :data:`EFFECTS` has: the
        statechart was checked against it at start-up).

        :raises ApiError: a passing failure; try again later.
        """
        return await self._registered[effect](link)

    # -- import --------------------------------------------------------------------------

    @request_priority(Priority.START)
    async def import_order(self, link: LinkedOrder) -> Outcome:
        """Create the Katana sales order for a PO, or find the one already created."""
        snapshot = link.snapshot
        if snapshot is None:
            return _failed(IMPORT_ORDER, "no PO snapshot was stored")
        return await _settled(IMPORT_ORDER, self._import(link, snapshot), "Katana or TradeGecko")

    async def _import(
        self, link: LinkedOrder, snapshot: PurchaseOrderSnapshot, *, fresh: bool = False
    ) -> Outcome:
        """``fresh``: look every variant up, trusting no cached one (Katana refused one: an
        answer, so nothing of that attempt is in flight)."""
        katana_config = self.config.katana
        rows, notes = lines_to_import(snapshot)
        if not rows:
            raise RuleViolation(f"PO {snapshot.po_number} has no line with a variant to import")

        skus, cached = await self._skus_for(snapshot, fresh=fresh)
        line_links: list[LineLink] = []
        async with self._find_or_create:
            variants, cached_katana = await self._katana_variants(
                sorted({skus[r.line_id] for r in rows}), notes, fresh=fresh
            )
        cached = cached or cached_katana
        for row in rows:
            variant_id, created = variants[skus[row.line_id]]
            line_links.append(
                LineLink(
                    line_id=row.line_id,
                    sku=skus[row.line_id],
                    katana_variant_id=variant_id,
                    quantity=row.quantity,
                    price=row.price,
                    created_variant=created,
                )
            )

        currency = await self._currency_iso(snapshot.currency_id)
        base = await self._katana_base_currency()
        if currency and base and currency != base:
            notes.append(
                f"PO currency {currency} differs from Katana's base currency {base}: "
                f"the SO is in {currency}"
            )

        def imported(so_id: int, so_number: str, cause: str) -> Outcome:
            return Outcome(
                effect=IMPORT_ORDER.name,
                trigger=IMPORT_ORDER.done,
                cause=cause,
                so_id=so_id,
                so_number=so_number,
                currency=currency,
                lines=tuple(line_links),
                notes=tuple(notes),
            )

        order_no = order_number_for(snapshot.po_number, katana_config.order_no_prefix)
        key = natural_key(await self._tradegecko_account_id(), snapshot.po_id)
        legacy = await self._predates_attempts(link)
        # A shadow run looks first, by order_no too: the integration it shadows (Katana's
        # own, Zapier) may have made the SO, which the run then follows as a live one would.
        shadow = self.katana.shadow
        if shadow or legacy or await self._attempted(link):
            # An earlier attempt may have landed (a crash, a timeout, a dropped answer); one
            # still in flight would land after a look that came too soon: wait it out.
            if not fresh:
                await self._until_settled(
                    f"{_ATTEMPT_KEY}{link.id}", f"{_UNCERTAIN_KEY}{link.id}", snapshot.po_number
                )
            found, by_key = await self._existing_sales_orders(
                key, order_no if legacy or shadow else None
            )
            if found:
                kept = _kept(found, link.so_id)
                if by_key and len(found) > 1:
                    notes.extend(await self.resolve_duplicates(link, found, line_links))
                return imported(
                    kept.id,
                    kept.order_no,
                    f"found Katana SO {kept.order_no} already made for this PO",
                )

        async with self._find_or_create:
            customer_id = await self._customer_id()
        order = NewSalesOrder(
            customer_id=customer_id,
            order_no=order_no,
            sales_order_rows=[
                NewSalesOrderRow(
                    variant_id=line.katana_variant_id,
                    quantity=line.quantity,
                    price_per_unit=line.price,
                )
                for line in line_links
            ],
            currency=currency,
            customer_ref=snapshot.po_number,
            additional_info=f"TradeGecko purchase order {snapshot.po_number}, imported by syncd",
            ecommerce_order_type=key.order_type,
            ecommerce_store_name=key.store_name,
            ecommerce_order_id=key.order_id,
        )
        # Committed before the POST: from here on the SO may exist, and a later attempt must
        # look before creating.
        await self._note_attempt(link)
        crash_point("so_create_noted")
        started = time.time()
        try:
            sales_order = await self.katana.create_sales_order(order)
        except (ValidationFailed, NotFound) as exc:
            if cached and _names_variant(exc):
                # A cached variant id gone stale: drop what was cached and look again. The
                # attempt is noted, so the retry looks the SO up first: never a second SO.
                await self._forget_variants(line_links)
                log.info(
                    "Katana refused a cached variant for %s; looking the variants up again",
                    snapshot.po_number,
                    extra={"po": snapshot.po_number},
                )
                return await self._import(link, snapshot, fresh=True)
            await self._note_answered(f"{_UNCERTAIN_KEY}{link.id}", started)
            if isinstance(exc, NotFound):
                raise
            raise RuleViolation(f"Katana refused the sales order: {exc.reason}") from None
        except ApiError as exc:
            if exc.status is None or exc.status >= 500:
                # The POST may have landed: the next attempt looks its natural key up first.
                log.warning(
                    "sales order create for %s uncertain: %s",
                    snapshot.po_number,
                    exc,
                    extra={"po": snapshot.po_number, "so": order_no},
                )
                await self._note_uncertain(f"{_UNCERTAIN_KEY}{link.id}", started)
            raise
        crash_point("so_created")
        await self._note_answered(f"{_UNCERTAIN_KEY}{link.id}", started)
        return imported(
            sales_order.id,
            sales_order.order_no,
            f"created Katana SO {sales_order.order_no} with {len(line_links)} rows",
        )

    async def _skus_for(
        self, snapshot: PurchaseOrderSnapshot, *, fresh: bool = False
    ) -> tuple[dict[int, str], bool]:
        """The SKU of each PO line by line id, and whether any came from the cache (only
        the variants not cached, or all with ``fresh``, are read from TradeGecko)."""
        variant_ids = sorted({ln.variant_id for ln in snapshot.lines if ln.variant_id is not None})
        known = {} if fresh else await self._cached_skus(_TRADEGECKO, variant_ids)
        missing = [v for v in variant_ids if v not in known]
        listed = await self.tradegecko.list_variants(ids=missing) if missing else []
        read = {v.id: (v.sku or "").strip() for v in listed}
        await self._remember_variants(_TRADEGECKO, {i: sku for i, sku in read.items() if sku})
        sku_of = {**known, **read}
        skus: dict[int, str] = {}
        for line in snapshot.lines:
            if line.variant_id is None or line.freeform:
                continue
            if line.variant_id not in sku_of:
                raise RuleViolation(
                    f"line {line.line_id}: TradeGecko variant {line.variant_id} not found"
                )
            sku = sku_of[line.variant_id]
            if not sku:
                raise RuleViolation(
                    f"line {line.line_id}: TradeGecko variant {line.variant_id} has no SKU: "
                    "cannot match without a SKU"
                )
            skus[line.line_id] = sku
        return skus, bool(known)

    async def _katana_variants(
        self, skus: Sequence[str], notes: list[str], *, fresh: bool = False
    ) -> tuple[dict[str, tuple[int, bool]], bool]:
        """The Katana variant id of each SKU and whether syncd created it now (a product per
        unknown SKU), and whether any came from the cache."""
        result: dict[str, tuple[int, bool]] = {}
        if not fresh:
            result = {
                sku: (variant_id, False)
                for sku, variant_id in (await self._cached_variant_ids(skus)).items()
            }
        cached = bool(result)
        wanted = [sku for sku in skus if sku not in result]
        if not wanted:
            return result, cached
        found: dict[str, list[KatanaVariant]] = {sku: [] for sku in wanted}
        for variant in await self.katana.list_variants(skus=wanted):
            if variant.sku in found and variant.deleted_at is None:
                found[variant.sku].append(variant)
        for sku, live in found.items():
            if len(live) > 1:
                ids = ", ".join(str(v.id) for v in live)
                raise RuleViolation(f"SKU {sku} matches several live Katana variants ({ids})")
            if live:
                result[sku] = (live[0].id, False)
                continue
            product = await self.katana.create_product(name=sku, sku=sku)
            crash_point("product_created")
            made = [v for v in product.variants if v.sku == sku] or product.variants
            if not made:
                raise RuleViolation(f"Katana created product {product.id} without a variant")
            notes.append(f"created Katana product {product.name!r} for SKU {sku}")
            result[sku] = (made[0].id, True)
        await self._remember_variants(_KATANA, {result[sku][0]: sku for sku in wanted})
        return result, cached

    # The variant cache is a saving, never a need: a store that fails here costs a look-up.

    async def _cached_skus(self, service: str, variant_ids: Sequence[int]) -> dict[int, str]:
        if self.store is None or not variant_ids:
            return {}
        since = time.time() - VARIANT_TRUST_SECONDS
        try:
            return await self.store.cached_skus(service, variant_ids, since=since)
        except SyncdError as exc:
            log.warning("variant cache not read: %s", exc)
            return {}

    async def _cached_variant_ids(self, skus: Sequence[str]) -> dict[str, int]:
        if self.store is None or not skus:
            return {}
        since = time.time() - VARIANT_TRUST_SECONDS
        try:
            return await self.store.cached_variant_ids(_KATANA, skus, since=since)
        except SyncdError as exc:
            log.warning("variant cache not read: %s", exc)
            return {}

    async def _remember_variants(self, service: str, skus: Mapping[int, str]) -> None:
        # A shadow run's placeholder variant (a negative id) names nothing in Katana.
        skus = {variant_id: sku for variant_id, sku in skus.items() if variant_id > 0}
        if self.store is None or not skus:
            return
        try:
            await self.store.remember_variants(service, skus)
        except SyncdError as exc:
            log.warning("variant cache not written: %s", exc)

    async def _forget_variants(self, lines: Sequence[LineLink]) -> None:
        """Drop the cached variants of ``lines`` on both sides: Katana refused one."""
        if self.store is None:
            return
        skus = sorted({line.sku for line in lines})
        # Must hold: a retry trusting the same stale entry would be refused again.
        await self.store.forget_variants(_KATANA, skus=skus)
        await self.store.forget_variants(_TRADEGECKO, skus=skus)

    async def _currency_iso(self, currency_id: int | None) -> str | None:
        if currency_id is None:
            return None

        async def load() -> dict[int, str]:
            return {c.id: c.iso for c in await self.tradegecko.list_currencies()}

        table = await self._currencies.get(load)
        assert isinstance(table, dict)
        iso = table.get(currency_id)
        if iso is None:
            raise RuleViolation(f"TradeGecko currency {currency_id} is unknown")
        return str(iso)

    async def _katana_base_currency(self) -> str | None:
        async def load() -> str:
            return (await self.katana.get_factory()).base_currency_code

        value = await self._base_currency.get(load)
        return str(value) if value else None

    async def _tradegecko_account_id(self) -> int:
        # The token's account never changes under a running daemon: asked once.
        if self._account_id is None:
            self._account_id = (await self.tradegecko.get_current_account()).id
        return self._account_id

    async def _predates_attempts(self, link: LinkedOrder) -> bool:
        """Whether ``link`` was made before syncd noted import attempts (or there is no
        store to note them in): an earlier syncd may have made its SO, keyed by
        ``order_no`` alone."""
        if self.store is None:
            return True
        if self._attempts_since is None:
            since = await self.store.setdefault_meta(*attempts_since_meta())
            self._attempts_since = float(since)
        return link.created_at is None or link.created_at.timestamp() < self._attempts_since

    async def _attempted(self, link: LinkedOrder) -> bool:
        return self.store is None or (
            await self.store.get_meta(f"{_ATTEMPT_KEY}{link.id}") is not None
        )

    async def _note_attempt(self, link: LinkedOrder) -> None:
        if self.store is not None:
            await self.store.set_meta(f"{_ATTEMPT_KEY}{link.id}", repr(time.time()))

    async def _note_uncertain(self, key: str, started: float) -> None:
        """Note until when a write begun at ``started`` whose outcome is uncertain may still
        land. A saving: without it the intent's time (and the timeout) bounds the wait."""
        if self.store is None:
            return
        until = max(started + self.config.katana.timeout, time.time())
        try:
            await self.store.set_meta(key, repr(until))
        except SyncdError as exc:
            log.warning("uncertain write not noted: %s", exc)

    async def _note_answered(self, key: str, started: float) -> None:
        """Note that the write begun at ``started`` was answered: nothing of it is in flight,
        so a later look (a crash before its outcome was recorded) need not wait."""
        if self.store is None:
            return
        try:
            await self.store.set_meta(key, f"{_ANSWERED}{started!r}")
        except SyncdError as exc:
            log.warning("answered write not noted: %s", exc)

    async def _until_settled(self, intent_key: str | None, uncertain_key: str, po: str) -> None:
        """Wait until a create that may be in flight can no longer land: its intent's time
        (``intent_key``, noted before the POST: a crash leaves only that) + the client's
        timeout, or the time noted when its outcome was uncertain, + the retry policy's
        ``settle``. Persisted both, so this holds across a restart."""
        if self.store is None:
            return
        intent = None if intent_key is None else await self.store.get_meta(intent_key)
        uncertain = await self.store.get_meta(uncertain_key)
        if uncertain is not None and uncertain.startswith(_ANSWERED):
            if intent is None or _seconds(uncertain.removeprefix(_ANSWERED)) >= _seconds(intent):
                return  # the last attempt was answered; none before it may land any more
            uncertain = None
        marks = [_seconds(uncertain)]
        if intent is not None:
            marks.append(_seconds(intent) + self.config.katana.timeout)
        until = max(marks)
        if until <= 0:
            return
        wait = until + self.config.retry().effect.settle - time.time()
        if wait > 0:
            log.info(
                "waiting %.1f s before looking for what an earlier create for %s made: "
                "it may still land",
                wait,
                po,
                extra={"po": po},
            )
            await anyio.sleep(wait)

    async def _existing_sales_orders(
        self, key: SalesOrderKey, order_no: str | None
    ) -> tuple[list[KatanaSalesOrder], bool]:
        """The live SOs an earlier attempt made, and whether found by natural key: by that
        key; then, for a link older than the key (``order_no`` given), by ``order_no``, as
        syncd found it before."""
        found = await self._by_natural_key(key)
        if found or order_no is None:
            return found, True
        by_number = [
            so
            for so in await self.katana.list_sales_orders(order_no=order_no)
            if so.order_no == order_no and so.deleted_at is None
        ]
        if len(by_number) > 1:
            log.warning(
                "several Katana SOs carry order_no %s; following %s",
                order_no,
                min(so.id for so in by_number),
                extra={"so": order_no},
            )
        return by_number, False

    async def _by_natural_key(self, key: SalesOrderKey) -> list[KatanaSalesOrder]:
        return [
            so
            for so in await self.katana.list_sales_orders(
                ecommerce_order_id=key.order_id,
                ecommerce_store_name=key.store_name,
                ecommerce_order_type=key.order_type,
            )
            if so.deleted_at is None
            and (so.ecommerce_order_id, so.ecommerce_store_name, so.ecommerce_order_type)
            == (key.order_id, key.store_name, key.order_type)
        ]

    async def settle_duplicate(self, link: LinkedOrder, seen: KatanaSalesOrder) -> None:
        """``seen`` (a poll's or a webhook's look) carries what looks like ``link``'s
        natural key and is not its SO: look the key up and settle what carries it
        (:meth:`resolve_duplicates`), noting it in the order's history. An SO carrying
        another account's key is left alone."""
        key = natural_key(await self._tradegecko_account_id(), link.po_id)
        if seen.deleted_at is not None or (
            seen.ecommerce_order_id,
            seen.ecommerce_store_name,
            seen.ecommerce_order_type,
        ) != (key.order_id, key.store_name, key.order_type):
            return
        notes = await self.resolve_duplicates(link, await self._by_natural_key(key))
        if notes and self.store is not None:
            await self.store.note(link.id, notes=notes)

    async def resolve_duplicates(
        self,
        link: LinkedOrder,
        found: Sequence[KatanaSalesOrder],
        lines: Sequence[LineLink] | None = None,
    ) -> list[str]:
        """Settle several live Katana SOs carrying ``link``'s natural key (``found``): keep
        the one the link records (else the oldest); delete each other one that is untouched
        (not shipped, no manufacturing order, its rows as syncd created them: ``lines``, by
        default the link's); note each other one a person must settle. Safe to run again:
        an SO already deleted is gone from the next look (a 404 is taken as done).

        :return: the notes for the order's history.
        """
        if len(found) < 2:
            return []
        kept = _kept(found, link.so_id)
        created = Counter(
            (line.katana_variant_id, line.quantity, line.price)
            for line in (link.lines if lines is None else lines)
        )
        notes: list[str] = []
        extra = {"po": link.po_number, "so": kept.order_no}
        for so in sorted(found, key=lambda so: so.id):
            if so.id == kept.id:
                continue
            why = _touched(so, created)
            if why is None and self.katana.shadow:
                why = "found by a shadow run, which deletes nothing"
            if why is None:
                try:
                    await self.katana.delete_sales_order(so.id)
                except NotFound:
                    pass  # deleted already, by an earlier run or a person
                except ApiError as exc:
                    if is_transient(exc):
                        raise
                    why = f"Katana refused to delete it: {exc}"
            if why is None:
                log.warning(
                    "deleted Katana SO %s (id %s): a duplicate of SO %s for %s",
                    so.order_no,
                    so.id,
                    kept.order_no,
                    link.po_number,
                    extra=extra,
                )
                notes.append(
                    f"deleted Katana SO {so.order_no} (id {so.id}): an untouched duplicate of "
                    f"SO {kept.order_no} (id {kept.id}), made by a create that landed late"
                )
                continue
            log.warning(
                "Katana SO %s (id %s) duplicates SO %s for %s and is not deleted: %s",
                so.order_no,
                so.id,
                kept.order_no,
                link.po_number,
                why,
                extra=extra,
            )
            notes.append(
                f"Katana SO {so.order_no} (id {so.id}) duplicates SO {kept.order_no} "
                f"(id {kept.id}), which syncd follows; not deleted ({why}): settle it in Katana"
            )
        return notes

    async def _customer_id(self) -> int:
        if self._customer.fresh():
            assert isinstance(self._customer.value, int)
            return self._customer.value
        config = self.config.katana
        customers = [
            c
            for c in await self.katana.list_customers(reference_id=config.customer_reference)
            if c.deleted_at is None and c.reference_id == config.customer_reference
        ]
        if not customers:
            customers = [
                c
                for c in await self.katana.list_customers(name=config.customer_name)
                if c.deleted_at is None and c.name == config.customer_name
            ]
        if customers:
            customer_id = min(c.id for c in customers)
        else:
            made = await self.katana.create_customer(
                name=config.customer_name, reference_id=config.customer_reference
            )
            crash_point("customer_created")
            log.info("created Katana customer %r (id %s)", made.name, made.id)
            customer_id = made.id
            if customer_id < 0:
                # A shadow run's placeholder: each plan that needs the customer makes it.
                return customer_id
        self._customer.set(customer_id)
        return customer_id

    # -- make to order -------------------------------------------------------------------

    async def make_to_order(self, link: LinkedOrder) -> Outcome:
        """Press "Make to order" on each row of the sales order that has a recipe and no
        manufacturing order yet; rows without a recipe are left to a person, and noted."""
        if link.so_id is None:
            return _failed(MAKE_TO_ORDER, "no Katana sales order is linked")
        return await _settled(MAKE_TO_ORDER, self._make_to_order(link, link.so_id), "Katana")

    async def _make_to_order(self, link: LinkedOrder, so_id: int) -> Outcome:
        # A POST an earlier run gave up on may still link a row: read the rows after it.
        await self._until_settled(None, f"{_MTO_UNCERTAIN_KEY}{so_id}", link.po_number)
        try:
            order = await self.katana.get_sales_order(so_id)
        except NotFound:
            raise RuleViolation(f"Katana SO {link.so_number} no longer exists") from None
        skus = {line.katana_variant_id: line.sku for line in link.lines}
        has_recipe: dict[int, bool] = {}
        notes: list[str] = []
        found = made = 0
        for row in order.sales_order_rows:
            if row.deleted_at is not None:
                continue
            if row.linked_manufacturing_order_id is not None:
                # Made by a run that died before recording it, or by a person: never twice.
                found += 1
                continue
            if row.variant_id not in has_recipe:
                has_recipe[row.variant_id] = bool(await self.katana.list_bom_rows(row.variant_id))
            if not has_recipe[row.variant_id]:
                sku = skus.get(row.variant_id, f"variant {row.variant_id}")
                notes.append(
                    f"Katana SO {order.order_no} row {row.id} ({sku}) has no recipe: no "
                    "manufacturing order made; make it or deliver it from stock in Katana"
                )
                continue
            if await self._make_row(order, row.id, link.po_number):
                made += 1
            else:
                found += 1
        done = (order.production_status or "NONE") in PRODUCTION_DONE
        if made == 0 and order.status == DELIVERED and done:
            # Made (or delivered from stock) while syncd was down; the look that showed it
            # came while the order could not move on.
            return Outcome(
                effect=MAKE_TO_ORDER.name,
                trigger=triggers.FOUND_DELIVERED,
                cause=f"Katana SO {order.order_no} is already delivered: nothing to make",
                notes=tuple(notes),
            )
        if made + found == 0:
            return Outcome(
                effect=MAKE_TO_ORDER.name,
                trigger=triggers.NOTHING_TO_MAKE,
                cause=f"no row of Katana SO {order.order_no} has a recipe: nothing made to order",
                notes=tuple(notes),
            )
        already = f" ({found} already linked)" if found else ""
        orders = "manufacturing order" if made == 1 else "manufacturing orders"
        return Outcome(
            effect=MAKE_TO_ORDER.name,
            trigger=MAKE_TO_ORDER.done,
            cause=f"made {made} {orders} for Katana SO {order.order_no}{already}",
            notes=tuple(notes),
        )

    async def _make_row(self, order: KatanaSalesOrder, row_id: int, po_number: str) -> bool:
        """Make the row's manufacturing order; ``False`` if it turned out to have one."""
        order_no = order.order_no
        started = time.time()
        try:
            await self.katana.make_to_order(
                row_id, create_subassemblies=self.config.katana.create_subassemblies
            )
        except ValidationFailed as exc:
            # A person may have pressed the button between the read and the call.
            again = await self.katana.get_sales_order(order.id)
            if any(
                r.id == row_id and r.linked_manufacturing_order_id is not None
                for r in again.sales_order_rows
            ):
                return False
            raise RuleViolation(
                f"Katana refused a manufacturing order for SO {order_no} row {row_id}: {exc.reason}"
            ) from None
        except ApiError as exc:
            if exc.status is None or exc.status >= 500:
                # The POST may have landed: the next attempt reads the row's link first.
                log.warning(
                    "make to order for %s row %s uncertain: %s",
                    order_no,
                    row_id,
                    exc,
                    extra={"po": po_number, "so": order_no},
                )
                await self._note_uncertain(f"{_MTO_UNCERTAIN_KEY}{order.id}", started)
            raise
        crash_point("mo_made")
        return True

    # -- receive -------------------------------------------------------------------------

    #: The states whose orders wait for their receipt (the statechart's ``receive_order``
    #: state): their POs are read ahead. Only a saving: a wrong name reads nothing ahead.
    receipt_states: tuple[str, ...] = ("delivered",)

    async def _receipts_due(self) -> list[LinkedOrder]:
        if self.store is None:
            return []
        return await self.store.links_in_states(self.receipt_states, limit=250)

    @request_priority(Priority.FINISH)
    async def receive_order(self, link: LinkedOrder) -> Outcome:
        """Re-cost the PO lines from Katana's average costs, then receive the PO."""
        return await _settled(RECEIVE_ORDER, self._receive(link), "TradeGecko or Katana")

    async def _receive(self, link: LinkedOrder) -> Outcome:
        ahead = self.purchase_orders.take_ahead(link.po_id)
        if ahead is None and await self._unchanged_since_import(link):
            # The poller saw no change to it: the PO is as imported, its lines at the
            # imported prices. A refusal says otherwise, and the PO is read after all.
            await self._note_receipt_attempt(link)
            try:
                outcome = await self._recost_and_receive(
                    link, {line.line_id: line.price for line in link.lines}, assumed=True
                )
            except _NotAsImported as exc:
                self.unread_refused += 1
                log.info(
                    "PO %s is not as imported (%s): read before its receipt",
                    link.po_number,
                    exc,
                    extra={"po": link.po_number, "po_id": link.po_id},
                )
            else:
                self.unread_receipts += 1
                return outcome
        try:
            po, po_lines = ahead or await self.purchase_orders.read(link.po_id)
        except NotFound:
            raise RuleViolation(f"PO {link.po_number} no longer exists in TradeGecko") from None
        prices = {line.id: line.price for line in po_lines}
        if po.status == "received":
            # Received by an earlier run that died before recording it (or by a person): the
            # record still says what the lines cost before and after.
            return Outcome(
                effect=RECEIVE_ORDER.name,
                trigger=RECEIVE_ORDER.done,
                cause=f"PO {link.po_number} is received in TradeGecko",
                lines=_costs_found(link.lines, prices),
            )
        if po.status in PO_WITHDRAWN:
            raise RuleViolation(f"PO {link.po_number} is {po.status} in TradeGecko: not received")
        await self._note_receipt_attempt(link)
        return await self._recost_and_receive(link, prices)

    def made_procurement(self, procurement_id: int) -> bool:
        """Whether a receipt of this daemon made the procurement ``procurement_id``."""
        return procurement_id in self._procurements

    async def _unchanged_since_import(self, link: LinkedOrder) -> bool:
        """Whether ``link``'s PO may be taken as imported: a first receipt (none was begun
        before, so none crashed half-way), of a PO whose every change up to at most
        ``fresh_for`` seconds ago the poller saw, with no drift among them."""
        if self.store is None or link.snapshot is None or not link.lines:
            return False
        seen = self.purchase_orders_seen(link.snapshot.created_at)
        if seen is None or time.monotonic() - seen > self.purchase_orders.fresh_for:
            return False
        if await self.store.get_meta(f"{_RECEIPT_KEY}{link.id}") is not None:
            return False
        events = await self.store.events_for_link(link.id)
        return not any(event.kind == _PO_OBSERVED for event in events)

    async def _note_receipt_attempt(self, link: LinkedOrder) -> None:
        # Before the first write: a retry (after a crash, say) reads the PO first.
        if self.store is not None:
            await self.store.set_meta(f"{_RECEIPT_KEY}{link.id}", repr(time.time()))

    async def _recost_and_receive(
        self, link: LinkedOrder, prices: Mapping[int, Decimal | None], *, assumed: bool = False
    ) -> Outcome:
        """Set each line's price (``prices``: the PO's, by line id) to Katana's average
        cost, then receive the PO. ``assumed``: the prices are the imported ones, not read;
        a refusal that says the PO is otherwise raises :class:`_NotAsImported`."""
        variant_ids = sorted({line.katana_variant_id for line in link.lines})
        records = await self.inventory.read(variant_ids) if variant_ids else []
        by_variant: dict[int, list[tuple[int, Decimal | None, Decimal | None]]] = {}
        for record in records:
            by_variant.setdefault(record.variant_id, []).append(
                (record.location_id, record.average_cost, record.quantity_in_stock)
            )
        location_id: int | None = None
        if len({r.location_id for r in records}) > 1 and link.so_id is not None:
            location_id = (await self.katana.get_sales_order(link.so_id)).location_id

        notes: list[str] = []
        costed: list[LineLink] = []
        for line in link.lines:
            if line.line_id not in prices:
                notes.append(f"line {line.line_id} is gone from the PO: not re-costed")
                costed.append(line)
                continue
            current = prices[line.line_id]
            average = pick_average_cost(by_variant.get(line.katana_variant_id, []), location_id)
            new_price = cost_update(current, average)
            before = current
            if (
                new_price is None
                and current != line.price
                and cost_update(line.price, average) == current
            ):
                # An earlier run set this price and died before the receipt: what the line
                # cost before is the price as imported.
                before = line.price
            if new_price is None:
                if not average:
                    recorded = [c for _, c, _ in by_variant.get(line.katana_variant_id, [])]
                    said = "0" if any(c is not None for c in recorded) else "null"
                    notes.append(
                        f"line {line.line_id} ({line.sku}): Katana average cost is {said}: "
                        "price kept"
                    )
                costed.append(msgspec.structs.replace(line, cost_before=before, cost_after=current))
                continue
            try:
                await self.tradegecko.update_line_item_price(
                    line.line_id,
                    new_price,
                    idempotency_key=f"syncd-price-{line.line_id}-{new_price}",
                )
            except (NotFound, ValidationFailed) as exc:
                if assumed:
                    # The line is gone, or the PO is void or deleted: not as imported.
                    raise _NotAsImported(f"line {line.line_id}: {exc}") from exc
                raise
            crash_point("price_updated")
            costed.append(msgspec.structs.replace(line, cost_before=current, cost_after=new_price))

        try:
            procurement = await self.tradegecko.receive_purchase_order(
                link.po_id, idempotency_key=f"syncd-receive-{link.po_id}"
            )
        except ValidationFailed:
            po, _ = await self.tradegecko.get_purchase_order(link.po_id)
            if po.status in PO_WITHDRAWN:
                # Withdrawn since the PO was read (a read ahead may be a minute old), or
                # since the poll that last saw it.
                raise RuleViolation(
                    f"PO {link.po_number} is {po.status} in TradeGecko: not received"
                ) from None
            if po.status != "received":
                raise
            # The lines were costed by this run just now: the record keeps them.
            cause = f"PO {link.po_number} was already received"
        else:
            self._procurements[procurement.id] = None
            if len(self._procurements) > _PROCUREMENTS_KEPT:
                del self._procurements[next(iter(self._procurements))]
            crash_point("po_received")
            cause = f"received PO {link.po_number} (procurement {procurement.id})"
        return Outcome(
            effect=RECEIVE_ORDER.name,
            trigger=RECEIVE_ORDER.done,
            cause=cause,
            lines=tuple(costed),
            notes=tuple(notes),
        )


class _NotAsImported(Exception):
    """A receipt that took its PO as imported was refused in a way that says it is not."""


def _never_seen(created_at: datetime) -> float | None:
    """No poller: no PO is known unchanged."""
    return None


def _seconds(value: str | None) -> float:
    """A time noted in the store's meta (``repr`` of a float); 0 when none or unreadable."""
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0


def _kept(found: Sequence[KatanaSalesOrder], so_id: int | None) -> KatanaSalesOrder:
    """Of several SOs for one order, the one to follow: the link's, else the oldest."""
    return next((so for so in found if so.id == so_id), None) or min(found, key=lambda so: so.id)


def _touched(
    so: KatanaSalesOrder, created: Counter[tuple[int, Decimal, Decimal | None]]
) -> str | None:
    """Why ``so`` is not as syncd created it (rows ``created``), or ``None``: untouched."""
    if so.status != _NOT_SHIPPED:
        return f"it is {so.status}"
    rows = [row for row in so.sales_order_rows if row.deleted_at is None]
    if any(row.linked_manufacturing_order_id is not None for row in rows):
        return "it has a manufacturing order"
    if Counter((row.variant_id, row.quantity, row.price_per_unit) for row in rows) != created:
        return "its rows were edited"
    return None


def _names_variant(exc: ApiError) -> bool:
    """Whether Katana's refusal is about a variant (an id it no longer knows)."""
    return "variant" in f"{exc.reason} {exc.details}".lower()


def _costs_found(
    lines: Sequence[LineLink], prices: dict[int, Decimal | None]
) -> tuple[LineLink, ...]:
    """The lines of a PO found received: cost before as recorded (else as imported), cost
    after as TradeGecko holds it (``prices``, by line id)."""
    found: list[LineLink] = []
    for line in lines:
        if line.line_id not in prices:
            found.append(line)  # gone from the PO: nothing to say
            continue
        before = line.cost_before if line.cost_before is not None else line.price
        found.append(
            msgspec.structs.replace(line, cost_before=before, cost_after=prices[line.line_id])
        )
    return tuple(found)


async def _settled(effect: EffectSpec, work: Awaitable[Outcome], services: str) -> Outcome:
    """The outcome of ``work``: what a person must fix (a rule the order breaks, a request
    ``services`` refuse) fires the effect's ``failed`` trigger; a passing failure is raised
    for the dispatcher to retry."""
    try:
        return await work
    except RuleViolation as exc:
        return _failed(effect, str(exc))
    except ApiError as exc:
        if is_transient(exc):
            raise
        return _failed(effect, f"{services} refused: {exc}")


def _failed(effect: EffectSpec, reason: str) -> Outcome:
    return Outcome(effect=effect.name, trigger=effect.failed, cause=reason, reason=reason)
