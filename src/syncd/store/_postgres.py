"""The PostgreSQL backend, through psycopg 3: several daemons can share one database.

Three connections: one for reads, in autocommit; one for write transactions, held by one
task at a time; and one for the coordinator's lease and heartbeat statements
(:meth:`PostgresBackend.lease_transaction`), so that a renewal or a takeover never queues
behind the factories' writes. Reads therefore see committed data only, never another task's
transaction half-way. Transactions run at PostgreSQL's default READ COMMITTED: every write
the store makes is one statement whose ``WHERE`` re-checks what it depends on (``UPDATE
links ... WHERE state = ?``, ``INSERT ... ON CONFLICT``), which PostgreSQL re-evaluates
against the row another writer just committed, so two daemons cannot both move an order.

``lock_timeout`` plays SQLite's busy timeout (5 s); ``idle_in_transaction_session_timeout``
(2 s) ends the session of a daemon frozen halfway through a transaction (SIGSTOP, a paused
VM), whose locks would otherwise outlive its leases: a renewal's updated row, or a fenced
write's ``FOR SHARE``, holds every other daemon's takeover of that factory for as long as it
stays frozen. The store's transactions run statement after statement, nothing else in
between, so a live daemon is never that long idle in one. Both apply to every connection,
the lease session's included. A URL's own ``options`` come after ours and win. A connection
found lost is opened again at the next call; the call that found it lost fails with
``StoreUnavailable``. Migrations take an advisory lock, so that two daemons starting
together on an empty database do not both create the schema.

The lease session and the writer cannot deadlock. A fenced write locks its one factory's
lease row ``FOR SHARE`` inside the writer's transaction; a renewal, release or takeover of
that row (an ``UPDATE``) waits for the writer's commit, which comes after the write's few
statements. The other way, a fenced write finding the row updated and not yet committed
waits for the lease statement's ``COMMIT``, which follows its one statement at once and
needs nothing the writer holds: the lease statements touch only ``leases`` and ``daemons``,
which writes only read (``FOR SHARE`` on one row). No cycle, so no wait longer than the
other side's transaction. Neither session's code opens the other's transaction, so the two
anyio locks are never held together either.

Wake-ups are ``NOTIFY syncd_wakeup`` with ``<schema>:<factory>`` as the payload (one
database may hold several syncd deployments, each in its schema), heard on a connection of
their own, opened only while someone listens.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from syncd.errors import StoreError, StoreUnavailable
from syncd.store._backend import CatchUp, Row, Statement, newer_schema, redact
from syncd.store._schema_postgres import POSTGRES_MIGRATIONS, VERSION_TABLE

__all__ = ["PostgresBackend", "PostgresWakeups"]

log = logging.getLogger("syncd.store")

#: ``pg_advisory_xact_lock`` key of the migrations ("syncd" in ASCII).
_MIGRATION_LOCK = 0x73796E6364
_OPTIONS = "-c lock_timeout=5000 -c idle_in_transaction_session_timeout=2000"
_READONLY_OPTIONS = " -c default_transaction_read_only=on"
_CHANNEL = "syncd_wakeup"
#: Seconds between attempts to listen again after losing the connection: doubling up to.
_RELISTEN_FIRST, _RELISTEN_MAX = 0.5, 30.0


@functools.lru_cache(maxsize=512)
def _sql(query: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return query.replace("%", "%%").replace("?", "%s")


def _named(conninfo: str, role: str) -> str:
    """The connection string with ``-<role>`` after its application name, so that
    pg_stat_activity tells the sessions apart."""
    name = conninfo_to_dict(conninfo).get("application_name") or "syncd"
    return make_conninfo(conninfo, application_name=f"{name}-{role}")


def _message(exc: BaseException) -> str:
    # libpq's messages span lines (one per address tried, a hint indented by a tab).
    return " ".join(str(exc).split())


def _transient(exc: psycopg.Error) -> bool:
    """Lock timeouts, deadlocks, serialization failures, a lost or refused connection, a
    full disk, a server shutting down: errors of the moment, not of the data (psycopg
    files all of these under ``OperationalError``; ``InterfaceError`` is a closed
    connection)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _error(exc: psycopg.Error) -> type[StoreError]:
    return StoreUnavailable if _transient(exc) else StoreError


