"""The store of linked orders, their transitions, the inbox and the pollers' cursors.

Each method is written once, in the SQL SQLite and PostgreSQL share (see
:mod:`syncd.store._backend`): a file (:mod:`syncd.store._sqlite`) is the embedded
default; a ``postgresql://`` URL selects :mod:`syncd.store._postgres`. A transition, the
link's new state and the inbox event that caused it are written in one transaction: either
all of it happened or none did.

Rows belong to factories (:meth:`Store.for_factory`); several daemons on one PostgreSQL
database share the factories through leases whose fence every owner's write re-checks.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec

from syncd.config import FACTORY_NAME
from syncd.domain.orders import LineLink, LinkedOrder, PurchaseOrderSnapshot
from syncd.domain.statechart import Decision
from syncd.errors import LeaseLost, StoreConflict, StoreError
from syncd.store._backend import Backend, Queries, Row, Wakeups, is_postgres_url
from syncd.store._schema import MIGRATIONS
from syncd.store._sqlite import SQLiteBackend

__all__ = [
    "DEFAULT_FACTORY",
    "OBSERVATIONS_KEPT",
    "PENDING_SUMMARY_AGE",
    "ImportOutcome",
    "ImportResult",
    "InboxEvent",
    "Lease",
    "LeaseRecord",
    "Placement",
    "PlannedWrite",
    "PurchaseOrderObservation",
    "SalesOrderEvidence",
    "Store",
    "TransitionRecord",
    "new_owner_id",
]

_encode = msgspec.json.Encoder().encode
_snapshot_decoder = msgspec.json.Decoder(PurchaseOrderSnapshot)
_lines_decoder = msgspec.json.Decoder(tuple[LineLink, ...])
_notes_decoder = msgspec.json.Decoder(tuple[str, ...])

_LINK_COLUMNS = (
    "id, po_id, po_number, state, resume_state, reason, so_id, so_number, currency, "
    "snapshot, lines, notes, last_error, created_at, updated_at, state_since"
)
_UNSET: Any = object()
#: ``po_observations`` keeps this many POs (the most recently seen); a row per PO, never
#: one per poll.
OBSERVATIONS_KEPT = 10_000
#: The factory of today's single-factory configuration, and of every row written before
#: there were several.
DEFAULT_FACTORY = "default"
#: How long (PostgreSQL's ``lock_timeout``) an acquire waits on a lease row another
#: transaction holds, before it fails: the coordinator's renewals share its session.
_ACQUIRE_LOCK_WAIT = "1s"


@dataclass(frozen=True)
class Lease:
    """A daemon's hold on a factory, as :meth:`Store.acquire_lease` or
    :meth:`Store.renew_lease` granted it.

    ``expires_at`` is the database's clock (seconds since the epoch); ``deadline`` is this
    process's ``time.monotonic()`` by which the holder must have stopped the factory's
    effects unless renewed: the moment the request was sent plus the TTL, so never later
    than the database's expiry, whatever the two clocks say.
    """

    factory: str
    owner: str
    fence: int
    expires_at: float
    deadline: float


@dataclass(frozen=True)
class LeaseRecord:
    """A row of the leases table, for the status page and rebalancing."""

    factory: str
    owner: str
    fence: int
    expires_at: float
    renewed_at: float
    #: Seconds until it expires by the database's clock; negative once expired.
    remaining: float

    @property
    def held(self) -> bool:
        return self.remaining >= 0


def new_owner_id() -> str:
    """A daemon's name in the leases: its host and pid, and a random part so that a pid
    used again after a restart is another owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class InboxEvent:
    """Something seen by a poller, a webhook or an effect, waiting for the dispatcher."""

    id: int
    source: str
    kind: str
    payload: bytes
    po_id: int | None
    so_id: int | None
    link_id: int | None
    received_at: float


@dataclass(frozen=True)
class Placement:
    """Where a look at a sales order placed a Katana MO (``so_id`` ``None``: made for no
    SO), and the status its signed deliveries said since (``heard``: that one's inbox id)."""

    mo_id: int
    so_id: int | None
    placed: int
    status: str | None
    heard: int | None


@dataclass(frozen=True)
class SalesOrderEvidence:
    """What the last look at a Katana SO saw, and what signed deliveries said since.

    ``looked``: the newest delivery collected before the look began (inbox ids grow);
    ``facts``: the look's encoded :class:`~syncd.domain.orders.SalesOrderFacts`;
    ``waiting``: a live row had no MO; ``status``/``heard``: the SO's status as last
    heard and from which delivery; ``edited``: a delivery since that may be a row edit;
    ``placements``: the MOs placed on it.
    """

    so_id: int
    looked: int
    facts: bytes
    waiting: bool
    status: str | None
    heard: int | None
    edited: int | None
    placements: tuple[Placement, ...]


@dataclass(frozen=True)
class TransitionRecord:
    """One row of the append-only transition log."""

    id: int
    link_id: int
    from_state: str | None
    to_state: str
    trigger: str
    cause: str
    at: float
    po_number: str | None = None


@dataclass(frozen=True)
class PurchaseOrderObservation:
    """The last time syncd saw a PO it did not link, and why it did not."""

    po_id: int
    po_number: str
    supplier: str | None
    status: str
    reason: str
    po_created_at: float | None
    first_seen_at: float
    seen_at: float


class ImportResult(StrEnum):
    """What the daemon made of a ``syncctl import``."""

    DISCOVERED = "discovered"
    NOT_FOUND = "not_found"
    NOT_ACTIVE = "not_active"
    OTHER_SUPPLIER = "other_supplier"
    ALREADY_LINKED = "already_linked"


@dataclass(frozen=True)
class ImportOutcome:
    """One ``syncctl import`` request as the daemon decided it."""

    event_id: int
    po_number: str
    result: ImportResult
    detail: str
    po_id: int | None
    decided_at: float


@dataclass(frozen=True)
class PlannedWrite:
    """One writing request a shadow run's effect would have sent for an order, in its place
    (``seq``) among the effect's writes, and the placeholder answer the run went on with."""

    link_id: int
    po_number: str
    effect: str
    seq: int
    service: str
    method: str
    endpoint: str
    path: str
    #: The JSON body it would have sent, decoded; ``None``: no body.
    body: Any
    #: The placeholder answer (negative ids), decoded; ``None``: withheld, the plan ends.
    answer: Any
    #: What explains it to a person (an SO's SKUs by variant id, a line's price before and
    #: after), decoded; ``None``: nothing.
    detail: Any
    planned_at: float


