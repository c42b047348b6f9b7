"""The store of linked orders, their transitions, the inbox and the pollers' cursors.

Each method is written once, in the SQL SQLite and PostgreSQL share (see
:mod:`syncd.store._backend`): a file (:mod:`syncd.store._sqlite`) is the embedded
default; a ``postgresql://`` URL selects :mod:`syncd.store._postgres`. A transition, the
link's new state and the inbox event that caused it are written in one transaction: either
all of it happened or none did.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

from syncd.domain.orders import LineLink, LinkedOrder, PurchaseOrderSnapshot
from syncd.domain.statechart import Decision
from syncd.errors import StoreConflict, StoreError
from syncd.store._backend import Backend, Queries, Row, is_postgres_url
from syncd.store._schema import MIGRATIONS
from syncd.store._sqlite import SQLiteBackend

__all__ = [
    "OBSERVATIONS_KEPT",
    "ImportOutcome",
    "ImportResult",
    "InboxEvent",
    "PurchaseOrderObservation",
    "Store",
    "TransitionRecord",
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


class Store:
    """The daemon's memory. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, db: Backend, path: str, *, clock: Any = time.time) -> None:
        self._db = db
        self.path = path
        self._clock = clock

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

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._db.dialect

    async def close(self) -> None:
        await self._db.close()

    def _transaction(self) -> AbstractAsyncContextManager[Queries]:
        return self._db.transaction()

    async def schema_version(self) -> int:
        """How many migrations the database has had (0: none, a new database)."""
        return await self._db.check_version()

    async def integrity_check(self) -> list[str]:
        """The database's own check (SQLite's ``integrity_check``; on PostgreSQL, that
        the schema is whole); an empty list means it is sound."""
        return await self._db.integrity_check()

    # -- meta and cursors ----------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self._db.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with ``prefix`` (without it) and its value."""
        rows = await self._db.fetchall(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        )
        return {str(r[0])[len(prefix) :]: str(r[1]) for r in rows}

    async def delete_meta(self, key: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM meta WHERE key = ?", (key,))

    async def setdefault_meta(self, key: str, value: str) -> str:
        """Set ``key`` unless it is set; return the value in force."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value)
            )
        stored = await self.get_meta(key)
        assert stored is not None
        return stored

    async def get_cursor(self, name: str) -> str | None:
        row = await self._db.fetchone("SELECT value FROM cursors WHERE name = ?", (name,))
        return None if row is None else str(row[0])

    async def set_cursor(self, name: str, value: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO cursors (name, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (name, value, self._clock()),
            )

    async def cursors(self) -> dict[str, tuple[str, float]]:
        rows = await self._db.fetchall("SELECT name, value, updated_at FROM cursors")
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
        """Persist an event; ``None`` when its ``dedup_key`` was seen before."""
        async with self._transaction() as db:
            row = await db.fetchone(
                "INSERT INTO inbox "
                "(source, kind, dedup_key, po_id, so_id, link_id, payload, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (source, kind, dedup_key, po_id, so_id, link_id, payload, self._clock()),
            )
        return None if row is None else int(row[0])

    async def pending_events(
        self,
        limit: int = 200,
        *,
        kinds: Sequence[str] | None = None,
        exclude_kinds: Sequence[str] = (),
    ) -> list[InboxEvent]:
        """Unprocessed events, oldest first; only of ``kinds`` when given, none of
        ``exclude_kinds``."""
        where = "processed_at IS NULL"
        args: list[Any] = []
        if kinds is not None:
            where += f" AND kind IN ({', '.join('?' * len(kinds)) or 'NULL'})"
            args += kinds
        if exclude_kinds:
            where += f" AND kind NOT IN ({', '.join('?' * len(exclude_kinds))})"
            args += exclude_kinds
        rows = await self._db.fetchall(
            "SELECT id, source, kind, payload, po_id, so_id, link_id, received_at FROM inbox "
            f"WHERE {where} ORDER BY id LIMIT ?",
            (*args, limit),
        )
        return [InboxEvent(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    async def has_pending_event(self, link_id: int, kind: str) -> bool:
        """Whether an event of ``kind`` for the link waits unprocessed in the inbox."""
        row = await self._db.fetchone(
            "SELECT 1 FROM inbox WHERE link_id = ? AND kind = ? AND processed_at IS NULL LIMIT 1",
            (link_id, kind),
        )
        return row is not None

    async def events_for_link(self, link_id: int) -> list[InboxEvent]:
        rows = await self._db.fetchall(
            "SELECT id, source, kind, payload, po_id, so_id, link_id, received_at FROM inbox "
            "WHERE link_id = ? ORDER BY id",
            (link_id,),
        )
        return [InboxEvent(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    async def mark_processed(self, event_id: int, outcome: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE inbox SET processed_at = ?, outcome = ? WHERE id = ?",
                (self._clock(), outcome, event_id),
            )

    async def event_outcome(self, event_id: int) -> tuple[float | None, str | None] | None:
        """When an inbox event was processed and with what outcome; ``None`` if no such
        event."""
        row = await self._db.fetchone(
            "SELECT processed_at, outcome FROM inbox WHERE id = ?", (event_id,)
        )
        return None if row is None else (row[0], row[1])

    async def inbox_backlog(self) -> tuple[int, float | None]:
        """How many events wait, and when the oldest arrived."""
        row = await self._db.fetchone(
            "SELECT count(*), min(received_at) FROM inbox WHERE processed_at IS NULL"
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
        now = self._clock()
        async with self._transaction() as db:
            row = await db.fetchone(
                "INSERT INTO links (po_id, po_number, state, snapshot, created_at, "
                "updated_at, state_since) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (snapshot.po_id, snapshot.po_number, state, _encode(snapshot), now, now, now),
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
                    "(SELECT id FROM links WHERE po_id = ?) WHERE id = ?",
                    (now, "linked" if created else "duplicate", snapshot.po_id, event_id),
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
        now = self._clock()
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
                f"UPDATE links SET {', '.join(sets)} WHERE id = ? AND state = ?",
                (*values, link.id, decision.source),
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
                    "UPDATE inbox SET processed_at = ?, outcome = ?, link_id = ? WHERE id = ?",
                    (now, f"{decision.source}->{decision.dest}", link.id, event_id),
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
        values: list[Any] = [self._clock()]
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
            await db.execute(f"UPDATE links SET {', '.join(sets)} WHERE id = ?", (*values, link_id))

    async def _one(self, where: str, args: Sequence[Any]) -> LinkedOrder | None:
        row = await self._db.fetchone(f"SELECT {_LINK_COLUMNS} FROM links WHERE {where}", args)
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
        sql = f"SELECT {_LINK_COLUMNS} FROM links WHERE state IN ({marks})"
        args: list[Any] = list(states)
        if older_than is not None:
            sql += " AND state_since <= ?"
            args.append(self._clock() - older_than)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = await self._db.fetchall(sql, args)
        return [_link(r) for r in rows]

    async def all_links(self, *, limit: int = 1000) -> list[LinkedOrder]:
        rows = await self._db.fetchall(
            f"SELECT {_LINK_COLUMNS} FROM links ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [_link(r) for r in rows]

    async def so_ids_in_states(self, states: Sequence[str]) -> dict[int, int]:
        """Katana SO id → link id, for links in ``states`` that have an SO."""
        if not states:
            return {}
        marks = ", ".join("?" for _ in states)
        rows = await self._db.fetchall(
            f"SELECT so_id, id FROM links WHERE so_id IS NOT NULL AND state IN ({marks})",
            list(states),
        )
        return {int(r[0]): int(r[1]) for r in rows}

    async def linked_po_ids(self, po_ids: Sequence[int]) -> set[int]:
        if not po_ids:
            return set()
        marks = ", ".join("?" for _ in po_ids)
        rows = await self._db.fetchall(
            f"SELECT po_id FROM links WHERE po_id IN ({marks})", list(po_ids)
        )
        return {int(r[0]) for r in rows}

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT state, count(*) FROM links GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}

    async def oldest_by_state(self) -> dict[str, tuple[str, float]]:
        """State → (PO number, since) of the order that has waited there longest."""
        rows = await self._db.fetchall(
            "SELECT l.state, l.po_number, l.state_since FROM links l JOIN ("
            "SELECT state, min(state_since) AS since FROM links GROUP BY state) o "
            "ON l.state = o.state AND l.state_since = o.since"
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
        now = self._clock()
        created = po_created_at.timestamp() if po_created_at is not None else None
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO po_observations (po_id, po_number, supplier, status, reason, "
                "po_created_at, first_seen_at, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (po_id) DO UPDATE SET po_number = excluded.po_number, "
                "supplier = coalesce(excluded.supplier, po_observations.supplier), "
                "status = excluded.status, "
                "reason = excluded.reason, po_created_at = excluded.po_created_at, "
                "seen_at = excluded.seen_at",
                (po_id, po_number, supplier, status, reason, created, now, now),
            )
            # Everything from the first row past the bound down, in (seen_at, po_id) order:
            # no row when under the bound (the comparison with NULL is never true). A row
            # value rather than SQLite's ``LIMIT -1 OFFSET``, which PostgreSQL has not.
            await db.execute(
                "DELETE FROM po_observations WHERE (seen_at, po_id) <= (SELECT seen_at, po_id "
                "FROM po_observations ORDER BY seen_at DESC, po_id DESC LIMIT 1 OFFSET ?)",
                (OBSERVATIONS_KEPT,),
            )

    async def purchase_order_observation(self, po_number: str) -> PurchaseOrderObservation | None:
        """The PO called ``po_number`` as last seen unlinked (the latest seen, if several)."""
        row = await self._read_one(
            "SELECT po_id, po_number, supplier, status, reason, po_created_at, first_seen_at, "
            "seen_at FROM po_observations WHERE po_number = ? ORDER BY seen_at DESC LIMIT 1",
            (po_number,),
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
        now = self._clock()
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO import_outcomes (event_id, po_number, result, detail, po_id, "
                "decided_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO UPDATE SET "
                "po_number = excluded.po_number, result = excluded.result, "
                "detail = excluded.detail, po_id = excluded.po_id, "
                "decided_at = excluded.decided_at",
                (event_id, po_number, result.value, detail, po_id, now),
            )
            await db.execute(
                "UPDATE inbox SET processed_at = ?, outcome = ? WHERE id = ?",
                (now, detail, event_id),
            )

    async def import_outcome(self, event_id: int) -> ImportOutcome | None:
        return await self._import_outcome("event_id = ?", (event_id,))

    async def last_import_outcome(self, po_number: str) -> ImportOutcome | None:
        return await self._import_outcome(
            "po_number = ? ORDER BY event_id DESC LIMIT 1", (po_number,)
        )

    async def _import_outcome(self, where: str, args: Sequence[Any]) -> ImportOutcome | None:
        row = await self._read_one(
            "SELECT event_id, po_number, result, detail, po_id, decided_at FROM import_outcomes "
            f"WHERE {where}",
            args,
        )
        if row is None:
            return None
        return ImportOutcome(row[0], row[1], ImportResult(row[2]), row[3], row[4], row[5])

    async def _read_one(self, sql: str, args: Sequence[Any]) -> Row | None:
        """One row of a table a read-only opener may not have yet (a database the daemon has
        not migrated): a clear error instead of the database's."""
        try:
            return await self._db.fetchone(sql, args)
        except StoreError as exc:
            if await self._db.check_version() >= len(MIGRATIONS):
                raise
            raise StoreError(f"{exc} (restart syncd to upgrade the database)") from None

    # -- transitions ---------------------------------------------------------------------

    async def history(self, link_id: int) -> list[TransitionRecord]:
        rows = await self._db.fetchall(
            "SELECT id, link_id, from_state, to_state, trigger, cause, at FROM transitions "
            "WHERE link_id = ? ORDER BY id",
            (link_id,),
        )
        return [TransitionRecord(*r) for r in rows]

    async def recent_transitions(self, limit: int = 50) -> list[TransitionRecord]:
        rows = await self._db.fetchall(
            "SELECT t.id, t.link_id, t.from_state, t.to_state, t.trigger, t.cause, t.at, "
            "l.po_number FROM transitions t JOIN links l ON l.id = t.link_id "
            "ORDER BY t.id DESC LIMIT ?",
            (limit,),
        )
        return [TransitionRecord(*r) for r in rows]

    # -- status page reads ---------------------------------------------------------------

    async def timeline(self, link_id: int) -> list[tuple[TransitionRecord, str | None, str | None]]:
        """An order's transitions, oldest first, each with the ``(source, kind)`` of the inbox
        event that caused it (``None`` for a transition no event caused)."""
        rows = await self._db.fetchall(
            "SELECT t.id, t.link_id, t.from_state, t.to_state, t.trigger, t.cause, t.at, "
            "i.source, i.kind FROM transitions t LEFT JOIN inbox i ON i.id = t.event_id "
            "WHERE t.link_id = ? ORDER BY t.id",
            (link_id,),
        )
        return [(TransitionRecord(*r[:7]), r[7], r[8]) for r in rows]

    async def last_event_by_source(self, kind: str) -> dict[str, float]:
        """Source → when the newest inbox event of ``kind`` from it arrived (e.g. the last
        webhook each service delivered)."""
        rows = await self._db.fetchall(
            "SELECT source, max(received_at) FROM inbox WHERE kind = ? GROUP BY source", (kind,)
        )
        return {str(r[0]): float(r[1]) for r in rows}
