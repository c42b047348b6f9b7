"""The store, against both backends: SQLite files in ``tmp_path``, and databases on a real
PostgreSQL server the session starts (``pg_server``). Every test taking ``database`` runs
on each; the tests of one backend's own parts say so in their names."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import msgspec
import psycopg
import pytest

from pg_server import (  # noqa: F401 - fixtures, for pytest to find
    PostgresServer,
    database_fixture,
    pg_server_fixture,
)
from syncd.domain.orders import LinkedOrder, PurchaseOrderLine, PurchaseOrderSnapshot
from syncd.domain.statechart import Decision, load_statechart
from syncd.errors import (
    LeaseLost,
    StoreConflict,
    StoreError,
    StoreInUse,
    StoreUnavailable,
    is_transient,
)
from syncd.store import ImportResult, Lease, Store
from syncd.store._backend import Row, Statement, redact
from syncd.store._postgres import _transient
from syncd.store._schema import MIGRATIONS
from syncd.store._schema_postgres import POSTGRES_MIGRATIONS, VERSION_TABLE
from syncd.store._store import OBSERVATIONS_KEPT, PENDING_SUMMARY_AGE

pytestmark = pytest.mark.anyio
T = TypeVar("T")

CHART = load_statechart()
WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def is_pg(database: str) -> bool:
    return database.startswith("postgresql://")


def raw(database: str, sql: str) -> list[tuple[Any, ...]]:
    """One statement outside the store, committed."""
    if is_pg(database):
        with psycopg.connect(database, autocommit=True) as pg:
            cursor = pg.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []
    with closing(sqlite3.connect(database)) as con:
        rows = con.execute(sql).fetchall()
        con.commit()
        return rows


def raw_many(database: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """One statement for each of ``rows``, outside the store, committed together."""
    if is_pg(database):
        with psycopg.connect(database) as pg, pg.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s").encode(), rows)
        return
    with closing(sqlite3.connect(database)) as con:
        con.executemany(sql, rows)
        con.commit()


def schema_version(database: str) -> int:
    sql = f"SELECT version FROM {VERSION_TABLE}" if is_pg(database) else "PRAGMA user_version"
    return int(raw(database, sql)[0][0])


#: SQLite's declared types as PostgreSQL names their translations.
_SQLITE_TYPES = {"INTEGER": "bigint", "TEXT": "text", "BLOB": "bytea", "REAL": "double precision"}


def schema(database: str) -> dict[str, Any]:
    """Tables → columns → (type, nullable), and the index names, in one vocabulary."""
    tables: dict[str, dict[str, tuple[str, bool]]] = {}
    if is_pg(database):
        for table, column, kind, nullable in raw(
            database,
            "SELECT table_name, column_name, data_type, is_nullable FROM "
            f"information_schema.columns WHERE table_schema = current_schema() "
            f"AND table_name <> '{VERSION_TABLE}'",
        ):
            tables.setdefault(table, {})[column] = (kind, nullable == "YES")
        indexes = {
            r[0]
            for r in raw(
                database,
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                "AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'",
            )
        }
    else:
        for (table,) in raw(database, "SELECT name FROM sqlite_master WHERE type = 'table'"):
            for _, column, kind, notnull, _, pk in raw(database, f"PRAGMA table_info({table})"):
                # A primary key is never NULL in PostgreSQL; SQLite's TEXT ones are by
                # accident only.
                tables.setdefault(table, {})[column] = (
                    _SQLITE_TYPES[kind],
                    not (notnull or pk),
                )
        indexes = {
            r[0]
            for r in raw(
                database,
                "SELECT name FROM sqlite_master WHERE type = 'index' "
                "AND name NOT LIKE 'sqlite_autoindex%'",
            )
        }
    return {"tables": tables, "indexes": indexes}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def opened(database: str | Path, clock: Clock | None = None) -> AsyncIterator[Store]:
    store = await Store.open(database)
    if clock is not None:
        store._clock = clock
    try:
        yield store
    finally:
        await store.close()


def snapshot(po_id: int, po_number: str | None = None) -> PurchaseOrderSnapshot:
    return PurchaseOrderSnapshot(
        po_id=po_id,
        po_number=po_number or f"PO{po_id:04d}",
        status="active",
        company_id=7,
        currency_id=3,
        created_at=WHEN,
        updated_at=WHEN,
        lines=(
            PurchaseOrderLine(
                line_id=po_id * 10, variant_id=5, quantity=Decimal("2"), price=Decimal("9.5")
            ),
        ),
    )


def decide(state: str, trigger: str, resume_state: str | None = None) -> Decision:
    decision = CHART.decide(state, trigger, resume_state=resume_state)
    assert decision is not None, (state, trigger)
    return decision


async def new_link(store: Store, po_id: int, po_number: str | None = None) -> LinkedOrder:
    link = await store.create_link(
        snapshot(po_id, po_number),
        state=CHART.initial,
        trigger="po_discovered",
        cause="seen",
        event_id=None,
    )
    assert link is not None
    return link


# -- opening --------------------------------------------------------------------------------


async def test_sqlite_migrations_set_user_version_and_wal(tmp_path: Path) -> None:
    db = str(tmp_path / "sub" / "syncd.db")
    async with opened(db):
        pass
    assert schema_version(db) == len(MIGRATIONS)
    assert raw(db, "PRAGMA journal_mode")[0][0] == "wal"
    assert {"meta", "links", "transitions", "inbox", "cursors", "po_observations"} <= set(
        schema(db)["tables"]
    )


def at_first_schema(database: str) -> None:
    """Make ``database`` what syncd's first release left: migration 1 only."""
    if is_pg(database):
        raw(database, POSTGRES_MIGRATIONS[0])
        raw(database, f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
        raw(database, f"INSERT INTO {VERSION_TABLE} (version) VALUES (1)")
    else:
        with closing(sqlite3.connect(database)) as con:
            con.executescript(MIGRATIONS[0])
            con.execute("PRAGMA user_version = 1")
            con.commit()


async def test_a_database_of_the_first_schema_is_migrated_in_place(database: str) -> None:
    at_first_schema(database)
    raw(database, "INSERT INTO meta (key, value) VALUES ('activated_at', 'then')")
    async with opened(database) as store:
        assert await store.get_meta("activated_at") == "then"
        assert await store.purchase_order_observation("PO1") is None
        assert await store.integrity_check() == []
    assert schema_version(database) == len(MIGRATIONS)


async def test_a_reader_of_an_unmigrated_database_gets_a_clear_error(database: str) -> None:
    at_first_schema(database)
    store = await Store.open(database, readonly=True)
    try:
        # The tables of a later migration are missing, and so are the old tables' factory
        # columns: every read says the same.
        with pytest.raises(StoreError, match="restart syncd to upgrade"):
            await store.last_import_outcome("PO1")
        with pytest.raises(StoreError, match="restart syncd to upgrade"):
            await store.get_meta("activated_at")
    finally:
        await store.close()


async def test_postgres_migrates_an_empty_database(pg_database: str) -> None:
    assert raw(pg_database, "SELECT to_regclass('links')") == [(None,)]
    async with opened(pg_database) as store:
        assert store.dialect == "postgresql"
        assert await store.integrity_check() == []
    assert schema_version(pg_database) == len(POSTGRES_MIGRATIONS)
    assert {"meta", "links", "transitions", "inbox", "cursors"} <= set(
        schema(pg_database)["tables"]
    )


async def test_both_backends_end_at_the_same_schema(tmp_path: Path, pg_database: str) -> None:
    assert len(POSTGRES_MIGRATIONS) == len(MIGRATIONS), "a migration without its translation"
    sqlite_db = str(tmp_path / "syncd.db")
    for db in (sqlite_db, pg_database):
        async with opened(db):
            pass
    ours, theirs = schema(sqlite_db), schema(pg_database)
    assert ours["tables"] == theirs["tables"]
    assert ours["indexes"] == theirs["indexes"]


async def test_two_daemons_migrating_one_postgres_database_at_once(pg_database: str) -> None:
    stores: list[Store] = []

    async def open_one() -> None:
        stores.append(await Store.open(pg_database))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(open_one)
    for store in stores:
        await store.close()
    assert len(stores) == 3
    assert schema_version(pg_database) == len(POSTGRES_MIGRATIONS)


async def test_reopening_is_idempotent_and_keeps_the_data(database: str) -> None:
    async with opened(database) as store:
        link = await new_link(store, 1)
        await store.set_cursor("tradegecko.po", "2024-05-01")
    before = schema(database)
    async with opened(database) as store:
        again = await store.get_link(link.id)
        assert again is not None and again.po_number == "PO0001"
        assert await store.get_cursor("tradegecko.po") == "2024-05-01"
        assert len(await store.history(link.id)) == 1
    assert schema_version(database) == len(MIGRATIONS)
    assert schema(database) == before


async def test_setdefault_meta_of_sets_only_what_is_unset_in_one_transaction(
    database: str,
) -> None:
    async with opened(database) as store:
        await store.for_factory("f1").set_meta("activated_at", "kept")
        rows = [(f"f{n}", key, f"{key}-{n}") for n in range(1200) for key in ("activated_at", "t")]
        # 2,399 rows: over one INSERT's worth, so the chunks are proven too.
        assert await store.setdefault_meta_of(rows) == 2399
        assert await store.for_factory("f1").get_meta("activated_at") == "kept"
        assert await store.for_factory("f1").get_meta("t") == "t-1"
        assert await store.for_factory("f1199").get_meta("activated_at") == "activated_at-1199"
        # A restart's call: every key set, so nothing is written (no write transaction).
        before = raw(database, "SELECT factory, key, value FROM meta ORDER BY factory, key")
        writes = 0
        real = store._transaction

        def counting() -> Any:
            nonlocal writes
            writes += 1
            return real()

        store._transaction = counting  # type: ignore[method-assign]
        assert await store.setdefault_meta_of([(f, k, "other") for f, k, _ in rows]) == 0
        assert writes == 0
        assert raw(database, "SELECT factory, key, value FROM meta ORDER BY factory, key") == before
        assert await store.setdefault_meta_of([]) == 0
        with pytest.raises(ValueError, match="not a factory name"):
            await store.setdefault_meta_of([("no such/name", "k", "v")])


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_newer_database_is_refused(database: str, readonly: bool) -> None:
    future = len(MIGRATIONS) + 1
    if is_pg(database):
        raw(database, f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
        raw(database, f"INSERT INTO {VERSION_TABLE} VALUES ({future})")
    else:
        raw(database, f"PRAGMA user_version = {future}")
    with pytest.raises(StoreError, match="newer than this syncd"):
        await Store.open(database, readonly=readonly)
    assert schema_version(database) == future  # left untouched
    assert "links" not in schema(database)["tables"]


async def test_sqlite_readonly_open_of_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="not found"):
        await Store.open(missing, readonly=True)
    assert not missing.exists()


async def test_postgres_readonly_open_of_an_empty_database_is_refused(pg_database: str) -> None:
    with pytest.raises(StoreError, match="has no syncd schema"):
        await Store.open(pg_database, readonly=True)
    assert schema(pg_database)["tables"] == {}


async def test_readonly_open_reads_an_existing_store(database: str) -> None:
    async with opened(database) as store:
        await new_link(store, 1)
    store = await Store.open(database, readonly=True)
    try:
        assert await store.counts_by_state() == {"discovered": 1}
        with pytest.raises(StoreError):
            await new_link(store, 2)
        assert await store.counts_by_state() == {"discovered": 1}
    finally:
        await store.close()


async def test_integrity_check_of_a_fresh_store_is_clean(database: str) -> None:
    async with opened(database) as store:
        assert await store.integrity_check() == []


# -- inbox ------------------------------------------------------------------------------------


def counting_commits(store: Store) -> list[int]:
    """The store's one-job transactions (its group commits) from now on, a statement
    count each."""
    commits: list[int] = []
    transact = store._db.transact

    async def counted(statements: Sequence[Statement]) -> list[list[Row]]:
        commits.append(len(statements))
        return await transact(statements)

    store._db.transact = counted  # type: ignore[method-assign]
    return commits


async def test_add_event_deduplicates_on_its_key(database: str) -> None:
    async with opened(database) as store:
        first = await store.add_event("poller", "so_observed", b"{}", dedup_key="so:9:t1")
        again = await store.add_event("webhook", "so_observed", b"{}", dedup_key="so:9:t1")
        other = await store.add_event("poller", "so_observed", b"{}", dedup_key="so:9:t2")
        keyless_a = await store.add_event("effect", "outcome", b"a")
        keyless_b = await store.add_event("effect", "outcome", b"a")
        assert isinstance(first, int)
        assert again is None
        assert len({first, other, keyless_a, keyless_b}) == 4
        pending = await store.pending_events()
        assert [e.id for e in pending] == [first, other, keyless_a, keyless_b]
        assert pending[0].source == "poller"


async def test_concurrent_events_share_a_commit_and_each_gets_its_own_row(
    database: str,
) -> None:
    """Group commit: events added while a commit runs go into the next one together; each
    caller gets the id of the row holding its own payload, a duplicate (of an earlier
    event, or of another in the same batch) gets None, and nothing is lost."""
    async with opened(database) as store:
        before = await store.add_event("webhook", "received", b"old", dedup_key="d:old")
        commits = counting_commits(store)
        results: dict[int, int | None] = {}

        def key(n: int) -> str:
            # Every 7th repeats the old delivery; n and n + 1 share a key when n % 10 == 0.
            return "d:old" if n % 7 == 0 else f"d:{n - n % 10 if n % 10 < 2 else n}"

        async def add(n: int) -> None:
            results[n] = await store.add_event(
                "webhook", "received", str(n).encode(), dedup_key=key(n)
            )

        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(add, n)
        assert len(commits) <= 3, f"{len(commits)} commits for 60 concurrent events: not grouped"

        rows = {e.id: e.payload for e in await store.pending_events(limit=500)}
        assert set(rows) == {before} | {i for i in results.values() if i is not None}
        for n, event_id in results.items():
            if event_id is not None:
                assert rows[event_id] == str(n).encode()
        # Each new key is stored once, and exactly one of its callers was told the row's id.
        new_keys = {key(n) for n in range(60)} - {"d:old"}
        assert len(rows) == 1 + len(new_keys)
        for k in new_keys:
            told = [n for n in range(60) if key(n) == k and results[n] is not None]
            assert len(told) == 1, (k, told)
        assert all(results[n] is None for n in range(60) if key(n) == "d:old")


async def test_callers_cancelled_while_waiting_for_a_group_commit_stall_no_one(
    database: str,
) -> None:
    """Callers cancelled while a commit runs write nothing and are answered nothing, the
    first in line (the one the turn to commit the next batch would go to) included: the
    callers behind them are still committed, together, and nobody is left waiting."""
    async with opened(database) as store:
        transact = store._db.transact
        held = anyio.Event()
        commits: list[int] = []

        async def slow(statements: Sequence[Statement]) -> list[list[Row]]:
            if not commits:
                await held.wait()
            commits.append(len(statements[0][1]) // 9)  # rows in the batch
            return await transact(statements)

        store._db.transact = slow  # type: ignore[method-assign]
        results: dict[int, int | None] = {}
        scopes: dict[int, anyio.CancelScope] = {}

        async def add(n: int) -> None:
            with anyio.CancelScope() as scope:
                scopes[n] = scope
                results[n] = await store.add_event(
                    "webhook", "received", str(n).encode(), dedup_key=f"k{n}"
                )

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(5):
                    tg.start_soon(add, n)
                    await anyio.wait_all_tasks_blocked()  # 0 commits; 1, 2, 3, 4 queue
                scopes[1].cancel()
                scopes[2].cancel()
                await anyio.wait_all_tasks_blocked()
                held.set()
            assert sorted(results) == [0, 3, 4]
            assert commits == [1, 2]  # caller 0 alone, then 3 and 4 together
            rows = {e.payload: e.id for e in await store.pending_events()}
            assert rows == {b"0": results[0], b"3": results[3], b"4": results[4]}
            assert await store.add_event("webhook", "received", b"5", dedup_key="k5") is not None


async def test_a_group_commit_is_one_job_on_the_sqlite_connections_thread(
    tmp_path: Path,
) -> None:
    """BEGIN IMMEDIATE, the INSERT and COMMIT of a batch go to aiosqlite's thread together:
    one hop per batch, not one per statement, fetch and cursor."""
    async with opened(tmp_path / "syncd.db") as store:
        connection = store._db._db  # type: ignore[attr-defined]
        execute = connection._execute
        jobs: list[str] = []

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            jobs.append(getattr(fn, "__name__", repr(fn)))
            return await execute(fn, *args, **kwargs)

        connection._execute = counted
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(
                    partial(store.add_event, dedup_key=f"k{n}"), "webhook", "received", b"x"
                )
        assert 1 <= len(jobs) <= 3, jobs
        assert set(jobs) == {"_transact_on_thread"}
        connection._execute = execute
        assert len(await store.pending_events()) == 20


async def test_a_writer_cancelled_at_any_step_leaves_no_transaction_open(
    database: str,
) -> None:
    """A factory stopped (its tasks cancelled) while the others write on: wherever its write
    was cut short, even with its BEGIN sent and not yet answered, the next write works."""
    async with opened(database) as store:
        for steps in range(12):

            async def write(n: int = steps) -> None:
                await store.set_meta(f"cut.{n}", "x")

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            await store.set_meta("after", str(steps))
            assert await store.get_meta("after") == str(steps)


async def test_a_refused_group_commit_fails_every_caller_in_it(database: str) -> None:
    async with opened(database) as store:
        transact = store._db.transact

        async def refusing(statements: Sequence[Statement]) -> list[list[Row]]:
            # The batch's INSERT runs, then the transaction is refused: all of it rolls back.
            return await transact([*statements, ("SELECT * FROM no_such_table", ())])

        store._db.transact = refusing  # type: ignore[method-assign]
        errors: list[BaseException] = []

        async def add(n: int) -> None:
            try:
                await store.add_event("webhook", "received", b"x", dedup_key=f"k{n}")
            except StoreError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(add, n)
        assert len(errors) == 10
        assert all("refused" in str(e) and "no_such_table" in str(e) for e in errors), errors
        store._db.transact = transact  # type: ignore[method-assign]
        assert await store.pending_events() == []


async def test_inbox_backlog_counts_and_dates_the_waiting_events(database: str) -> None:
    clock = Clock(100.0)
    async with opened(database, clock) as store:
        assert await store.inbox_backlog() == (0, None)
        first = await store.add_event("poller", "po_observed", b"{}")
        clock.now = 200.0
        await store.add_event("poller", "po_observed", b"{}")
        assert await store.inbox_backlog() == (2, 100.0)
        assert first is not None
        await store.mark_processed(first, "done")
        assert await store.inbox_backlog() == (1, 200.0)


# -- links ------------------------------------------------------------------------------------


async def test_create_link_is_once_per_po(database: str) -> None:
    async with opened(database) as store:
        first_event = await store.add_event("poller", "po_discovered", b"1", po_id=1)
        link = await store.create_link(
            snapshot(1),
            state="discovered",
            trigger="po_discovered",
            cause="seen",
            event_id=first_event,
        )
        assert link is not None
        assert (link.state, link.po_id, link.po_number) == ("discovered", 1, "PO0001")
        assert link.snapshot == snapshot(1)

        second_event = await store.add_event("webhook", "po_discovered", b"2", po_id=1)
        duplicate = await store.create_link(
            snapshot(1),
            state="discovered",
            trigger="po_discovered",
            cause="seen again",
            event_id=second_event,
        )
        assert duplicate is None
        assert await store.counts_by_state() == {"discovered": 1}
        history = await store.history(link.id)
        assert [(h.from_state, h.to_state, h.trigger) for h in history] == [
            (None, "discovered", "po_discovered")
        ]
        # Both events are settled and attached to the one link.
        assert await store.pending_events() == []
        assert [e.id for e in await store.events_for_link(link.id)] == [first_event, second_event]


async def test_apply_moves_logs_and_settles_the_event_together(database: str) -> None:
    clock = Clock(1_000.0)
    async with opened(database, clock) as store:
        link = await new_link(store, 1)
        event = await store.add_event("effect", "outcome", b"{}", link_id=link.id)
        clock.now = 1_500.0
        updated = await store.apply(
            link,
            decide("discovered", "so_created"),
            cause="SO made",
            event_id=event,
            so_id=77,
            so_number="TG-PO0001",
            currency="EUR",
            notes=["line 3 left out"],
        )
        assert updated.state == "imported"
        assert (updated.so_id, updated.so_number, updated.currency) == (77, "TG-PO0001", "EUR")
        assert updated.notes == ("line 3 left out",)
        assert updated.state_since == datetime.fromtimestamp(1_500.0, UTC)
        history = await store.history(link.id)
        assert [(h.from_state, h.to_state, h.trigger, h.cause) for h in history][-1] == (
            "discovered",
            "imported",
            "so_created",
            "SO made",
        )
        assert history[-1].at == 1_500.0
        assert await store.pending_events() == []
        assert await store.link_by_so(77) == updated


async def test_apply_refuses_a_link_that_moved_and_writes_nothing(database: str) -> None:
    async with opened(database) as store:
        stale = await new_link(store, 1)
        await store.apply(stale, decide("discovered", "so_created"), cause="SO made")
        event = await store.add_event("operator", "command", b"{}", link_id=stale.id)
        with pytest.raises(StoreConflict, match="no longer in discovered"):
            await store.apply(
                stale, decide("discovered", "cancel"), cause="operator", event_id=event
            )
        current = await store.get_link(stale.id)
        assert current is not None and current.state == "imported"
        assert [h.to_state for h in await store.history(stale.id)] == ["discovered", "imported"]
        assert [e.id for e in await store.pending_events()] == [event]


async def test_apply_records_attention_and_retry(database: str) -> None:
    async with opened(database) as store:
        link = await new_link(store, 1)
        await store.note(link.id, last_error="import_order: 502")
        noted = await store.get_link(link.id)
        assert noted is not None
        failed = await store.apply(
            noted, decide("discovered", "import_failed"), cause="no SKU", reason="no SKU"
        )
        assert (failed.state, failed.resume_state, failed.reason) == (
            "needs_attention",
            "discovered",
            "no SKU",
        )
        assert failed.last_error == "import_order: 502"  # kept while attention is needed
        back = await store.apply(
            failed,
            decide("needs_attention", "retry", resume_state=failed.resume_state),
            cause="operator retry",
        )
        assert (back.state, back.resume_state, back.reason, back.last_error) == (
            "discovered",
            None,
            None,
            None,
        )
        assert CHART.valid_path(
            [(h.from_state, h.to_state, h.trigger) for h in await store.history(link.id)]
        )


async def test_transitions_are_append_only(database: str) -> None:
    async with opened(database) as store:
        link = await new_link(store, 1)
    refused = (sqlite3.DatabaseError, psycopg.Error)
    with pytest.raises(refused, match="append-only"):
        raw(database, "UPDATE transitions SET cause = 'rewritten'")
    with pytest.raises(refused, match="append-only"):
        raw(database, "DELETE FROM transitions")
    if is_pg(database):
        with pytest.raises(refused, match="append-only"):
            raw(database, "TRUNCATE transitions")
    async with opened(database) as store:
        history = await store.history(link.id)
        assert [(h.to_state, h.cause) for h in history] == [("discovered", "seen")]


async def test_notes_deduplicate(database: str) -> None:
    async with opened(database) as store:
        link = await new_link(store, 1)
        await store.note(link.id, notes=["a", "b"])
        await store.note(link.id, notes=["b", "c"])
        noted = await store.get_link(link.id)
        assert noted is not None and noted.notes == ("a", "b", "c")
        moved = await store.apply(
            noted, decide("discovered", "so_created"), cause="SO made", notes=["c", "d"]
        )
        assert moved.notes == ("a", "b", "c", "d")


async def test_note_on_a_missing_link_is_refused(database: str) -> None:
    async with opened(database) as store:
        with pytest.raises(StoreError, match="no linked order with id 42"):
            await store.note(42, notes=["x"])


# -- questions --------------------------------------------------------------------------------


async def _three_links(store: Store, clock: Clock) -> list[LinkedOrder]:
    clock.now = 1_000.0
    a = await new_link(store, 1)
    clock.now = 2_000.0
    b = await new_link(store, 2)
    clock.now = 3_000.0
    c = await new_link(store, 3)
    clock.now = 3_500.0
    b = await store.apply(b, decide("discovered", "so_created"), cause="SO", so_id=202)
    clock.now = 4_000.0
    c = await store.apply(c, decide("discovered", "so_created"), cause="SO", so_id=303)
    return [a, b, c]


async def test_counts_and_oldest_by_state(database: str) -> None:
    clock = Clock()
    async with opened(database, clock) as store:
        assert await store.counts_by_state() == {}
        assert await store.oldest_by_state() == {}
        await _three_links(store, clock)
        assert await store.counts_by_state() == {"discovered": 1, "imported": 2}
        assert await store.oldest_by_state() == {
            "discovered": ("PO0001", 1_000.0),
            "imported": ("PO0002", 3_500.0),
        }


async def test_links_in_states(database: str) -> None:
    clock = Clock()
    async with opened(database, clock) as store:
        a, b, c = await _three_links(store, clock)
        clock.now = 5_000.0

        def ids(links: list[LinkedOrder]) -> list[int]:
            return [link.id for link in links]

        assert ids(await store.links_in_states(["imported"])) == [b.id, c.id]
        assert ids(await store.links_in_states(["imported", "discovered"])) == [a.id, b.id, c.id]
        # older_than counts from entering the state, not from creation.
        assert ids(await store.links_in_states(["imported"], older_than=1_200)) == [b.id]
        assert ids(await store.links_in_states(["imported"], older_than=1_000)) == [b.id, c.id]
        assert ids(await store.links_in_states(["imported"], older_than=2_000)) == []
        assert ids(await store.links_in_states(["imported"], limit=1)) == [b.id]
        assert await store.links_in_states([]) == []
        assert await store.links_in_states(["received"]) == []


async def test_so_ids_and_linked_po_ids(database: str) -> None:
    clock = Clock()
    async with opened(database, clock) as store:
        _, b, c = await _three_links(store, clock)
        assert await store.so_ids_in_states(["imported"]) == {202: b.id, 303: c.id}
        assert await store.so_ids_in_states(["discovered"]) == {}
        assert await store.so_ids_in_states([]) == {}
        assert await store.linked_po_ids([1, 3, 99]) == {1, 3}
        assert await store.linked_po_ids([99]) == set()
        assert await store.linked_po_ids([]) == set()


async def test_find_link_by_po_number_or_id(database: str) -> None:
    async with opened(database) as store:
        first = await new_link(store, 1, "PO0435")
        second = await new_link(store, 2, "PO0436")
        found = await store.find_link("PO0436")
        assert found is not None and found.id == second.id
        by_id = await store.find_link(str(first.id))
        assert by_id is not None and by_id.po_number == "PO0435"
        assert await store.find_link("PO9999") is None
        assert await store.find_link("999") is None


# -- PostgreSQL: several writers, errors ------------------------------------------------------


async def test_postgres_concurrent_writers_from_two_connections(pg_database: str) -> None:
    async with opened(pg_database) as one, opened(pg_database) as two:
        ids: list[int | None] = []

        async def add(store: Store, key: str) -> None:
            ids.append(await store.add_event("poller", "so_observed", b"{}", dedup_key=key))

        async with anyio.create_task_group() as tg:
            for n in range(20):
                for store in (one, two):
                    tg.start_soon(add, store, f"so:{n}")
        assert len([i for i in ids if i is not None]) == 20
        assert len(await one.pending_events()) == 20

        links: list[LinkedOrder | None] = []

        async def link(store: Store) -> None:
            links.append(
                await store.create_link(
                    snapshot(1),
                    state="discovered",
                    trigger="po_discovered",
                    cause="seen",
                    event_id=None,
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(link, one)
            tg.start_soon(link, two)
        created = [x for x in links if x is not None]
        assert len(created) == 1

        # Both decide from the same reading; the second to write is refused.
        outcomes: list[str] = []

        async def move(store: Store, trigger: str) -> None:
            try:
                await store.apply(created[0], decide("discovered", trigger), cause=trigger)
                outcomes.append(trigger)
            except StoreConflict as exc:
                assert not is_transient(exc)
                assert "no longer in discovered" in str(exc)
                outcomes.append("refused")

        async with anyio.create_task_group() as tg:
            tg.start_soon(move, one, "so_created")
            tg.start_soon(move, two, "cancel")
        assert outcomes.count("refused") == 1
        (winner,) = [o for o in outcomes if o != "refused"]
        history = await two.history(created[0].id)
        assert [h.trigger for h in history] == ["po_discovered", winner]
        assert CHART.valid_path([(h.from_state, h.to_state, h.trigger) for h in history])


async def test_postgres_a_lock_held_past_the_timeout_is_transient(pg_database: str) -> None:
    async with opened(pg_database) as store:
        await store.set_meta("k", "v")
    # The URL's own options win over syncd's 5 s, to keep the test short.
    url = pg_database + "?options=-c%20lock_timeout%3D200"
    async with opened(url) as store:
        with psycopg.connect(pg_database) as holder:
            holder.execute("SELECT * FROM meta WHERE key = 'k' FOR UPDATE")
            with pytest.raises(StoreError, match="lock timeout") as caught:
                await store.set_meta("k", "w")
            assert isinstance(caught.value, StoreUnavailable)
        await store.set_meta("k", "w")  # the lock gone, the write goes through
        assert await store.get_meta("k") == "w"


async def test_postgres_a_lost_connection_is_transient_and_reopened(
    pg_database: str, pg_server: PostgresServer
) -> None:
    async with opened(pg_database) as store:
        await store.set_meta("k", "v")
        with pg_server.admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'syncd' AND datname = %s",
                (pg_database.rsplit("/", 1)[1],),
            )
        with pytest.raises(StoreUnavailable):
            await store.get_meta("k")
        with pytest.raises(StoreUnavailable):
            await store.set_meta("k", "w")
        assert await store.get_meta("k") == "v"  # both connections opened again
        await store.set_meta("k", "w")
        assert await store.get_meta("k") == "w"


def test_postgres_transient_errors_are_those_of_the_moment() -> None:
    errors = psycopg.errors
    for passing in (
        errors.SerializationFailure("could not serialize access"),
        errors.DeadlockDetected("deadlock detected"),
        errors.LockNotAvailable("canceling statement due to lock timeout"),
        errors.AdminShutdown("terminating connection due to administrator command"),
        errors.DiskFull("could not extend file"),
        psycopg.OperationalError("connection failed: Connection refused"),
        psycopg.InterfaceError("the connection is closed"),
    ):
        assert _transient(passing), passing
    for lasting in (
        errors.UniqueViolation("duplicate key"),
        errors.UndefinedTable("relation does not exist"),
        errors.RaiseException("transitions are append-only"),
        errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only transaction"),
    ):
        assert not _transient(lasting), lasting


async def test_postgres_unreachable_server_is_named(pg_server: PostgresServer) -> None:
    with socket_closed() as port:
        url = f"postgresql://syncd:secret@127.0.0.1:{port}/syncd?connect_timeout=5"
        with pytest.raises(StoreError, match="cannot connect to database") as caught:
            await Store.open(url)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "refused" in message
    assert "secret" not in message


async def test_postgres_refused_password_and_missing_database(pg_server: PostgresServer) -> None:
    with pytest.raises(StoreError, match="password authentication failed") as caught:
        await Store.open(pg_server.url(password="wrong-password"))
    assert "wrong-password" not in str(caught.value)
    with pytest.raises(StoreError, match='database "nowhere" does not exist'):
        await Store.open(pg_server.url("nowhere"))
    with pytest.raises(StoreError, match="bad database URL"):
        await Store.open(pg_server.url() + "?no_such_option=1")


def test_redact_hides_passwords() -> None:
    assert redact("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact("postgresql://h/d?password=pw&sslmode=require") == (
        "postgresql://h/d?password=***&sslmode=require"
    )
    assert redact("postgresql://u@h/d") == "postgresql://u@h/d"


async def test_postgres_integrity_check_finds_a_missing_trigger(pg_database: str) -> None:
    async with opened(pg_database) as store:
        raw(pg_database, "DROP TRIGGER transitions_no_delete ON transitions")
        assert await store.integrity_check() == ["trigger transitions_no_delete is missing"]


class socket_closed:
    """A loopback port nothing listens on, while the block runs."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# -- SQLite: one daemon per file --------------------------------------------------------------

_SECOND_DAEMON = textwrap.dedent(
    """
    import sys, anyio
    from syncd.errors import StoreInUse
    from syncd.store import Store

    async def main():
        try:
            store = await Store.open(sys.argv[1], exclusive=sys.argv[2] == "exclusive",
                                     readonly=sys.argv[2] == "readonly")
        except StoreInUse as exc:
            print(exc)
            sys.exit(3)
        print(await store.counts_by_state())
        await store.close()

    anyio.run(main)
    """
)


def second_process(db: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SECOND_DAEMON, str(db), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_sqlite_a_second_daemon_on_the_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    store = await Store.open(db, exclusive=True)
    try:
        await new_link(store, 1)
        second = await anyio.to_thread.run_sync(second_process, db, "exclusive")
        assert second.returncode == 3, second.stderr
        assert second.stdout.strip() == (
            f"database {db} is in use by another syncd (pid {os.getpid()}); one daemon per "
            "database file (syncctl can still read it)"
        )
        # syncctl's read-only open is not refused, nor is a plain (syncctl --write) one.
        for mode in ("readonly", "plain"):
            reader = await anyio.to_thread.run_sync(second_process, db, mode)
            assert (reader.returncode, reader.stdout.strip()) == (0, "{'discovered': 1}")
        with pytest.raises(StoreInUse, match="in use by another syncd"):
            await Store.open(db, exclusive=True)  # nor twice from one process
    finally:
        await store.close()
    # Closed, the file is free again.
    after = await anyio.to_thread.run_sync(second_process, db, "exclusive")
    assert (after.returncode, after.stdout.strip()) == (0, "{'discovered': 1}")


async def test_postgres_a_cancelled_write_leaves_the_store_usable(pg_database: str) -> None:
    async with opened(pg_database) as store:
        await store.set_meta("k", "v")
        with psycopg.connect(pg_database) as holder:
            holder.execute("SELECT * FROM meta WHERE key = 'k' FOR UPDATE")
            with anyio.move_on_after(0.3) as scope:
                await store.set_meta("k", "cancelled")  # waits on the row lock
            assert scope.cancelled_caught
            holder.rollback()
        await store.set_meta("k", "w")
        assert await store.get_meta("k") == "w"
        assert raw(pg_database, "SELECT value FROM meta WHERE key = 'k'") == [("w",)]


# -- observations and imports ---------------------------------------------------------------


async def test_an_observation_is_one_row_per_po_updated_in_place(database: str) -> None:
    clock = Clock(100.0)
    async with opened(database, clock) as store:
        await store.observe_purchase_order(
            5, "PO0005", status="draft", reason="draft", supplier="Katana", po_created_at=WHEN
        )
        clock.now = 200.0
        await store.observe_purchase_order(5, "PO0005", status="void", reason="void")
        seen = await store.purchase_order_observation("PO0005")
        assert seen is not None
        assert (seen.status, seen.reason, seen.supplier) == ("void", "void", "Katana")
        assert (seen.first_seen_at, seen.seen_at, seen.po_created_at) == (100.0, 200.0, None)
        assert await store.purchase_order_observation("PO0006") is None
    assert raw(database, "SELECT count(*) FROM po_observations") == [(1,)]


async def test_observations_keep_only_the_most_recently_seen(database: str) -> None:
    clock = Clock(0.0)
    async with opened(database, clock) as store:
        raw_many(  # fill to the bound without 10 000 transactions
            database,
            "INSERT INTO po_observations (po_id, po_number, status, reason, first_seen_at, "
            "seen_at) VALUES (?, ?, 'draft', 'draft', ?, ?)",
            [(i, f"PO{i}", float(i), float(i)) for i in range(1, OBSERVATIONS_KEPT + 1)],
        )
        # At the bound, a PO seen again is updated in place: nothing is dropped.
        clock.now = float(OBSERVATIONS_KEPT)
        await store.observe_purchase_order(OBSERVATIONS_KEPT, "PO-AGAIN", status="v", reason="v")
        assert raw(database, "SELECT count(*) FROM po_observations") == [(OBSERVATIONS_KEPT,)]
        clock.now = 1e9
        await store.observe_purchase_order(0, "PO-NEW", status="draft", reason="draft")
        assert await store.purchase_order_observation("PO-NEW") is not None
        assert await store.purchase_order_observation("PO1") is None  # the least recent
        assert await store.purchase_order_observation("PO2") is not None
    assert raw(database, "SELECT count(*) FROM po_observations") == [(OBSERVATIONS_KEPT,)]


async def test_an_import_outcome_settles_its_event(database: str) -> None:
    clock = Clock(50.0)
    async with opened(database, clock) as store:
        first = await store.add_event("syncctl", "import_requested", b"{}")
        second = await store.add_event("syncctl", "import_requested", b"{}")
        assert first is not None and second is not None
        assert await store.event_outcome(first) == (None, None)
        assert await store.event_outcome(9999) is None
        assert await store.import_outcome(first) is None
        await store.record_import_outcome(
            first, "PO7", ImportResult.NOT_FOUND, "no PO PO7 in TradeGecko"
        )
        await store.record_import_outcome(
            second, "PO7", ImportResult.DISCOVERED, "PO PO7 (id 3) discovered", po_id=3
        )
        assert await store.event_outcome(first) == (50.0, "no PO PO7 in TradeGecko")
        outcome = await store.import_outcome(first)
        assert outcome is not None and outcome.result is ImportResult.NOT_FOUND
        last = await store.last_import_outcome("PO7")
        assert last is not None and (last.event_id, last.po_id) == (second, 3)
        assert last.result is ImportResult.DISCOVERED
        assert await store.inbox_backlog() == (0, None)
        assert await store.last_import_outcome("PO8") is None


# -- status page reads ----------------------------------------------------------------------


async def test_timeline_names_each_transitions_event(database: str) -> None:
    clock = Clock(10.0)
    async with opened(database, clock) as store:
        link = await new_link(store, 1)
        event = await store.add_event("katana", "webhook", b"{}", link_id=link.id)
        clock.now = 20.0
        await store.apply(link, decide("discovered", "so_created"), cause="SO", event_id=event)
        timeline = await store.timeline(link.id)
        assert [(t.trigger, t.at, source, kind) for t, source, kind in timeline] == [
            ("po_discovered", 10.0, None, None),
            ("so_created", 20.0, "katana", "webhook"),
        ]
        assert await store.timeline(999) == []


async def test_last_event_by_source_is_the_newest_of_a_kind(database: str) -> None:
    clock = Clock(10.0)
    async with opened(database, clock) as store:
        assert await store.last_event_by_source("webhook") == {}
        await store.add_event("katana", "webhook", b"{}")
        await store.add_event("tradegecko", "webhook", b"{}")
        clock.now = 30.0
        await store.add_event("katana", "webhook", b"{}")
        await store.add_event("katana", "poll", b"{}")
        assert await store.last_event_by_source("webhook") == {
            "katana": 30.0,
            "tradegecko": 10.0,
        }


# -- factories --------------------------------------------------------------------------------

TABLES = ("meta", "links", "transitions", "inbox", "cursors", "po_observations", "import_outcomes")


def present(value: T | None) -> T:
    assert value is not None
    return value


def rows_of(database: str, *tables: str) -> dict[str, list[str]]:
    """Every row of ``tables``, in a stable order: to check that nothing was written."""
    return {table: sorted(map(repr, raw(database, f"SELECT * FROM {table}"))) for table in tables}


async def test_factories_never_see_each_others_rows(database: str) -> None:
    async with opened(database) as store:
        north, south = store.for_factory("north"), store.for_factory("south")
        # The same TradeGecko and Katana ids in two accounts: each factory links its own.
        n_link, s_link = await new_link(north, 1), await new_link(south, 1)
        assert n_link.id != s_link.id
        n_link = await north.apply(n_link, decide("discovered", "so_created"), cause="SO", so_id=9)
        s_link = await south.apply(s_link, decide("discovered", "so_created"), cause="SO", so_id=9)
        n_event = await north.add_event(
            "katana", "webhook", b"n", dedup_key="so:9", link_id=n_link.id
        )
        s_event = await south.add_event(
            "katana", "webhook", b"s", dedup_key="so:9", link_id=s_link.id
        )
        assert n_event is not None and s_event is not None
        assert await north.add_event("katana", "webhook", b"again", dedup_key="so:9") is None
        await north.set_meta("paused.katana", "north paused")
        await south.set_meta("activated_at", "south's")
        await north.set_cursor("tradegecko.po", "n")
        await south.set_cursor("tradegecko.po", "s")
        await north.observe_purchase_order(5, "PO5", status="draft", reason="north's draft")
        await south.observe_purchase_order(5, "PO5", status="void", reason="south's void")
        await north.record_import_outcome(n_event, "PO7", ImportResult.NOT_FOUND, "none in north")

        assert (await north.link_by_po(1), await south.link_by_po(1)) == (
            await north.get_link(n_link.id),
            await south.get_link(s_link.id),
        )
        assert present(await north.link_by_so(9)).id == n_link.id
        assert present(await south.link_by_so(9)).id == s_link.id
        # Another factory's ids lead nowhere, for reading or for writing.
        assert await north.get_link(s_link.id) is None
        assert await north.history(s_link.id) == []
        assert await north.timeline(s_link.id) == []
        assert await north.events_for_link(s_link.id) == []
        assert await north.event_outcome(s_event) is None
        with pytest.raises(StoreConflict):
            await north.apply(s_link, decide("imported", "cancel"), cause="wrong factory")
        with pytest.raises(StoreError, match=f"no linked order with id {s_link.id}"):
            await north.note(s_link.id, notes=["wrong factory"])
        await north.mark_processed(s_event, "wrong factory")
        assert await south.event_outcome(s_event) == (None, None)
        assert [e.id for e in await south.pending_events()] == [s_event]
        assert [t.link_id for t in await south.recent_transitions()] == [s_link.id] * 2

        assert await north.meta_with_prefix("paused.") == {"katana": "north paused"}
        assert await south.meta_with_prefix("paused.") == {}
        assert await north.get_meta("activated_at") is None
        assert {n: v for n, (v, _) in (await south.cursors()).items()} == {"tradegecko.po": "s"}
        assert present(await north.purchase_order_observation("PO5")).reason == "north's draft"
        assert present(await south.purchase_order_observation("PO5")).reason == "south's void"
        assert await south.last_import_outcome("PO7") is None
        assert present(await north.last_import_outcome("PO7")).detail == "none in north"
        assert await north.inbox_backlog() == (0, None)
        assert (await south.inbox_backlog())[0] == 1
        assert await south.linked_po_ids([1, 2]) == {1}
        assert await south.so_ids_in_states(["imported"]) == {9: s_link.id}

        # The store as opened is the factory `default`, empty here.
        assert store.factory == "default"
        assert await store.counts_by_state() == {}
        assert await store.all_links() == []
        assert await store.pending_events() == []
        # Reads across factories.
        await new_link(store, 1)
        assert await store.factories() == ["default", "north", "south"]
        assert await north.counts_by_state_per_factory() == {
            "default": {"discovered": 1},
            "north": {"imported": 1},
            "south": {"imported": 1},
        }
        backlog = await store.inbox_backlog_per_factory()
        assert list(backlog) == ["south"] and backlog["south"][0] == 1
        assert await store.meta_with_prefix_per_factory("paused.") == {
            "north": {"katana": "north paused"}
        }


def test_a_factory_view_needs_a_factory_name() -> None:
    store = Store(None, "nowhere")  # type: ignore[arg-type]
    for bad in ("", "North", "a:b", "x" * 64):
        with pytest.raises(ValueError, match="not a factory name"):
            store.for_factory(bad)
    lease = Lease("north", "d1", 1, 0.0, 0.0)
    with pytest.raises(ValueError, match="the lease of factory north cannot fence south"):
        store.for_factory("south", lease=lease)


def at_second_schema(database: str) -> None:
    """Make ``database`` what syncd left before factories: migrations 1 and 2."""
    if is_pg(database):
        raw(database, POSTGRES_MIGRATIONS[0])
        raw(database, POSTGRES_MIGRATIONS[1])
        raw(database, f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
        raw(database, f"INSERT INTO {VERSION_TABLE} (version) VALUES (2)")
    else:
        with closing(sqlite3.connect(database)) as con:
            con.executescript(MIGRATIONS[0] + MIGRATIONS[1])
            con.execute("PRAGMA user_version = 2")
            con.commit()


async def test_a_version_2_database_is_migrated_with_everything_in_default(
    database: str, tmp_path: Path
) -> None:
    at_second_schema(database)
    blob = "decode('7b7d', 'hex')" if is_pg(database) else "X'7B7D'"
    for sql in (
        "INSERT INTO meta (key, value) VALUES ('activated_at', 'then')",
        "INSERT INTO links (id, po_id, po_number, state, so_id, created_at, updated_at, "
        "state_since) VALUES (7, 1, 'PO0001', 'imported', 9, 1, 2, 2)",
        "INSERT INTO transitions (link_id, from_state, to_state, trigger, cause, at) "
        "VALUES (7, NULL, 'discovered', 'po_discovered', 'seen', 1)",
        "INSERT INTO inbox (id, source, kind, dedup_key, link_id, payload, received_at) "
        f"VALUES (3, 'katana', 'webhook', 'so:9', 7, {blob}, 5)",
        "INSERT INTO cursors (name, value, updated_at) VALUES ('tradegecko.po', 'c', 5)",
        "INSERT INTO po_observations (po_id, po_number, status, reason, first_seen_at, "
        "seen_at) VALUES (5, 'PO5', 'draft', 'draft', 1, 1)",
        "INSERT INTO import_outcomes (event_id, po_number, result, detail, decided_at) "
        "VALUES (3, 'PO7', 'not_found', 'none', 6)",
    ):
        raw(database, sql)
    if is_pg(database):  # where syncd's own inserts would have left the identities
        for table, last in (("links", 7), ("inbox", 3)):
            raw(database, f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")
    async with opened(database) as store:
        assert await store.get_meta("activated_at") == "then"
        link = await store.link_by_po(1)
        assert link is not None and (link.id, link.so_id) == (7, 9)
        assert [h.trigger for h in await store.history(7)] == ["po_discovered"]
        assert [e.id for e in await store.pending_events()] == [3]
        assert await store.get_cursor("tradegecko.po") == "c"
        assert await store.purchase_order_observation("PO5") is not None
        assert await store.last_import_outcome("PO7") is not None
        assert await store.integrity_check() == []
        assert await store.factories() == ["default"]
        # A new factory starts empty and may reuse every key; ids go on from the old ones.
        other = store.for_factory("other")
        assert await other.link_by_po(1) is None and await other.pending_events() == []
        assert await other.add_event("katana", "webhook", b"y", dedup_key="so:9") == 4
        assert (await new_link(other, 1)).id == 8
        assert await store.add_event("katana", "webhook", b"z", dedup_key="so:9") is None
    for table in set(TABLES) - {"transitions"}:  # a transition's factory is its link's
        assert {r[0] for r in raw(database, f"SELECT DISTINCT factory FROM {table}")} <= {
            "default",
            "other",
        }
    assert schema_version(database) == len(MIGRATIONS)
    if not is_pg(database):
        assert raw(database, "PRAGMA foreign_key_check") == []
        with (
            pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"),
            closing(sqlite3.connect(database)) as con,
        ):
            con.execute("PRAGMA foreign_keys = ON")
            con.execute(
                "INSERT INTO transitions (link_id, to_state, trigger, cause, at) "
                "VALUES (99, 'x', 'y', 'z', 1)"
            )
    # The migrated schema is the one a new database gets.
    fresh = str(tmp_path / "fresh.db") if not is_pg(database) else None
    if fresh is not None:
        async with opened(fresh):
            pass
        assert schema(fresh) == schema(database)


# -- leases -----------------------------------------------------------------------------------


def expire(database: str, factory: str) -> None:
    """Let ``factory``'s lease run out, by the database's clock (an hour ago)."""
    raw(database, f"UPDATE leases SET expires_at = expires_at - 3600 WHERE factory = '{factory}'")


async def test_a_takeover_raises_the_fence_and_a_renewal_keeps_it(database: str) -> None:
    async with opened(database) as store:
        first = await store.acquire_lease("north", "d1", 30)
        assert first is not None and (first.owner, first.fence) == ("d1", 1)
        assert await store.acquire_lease("north", "d2", 30) is None  # held
        again = await store.acquire_lease("north", "d1", 30)
        assert again is not None and again.fence == 1  # one's own: the same lease
        renewed = await store.renew_lease(first, 60)
        assert renewed is not None and renewed.fence == 1
        assert renewed.expires_at >= first.expires_at + 29
        assert renewed.deadline > first.deadline
        (record,) = await store.leases()
        assert (record.factory, record.owner, record.fence, record.held) == ("north", "d1", 1, True)
        assert 50 < record.remaining <= 60

        expire(database, "north")
        taken = await store.acquire_lease("north", "d2", 30)
        assert taken is not None and (taken.owner, taken.fence) == ("d2", 2)
        # The old holder's renewal and release fail: the lease moved on.
        assert await store.renew_lease(renewed, 30) is None
        assert not await store.release_lease(renewed)
        assert await store.acquire_lease("north", "d1", 30) is None

        # Released, it is free at once, and the fence still rises.
        assert await store.release_lease(taken)
        (record,) = await store.leases()
        assert (record.owner, record.fence, record.held) == ("d2", 2, False)
        back = await store.acquire_lease("north", "d1", 30)
        assert back is not None and back.fence == 3
        # An expired lease is lost even if no one took it: renewing fails, acquiring again
        # is a new fence (whatever the holder had in flight is refused).
        expire(database, "north")
        assert await store.renew_lease(back, 30) is None
        mine_again = await store.acquire_lease("north", "d1", 30)
        assert mine_again is not None and mine_again.fence == 4


async def test_a_fenced_write_after_a_takeover_is_refused_and_writes_nothing(
    database: str,
) -> None:
    async with opened(database) as store:
        lease = await store.acquire_lease("north", "d1", 30)
        assert lease is not None
        mine = store.for_factory("north", lease=lease)
        link = await new_link(mine, 1)
        event = await mine.add_event("katana", "webhook", b"{}", link_id=link.id)
        assert event is not None
        await mine.set_meta("paused.katana", "x")
        await mine.set_cursor("katana.sales_orders", "c")

        expire(database, "north")
        theirs = await store.acquire_lease("north", "d2", 30)
        assert theirs is not None and theirs.fence == 2
        before = rows_of(database, *TABLES)
        refused: list[Any] = [
            mine.create_link(
                snapshot(2), state="discovered", trigger="po_discovered", cause="c", event_id=event
            ),
            mine.apply(link, decide("discovered", "so_created"), cause="SO", event_id=event),
            mine.note(link.id, notes=["n"], last_error="e"),
            mine.add_event("effect", "outcome", b"{}", link_id=link.id),
            mine.mark_processed(event, "done"),
            mine.set_cursor("katana.sales_orders", "d"),
            mine.set_meta("paused.katana", "y"),
            mine.setdefault_meta("activated_at", "now"),
            mine.delete_meta("paused.katana"),
            mine.observe_purchase_order(3, "PO3", status="draft", reason="draft"),
            mine.record_import_outcome(event, "PO4", ImportResult.NOT_FOUND, "none"),
        ]
        for write in refused:
            with pytest.raises(LeaseLost, match="d2 holds it with fence 2") as caught:
                await write
            assert not is_transient(caught.value)
            assert "nothing written" in str(caught.value)
        assert rows_of(database, *TABLES) == before

        # The new owner writes; webhook intake needs no lease at all.
        new_owner = store.for_factory("north", lease=theirs)
        moved = await new_owner.apply(link, decide("discovered", "so_created"), cause="SO")
        assert moved.state == "imported"
        assert await store.for_factory("north").add_event("katana", "webhook", b"2") is not None
        # Reads through the lost view still work (they change nothing).
        assert (await mine.get_link(link.id)) == moved
        # An expired lease fences too, taken over or not.
        expire(database, "north")
        with pytest.raises(LeaseLost, match="it expired"):
            await new_owner.set_meta("k", "v")


async def test_postgres_two_daemons_racing_for_twelve_factories_hold_disjoint_sets(
    pg_database: str,
) -> None:
    names = [f"f{n:02d}" for n in range(12)]
    async with opened(pg_database) as one, opened(pg_database) as two:
        won: dict[str, list[str]] = {"d1": [], "d2": []}

        async def grab(store: Store, owner: str, order: list[str]) -> None:
            for name in order:
                lease = await store.acquire_lease(name, owner, 30)
                if lease is not None:
                    assert lease.fence == 1
                    won[owner].append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(grab, one, "d1", names)
            tg.start_soon(grab, two, "d2", names[::-1])
        assert not set(won["d1"]) & set(won["d2"])
        assert sorted(won["d1"] + won["d2"]) == names
        for record in await one.leases():
            assert record.owner == ("d1" if record.factory in won["d1"] else "d2")
            assert record.fence == 1


async def test_postgres_a_takeover_waits_for_a_fenced_write_in_flight(pg_database: str) -> None:
    async with opened(pg_database) as one, opened(pg_database) as two:
        lease = await one.acquire_lease("north", "d1", 1)
        assert lease is not None
        mine = one.for_factory("north", lease=lease)
        taken: list[Lease | None] = []

        async def take_over() -> None:
            taken.append(await two.acquire_lease("north", "d2", 30))

        # The fence is checked and the lease's row locked at the write's start; a
        # takeover meanwhile waits for the write to commit, so no write ever commits
        # after the fence has moved.
        async with anyio.create_task_group() as tg, mine._transaction() as db:
            await db.execute("INSERT INTO meta (factory, key, value) VALUES ('north', 'k', 'v')")
            await anyio.sleep(1.2)  # the lease expires meanwhile
            tg.start_soon(take_over)
            await anyio.sleep(0.5)
            assert taken == []  # waiting on the row lock
        assert taken[0] is not None and taken[0].fence == 2
        assert raw(pg_database, "SELECT value FROM meta WHERE factory = 'north'") == [("v",)]
        with pytest.raises(LeaseLost, match="d2 holds it"):
            await mine.set_meta("k", "w")


async def lease_session_waits_on_a_lock(database: str) -> None:
    """Until the store's lease session is seen waiting on a row lock (at most 3 s)."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'syncd-leases' "
        "AND datname = current_database() AND wait_event_type = 'Lock'"
    )
    with anyio.fail_after(3):
        while await anyio.to_thread.run_sync(raw, database, sql) != [(1,)]:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_postgres_a_renewal_does_not_wait_for_another_factorys_write(
    pg_database: str,
) -> None:
    """Leases and heartbeats have a session of their own: a renewal completes while a
    factory's write transaction is still open on the writer."""
    async with opened(pg_database) as store:
        north = await store.acquire_lease("north", "d1", 30)
        south = await store.acquire_lease("south", "d1", 30)
        assert north is not None and south is not None
        writing = store.for_factory("south", lease=south)
        open_, renewed = anyio.Event(), anyio.Event()
        order: list[str] = []

        async def long_write() -> None:
            async with writing._transaction() as db:
                await db.execute(
                    "INSERT INTO meta (factory, key, value) VALUES ('south', 'k', 'v')"
                )
                open_.set()
                # Bounded below idle_in_transaction_session_timeout (2 s): with one
                # writer for everything the renewal would wait all of it, then go.
                with anyio.move_on_after(1.5):
                    await renewed.wait()
            order.append("write committed")

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_write)
            await open_.wait()
            lease = await store.renew_lease(north, 30)
            await store.heartbeat("d1")
            taken = await store.acquire_lease("east", "d1", 30)
            order.append("renewed")
            renewed.set()
        assert order == ["renewed", "write committed"]
        assert lease is not None and lease.fence == 1
        assert taken is not None and taken.fence == 1
        assert await store.live_owners(60) == ["d1"]
        assert raw(pg_database, "SELECT value FROM meta WHERE factory = 'south'") == [("v",)]


async def test_postgres_a_renewal_of_a_row_a_write_holds_waits_for_its_commit_only(
    pg_database: str,
) -> None:
    """The fenced write's ``FOR SHARE`` holds its own factory's renewal until it commits;
    the write meanwhile goes on writing (it never waits on the lease session)."""
    async with opened(pg_database) as store:
        lease = await store.acquire_lease("north", "d1", 30)
        assert lease is not None
        mine = store.for_factory("north", lease=lease)
        renewed: list[Lease | None] = []

        async def renew() -> None:
            renewed.append(await store.renew_lease(lease, 60))

        # The renewal is done soon after the write commits (the task group waits for it).
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg, mine._transaction() as db:
                tg.start_soon(renew)
                await lease_session_waits_on_a_lock(pg_database)
                assert renewed == []
                with anyio.fail_after(1):
                    await db.execute(
                        "INSERT INTO meta (factory, key, value) VALUES ('north', 'k', 'v')"
                    )
        assert renewed[0] is not None and renewed[0].fence == 1
        assert renewed[0].expires_at >= lease.expires_at + 29
        assert await mine.get_meta("k") == "v"


async def test_postgres_the_lease_session_has_the_timeouts_and_survives_a_cancel(
    pg_database: str,
) -> None:
    async with opened(pg_database) as store:
        lease = await store.acquire_lease("north", "d1", 30)
        assert lease is not None
        async with store._db.lease_transaction() as db:
            assert await db.fetchone("SHOW lock_timeout") == ("5s",)
            assert await db.fetchone("SHOW idle_in_transaction_session_timeout") == ("2s",)
            assert await db.fetchone("SELECT current_setting('application_name')") == (
                "syncd-leases",
            )
        with psycopg.connect(pg_database) as holder:
            holder.execute("SELECT * FROM leases WHERE factory = 'north' FOR UPDATE")
            with anyio.move_on_after(0.3) as scope:
                await store.renew_lease(lease, 30)  # waits on the row lock
            assert scope.cancelled_caught
            holder.rollback()
        # The cancelled statement's connection was given up; the next one is clean.
        renewed = await store.renew_lease(lease, 60)
        assert renewed is not None and renewed.expires_at >= lease.expires_at + 29
        assert raw(
            pg_database,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'syncd-leases' "
            "AND datname = current_database() AND state <> 'idle'",
        ) == [(0,)]


async def test_postgres_an_acquire_blocked_on_a_locked_row_fails_fast(pg_database: str) -> None:
    async with opened(pg_database) as store:
        assert await store.acquire_lease("north", "d1", 30) is not None
        mine = await store.acquire_lease("south", "d2", 30)
        assert mine is not None
        expire(pg_database, "north")
        with psycopg.connect(pg_database) as holder:
            holder.execute("SELECT * FROM leases WHERE factory = 'north' FOR UPDATE")
            started = anyio.current_time()
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await store.acquire_lease("north", "d2", 30)
            # Its own bound (1 s), not the session's 5 s.
            assert anyio.current_time() - started < 3.5
            # The session's own timeout is back for the next statement.
            async with store._db.lease_transaction() as db:
                assert await db.fetchone("SHOW lock_timeout") == ("5s",)
            assert await store.renew_lease(mine, 30) is not None
            holder.rollback()
        taken = await store.acquire_lease("north", "d2", 30)
        assert taken is not None and taken.fence == 2


# -- wake-ups ---------------------------------------------------------------------------------


async def next_wakeup(wakeups: Any) -> str:
    with anyio.fail_after(10):
        return str(await wakeups.__anext__())


async def drain(wakeups: Any, idle: float = 0.3) -> list[str]:
    """The wake-ups that come until none has for ``idle`` seconds."""
    names: list[str] = []
    while True:
        with anyio.move_on_after(idle):
            names.append(str(await wakeups.__anext__()))
            continue
        return names


async def test_wakeups_name_the_notified_factories_once_each(database: str) -> None:
    async with opened(database) as store:
        async with store.wakeups() as wakeups:
            await store.for_factory("north").notify("north")
            await store.notify("south")
            await store.notify("north")
            names = await drain(wakeups)
            # A name not yet taken is given once; on PostgreSQL the second NOTIFY may come
            # after the first was taken (a spurious wake-up, harmless).
            assert names[:2] == ["north", "south"] and set(names) == {"north", "south"}
            if not is_pg(database):
                assert names == ["north", "south"]
            await store.notify("east")
            assert await drain(wakeups) == ["east"]
        await store.notify("north")  # no one listening: nothing to do, nothing fails


async def test_postgres_notify_reaches_another_connections_wakeups(pg_database: str) -> None:
    async with opened(pg_database) as daemon, opened(pg_database) as intake:
        async with daemon.wakeups() as wakeups:
            north = intake.for_factory("north")
            assert await north.add_event("tradegecko", "webhook", b"{}") is not None
            await intake.notify("north")
            assert await next_wakeup(wakeups) == "north"
        # Another deployment on the same database, in its own schema, is not woken.
        raw(pg_database, "CREATE SCHEMA elsewhere")
        elsewhere_url = pg_database + "?options=-c%20search_path%3Delsewhere"
        async with opened(elsewhere_url) as other, daemon.wakeups() as wakeups:
            await other.notify("north")
            await intake.notify("south")
            assert await next_wakeup(wakeups) == "south"


async def test_postgres_wakeups_listen_again_after_a_lost_connection(
    pg_database: str, pg_server: PostgresServer
) -> None:
    async with (
        opened(pg_database) as daemon,
        opened(pg_database) as intake,
        daemon.wakeups() as wakeups,
    ):
        # A delivery persisted while the listener is away: its notification is lost, the
        # catch-up names its factory.
        with pg_server.admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'syncd-wakeups'",
                (pg_database.rsplit("/", 1)[1],),
            )
        await intake.for_factory("south").add_event("katana", "webhook", b"{}")
        assert await next_wakeup(wakeups) == "south"
        await intake.notify("north")
        assert await next_wakeup(wakeups) == "north"