class _Request(Protocol):
    """What :meth:`Store.record_plan` keeps of one write
    (:class:`syncd.adapters._http.PlannedRequest`)."""

    @property
    def service(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def body(self) -> Any: ...
    @property
    def answer(self) -> Any: ...
    @property
    def detail(self) -> Any: ...


def _epoch(moment: datetime | None) -> float:
    return time.time() if moment is None else moment.timestamp()


def _iso(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _link(row: Sequence[Any]) -> LinkedOrder:
    return LinkedOrder(
        id=row[0],
        po_id=row[1],
        po_number=row[2],
        state=row[3],
        resume_state=row[4],
        reason=row[5],
        so_id=row[6],
        so_number=row[7],
        currency=row[8],
        snapshot=_snapshot_decoder.decode(row[9]) if row[9] else None,
        lines=_lines_decoder.decode(row[10]) if row[10] else (),
        notes=_notes_decoder.decode(row[11]) if row[11] else (),
        last_error=row[12],
        created_at=_iso(row[13]),
        updated_at=_iso(row[14]),
        state_since=_iso(row[15]),
    )


class _QueuedEvent:
    """An inbox row waiting for its group commit, and then what became of it."""

    __slots__ = ("dedup_key", "done", "error", "event_id", "leads", "row", "turn")

    def __init__(self, dedup_key: str | None, row: tuple[Any, ...]) -> None:
        self.dedup_key = dedup_key
        self.row = row
        self.done = False
        self.event_id: int | None = None
        self.error: Exception | None = None
        # Set once the row is committed, or once it is this caller's turn to commit the
        # next batch (``leads``); made only for a caller that has to wait.
        self.turn: anyio.Event | None = None
        self.leads = False

    def wake(self) -> None:
        if self.turn is not None:
            self.turn.set()


#: Rows in one multi-row INSERT of a group commit (9 values a row, well under SQLite's
#: 32,766 variables).
_ROWS_PER_INSERT = 500
#: Rows in one multi-row INSERT of :meth:`Store.setdefault_meta_of` (3 values a row).
_META_ROWS_PER_INSERT = 1000
#: Seconds the summary of the inbox's waiting events is used (see Store.pending_events).
PENDING_SUMMARY_AGE = 0.5


@dataclass(frozen=True)
class _PendingSummary:
    """Which kinds of events wait in the inbox, by factory, as read at ``at`` (monotonic),
    after ``commits`` of this process's inbox commits."""

    at: float
    commits: int
    kinds: dict[str, set[str]]


@functools.lru_cache(maxsize=64)
def _insert_events_sql(rows: int) -> str:
    """The multi-row INSERT of a group commit of ``rows`` rows."""
    return (
        "INSERT INTO inbox (factory, source, kind, dedup_key, po_id, so_id, link_id, payload, "
        "received_at) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
        + " ON CONFLICT DO NOTHING RETURNING id, dedup_key"
    )


def _match_ids(chunk: Sequence[_QueuedEvent], returned: Sequence[Row]) -> None:
    """Give each row of one multi-row INSERT its id from what ``RETURNING`` gave back.

    A row whose dedup key is not returned was a duplicate. ``RETURNING`` has no set order,
    but the rows are inserted in ``VALUES`` order and each takes the next rowid (SQLite) or
    sequence value (PostgreSQL), so their ids ascend in that order."""
    inserted_keys = {row[1] for row in returned if row[1] is not None}
    ids = iter(sorted(int(row[0]) for row in returned))
    for queued in chunk:
        if queued.dedup_key is not None and queued.dedup_key not in inserted_keys:
            queued.event_id = None
        else:
            queued.event_id = next(ids)


class Store:
    """The daemon's memory. Open with :meth:`open`; close with :meth:`close`.

    Every row belongs to a factory. The store :meth:`open` returns is the factory
    ``default``'s (today's daemon and ``syncctl`` use it as they always did);
    :meth:`for_factory` gives another factory's view, with the same methods, every read
    filtered and every write stamped with its name. Methods named ``*_per_factory``, the
    leases and the daemons' heartbeats read across factories, whichever view they are
    called on.
    """

    def __init__(
        self,
        db: Backend,
        path: str,
        *,
        clock: Any = time.time,
        factory: str = DEFAULT_FACTORY,
        lease: Lease | None = None,
        root: Store | None = None,
    ) -> None:
        self._db = db
        self.path = path
        self._clock = clock
        self.factory = factory
        self.lease = lease
        self._root = self if root is None else root
        # Group commit of inbox rows (see add_event): rows waiting for the next commit, and
        # whether a caller is committing (or has been handed the turn to).
        self._queued: list[_QueuedEvent] = []
        self._committing = False
        # The root's summary of what waits in the inbox (see _nothing_pending).
        self._pending: _PendingSummary | None = None
        self._pending_lock = anyio.Lock()
        self._pending_askers: set[str] = set()
        self._commits = 0
        self._committed_for: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        readonly: bool = False,
        exclusive: bool = False,
        require_schema: bool = True,
    ) -> Store:
        """Open (and migrate) the store: a SQLite file, or a ``postgresql://`` URL.

        :param readonly: only read (``syncctl``): nothing is created or migrated.
        :param exclusive: the daemon's open of a SQLite file: refuse when another syncd
            holds it. Several daemons may share a PostgreSQL database, so it is not
            refused there.
        :param require_schema: with ``readonly``, refuse a PostgreSQL database with no
            syncd schema yet; ``syncd check`` passes ``False`` and asks
            :meth:`schema_version` (``syncd run`` would create the schema).
        :raises StoreInUse: ``exclusive`` and another syncd has the file open for writing.
        :raises StoreError: the file cannot be opened, the server reached or the password
            is refused, the database is not a syncd database, or is newer than this syncd.
        """
        location = str(path)
        db: Backend
        if is_postgres_url(location):
            # Imported here: a SQLite-only install never loads the PostgreSQL driver.
            from syncd.store._postgres import PostgresBackend

            db = await PostgresBackend.open(
                location, readonly=readonly, require_schema=require_schema
            )
        else:
            db = await SQLiteBackend.open(location, readonly=readonly, exclusive=exclusive)
        return cls(db, db.where)

    def for_factory(self, name: str, *, lease: Lease | None = None) -> Store:
        """The store as one factory sees it: the same database, that factory's rows.

        :param lease: the daemon's lease of the factory. Every write of the view then
            checks, in its own transaction, that the lease is still current, and raises
            :class:`LeaseLost` (writing nothing) when it is not. Without a lease the view
            writes unfenced: webhook intake (any daemon persists any factory's
            deliveries), ``syncctl``.
        :raises ValueError: ``name`` is not a factory name, or the lease is another's.
        """
        if not FACTORY_NAME.fullmatch(name):
            raise ValueError(f"not a factory name: {name!r}")
        if lease is not None and lease.factory != name:
            raise ValueError(f"the lease of factory {lease.factory} cannot fence {name}")
        return Store(self._db, self.path, factory=name, lease=lease, root=self._root)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._db.dialect

    async def close(self) -> None:
        """Close the database; a view from :meth:`for_factory` leaves it to its store."""
        if self._root is self:
            await self._db.close()

    def _now(self) -> float:
        # The store's clock (tests set it on the store :meth:`open` gave): one for all views.
        return float(self._root._clock())

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Queries]:
        async with self._db.transaction() as db:
            if self.lease is not None:
                await self._check_fence(db, self.lease)
            yield db

    async def schema_version(self) -> int:
        """How many migrations the database has had (0: none, a new database)."""
        return await self._db.check_version()

    async def integrity_check(self) -> list[str]:
        """The database's own check (SQLite's ``integrity_check``; on PostgreSQL, that
        the schema is whole); an empty list means it is sound."""
        return await self._db.integrity_check()

    # -- meta and cursors ----------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self._fetchone(
            "SELECT value FROM meta WHERE factory = ? AND key = ?", (self.factory, key)
        )
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO meta (factory, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (factory, key) DO UPDATE SET value = excluded.value",
                (self.factory, key, value),
            )

    async def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with ``prefix`` (without it) and its value."""
        rows = await self._fetchall(
            "SELECT key, value FROM meta WHERE factory = ? AND substr(key, 1, ?) = ?",
            (self.factory, len(prefix), prefix),
        )
        return {str(r[0])[len(prefix) :]: str(r[1]) for r in rows}

    async def delete_meta(self, key: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM meta WHERE factory = ? AND key = ?", (self.factory, key))

    async def setdefault_meta(self, key: str, value: str) -> str:
        """Set ``key`` unless it is set; return the value in force."""
        # Read first: at a restart every such key is set, and a write transaction each was
        # most of the database's work in a 1,000-factory start.
        stored = await self.get_meta(key)
        if stored is not None:
            return stored
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO meta (factory, key, value) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (self.factory, key, value),
            )
        stored = await self.get_meta(key)
        assert stored is not None
        return stored

    async def setdefault_meta_of(self, rows: Iterable[tuple[str, str, str]]) -> int:
        """:meth:`setdefault_meta` for many factories at once: each ``(factory, key,
        value)`` not set yet is set, all in one transaction (none when every key is set);
        return how many were set. A daemon's first start of 1,000 factories wrote three
        keys each in a transaction of its own: 3,000 turns of the one writer, ~1.7 s of a
        6 s start."""
        wanted = {(factory, key): value for factory, key, value in rows}
        for factory, _ in wanted:
            if not FACTORY_NAME.fullmatch(factory):
                raise ValueError(f"not a factory name: {factory!r}")
        keys = sorted({key for _, key in wanted})
        if not keys:
            return 0
        marks = ", ".join("?" * len(keys))
        found = await self._fetchall(f"SELECT factory, key FROM meta WHERE key IN ({marks})", keys)
        for row in found:
            wanted.pop((str(row[0]), str(row[1])), None)
        missing = [(factory, key, value) for (factory, key), value in wanted.items()]
        if not missing:
            return 0
        async with self._transaction() as db:
            for start in range(0, len(missing), _META_ROWS_PER_INSERT):
                chunk = missing[start : start + _META_ROWS_PER_INSERT]
                await db.execute(
                    "INSERT INTO meta (factory, key, value) VALUES "
                    + ", ".join(["(?, ?, ?)"] * len(chunk))
                    + " ON CONFLICT DO NOTHING",
                    [value for row in chunk for value in row],
                )
        return len(missing)

    async def get_cursor(self, name: str) -> str | None:
        row = await self._fetchone(
            "SELECT value FROM cursors WHERE factory = ? AND name = ?", (self.factory, name)
        )
        return None if row is None else str(row[0])

    async def set_cursor(self, name: str, value: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO cursors (factory, name, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (factory, name) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (self.factory, name, value, self._now()),
            )

    async def cursors(self) -> dict[str, tuple[str, float]]:
        rows = await self._fetchall(
            "SELECT name, value, updated_at FROM cursors WHERE factory = ?", (self.factory,)
        )
        return {str(r[0]): (str(r[1]), float(r[2])) for r in rows}

    # -- inbox ---------------------------------------------------------------------------

    async def add_event(
        self,
        source: str,
        kind: str,
        payload: bytes,
        *,
        dedup_key: str | None = None,
        po_id: int | None = None,
        so_id: int | None = None,
        link_id: int | None = None,
    ) -> int | None:
        """Persist an event; ``None`` when its ``dedup_key`` was seen before.

        Group commit: events added while another commit is under way are written together
        in the next transaction, one fsync for all of them, and each caller returns once
        its own row is committed. A burst of webhook deliveries pays one fsync per batch,
        not per delivery, and nothing is acknowledged before it is durable.
        """
        queued = _QueuedEvent(
            dedup_key, (self.factory, source, kind, dedup_key, po_id, so_id, link_id, payload)
        )
        self._queued.append(queued)
        if self._committing:
            queued.turn = turn = anyio.Event()
            try:
                await turn.wait()
            except BaseException:
                # Cancelled while waiting: a row not yet taken is not written (its caller
                # answers nothing), and a turn handed to it goes to the next in line.
                if not queued.done and queued in self._queued:
                    self._queued.remove(queued)
                    if queued.leads:
                        self._hand_on()
                raise
        if not queued.done:
            # Our turn: commit everything queued, ours included. The committer wakes each
            # caller of the batch at once, and hands the next batch to the first caller
            # that came meanwhile, so the next commit starts without waiting for them.
            self._committing = True
            batch, self._queued = self._queued, []
            try:
                # Shielded: a cancelled caller must not cut the commit short for the others
                # in its batch (their answers depend on it).
                with anyio.CancelScope(shield=True):
                    await self._commit_events(batch)
            finally:
                # The next leader first, so that it is the first of them to run: the next
                # commit starts while this batch's answers are written.
                self._hand_on()
                for waiting in batch:
                    waiting.wake()
        if queued.error is not None:
            raise queued.error
        return queued.event_id

    def _hand_on(self) -> None:
        """Give the turn to commit to the first caller waiting, or end the turns."""
        if self._queued:
            first = self._queued[0]
            first.leads = True
            first.wake()
        else:
            self._committing = False

    async def _commit_events(self, batch: list[_QueuedEvent]) -> None:
        """Insert ``batch`` in one transaction, one statement per :data:`_ROWS_PER_INSERT`
        rows; each row's id (``None``: a duplicate) or the error that refused the
        transaction is left on it."""
        fresh: list[_QueuedEvent] = []
        seen: set[str] = set()
        for queued in batch:
            if queued.dedup_key is not None:
                if queued.dedup_key in seen:
                    continue  # the same delivery twice in one batch: one row, one answer
                seen.add(queued.dedup_key)
            fresh.append(queued)
        received_at = self._now()
        chunks = [fresh[i : i + _ROWS_PER_INSERT] for i in range(0, len(fresh), _ROWS_PER_INSERT)]
        statements = [
            (
                _insert_events_sql(len(chunk)),
                [value for queued in chunk for value in (*queued.row, received_at)],
            )
            for chunk in chunks
        ]
        try:
            if self.lease is None:
                # Decided before it starts: one job for the backend (see Backend.transact).
                returned = await self._db.transact(statements)
            else:
                async with self._transaction() as db:
                    returned = [await db.fetchall(sql, args) for sql, args in statements]
            for chunk, rows in zip(chunks, returned, strict=True):
                _match_ids(chunk, rows)
        except Exception as exc:
            for queued in batch:
                queued.event_id = None
                queued.error = exc
        root = self._root
        root._commits += 1
        for queued in batch:
            # Rows of these factories may be newer than the inbox summary (see pending_events).
            root._committed_for[queued.row[0]] = root._commits
            queued.done = True

    async def pending_events(
        self,
        limit: int = 200,
        *,
        kinds: Sequence[str] | None = None,
        exclude_kinds: Sequence[str] = (),
    ) -> list[InboxEvent]:
        """Unprocessed events, oldest first; only of ``kinds`` when given, none of
        ``exclude_kinds``.

        With several factories asking, one grouped query (at most every
        :data:`PENDING_SUMMARY_AGE` seconds) says which factories have events of which kinds
        waiting, and a factory with none of those asked for gets ``[]`` without a query of its
        own. The daemon's readers sleep until woken; its one look at the inbox
        (:class:`~syncd.runtime.inbox.InboxWatch`) reads the same summary
        (:meth:`pending_kinds_per_factory`) to wake those with events another process
        (``syncctl``, another daemon) wrote. Events this process added after the summary was
        read are always looked for at once.
        """
        if await self._root._nothing_pending(self.factory, kinds, exclude_kinds):
            return []
        where = "factory = ? AND processed_at IS NULL"
        args: list[Any] = [self.factory]
        if kinds is not None:
            where += f" AND kind IN ({', '.join('?' * len(kinds)) or 'NULL'})"
            args += kinds
        if exclude_kinds:
            where += f" AND kind NOT IN ({', '.join('?' * len(exclude_kinds))})"
            args += exclude_kinds
        rows = await self._fetchall(
            "SELECT id, source, kind, payload, po_id, so_id, link_id, received_at FROM inbox "
            f"WHERE {where} ORDER BY id LIMIT ?",
            (*args, limit),
        )
        return [InboxEvent(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    async def _nothing_pending(
        self, factory: str, kinds: Sequence[str] | None, exclude_kinds: Sequence[str]
    ) -> bool:
        """Whether the summary shows no event ``pending_events`` would return (the root's)."""
        self._pending_askers.add(factory)
        if len(self._pending_askers) < 2:
            return False  # one factory: its own query is as cheap as the summary's
        summary = await self._pending_summary()
        if self._committed_for.get(factory, -1) > summary.commits:
            return False  # this process added events the summary may not show
        waiting = summary.kinds.get(factory, set())
        if kinds is not None:
            waiting = waiting & set(kinds)
        return not waiting - set(exclude_kinds)

    async def pending_kinds_per_factory(self) -> dict[str, set[str]]:
        """Which kinds of events wait unprocessed, by factory: the summary
        :meth:`pending_events` uses (read again when older than :data:`PENDING_SUMMARY_AGE`
        seconds), for the daemon's one look at the inbox for all its factories."""
        return (await self._root._pending_summary()).kinds

    async def _pending_summary(self) -> _PendingSummary:
        summary = self._pending
        if summary is None or time.monotonic() - summary.at > PENDING_SUMMARY_AGE:
            async with self._pending_lock:
                summary = self._pending
                if summary is None or time.monotonic() - summary.at > PENDING_SUMMARY_AGE:
                    # Read before the query: a commit ending during it may be missing from it.
                    commits, at = self._commits, time.monotonic()
                    rows = await self._fetchall(
                        "SELECT factory, kind FROM inbox WHERE processed_at IS NULL "
                        "GROUP BY factory, kind"
                    )
                    kinds_by_factory: dict[str, set[str]] = {}
                    for name, kind in rows:
                        kinds_by_factory.setdefault(str(name), set()).add(str(kind))
                    summary = self._pending = _PendingSummary(at, commits, kinds_by_factory)
        return summary

    async def has_pending_event(self, link_id: int, kind: str) -> bool:
        """Whether an event of ``kind`` for the link waits unprocessed in the inbox."""
        row = await self._fetchone(
            "SELECT 1 FROM inbox WHERE factory = ? AND link_id = ? AND kind = ? "
            "AND processed_at IS NULL LIMIT 1",
            (self.factory, link_id, kind),
        )
        return row is not None

    async def events_for_link(self, link_id: int) -> list[InboxEvent]:
        rows = await self._fetchall(
            "SELECT id, source, kind, payload, po_id, so_id, link_id, received_at FROM inbox "
            "WHERE factory = ? AND link_id = ? ORDER BY id",
            (self.factory, link_id),
        )
        return [InboxEvent(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    async def mark_processed(self, event_id: int, outcome: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE inbox SET processed_at = ?, outcome = ? WHERE factory = ? AND id = ?",
                (self._now(), outcome, self.factory, event_id),
            )

    async def event_outcome(self, event_id: int) -> tuple[float | None, str | None] | None:
        """When an inbox event was processed and with what outcome; ``None`` if no such
        event."""
        row = await self._fetchone(
            "SELECT processed_at, outcome FROM inbox WHERE factory = ? AND id = ?",
            (self.factory, event_id),
        )
        return None if row is None else (row[0], row[1])

    async def inbox_backlog(self) -> tuple[int, float | None]:
        """How many events wait, and when the oldest arrived."""
        row = await self._fetchone(
            "SELECT count(*), min(received_at) FROM inbox "
            "WHERE factory = ? AND processed_at IS NULL",
            (self.factory,),
        )
        assert row is not None
        return int(row[0]), row[1]

    # -- links ---------------------------------------------------------------------------

    async def create_link(
        self,
        snapshot: PurchaseOrderSnapshot,
        *,
        state: str,
        trigger: str,
        cause: str,
        event_id: int | None,
    ) -> LinkedOrder | None:
        """Start following a PO; ``None`` when it is already linked."""
        now = self._now()
        async with self._transaction() as db:
            row = await db.fetchone(
                "INSERT INTO links (factory, po_id, po_number, state, snapshot, created_at, "
                "updated_at, state_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (
                    self.factory,
                    snapshot.po_id,
                    snapshot.po_number,
                    state,
                    _encode(snapshot),
                    now,
                    now,
                    now,
                ),
            )
            created = row is not None
            link_id = None if row is None else int(row[0])
            if created:
                await db.execute(
                    "INSERT INTO transitions (link_id, from_state, to_state, trigger, cause, "
                    "event_id, at) VALUES (?, NULL, ?, ?, ?, ?, ?)",
                    (link_id, state, trigger, cause, event_id, now),
                )
            if event_id is not None:
                await db.execute(
                    "UPDATE inbox SET processed_at = ?, outcome = ?, link_id = "
                    "(SELECT id FROM links WHERE factory = ? AND po_id = ?) "
                    "WHERE factory = ? AND id = ?",
                    (
                        now,
                        "linked" if created else "duplicate",
                        self.factory,
                        snapshot.po_id,
                        self.factory,
                        event_id,
                    ),
                )
        if not created:
            return None
        assert link_id is not None
        return await self.get_link(link_id)

    async def apply(
        self,
        link: LinkedOrder,
        decision: Decision,
        *,
        cause: str,
        event_id: int | None = None,
        reason: str | None = None,
        so_id: int | None = _UNSET,
        so_number: str | None = _UNSET,
        currency: str | None = _UNSET,
        lines: tuple[LineLink, ...] | None = None,
        notes: Iterable[str] = (),
    ) -> LinkedOrder:
        """Record a transition: the link's new state, the log row, the event processed.

        Refuses (``StoreConflict``) if the link is no longer in ``decision.source``: another
        writer moved it first, and the caller must decide again.
        """
        now = self._now()
        sets = ["state = ?", "resume_state = ?", "reason = ?", "updated_at = ?", "state_since = ?"]
        values: list[Any] = [decision.dest, decision.resume_state, reason, now, now]
        if so_id is not _UNSET:
            sets.append("so_id = ?")
            values.append(so_id)
        if so_number is not _UNSET:
            sets.append("so_number = ?")
            values.append(so_number)
        if currency is not _UNSET:
            sets.append("currency = ?")
            values.append(currency)
        if lines is not None:
            sets.append("lines = ?")
            values.append(_encode(lines))
        new_notes = tuple(notes)
        if new_notes:
            sets.append("notes = ?")
            values.append(_encode(link.notes + tuple(n for n in new_notes if n not in link.notes)))
        if decision.dest != decision.source and not self._is_attention(decision):
            sets.append("last_error = NULL")
        async with self._transaction() as db:
            changed = await db.execute(
                f"UPDATE links SET {', '.join(sets)} WHERE factory = ? AND id = ? AND state = ?",
                (*values, self.factory, link.id, decision.source),
            )
            if changed != 1:
                raise StoreConflict(
                    f"order {link.po_number} is no longer in {decision.source}: not applied"
                )
            await db.execute(
                "INSERT INTO transitions (link_id, from_state, to_state, trigger, cause, "
                "event_id, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (link.id, decision.source, decision.dest, decision.trigger, cause, event_id, now),
            )
            if event_id is not None:
                await db.execute(
                    "UPDATE inbox SET processed_at = ?, outcome = ?, link_id = ? "
                    "WHERE factory = ? AND id = ?",
                    (now, f"{decision.source}->{decision.dest}", link.id, self.factory, event_id),
                )
        updated = await self.get_link(link.id)
        assert updated is not None
        return updated

    @staticmethod
    def _is_attention(decision: Decision) -> bool:
        return decision.resume_state is not None

    async def note(
        self,
        link_id: int,
        *,
        notes: Iterable[str] = (),
        last_error: str | None = _UNSET,
        lines: tuple[LineLink, ...] | None = None,
    ) -> None:
        """Add notes, set the last error or the line map, without moving the order."""
        link = await self.get_link(link_id)
        if link is None:
            raise StoreError(f"no linked order with id {link_id}")
        sets: list[str] = ["updated_at = ?"]
        values: list[Any] = [self._now()]
        new = tuple(n for n in notes if n not in link.notes)
        if new:
            sets.append("notes = ?")
            values.append(_encode(link.notes + new))
        if last_error is not _UNSET:
            sets.append("last_error = ?")
            values.append(last_error)
        if lines is not None:
            sets.append("lines = ?")
            values.append(_encode(lines))
        async with self._transaction() as db:
            await db.execute(
                f"UPDATE links SET {', '.join(sets)} WHERE factory = ? AND id = ?",
                (*values, self.factory, link_id),
            )

    async def _one(self, where: str, args: Sequence[Any]) -> LinkedOrder | None:
        row = await self._fetchone(
            f"SELECT {_LINK_COLUMNS} FROM links WHERE factory = ? AND {where}",
            (self.factory, *args),
        )
        return None if row is None else _link(row)

    async def get_link(self, link_id: int) -> LinkedOrder | None:
        return await self._one("id = ?", (link_id,))

    async def link_by_po(self, po_id: int) -> LinkedOrder | None:
        return await self._one("po_id = ?", (po_id,))

    async def link_by_po_number(self, po_number: str) -> LinkedOrder | None:
        return await self._one("po_number = ?", (po_number,))

    async def link_by_so(self, so_id: int) -> LinkedOrder | None:
        return await self._one("so_id = ?", (so_id,))

    async def find_link(self, key: str) -> LinkedOrder | None:
        """A link by PO number, or by its numeric id."""
        link = await self.link_by_po_number(key)
        if link is None and key.isdigit():
            link = await self.get_link(int(key))
        return link

    async def links_in_states(
        self, states: Sequence[str], *, older_than: float | None = None, limit: int | None = None
    ) -> list[LinkedOrder]:
        if not states:
            return []
        marks = ", ".join("?" for _ in states)
        sql = f"SELECT {_LINK_COLUMNS} FROM links WHERE factory = ? AND state IN ({marks})"
        args: list[Any] = [self.factory, *states]
        if older_than is not None:
            sql += " AND state_since <= ?"
            args.append(self._now() - older_than)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = await self._fetchall(sql, args)
        return [_link(r) for r in rows]

    async def all_links(self, *, limit: int = 1000) -> list[LinkedOrder]:
        rows = await self._fetchall(
            f"SELECT {_LINK_COLUMNS} FROM links WHERE factory = ? ORDER BY id DESC LIMIT ?",
            (self.factory, limit),
        )
        return [_link(r) for r in rows]

    async def so_ids_in_states(self, states: Sequence[str]) -> dict[int, int]:
        """Katana SO id → link id, for links in ``states`` that have an SO."""
        if not states:
            return {}
        marks = ", ".join("?" for _ in states)
        rows = await self._fetchall(
            "SELECT so_id, id FROM links WHERE factory = ? AND so_id IS NOT NULL "
            f"AND state IN ({marks})",
            [self.factory, *states],
        )
        return {int(r[0]): int(r[1]) for r in rows}

    async def linked_po_ids(self, po_ids: Sequence[int]) -> set[int]:
        if not po_ids:
            return set()
        marks = ", ".join("?" for _ in po_ids)
        rows = await self._fetchall(
            f"SELECT po_id FROM links WHERE factory = ? AND po_id IN ({marks})",
            [self.factory, *po_ids],
        )
        return {int(r[0]) for r in rows}

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT state, count(*) FROM links WHERE factory = ? GROUP BY state", (self.factory,)
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def oldest_by_state(self) -> dict[str, tuple[str, float]]:
        """State → (PO number, since) of the order that has waited there longest."""
        rows = await self._fetchall(
            "SELECT l.state, l.po_number, l.state_since FROM links l JOIN ("
            "SELECT state, min(state_since) AS since FROM links WHERE factory = ? "
            "GROUP BY state) o ON l.state = o.state AND l.state_since = o.since "
            "WHERE l.factory = ?",
            (self.factory, self.factory),
        )
        return {str(r[0]): (str(r[1]), float(r[2])) for r in rows}

    # -- what was seen but not linked, and operators' imports -----------------------------

    async def observe_purchase_order(
        self,
        po_id: int,
        po_number: str,
        *,
        status: str,
        reason: str,
        supplier: str | None = None,
        po_created_at: datetime | None = None,
    ) -> None:
        """Record why a PO seen in TradeGecko was not linked: its row is updated in place, and
        the least recently seen beyond :data:`OBSERVATIONS_KEPT` are dropped."""
        now = self._now()
        created = po_created_at.timestamp() if po_created_at is not None else None
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO po_observations (factory, po_id, po_number, supplier, status, "
                "reason, po_created_at, first_seen_at, seen_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (factory, po_id) DO UPDATE SET po_number = excluded.po_number, "
                "supplier = coalesce(excluded.supplier, po_observations.supplier), "
                "status = excluded.status, "
                "reason = excluded.reason, po_created_at = excluded.po_created_at, "
                "seen_at = excluded.seen_at",
                (self.factory, po_id, po_number, supplier, status, reason, created, now, now),
            )
            # Everything from the first row past the bound down, in (seen_at, po_id) order:
            # no row when under the bound (the comparison with NULL is never true). A row
            # value rather than SQLite's ``LIMIT -1 OFFSET``, which PostgreSQL has not. The
            # bound is each factory's: a busy one does not push out another's.
            await db.execute(
                "DELETE FROM po_observations WHERE factory = ? AND (seen_at, po_id) <= "
                "(SELECT seen_at, po_id FROM po_observations WHERE factory = ? "
                "ORDER BY seen_at DESC, po_id DESC LIMIT 1 OFFSET ?)",
                (self.factory, self.factory, OBSERVATIONS_KEPT),
            )

    async def purchase_order_observation(self, po_number: str) -> PurchaseOrderObservation | None:
        """The PO called ``po_number`` as last seen unlinked (the latest seen, if several)."""
        row = await self._fetchone(
            "SELECT po_id, po_number, supplier, status, reason, po_created_at, first_seen_at, "
            "seen_at FROM po_observations WHERE factory = ? AND po_number = ? "
            "ORDER BY seen_at DESC LIMIT 1",
            (self.factory, po_number),
        )
        return None if row is None else PurchaseOrderObservation(*row)

    async def record_import_outcome(
        self,
        event_id: int,
        po_number: str,
        result: ImportResult,
        detail: str,
        *,
        po_id: int | None = None,
    ) -> None:
        """Settle a ``syncctl import`` request: its outcome and the inbox event, together."""
        now = self._now()
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO import_outcomes (factory, event_id, po_number, result, detail, "
                "po_id, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET "
                "po_number = excluded.po_number, result = excluded.result, "
                "detail = excluded.detail, po_id = excluded.po_id, "
                "decided_at = excluded.decided_at",
                (self.factory, event_id, po_number, result.value, detail, po_id, now),
            )
            await db.execute(
                "UPDATE inbox SET processed_at = ?, outcome = ? WHERE factory = ? AND id = ?",
                (now, detail, self.factory, event_id),
            )

    async def import_outcome(self, event_id: int) -> ImportOutcome | None:
        return await self._import_outcome("event_id = ?", (event_id,))

    async def last_import_outcome(self, po_number: str) -> ImportOutcome | None:
        return await self._import_outcome(
            "po_number = ? ORDER BY event_id DESC LIMIT 1", (po_number,)
        )

    async def _import_outcome(self, where: str, args: Sequence[Any]) -> ImportOutcome | None:
        row = await self._fetchone(
            "SELECT event_id, po_number, result, detail, po_id, decided_at FROM import_outcomes "
            f"WHERE factory = ? AND {where}",
            (self.factory, *args),
        )
        if row is None:
            return None
        return ImportOutcome(row[0], row[1], ImportResult(row[2]), row[3], row[4], row[5])

    async def _fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        try:
            return await self._db.fetchone(sql, args)
        except StoreError as exc:
            raise await self._behind(exc) from None

    async def _fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            return await self._db.fetchall(sql, args)
        except StoreError as exc:
            raise await self._behind(exc) from None

    async def _behind(self, exc: StoreError) -> StoreError:
        """A read-only opener's read of a database the daemon has not migrated yet (a
        table or column missing): a clear error instead of the database's."""
        try:
            if await self._db.check_version() >= len(MIGRATIONS):
                return exc
        except StoreError:
            return exc
        return StoreError(f"{exc} (restart syncd to upgrade the database)")

    # -- transitions ---------------------------------------------------------------------

    async def history(self, link_id: int) -> list[TransitionRecord]:
        rows = await self._fetchall(
            "SELECT t.id, t.link_id, t.from_state, t.to_state, t.trigger, t.cause, t.at "
            "FROM transitions t JOIN links l ON l.id = t.link_id "
            "WHERE l.factory = ? AND t.link_id = ? ORDER BY t.id",
            (self.factory, link_id),
        )
        return [TransitionRecord(*r) for r in rows]

    async def recent_transitions(self, limit: int = 50) -> list[TransitionRecord]:
        rows = await self._fetchall(
            "SELECT t.id, t.link_id, t.from_state, t.to_state, t.trigger, t.cause, t.at, "
            "l.po_number FROM transitions t JOIN links l ON l.id = t.link_id "
            "WHERE l.factory = ? ORDER BY t.id DESC LIMIT ?",
            (self.factory, limit),
        )
        return [TransitionRecord(*r) for r in rows]

    # -- status page reads ---------------------------------------------------------------

    async def timeline(self, link_id: int) -> list[tuple[TransitionRecord, str | None, str | None]]:
        """An order's transitions, oldest first, each with the ``(source, kind)`` of the inbox
        event that caused it (``None`` for a transition no event caused)."""
        rows = await self._fetchall(
            "SELECT t.id, t.link_id, t.from_state, t.to_state, t.trigger, t.cause, t.at, "
            "i.source, i.kind FROM transitions t JOIN links l ON l.id = t.link_id "
            "LEFT JOIN inbox i ON i.id = t.event_id "
            "WHERE l.factory = ? AND t.link_id = ? ORDER BY t.id",
            (self.factory, link_id),
        )
        return [(TransitionRecord(*r[:7]), r[7], r[8]) for r in rows]

    async def last_event_by_source(self, kind: str) -> dict[str, float]:
        """Source → when the newest inbox event of ``kind`` from it arrived (e.g. the last
        webhook each service delivered)."""
        rows = await self._fetchall(
            "SELECT source, max(received_at) FROM inbox WHERE factory = ? AND kind = ? "
            "GROUP BY source",
            (self.factory, kind),
        )
        return {str(r[0]): float(r[1]) for r in rows}

    # -- across factories ----------------------------------------------------------------

    async def factories(self) -> list[str]:
        """Every factory the database has rows of (a factory removed from the
        configuration keeps its history, and is listed), sorted."""
        rows = await self._fetchall(
            "SELECT factory FROM links UNION SELECT factory FROM inbox "
            "UNION SELECT factory FROM meta UNION SELECT factory FROM cursors "
            "UNION SELECT factory FROM po_observations UNION SELECT factory FROM leases"
        )
        return sorted(str(r[0]) for r in rows)

    async def counts_by_state_per_factory(self) -> dict[str, dict[str, int]]:
        """Factory → state → how many orders are in it (factories with orders only)."""
        rows = await self._fetchall(
            "SELECT factory, state, count(*) FROM links GROUP BY factory, state"
        )
        counts: dict[str, dict[str, int]] = {}
        for factory, state, count in rows:
            counts.setdefault(str(factory), {})[str(state)] = int(count)
        return counts

    async def oldest_by_state_per_factory(self) -> dict[str, dict[str, tuple[str, float]]]:
        """Factory → :meth:`oldest_by_state` of it (factories with orders only)."""
        rows = await self._fetchall(
            "SELECT l.factory, l.state, l.po_number, l.state_since FROM links l JOIN ("
            "SELECT factory, state, min(state_since) AS since FROM links "
            "GROUP BY factory, state) o ON l.factory = o.factory AND l.state = o.state "
            "AND l.state_since = o.since"
        )
        found: dict[str, dict[str, tuple[str, float]]] = {}
        for factory, state, po_number, since in rows:
            found.setdefault(str(factory), {})[str(state)] = (str(po_number), float(since))
        return found

    async def inbox_backlog_per_factory(self) -> dict[str, tuple[int, float]]:
        """Factory → how many events wait and when the oldest arrived (factories with a
        backlog only)."""
        rows = await self._fetchall(
            "SELECT factory, count(*), min(received_at) FROM inbox "
            "WHERE processed_at IS NULL GROUP BY factory"
        )
        return {str(r[0]): (int(r[1]), float(r[2])) for r in rows}

    async def meta_with_prefix_per_factory(self, prefix: str) -> dict[str, dict[str, str]]:
        """Factory → :meth:`meta_with_prefix` of it (e.g. every factory's pauses)."""
        rows = await self._fetchall(
            "SELECT factory, key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix),
        )
        found: dict[str, dict[str, str]] = {}
        for factory, key, value in rows:
            found.setdefault(str(factory), {})[str(key)[len(prefix) :]] = str(value)
        return found

    async def cursors_per_factory(self) -> dict[str, dict[str, tuple[str, float]]]:
        """Factory → :meth:`cursors` of it (factories with cursors only)."""
        rows = await self._fetchall("SELECT factory, name, value, updated_at FROM cursors")
        found: dict[str, dict[str, tuple[str, float]]] = {}
        for factory, name, value, updated_at in rows:
            found.setdefault(str(factory), {})[str(name)] = (str(value), float(updated_at))
        return found

    # -- leases --------------------------------------------------------------------------
    #
    # Times are the database's clock: PostgreSQL's now(), one clock for every daemon
    # whatever their hosts' clocks say; on SQLite (one host, one daemon per file) the
    # store's clock. Acquiring and renewing are each one statement, atomic on both. They
    # run in the backend's lease transactions: on PostgreSQL a session of their own, so a
    # renewal never queues behind the factories' writes (see syncd.store._postgres).

    def _clock_cte(self) -> tuple[str, tuple[Any, ...]]:
        """A ``clock (ts)`` CTE holding the database's now, and its arguments."""
        if self.dialect == "postgresql":
            return "WITH clock (ts) AS (SELECT CAST(extract(epoch FROM now()) AS FLOAT8)) ", ()
        return "WITH clock (ts) AS (SELECT ?) ", (self._now(),)

    async def acquire_lease(self, factory: str, owner: str, ttl: float) -> Lease | None:
        """Take ``factory`` for ``owner`` for ``ttl`` seconds, if it is free, expired or
        already ``owner``'s; ``None`` while another daemon holds it.

        The fence rises by one at every takeover (a first lease has fence 1); acquiring a
        lease one still holds keeps its fence, like :meth:`renew_lease`.

        :raises StoreUnavailable: on PostgreSQL, the row stayed locked for a second (its
            last holder's write in flight, or that holder frozen mid-transaction until its
            session is ended): try again later.
        """
        clock, args = self._clock_cte()
        deadline = time.monotonic() + ttl
        async with self._db.lease_transaction() as db:
            if self.dialect == "postgresql":
                # Fail fast rather than hold the lease session (the round's renewals, the
                # releases) for the default 5 s.
                await db.execute(f"SET LOCAL lock_timeout = '{_ACQUIRE_LOCK_WAIT}'")
            row = await db.fetchone(
                clock + "INSERT INTO leases (factory, owner, fence, expires_at, renewed_at) "
                "VALUES (?, ?, 1, (SELECT ts FROM clock) + ?, (SELECT ts FROM clock)) "
                "ON CONFLICT (factory) DO UPDATE SET owner = excluded.owner, "
                "fence = CASE WHEN leases.owner = excluded.owner "
                "AND leases.expires_at >= excluded.renewed_at "
                "THEN leases.fence ELSE leases.fence + 1 END, "
                "expires_at = excluded.expires_at, renewed_at = excluded.renewed_at "
                "WHERE leases.expires_at < excluded.renewed_at OR leases.owner = excluded.owner "
                "RETURNING fence, expires_at",
                (*args, factory, owner, ttl),
            )
        if row is None:
            return None
        return Lease(factory, owner, int(row[0]), float(row[1]), deadline)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a lease for ``ttl`` seconds from now, keeping its fence; ``None`` when it
        is lost: expired (even if no one took it yet: its holder had to stop) or taken
        over. A lost lease is acquired again with :meth:`acquire_lease`, a new fence."""
        clock, args = self._clock_cte()
        deadline = time.monotonic() + ttl
        async with self._db.lease_transaction() as db:
            row = await db.fetchone(
                clock + "UPDATE leases SET expires_at = (SELECT ts FROM clock) + ?, "
                "renewed_at = (SELECT ts FROM clock) "
                "WHERE factory = ? AND owner = ? AND fence = ? "
                "AND expires_at >= (SELECT ts FROM clock) RETURNING fence, expires_at",
                (*args, ttl, lease.factory, lease.owner, lease.fence),
            )
        if row is None:
            return None
        return Lease(lease.factory, lease.owner, int(row[0]), float(row[1]), deadline)

    async def release_lease(self, lease: Lease) -> bool:
        """Give a lease up at once (another daemon may take it at its next claim): the row
        stays, expired, so that the fence keeps rising. ``False`` if it was lost already."""
        async with self._db.lease_transaction() as db:
            changed = await db.execute(
                "UPDATE leases SET expires_at = 0 WHERE factory = ? AND owner = ? AND fence = ?",
                (lease.factory, lease.owner, lease.fence),
            )
        return changed == 1

    async def leases(self) -> list[LeaseRecord]:
        """Every factory's lease, held or not, by factory name."""
        clock, args = self._clock_cte()
        rows = await self._fetchall(
            clock + "SELECT factory, owner, fence, expires_at, renewed_at, "
            "expires_at - (SELECT ts FROM clock) FROM leases ORDER BY factory",
            args,
        )
        return [
            LeaseRecord(str(r[0]), str(r[1]), int(r[2]), float(r[3]), float(r[4]), float(r[5]))
            for r in rows
        ]

    async def _check_fence(self, db: Queries, lease: Lease) -> None:
        """Inside a write's transaction: the lease is still current, or :class:`LeaseLost`.

        On PostgreSQL the lease's row is locked ``FOR SHARE`` until the write commits, so a
        takeover (which updates the row) waits for it: a write either commits before the
        fence moves or is refused. On SQLite every write transaction holds the file.
        """
        clock, args = self._clock_cte()
        lock = " FOR SHARE" if self.dialect == "postgresql" else ""
        row = await db.fetchone(
            clock + "SELECT fence FROM leases WHERE factory = ? AND owner = ? AND fence = ? "
            "AND expires_at >= (SELECT ts FROM clock)" + lock,
            (*args, lease.factory, lease.owner, lease.fence),
        )
        if row is not None:
            return
        now = await db.fetchone(
            "SELECT owner, fence FROM leases WHERE factory = ?", (lease.factory,)
        )
        if now is not None and (str(now[0]), int(now[1])) != (lease.owner, lease.fence):
            became = f"{now[0]} holds it with fence {now[1]}"
        else:
            became = "it expired"
        raise LeaseLost(
            f"factory {lease.factory}: the lease of {lease.owner} (fence {lease.fence}) is "
            f"lost ({became}): nothing written"
        )

    # -- daemons sharing the factories ---------------------------------------------------

    async def heartbeat(self, owner: str) -> None:
        """Say ``owner`` is alive (by the database's clock)."""
        clock, args = self._clock_cte()
        async with self._db.lease_transaction() as db:
            await db.execute(
                clock + "INSERT INTO daemons (owner, started_at, seen_at) "
                "VALUES (?, (SELECT ts FROM clock), (SELECT ts FROM clock)) "
                "ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at",
                (*args, owner),
            )

    async def live_owners(self, within: float) -> list[str]:
        """The daemons whose last heartbeat is at most ``within`` seconds old, sorted."""
        clock, args = self._clock_cte()
        rows = await self._fetchall(
            clock + "SELECT owner FROM daemons WHERE seen_at >= (SELECT ts FROM clock) - ? "
            "ORDER BY owner",
            (*args, within),
        )
        return [str(r[0]) for r in rows]

    async def leave(self, owner: str) -> None:
        """A daemon stopping: its heartbeat goes and its leases expire at once, so that the
        others take its factories at their next claim instead of after the TTL."""
        async with self._db.lease_transaction() as db:
            await db.execute("UPDATE leases SET expires_at = 0 WHERE owner = ?", (owner,))
            await db.execute("DELETE FROM daemons WHERE owner = ?", (owner,))

    # -- wake-ups ------------------------------------------------------------------------

    async def notify(self, factory: str) -> None:
        """Wake the daemon that owns ``factory`` (call it once a delivery is persisted).

        PostgreSQL: a ``NOTIFY`` every daemon on the database hears; SQLite: this
        process's :meth:`wakeups` only (one daemon per file).
        """
        await self._db.notify(factory)

    def wakeups(self) -> Wakeups:
        """The factories :meth:`notify` names, as they come::

            async with store.wakeups() as wakeups:
                ...  # look at the inbox once: nothing notified from here on is missed
                async for factory in wakeups:
                    ...

        A wake-up may be spurious (after a lost connection to PostgreSQL is opened
        again, every factory with waiting events is named, since a notification may have
        been missed meanwhile), never lost while the block runs. Repeated names not yet
        taken are given once.
        """
        return self._db.wakeups(self._pending_factories)

    async def _pending_factories(self) -> list[str]:
        rows = await self._fetchall(
            "SELECT DISTINCT factory FROM inbox WHERE processed_at IS NULL ORDER BY factory"
        )
        return [str(r[0]) for r in rows]

    async def adopt_link(self, link: LinkedOrder, history: Sequence[TransitionRecord]) -> int:
        """Take over ``link`` (from another database: a shadow run's) with its transition
        history, as it stands; returns its id here. Its inbox events stay behind: the next
        look at each service sees the order afresh.

        :raises StoreConflict: the PO or its SO is already linked here.
        """
        async with self._transaction() as db:
            taken = await db.fetchone(
                "SELECT po_number FROM links WHERE factory = ? AND (po_id = ? OR so_id = ?)",
                (self.factory, link.po_id, link.so_id),
            )
            if taken is not None:
                raise StoreConflict(f"PO {link.po_number} or its SO is already linked here")
            row = await db.fetchone(
                "INSERT INTO links (factory, po_id, po_number, state, resume_state, reason, "
                "so_id, so_number, currency, snapshot, lines, notes, last_error, created_at, "
                "updated_at, state_since) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    self.factory,
                    link.po_id,
                    link.po_number,
                    link.state,
                    link.resume_state,
                    link.reason,
                    link.so_id,
                    link.so_number,
                    link.currency,
                    None if link.snapshot is None else _encode(link.snapshot),
                    _encode(link.lines),
                    _encode(link.notes),
                    link.last_error,
                    _epoch(link.created_at),
                    _epoch(link.updated_at),
                    _epoch(link.state_since),
                ),
            )
            assert row is not None
            link_id = int(row[0])
            for step in history:
                await db.execute(
                    "INSERT INTO transitions (link_id, from_state, to_state, trigger, cause, "
                    "event_id, at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
                    (link_id, step.from_state, step.to_state, step.trigger, step.cause, step.at),
                )
        return link_id

    # -- a shadow run's plan -------------------------------------------------------------

    async def record_plan(
        self, link_id: int, po_number: str, effect: str, requests: Sequence[_Request]
    ) -> None:
        """Record every write ``effect`` would have sent for the order, in order (replacing
        what it would have sent before: the effect ran again)."""
        now = self._now()

        def text(value: Any) -> str | None:
            return None if value is None else msgspec.json.encode(value).decode()

        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM plans WHERE factory = ? AND link_id = ? AND effect = ?",
                (self.factory, link_id, effect),
            )
            for seq, request in enumerate(requests):
                await db.execute(
                    "INSERT INTO plans (factory, link_id, effect, seq, po_number, service, "
                    "method, endpoint, path, body, answer, detail, planned_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.factory,
                        link_id,
                        effect,
                        seq,
                        po_number,
                        request.service,
                        request.method,
                        request.endpoint,
                        request.path,
                        text(request.body),
                        text(request.answer),
                        text(request.detail),
                        now,
                    ),
                )

    async def drop_plan(self, link_id: int, effect: str) -> None:
        """Forget what ``effect`` would have sent for the order: it ran without a write."""
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM plans WHERE factory = ? AND link_id = ? AND effect = ?",
                (self.factory, link_id, effect),
            )

    async def plans(self, po_number: str | None = None) -> list[PlannedWrite]:
        """The shadow run's plan, by order (oldest order first) and in the order of each
        effect's writes, of one PO or of all."""
        where, args = ("", ()) if po_number is None else (" AND po_number = ?", (po_number,))
        rows = await self._fetchall(
            "SELECT link_id, po_number, effect, seq, service, method, endpoint, path, body, "
            f"answer, detail, planned_at FROM plans WHERE factory = ?{where} "
            "ORDER BY link_id, planned_at, effect, seq",
            (self.factory, *args),
        )

        def value(text: str | None) -> Any:
            return None if text is None else msgspec.json.decode(text)

        return [
            PlannedWrite(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
                row[7],
                value(row[8]),
                value(row[9]),
                value(row[10]),
                row[11],
            )
            for row in rows
        ]

    # -- what the webhook consumer knows of Katana's production ---------------------------

    async def record_sales_order_look(
        self,
        so_id: int,
        looked: int,
        facts: bytes,
        *,
        status: str,
        waiting: bool,
        mo_ids: Sequence[int],
    ) -> None:
        """Keep what a look at SO ``so_id`` saw and place the MOs its rows link on it. A
        look that began before the one kept (``looked`` lower) changes nothing; an MO's
        status heard after ``looked`` survives its placement, one heard before does not."""
        async with self._transaction() as db:
            row = await db.fetchone(
                "SELECT looked FROM so_evidence WHERE factory = ? AND so_id = ?",
                (self.factory, so_id),
            )
            if row is not None and int(row[0]) > looked:
                return
            await db.execute(
                "INSERT INTO so_evidence (factory, so_id, looked, facts, waiting, status, "
                "heard, edited) VALUES (?, ?, ?, ?, ?, ?, ?, NULL) "
                "ON CONFLICT (factory, so_id) DO UPDATE SET looked = excluded.looked, "
                "facts = excluded.facts, waiting = excluded.waiting, status = excluded.status, "
                "heard = excluded.heard, edited = NULL",
                (self.factory, so_id, looked, facts.decode(), int(waiting), status, looked),
            )
            for mo_id in mo_ids:
                await self._place(db, mo_id, so_id, looked)

    async def place_manufacturing_order(self, mo_id: int, so_id: int | None, placed: int) -> None:
        """Place MO ``mo_id`` on SO ``so_id`` (``None``: made for no SO) as of ``placed``."""
        async with self._transaction() as db:
            await self._place(db, mo_id, so_id, placed)

    async def _place(self, db: Queries, mo_id: int, so_id: int | None, placed: int) -> None:
        await db.execute(
            "INSERT INTO mo_placements (factory, mo_id, so_id, placed, status, heard) "
            "VALUES (?, ?, ?, ?, NULL, NULL) ON CONFLICT (factory, mo_id) DO UPDATE SET "
            "status = CASE WHEN mo_placements.so_id = excluded.so_id "
            "AND mo_placements.heard > excluded.placed THEN mo_placements.status END, "
            "heard = CASE WHEN mo_placements.so_id = excluded.so_id "
            "AND mo_placements.heard > excluded.placed THEN mo_placements.heard END, "
            "so_id = excluded.so_id, placed = excluded.placed",
            (self.factory, mo_id, so_id, placed),
        )

    async def placement(self, mo_id: int) -> Placement | None:
        """Where a look placed MO ``mo_id``, or ``None`` if none has."""
        row = await self._fetchone(
            "SELECT mo_id, so_id, placed, status, heard FROM mo_placements "
            "WHERE factory = ? AND mo_id = ?",
            (self.factory, mo_id),
        )
        return None if row is None else Placement(*row)

    async def hear_manufacturing_order(self, mo_id: int, status: str, event_id: int) -> None:
        """A placed MO's signed delivery ``event_id`` says ``status``: kept unless a later
        delivery was heard already."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE mo_placements SET status = ?, heard = ? WHERE factory = ? AND mo_id = ? "
                "AND (heard IS NULL OR heard < ?)",
                (status, event_id, self.factory, mo_id, event_id),
            )

    async def hear_sales_order(
        self, so_id: int, event_id: int, *, status: str | None, edit: bool
    ) -> None:
        """An SO's signed delivery ``event_id``: its ``status`` (kept unless a later one was
        heard), and with ``edit`` a change the last look may not have seen (its rows)."""
        async with self._transaction() as db:
            if status is not None:
                await db.execute(
                    "UPDATE so_evidence SET status = ?, heard = ? WHERE factory = ? "
                    "AND so_id = ? AND (heard IS NULL OR heard < ?)",
                    (status, event_id, self.factory, so_id, event_id),
                )
            if edit:
                await db.execute(
                    "UPDATE so_evidence SET edited = ? WHERE factory = ? AND so_id = ? "
                    "AND looked < ? AND (edited IS NULL OR edited < ?)",
                    (event_id, self.factory, so_id, event_id, event_id),
                )

    async def sales_order_evidence(self, so_id: int) -> SalesOrderEvidence | None:
        """What the last look at SO ``so_id`` saw and what was heard since, or ``None``."""
        row = await self._fetchone(
            "SELECT so_id, looked, facts, waiting, status, heard, edited FROM so_evidence "
            "WHERE factory = ? AND so_id = ?",
            (self.factory, so_id),
        )
        if row is None:
            return None
        placed = await self._fetchall(
            "SELECT mo_id, so_id, placed, status, heard FROM mo_placements "
            "WHERE factory = ? AND so_id = ? ORDER BY mo_id",
            (self.factory, so_id),
        )
        return SalesOrderEvidence(
            so_id=int(row[0]),
            looked=int(row[1]),
            facts=str(row[2]).encode(),
            waiting=bool(row[3]),
            status=row[4],
            heard=row[5],
            edited=row[6],
            placements=tuple(Placement(*p) for p in placed),
        )

    async def sales_orders_waiting(self, so_ids: Sequence[int]) -> set[int]:
        """Those of ``so_ids`` that may still gain an MO: no look kept, a live row with no
        MO, or a change since the look."""
        if not so_ids:
            return set()
        marks = ", ".join("?" * len(so_ids))
        rows = await self._fetchall(
            f"SELECT so_id FROM so_evidence WHERE factory = ? AND so_id IN ({marks}) "
            "AND waiting = 0 AND edited IS NULL",
            (self.factory, *so_ids),
        )
        settled = {int(r[0]) for r in rows}
        return {so_id for so_id in so_ids if so_id not in settled}

    # -- the variant cache (SKU ↔ variant id, per service) -------------------------------

    async def cached_skus(
        self, service: str, variant_ids: Sequence[int], *, since: float
    ) -> dict[int, str]:
        """The SKUs ``service`` last gave for ``variant_ids`` (seen at or after ``since``),
        by variant id; ids not cached, or older, are left out."""
        if not variant_ids:
            return {}
        marks = ", ".join("?" * len(variant_ids))
        rows = await self._fetchall(
            "SELECT variant_id, sku FROM variants WHERE factory = ? AND service = ? "
            f"AND seen_at >= ? AND variant_id IN ({marks})",
            (self.factory, service, since, *variant_ids),
        )
        return {int(row[0]): str(row[1]) for row in rows}

    async def cached_variant_ids(
        self, service: str, skus: Sequence[str], *, since: float
    ) -> dict[str, int]:
        """The variant ids ``service`` last gave for ``skus`` (seen at or after ``since``),
        by SKU; SKUs not cached, or older, are left out."""
        if not skus:
            return {}
        marks = ", ".join("?" * len(skus))
        rows = await self._fetchall(
            "SELECT sku, variant_id FROM variants WHERE factory = ? AND service = ? "
            f"AND seen_at >= ? AND sku IN ({marks})",
            (self.factory, service, since, *skus),
        )
        return {str(row[0]): int(row[1]) for row in rows}

    async def remember_variants(self, service: str, skus: Mapping[int, str]) -> None:
        """Note what ``service`` calls its variants now (``skus``: variant id → SKU). An id
        or a SKU noted before is replaced: one SKU names one variant per service."""
        if not skus:
            return
        now = self._now()
        async with self._transaction() as db:
            for variant_id, sku in skus.items():
                await db.execute(
                    "DELETE FROM variants WHERE factory = ? AND service = ? AND sku = ? "
                    "AND variant_id <> ?",
                    (self.factory, service, sku, variant_id),
                )
                await db.execute(
                    "INSERT INTO variants (factory, service, variant_id, sku, seen_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (factory, service, variant_id) DO "
                    "UPDATE SET sku = excluded.sku, seen_at = excluded.seen_at",
                    (self.factory, service, variant_id, sku, now),
                )

    async def forget_variants(
        self,
        service: str,
        *,
        variant_ids: Sequence[int] = (),
        skus: Sequence[str] = (),
        every: bool = False,
    ) -> None:
        """Drop the cached entries of ``service`` for these variant ids and SKUs (or
        ``every`` one): the service refused one, or said it changed."""
        async with self._transaction() as db:
            if every:
                await db.execute(
                    "DELETE FROM variants WHERE factory = ? AND service = ?",
                    (self.factory, service),
                )
            if variant_ids:
                marks = ", ".join("?" * len(variant_ids))
                await db.execute(
                    "DELETE FROM variants WHERE factory = ? AND service = ? "
                    f"AND variant_id IN ({marks})",
                    (self.factory, service, *variant_ids),
                )
            if skus:
                marks = ", ".join("?" * len(skus))
                await db.execute(
                    f"DELETE FROM variants WHERE factory = ? AND service = ? AND sku IN ({marks})",
                    (self.factory, service, *skus),
                )
