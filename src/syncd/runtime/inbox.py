"""The kinds of event that enter the inbox, and their payloads.

Sources (pollers, webhooks, effects) write these; only the dispatcher reads them. Each kind
has one payload type, encoded as JSON in the inbox row. :class:`InboxWatch` is the daemon's
one look at the inbox for work written by another process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import msgspec

from syncd.domain import triggers
from syncd.domain.orders import PurchaseOrderLine, PurchaseOrderSnapshot, SalesOrderFacts
from syncd.domain.rules import Signal, purchase_order_signal, sales_order_signal
from syncd.errors import SyncdError
from syncd.runtime.effects import Outcome
from syncd.store import InboxEvent, Store

__all__ = [
    "EFFECT_OUTCOME",
    "IMPORT_REQUESTED",
    "LOOK_EVERY",
    "OPERATOR",
    "OPERATOR_ACTIONS",
    "PO_DISCOVERED",
    "PO_OBSERVED",
    "REPLAY",
    "SOURCE_KINDS",
    "SO_OBSERVED",
    "WEBHOOK_KINDS",
    "WEBHOOK_RECEIVED",
    "ImportRequest",
    "InboxWatch",
    "OperatorCommand",
    "PurchaseOrderObserved",
    "WebhookReceived",
    "decode",
    "encode",
    "replayable",
    "watched",
]

PO_DISCOVERED = "po_discovered"
PO_OBSERVED = "purchase_order_observed"
SO_OBSERVED = "sales_order_observed"
EFFECT_OUTCOME = "effect_outcome"
#: An operator's ``syncctl import PO_NUMBER``: backfill one PO created before activation.
IMPORT_REQUESTED = "import_requested"
#: An operator's command from ``syncctl``, applied by the running daemon's dispatcher.
OPERATOR = "operator"
#: ``replay`` is not a statechart trigger: it re-drives the order from where it is.
REPLAY = "replay"
OPERATOR_ACTIONS = (*triggers.OPERATOR_TRIGGERS, REPLAY)
#: A verified webhook delivery, persisted before it is acknowledged. Not for the dispatcher:
#: the webhook consumer re-fetches the object and writes the events the pollers would.
WEBHOOK_RECEIVED = "webhook_received"
WEBHOOK_KINDS = (WEBHOOK_RECEIVED,)
#: Requests to a source to look at a service, handled by that source, not the dispatcher:
#: webhook deliveries (the webhook consumer) and imports on purpose (the TradeGecko poller).
SOURCE_KINDS = (*WEBHOOK_KINDS, IMPORT_REQUESTED)
#: Seconds between looks at the inbox for rows another process wrote (``syncctl retry``,
#: ``replay``, ``import``; another daemon's listener): the daemon's :class:`InboxWatch`
#: looks this often for all its factories; a reader without one looks this often itself.
LOOK_EVERY = 1.0

log = logging.getLogger("syncd.inbox")


class PurchaseOrderObserved(msgspec.Struct, kw_only=True, frozen=True):
    """A linked PO's status as last seen in TradeGecko; ``lines`` when they drifted from the
    synced snapshot (edits after import are recorded, never copied)."""

    po_id: int
    status: str
    lines: tuple[PurchaseOrderLine, ...] | None = None


class OperatorCommand(msgspec.Struct, kw_only=True, frozen=True):
    """An operator's ``retry``, ``cancel`` or ``replay`` of one linked order."""

    link_id: int
    action: str
    reason: str | None = None
    operator: str | None = None

    def cause(self) -> str:
        """The transition's cause as the history shows it."""
        who = f"operator {self.operator}" if self.operator else "operator"
        return f"{who}: {self.action}" + (f" ({self.reason})" if self.reason else "")


class WebhookReceived(msgspec.Struct, kw_only=True, frozen=True):
    """One verified webhook delivery: which object changed, never what it is now."""

    #: ``tradegecko`` or ``katana``.
    service: str
    event: str
    #: ``purchase_order``, ``procurement``, ``sales_order``, ``manufacturing_order``.
    resource_type: str
    object_id: int
    #: TradeGecko's ``X-Gecko-Delivery``; Katana sends no delivery id.
    delivery_id: str | None = None
    #: Katana's ``X-Katana-Retry-Num``.
    retry: int | None = None
    #: Katana's ``object.status``: what the object says it is now (a hint, maybe stale).
    status: str | None = None


class ImportRequest(msgspec.Struct, kw_only=True, frozen=True):
    """An operator asks for one PO to be imported on purpose (``syncctl import``)."""

    po_number: str
    reason: str | None = None
    operator: str | None = None
    #: ``--force``: import it even if it is another supplier's.
    force: bool = False

    def who(self) -> str:
        return f"operator {self.operator}" if self.operator else "operator"


_TYPES: dict[str, type[msgspec.Struct]] = {
    PO_DISCOVERED: PurchaseOrderSnapshot,
    PO_OBSERVED: PurchaseOrderObserved,
    SO_OBSERVED: SalesOrderFacts,
    EFFECT_OUTCOME: Outcome,
    OPERATOR: OperatorCommand,
    IMPORT_REQUESTED: ImportRequest,
    WEBHOOK_RECEIVED: WebhookReceived,
}
_DECODERS = {kind: msgspec.json.Decoder(t) for kind, t in _TYPES.items()}