class _Queries:
    """Statements on one connection, driver errors left as they are (the caller wraps)."""

    def __init__(self, conn: psycopg.AsyncConnection[Row]) -> None:
        self._conn = conn

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        cursor = await self._conn.execute(_sql(sql), args)
        return await cursor.fetchone()

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        cursor = await self._conn.execute(_sql(sql), args)
        return await cursor.fetchall()

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cursor = await self._conn.execute(_sql(sql), args)
        return cursor.rowcount

    async def rows(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """What the statement returned; empty for one that returns nothing."""
        cursor = await self._conn.execute(_sql(sql), args)
        return await cursor.fetchall() if cursor.description is not None else []

    async def script(self, sql: str) -> None:
        """Several statements at once (a migration): with no parameters psycopg sends the
        text as it is, ``%`` and ``?`` included."""
        await self._conn.execute(sql.encode())


class _Session:
    """One connection, opened again when found lost; used by one task at a time."""

    def __init__(self, conninfo: str, where: str) -> None:
        self._conninfo = conninfo
        self._where = where
        self._conn: psycopg.AsyncConnection[Row] | None = None
        self.lock = anyio.Lock()

    async def connection(self) -> psycopg.AsyncConnection[Row]:
        """The connection, idle and outside any transaction; call with :attr:`lock` held."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            if conn.info.transaction_status == TransactionStatus.IDLE:
                return conn
            # Left mid-query or mid-transaction by a cancelled task: start clean.
            log.warning("database connection to %s left busy: opening it again", self._where)
        await self.discard()
        self._conn = await _connect(self._conninfo, self._where)
        return self._conn

    async def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()


async def _connect(conninfo: str, where: str) -> psycopg.AsyncConnection[Row]:
    try:
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        # Transient for a running daemon (the server restarting); at start, Store.open's
        # caller stops on any StoreError.
        raise _error(exc)(f"cannot connect to database {where}: {_message(exc)}") from None


class PostgresWakeups:
    """``LISTEN`` on a connection of its own; a lost connection is opened again (with a
    growing pause), and then every factory ``catch_up`` names is woken, since a
    notification may have been missed meanwhile."""

    def __init__(self, conninfo: str, where: str, catch_up: CatchUp) -> None:
        self._conninfo = conninfo
        self._where = where
        self._catch_up = catch_up
        self._conn: psycopg.AsyncConnection[Row] | None = None
        self._schema = ""
        # An ordered set: a factory named twice before it is taken is given once.
        self._pending: dict[str, None] = {}
        self._pause = _RELISTEN_FIRST

    async def __aenter__(self) -> PostgresWakeups:
        await self._listen()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._discard()

    def __aiter__(self) -> PostgresWakeups:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            if self._conn is None:
                await self._listen_again()
                continue
            try:
                # stop_after: back here after each packet, so the pending set is served.
                async with aclosing(self._conn.notifies(stop_after=1)) as notes:
                    async for note in notes:
                        schema, _, factory = note.payload.rpartition(":")
                        if schema == self._schema:
                            self._pending[factory] = None
            except psycopg.Error as exc:
                log.warning(
                    "listening for wake-ups on %s: %s: listening again", self._where, _message(exc)
                )
                await self._discard()
        factory = next(iter(self._pending))
        del self._pending[factory]
        return factory

    async def _listen(self) -> None:
        conn = await _connect(self._conninfo, self._where)
        try:
            await conn.execute(f"LISTEN {_CHANNEL}")
            row = await (await conn.execute("SELECT current_schema()")).fetchone()
        except psycopg.Error as exc:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise _error(exc)(f"cannot listen on {self._where}: {_message(exc)}") from None
        self._schema = "" if row is None or row[0] is None else str(row[0])
        self._conn = conn

    async def _listen_again(self) -> None:
        await anyio.sleep(self._pause)
        try:
            await self._listen()
            missed = await self._catch_up()
        except StoreError as exc:
            self._pause = min(self._pause * 2, _RELISTEN_MAX)
            log.warning("wake-ups from %s: %s (next try in %.0f s)", self._where, exc, self._pause)
            await self._discard()
            return
        self._pause = _RELISTEN_FIRST
        self._pending.update(dict.fromkeys(missed))
        log.info("listening for wake-ups on %s again", self._where)

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()


class PostgresBackend:
    dialect = "postgresql"

    def __init__(self, conninfo: str, where: str, *, readonly: bool) -> None:
        self.where = where
        self._conninfo = conninfo
        self._readonly = readonly
        self._reader = _Session(conninfo, where)
        self._writer = _Session(conninfo, where)
        # Opened at the first lease statement: syncctl and check never open it.
        self._leaser = _Session(_named(conninfo, "leases"), where)

    @classmethod
    async def open(
        cls, url: str, *, readonly: bool, require_schema: bool = True
    ) -> PostgresBackend:
        where = redact(url)
        try:
            params: dict[str, Any] = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(f"bad database URL {where}: {_message(exc)}") from None
        options = _OPTIONS + (_READONLY_OPTIONS if readonly else "")
        if params.get("options"):
            options += f" {params['options']}"
        params["options"] = options
        params.setdefault("connect_timeout", "10")
        params.setdefault("application_name", "syncd")
        backend = cls(make_conninfo(**params), where, readonly=readonly)
        try:
            # Connect now, so that a wrong URL, password or database is said at start.
            async with backend._reader.lock:
                await backend._reader.connection()
            if readonly:
                if await backend.check_version() == 0 and require_schema:
                    raise StoreError(f"database {where} has no syncd schema: run syncd on it once")
            else:
                await backend.migrate()
        except BaseException:
            await backend.close()
            raise
        return backend

    async def close(self) -> None:
        await self._reader.discard()
        await self._writer.discard()
        await self._leaser.discard()

    # -- queries -------------------------------------------------------------------------

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._reader.lock:
            conn = await self._reader.connection()
            try:
                return await _Queries(conn).fetchone(sql, args)
            except psycopg.Error as exc:
                raise self._read_error(exc) from None

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._reader.lock:
            conn = await self._reader.connection()
            try:
                return await _Queries(conn).fetchall(sql, args)
            except psycopg.Error as exc:
                raise self._read_error(exc) from None

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One statement in its own transaction."""
        async with self.transaction() as tx:
            return await tx.execute(sql, args)

    def _read_error(self, exc: psycopg.Error) -> StoreError:
        return _error(exc)(f"cannot read from {self.where}: {_message(exc)}")

    def transaction(self) -> AbstractAsyncContextManager[_Queries]:
        return self._transaction(self._writer)

    def lease_transaction(self) -> AbstractAsyncContextManager[_Queries]:
        return self._transaction(self._leaser)

    @asynccontextmanager
    async def _transaction(self, session: _Session) -> AsyncIterator[_Queries]:
        async with session.lock:
            try:
                conn = await session.connection()
                await conn.execute("BEGIN")
            except psycopg.Error as exc:
                await session.discard()
                raise _error(exc)(f"cannot write to {self.where}: {_message(exc)}") from None
            except BaseException:
                # Cancelled mid-command: the connection's state is unknown; the session's
                # next transaction gets a new one.
                await session.discard()
                raise
            try:
                yield _Queries(conn)
            except psycopg.Error as exc:
                await self._rollback(session, conn)
                raise _error(exc)(f"write to {self.where} refused: {_message(exc)}") from exc
            except BaseException:
                await self._rollback(session, conn)
                raise
            try:
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                # The outcome is unknown when the connection died during COMMIT; every write
                # the store makes is safe to try again (its WHERE or ON CONFLICT re-checks).
                await self._rollback(session, conn)
                raise _error(exc)(f"cannot commit to {self.where}: {_message(exc)}") from None
            except BaseException:
                # Cancelled during COMMIT: committed or not, the server decides; this
                # connection is mid-command, so it is not used again.
                await session.discard()
                raise

    async def transact(self, statements: Sequence[Statement]) -> list[list[Row]]:
        # The server's round trips are the cost here, not a thread's: one per statement,
        # as in any transaction.
        async with self.transaction() as tx:
            return [await tx.rows(sql, args) for sql, args in statements]

    @staticmethod
    async def _rollback(session: _Session, conn: psycopg.AsyncConnection[Row]) -> None:
        # Shielded: a cancelled task must not leave its transaction open for the next one.
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await conn.execute("ROLLBACK")
                return
            except psycopg.Error as exc:
                log.debug("rollback: %s", exc)
        await session.discard()

    # -- wake-ups ------------------------------------------------------------------------

    async def notify(self, factory: str) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "SELECT pg_notify(?, current_schema() || ':' || ?)", (_CHANNEL, factory)
            )

    def wakeups(self, catch_up: CatchUp) -> PostgresWakeups:
        # Named apart in pg_stat_activity: the connection that sits idle, listening.
        return PostgresWakeups(_named(self._conninfo, "wakeups"), self.where, catch_up)

    # -- schema --------------------------------------------------------------------------

    async def check_version(self) -> int:
        version = await self._version(self)
        if version > len(POSTGRES_MIGRATIONS):
            raise newer_schema(self.where, version, len(POSTGRES_MIGRATIONS))
        return version

    @staticmethod
    async def _version(queries: _Queries | PostgresBackend) -> int:
        row = await queries.fetchone("SELECT to_regclass(?) IS NOT NULL", (VERSION_TABLE,))
        if row is None or not row[0]:
            return 0
        row = await queries.fetchone(f"SELECT version FROM {VERSION_TABLE}")
        return 0 if row is None else int(row[0])

    async def migrate(self) -> None:
        latest = len(POSTGRES_MIGRATIONS)
        while True:
            async with self.transaction() as tx:
                await tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
                version = await self._version(tx)
                if version > latest:
                    raise newer_schema(self.where, version, latest)
                if version == latest:
                    return
                if version == 0:
                    await tx.execute(
                        f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)"
                    )
                    await tx.execute(f"DELETE FROM {VERSION_TABLE}")
                    await tx.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)")
                await tx.script(POSTGRES_MIGRATIONS[version])
                await tx.execute(f"UPDATE {VERSION_TABLE} SET version = ?", (version + 1,))
            log.info("database %s migrated to schema version %d", self.where, version + 1)

    async def integrity_check(self) -> list[str]:
        """The schema is whole: the version, and every table, index and trigger the
        migrations made, each table readable. (PostgreSQL checks its pages itself when
        it reads them; a deeper check, ``amcheck``, needs a superuser.)"""
        problems: list[str] = []
        version = await self._version(self)
        if version != len(POSTGRES_MIGRATIONS):
            problems.append(f"schema version {version}, expected {len(POSTGRES_MIGRATIONS)}")
        script = "\n".join(POSTGRES_MIGRATIONS)
        tables = re.findall(r"CREATE TABLE (\w+)", script)
        present = {
            str(r[0])
            for r in await self.fetchall(
                "SELECT c.relname FROM pg_class c "
                "WHERE c.relnamespace = current_schema()::regnamespace"
            )
        }
        for kind, names in (
            ("table", tables),
            ("index", re.findall(r"CREATE (?:UNIQUE )?INDEX (\w+)", script)),
        ):
            problems += [f"{kind} {name} is missing" for name in names if name not in present]
        triggers = {
            str(r[0])
            for r in await self.fetchall(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass('transitions')"
            )
        }
        problems += [
            f"trigger {name} is missing"
            for name in re.findall(r"CREATE TRIGGER (\w+)", script)
            if name not in triggers
        ]
        for table in tables:
            if table in present:
                try:
                    await self.fetchall(f"SELECT * FROM {table} LIMIT 1")
                except StoreError as exc:
                    problems.append(f"table {table} cannot be read: {exc}")
        return problems