# -- a shadow run's plans, and adopting its links ----------------------------------------------


@dataclass(frozen=True)
class Request:
    service: str
    method: str
    endpoint: str
    path: str
    body: Any = None
    answer: Any = None
    detail: Any = None


async def test_a_plan_holds_every_request_in_order_and_is_replaced_whole(database: str) -> None:
    product = Request("katana", "POST", "/products", "/products", {"name": "S"}, {"id": -1})
    order = Request(
        "katana", "POST", "/sales_orders", "/sales_orders", {"order_no": "TG-1"}, {"id": -2}
    )
    async with opened(database) as store:
        await store.record_plan(1, "PO1", "import_order", [product, order])
        await store.record_plan(2, "PO2", "import_order", [order])
        await store.record_plan(2, "PO2", "import_order", [order, product])  # ran again
        plans = await store.plans()
        assert [(p.po_number, p.seq, p.endpoint) for p in plans] == [
            ("PO1", 0, "/products"),
            ("PO1", 1, "/sales_orders"),
            ("PO2", 0, "/sales_orders"),
            ("PO2", 1, "/products"),
        ]
        assert (plans[0].body, plans[0].answer, plans[0].detail) == (
            {"name": "S"},
            {"id": -1},
            None,
        )
        await store.drop_plan(1, "import_order")
        assert {p.po_number for p in await store.plans()} == {"PO2"}
        assert [p.seq for p in await store.plans("PO2")] == [0, 1]