encode = msgspec.json.Encoder().encode


def decode(kind: str, payload: bytes) -> msgspec.Struct:
    """Decode an inbox payload of ``kind``.

    :raises KeyError: an unknown kind.
    :raises msgspec.DecodeError: a payload that does not fit its kind.
    """
    result: msgspec.Struct = _DECODERS[kind].decode(payload)
    return result


def replayable(events: Iterable[InboxEvent]) -> list[tuple[int, Signal]]:
    """The stored looks at either service among ``events``, as the statechart reads them,
    for :func:`syncd.domain.replay.plan_replay`. A replay does not re-process the PO's
    discovery, effects' past outcomes (the effect is re-run instead) or operators' commands;
    an unreadable event is skipped."""
    seen: list[tuple[int, Signal]] = []
    for event in events:
        if event.kind not in (SO_OBSERVED, PO_OBSERVED):
            continue
        try:
            payload = decode(event.kind, event.payload)
        except msgspec.DecodeError:
            continue
        if isinstance(payload, SalesOrderFacts):
            seen.append((event.id, sales_order_signal(payload)))
        elif isinstance(payload, PurchaseOrderObserved):
            seen.append((event.id, purchase_order_signal(payload.status)))
    return seen


@dataclass(frozen=True, eq=False)
class _Reader:
    """One task of a factory that reads the inbox, and which kinds it reads."""

    wake: Callable[[], None]
    kinds: frozenset[str] | None
    exclude_kinds: frozenset[str]

    def wants(self, waiting: set[str]) -> bool:
        mine = waiting if self.kinds is None else waiting & self.kinds
        return bool(mine - self.exclude_kinds)


class InboxWatch:
    """The daemon's one look at the inbox for every factory it runs.

    A factory's inbox readers (its dispatcher, webhook consumer and import watcher) sleep
    until woken: by whoever writes their work in this process (a poller, an effect, the
    webhook listener), by another daemon's ``NOTIFY`` (PostgreSQL), or by this watch, which
    every :data:`LOOK_EVERY` seconds reads which kinds of events wait for which factory (one
    grouped query, :meth:`Store.pending_kinds_per_factory`) and wakes the readers that have
    some: rows written by ``syncctl`` or another daemon are seen within that time plus the
    summary's age. One timer for the daemon, where each reader used to look every second.
    """

    def __init__(self, store: Store, *, every: float = LOOK_EVERY) -> None:
        self.store = store
        self.every = every
        self._readers: dict[str, list[_Reader]] = {}
        #: Looks made at the inbox (for tests and the curious).
        self.looks = 0

    @contextmanager
    def watching(
        self,
        factory: str,
        wake: Callable[[], None],
        *,
        kinds: Sequence[str] | None = None,
        exclude_kinds: Sequence[str] = (),
    ) -> Iterator[None]:
        """While the block runs, call ``wake`` when events of ``factory`` wait that
        :meth:`Store.pending_events` with the same ``kinds`` and ``exclude_kinds`` returns
        (woken again at each look while they wait)."""
        reader = _Reader(
            wake, None if kinds is None else frozenset(kinds), frozenset(exclude_kinds)
        )
        readers = self._readers.setdefault(factory, [])
        readers.append(reader)
        try:
            yield
        finally:
            readers.remove(reader)
            if not readers and self._readers.get(factory) is readers:
                del self._readers[factory]

    async def run(self) -> None:
        """Look every :attr:`every` seconds until cancelled; a failed look is logged and
        made again at the next."""
        failing = False
        while True:
            await anyio.sleep(self.every)
            if not self._readers:
                continue
            try:
                waiting = await self.store.pending_kinds_per_factory()
            except SyncdError as exc:
                if not failing:
                    log.warning("cannot look at the inbox (trying every %s s): %s", self.every, exc)
                failing = True
                continue
            if failing:
                log.info("the inbox can be read again")
            failing = False
            self.looks += 1
            self.wake_waiting(waiting)

    def wake_waiting(self, waiting: dict[str, set[str]]) -> None:
        """Wake each reader that has events among ``waiting`` (kinds by factory)."""
        for factory, kinds in waiting.items():
            for reader in self._readers.get(factory, ()):
                if reader.wants(kinds):
                    reader.wake()


@contextmanager
def watched(
    watch: InboxWatch | None,
    factory: str,
    wake: Callable[[], None],
    *,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] = (),
    alone: float = LOOK_EVERY,
) -> Iterator[float | None]:
    """A reader's wait for its work: while the block runs ``watch`` wakes it (see
    :meth:`InboxWatch.watching`); yields how long the reader waits at most between its own
    looks: ``None`` (until woken: no timer) with a watch, ``alone`` seconds without one."""
    if watch is None:
        yield alone
        return
    with watch.watching(factory, wake, kinds=kinds, exclude_kinds=exclude_kinds):
        yield None