async def test_a_version_4_plan_is_kept_as_its_first_request(database: str) -> None:
    if is_pg(database):
        for sql in POSTGRES_MIGRATIONS[:4]:
            raw(database, sql)
        raw(database, f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
        raw(database, f"INSERT INTO {VERSION_TABLE} (version) VALUES (4)")
    else:
        with closing(sqlite3.connect(database)) as con:
            con.executescript("".join(MIGRATIONS[:4]))
            con.execute("PRAGMA user_version = 4")
            con.commit()
    raw(
        database,
        "INSERT INTO plans (link_id, effect, po_number, service, method, endpoint, path, body, "
        "planned_at) VALUES (3, 'import_order', 'PO3', 'katana', 'POST', '/sales_orders', "
        "'/sales_orders', '{\"order_no\": \"TG-PO3\"}', 5)",
    )
    async with opened(database) as store:
        (plan,) = await store.plans()
        assert (plan.po_number, plan.seq, plan.body, plan.answer) == (
            "PO3",
            0,
            {"order_no": "TG-PO3"},
            None,
        )
    assert schema_version(database) == len(MIGRATIONS)


async def test_adopting_a_link_copies_it_with_its_history(database: str, tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.shadow.db") as shadow:
        link = await new_link(shadow, 10, "PO10")
        followed = await shadow.apply(
            link, decide("discovered", "so_created"), cause="found", so_id=77, so_number="SO-77"
        )
        await new_link(shadow, 11, "PO11")
        history = await shadow.history(followed.id)
    async with opened(database) as live:
        await new_link(live, 12, "PO12")  # ids here differ from the shadow's
        new_id = await live.adopt_link(followed, history)
        adopted = present(await live.get_link(new_id))
        assert msgspec.structs.replace(adopted, id=followed.id) == followed
        assert [
            (h.from_state, h.to_state, h.trigger, h.cause, h.at) for h in await live.history(new_id)
        ] == [(h.from_state, h.to_state, h.trigger, h.cause, h.at) for h in history]
        assert present(await live.link_by_so(77)).id == new_id
        with pytest.raises(StoreConflict, match="PO10 or its SO is already linked"):
            await live.adopt_link(followed, history)


async def test_the_variant_cache_maps_skus_per_service_and_factory(database: str) -> None:
    clock = Clock(1000.0)
    async with opened(database, clock) as store:
        north, south = store.for_factory("north"), store.for_factory("south")
        await north.remember_variants("tradegecko", {11: "A-1", 12: "B-2"})
        await north.remember_variants("katana", {501: "A-1"})
        await south.remember_variants("katana", {777: "A-1"})
        assert await north.cached_skus("tradegecko", [11, 12, 13], since=0) == {
            11: "A-1",
            12: "B-2",
        }
        assert await north.cached_variant_ids("katana", ["A-1", "Z"], since=0) == {"A-1": 501}
        assert await south.cached_variant_ids("katana", ["A-1"], since=0) == {"A-1": 777}
        # One SKU names one variant per service: a new id for A-1 replaces the old one.
        clock.now = 2000.0
        await north.remember_variants("katana", {502: "A-1"})
        assert await north.cached_variant_ids("katana", ["A-1"], since=0) == {"A-1": 502}
        # Older than `since`: not trusted.
        assert await north.cached_skus("tradegecko", [11], since=1500.0) == {}
        assert await north.cached_variant_ids("katana", ["A-1"], since=1500.0) == {"A-1": 502}
        await north.forget_variants("katana", variant_ids=[502])
        await north.forget_variants("tradegecko", skus=["B-2"])
        assert await north.cached_variant_ids("katana", ["A-1"], since=0) == {}
        assert await north.cached_skus("tradegecko", [11, 12], since=0) == {11: "A-1"}
        assert await south.cached_variant_ids("katana", ["A-1"], since=0) == {"A-1": 777}
        assert await north.cached_skus("tradegecko", [], since=0) == {}


async def test_oldest_by_state_per_factory_is_each_factorys_oldest(database: str) -> None:
    async with opened(database) as store:
        north, south = store.for_factory("north"), store.for_factory("south")
        await new_link(north, 1)
        await anyio.sleep(0.01)  # a later state_since
        await new_link(north, 2)
        await new_link(south, 3)
        found = await store.oldest_by_state_per_factory()
        assert {f: {s: n for s, (n, _) in by.items()} for f, by in found.items()} == {
            "north": {"discovered": "PO0001"},
            "south": {"discovered": "PO0003"},
        }
        assert found["north"] == await north.oldest_by_state()
        assert found["south"] == await south.oldest_by_state()


async def test_cursors_per_factory_are_each_factorys_cursors(database: str) -> None:
    async with opened(database) as store:
        north, south = store.for_factory("north"), store.for_factory("south")
        await north.set_cursor("tradegecko.po", "n1")
        await north.set_cursor("katana.so", "n2")
        await south.set_cursor("tradegecko.po", "s1")
        await store.for_factory("idle").set_meta("activated_at", "1")  # rows, no cursor
        found = await north.cursors_per_factory()
        assert {f: {n: v for n, (v, _) in by.items()} for f, by in found.items()} == {
            "north": {"tradegecko.po": "n1", "katana.so": "n2"},
            "south": {"tradegecko.po": "s1"},
        }
        assert found["north"] == await north.cursors()
        assert found["south"] == await south.cursors()


async def test_idle_factories_share_one_query_for_what_waits_in_the_inbox(database: str) -> None:
    async with opened(database) as store:
        views = [store.for_factory(f"f{i}") for i in range(20)]
        queries: list[str] = []
        fetchall = store._db.fetchall

        async def counted(sql: str, args: Any = ()) -> Any:
            queries.append(sql)
            return await fetchall(sql, args)

        store._db.fetchall = counted  # type: ignore[method-assign]
        for view in views:
            assert await view.pending_events() == []
        # Twenty idle factories asking: the first two ask for themselves (one factory's own
        # query is as cheap), then one summary answers the rest.
        assert len(queries) <= 3, queries
        # An event this process adds is found at once, whatever the summary said.
        event = await views[7].add_event("tradegecko", "webhook", b"x")
        assert [e.id for e in await views[7].pending_events()] == [event]
        assert await views[7].pending_events(kinds=("import_requested",)) == []
        assert [e.id for e in await views[7].pending_events(exclude_kinds=("other",))] == [event]
        assert await views[8].pending_events() == []
        # Another process's event (syncctl, another daemon) is found once the summary is
        # older than its age.
        other = await Store.open(database)
        try:
            theirs = await other.for_factory("f9").add_event("tradegecko", "webhook", b"y")
        finally:
            await other.close()
        await anyio.sleep(PENDING_SUMMARY_AGE + 0.1)
        # The same summary, by factory and kind, for the daemon's one look at the inbox.
        assert await views[0].pending_kinds_per_factory() == {
            "f7": {"webhook"},
            "f9": {"webhook"},
        }
        assert [e.id for e in await views[9].pending_events()] == [theirs]
        await views[9].mark_processed(theirs if theirs is not None else -1, "done")
        assert await views[9].pending_events() == []


async def test_production_evidence_keeps_looks_placements_and_what_was_heard_since(
    database: str,
) -> None:
    async with opened(database) as store:
        assert await store.sales_order_evidence(7) is None
        assert await store.sales_orders_waiting([7, 8]) == {7, 8}  # never looked at
        await store.record_sales_order_look(
            7, 10, b'{"so_id":7}', status="NOT_SHIPPED", waiting=False, mo_ids=[70, 71]
        )
        await store.record_sales_order_look(
            8, 10, b'{"so_id":8}', status="NOT_SHIPPED", waiting=True, mo_ids=[]
        )
        assert await store.sales_orders_waiting([7, 8]) == {8}  # a row waits for an MO
        # Heard after the look: kept; an older delivery than the one kept changes nothing.
        await store.hear_manufacturing_order(70, "DONE", 12)
        await store.hear_manufacturing_order(70, "IN_PROGRESS", 11)
        await store.hear_manufacturing_order(99, "DONE", 12)  # placed by no look: ignored
        assert await store.placement(99) is None
        await store.hear_sales_order(7, 13, status="DELIVERED", edit=False)
        evidence = await store.sales_order_evidence(7)
        assert evidence is not None
        assert (evidence.looked, evidence.facts, evidence.waiting) == (10, b'{"so_id":7}', False)
        assert (evidence.status, evidence.heard, evidence.edited) == ("DELIVERED", 13, None)
        assert [(p.mo_id, p.so_id, p.placed, p.status, p.heard) for p in evidence.placements] == [
            (70, 7, 10, "DONE", 12),
            (71, 7, 10, None, None),
        ]
        # An edit the look already saw marks nothing; one after it makes the look stale.
        await store.hear_sales_order(7, 9, status=None, edit=True)
        assert await store.sales_orders_waiting([7]) == set()
        await store.hear_sales_order(7, 14, status="NOT_SHIPPED", edit=True)
        assert await store.sales_orders_waiting([7]) == {7}
        # A look older than the one kept is dropped; a newer one replaces it and keeps only
        # what its MOs said after it began.
        await store.record_sales_order_look(
            7, 5, b"{}", status="NOT_SHIPPED", waiting=True, mo_ids=[]
        )
        assert (await store.sales_order_evidence(7)).looked == 10  # type: ignore[union-attr]
        await store.record_sales_order_look(
            7, 12, b"{}", status="DELIVERED", waiting=False, mo_ids=[70, 71]
        )
        again = await store.sales_order_evidence(7)
        assert again is not None and again.edited is None and again.heard == 12
        assert [(p.mo_id, p.status, p.heard) for p in again.placements] == [
            (70, None, None),
            (71, None, None),
        ]
        # An MO made for no sales order is placed so; another factory sees none of it.
        await store.place_manufacturing_order(72, None, 12)
        placement = await store.placement(72)
        assert placement is not None and placement.so_id is None
        other = store.for_factory("other")
        assert await other.placement(70) is None
        assert await other.sales_order_evidence(7) is None


async def test_sqlite_inbox_commits_go_before_the_transactions_waiting(tmp_path: Path) -> None:
    """A webhook is answered once its row is committed: it must not wait behind every
    factory's transactions (at 1,000 factories the answer came after the senders' 10 s)."""
    store = await Store.open(tmp_path / "turns.db")
    finished: list[str] = []
    try:
        backend = store._db
        async with anyio.create_task_group() as tg:

            async def write(name: str) -> None:
                await store.set_meta(name, "x")
                finished.append(name)

            async def delivery() -> None:
                assert await store.add_event("katana", "webhook_received", b"{}") is not None
                finished.append("delivery")

            scopes: list[anyio.CancelScope] = []

            async def given_up() -> None:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await store.set_meta("given-up", "x")

            async with backend.transaction():  # a factory's transaction, under way
                tg.start_soon(write, "first")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(given_up)  # waits, then its caller goes away
                await anyio.wait_all_tasks_blocked()
                scopes[0].cancel()
                tg.start_soon(write, "second")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(delivery)  # came last, goes first
                await anyio.wait_all_tasks_blocked()
                assert finished == []
        assert finished == ["delivery", "first", "second"]
        assert await store.get_meta("given-up") is None  # its place given up, none lost
    finally:
        await store.close()
