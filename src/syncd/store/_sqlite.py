"""The SQLite backend: one aiosqlite connection to a file, the embedded default.

WAL journal, ``synchronous=FULL`` so that an acknowledged write survives power loss, a busy
timeout so that ``syncctl`` writing at the same moment waits instead of failing, and
``BEGIN IMMEDIATE`` for every write so that a transaction never has to upgrade its lock
halfway. The schema version is ``PRAGMA user_version``.

An exclusive open (the daemon's) also holds an ``flock`` on ``<file>.lock`` for the
connection's life, so that a second daemon on the same file is refused at start instead of
the two deciding for the same orders. Read-only opens never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite
import anyio

from syncd.errors import StoreError, StoreInUse, StoreUnavailable
from syncd.store._backend import CatchUp, Row, Statement, newer_schema
from syncd.store._schema import MIGRATIONS

__all__ = ["LocalWakeups", "SQLiteBackend", "ensure_not_in_use", "lock_path"]

log = logging.getLogger("syncd.store")


def lock_path(path: str) -> str:
    """The lock file an exclusive open holds beside the database."""
    return f"{path}.lock"


class _Queries:
    """Statements on the connection, driver errors left as they are (the caller wraps)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._db.execute(sql, args) as cursor:
            row = await cursor.fetchone()
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._db.execute(sql, args) as cursor:
            rows = await cursor.fetchall()
        return [tuple(r) for r in rows]

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._db.execute(sql, args) as cursor:
            return cursor.rowcount


class LocalWakeups:
    """Wake-ups within this process: one daemon per SQLite file, so the webhook that
    persisted a delivery and the factory's owner are in the same process."""

    def __init__(self, listeners: set[LocalWakeups]) -> None:
        self._listeners = listeners
        # An ordered set: a factory named twice before it is taken is given once.
        self._pending: dict[str, None] = {}
        self._arrived = anyio.Event()

    def put(self, factory: str) -> None:
        self._pending[factory] = None
        self._arrived.set()

    async def __aenter__(self) -> LocalWakeups:
        self._listeners.add(self)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._listeners.discard(self)

    def __aiter__(self) -> LocalWakeups:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            await self._arrived.wait()
            self._arrived = anyio.Event()
        factory = next(iter(self._pending))
        del self._pending[factory]
        return factory


class _WriteTurns:
    """The one writer's turn: first come, first served, except that a commit of the
    inbox's rows (:meth:`SQLiteBackend.transact`, one job) goes before the transactions
    waiting. A webhook is answered once its row is committed: behind 1,000 factories'
    transactions, each holding the turn over several round trips on the connection's one
    thread, the answer came after the services' 10 s and the delivery was sent again later.
    The inbox's group commit has one leader waiting at a time, so the others still get every
    other turn."""

    def __init__(self) -> None:
        self._held = False
        self._ahead: deque[anyio.Event] = deque()
        self._behind: deque[anyio.Event] = deque()

    @asynccontextmanager
    async def turn(self, *, ahead: bool = False) -> AsyncIterator[None]:
        if self._held:
            handed = anyio.Event()
            line = self._ahead if ahead else self._behind
            line.append(handed)
            try:
                await handed.wait()
            except BaseException:
                if handed.is_set():
                    self._release()  # handed the turn, then cancelled: the next one's
                else:
                    line.remove(handed)
                raise
        else:
            self._held = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for line in (self._ahead, self._behind):
            if line:
                line.popleft().set()  # held still: handed straight on
                return
        self._held = False


class SQLiteBackend:
    """One aiosqlite connection; a transaction's statements run on it too (so a read by
    another task during a transaction sees its writes, as SQLite always did here)."""

    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: str, lock_fd: int | None) -> None:
        self._db = db
        self.where = path
        self._lock_fd = lock_fd
        self._turns = _WriteTurns()
        self._queries = _Queries(db)
        self._listeners: set[LocalWakeups] = set()

    @classmethod
    async def open(cls, path: str, *, readonly: bool, exclusive: bool) -> SQLiteBackend:
        lock_fd: int | None = None
        try:
            if readonly:
                if not Path(path).exists():  # noqa: ASYNC240 - once, at start
                    raise StoreError(f"database not found: {path}")
                db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                if exclusive:
                    lock_fd = _lock(path)
                # Try the file plainly first: an aiosqlite connect that fails leaves its
                # worker thread racing the event loop's shutdown (a traceback at exit).
                await anyio.to_thread.run_sync(_probe, path)
                db = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            _unlock(lock_fd)
            raise StoreError(f"cannot open database {path}: {exc}") from None
        except StoreError:
            _unlock(lock_fd)
            raise
        backend = cls(db, path, lock_fd)
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = FULL")
                await backend.migrate()
            else:
                await backend.check_version()
        except sqlite3.Error as exc:
            await backend.close()
            raise StoreError(f"cannot use database {path}: {exc}{_why_unwritable(path)}") from None
        except StoreError:
            await backend.close()
            raise
        return backend

    async def close(self) -> None:
        try:
            await self._db.close()
        finally:
            _unlock(self._lock_fd)
            self._lock_fd = None

    # -- queries -------------------------------------------------------------------------

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        try:
            return await self._queries.fetchone(sql, args)
        except sqlite3.Error as exc:
            raise _error(exc)(f"cannot read from {self.where}: {exc}") from None

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            return await self._queries.fetchall(sql, args)
        except sqlite3.Error as exc:
            raise _error(exc)(f"cannot read from {self.where}: {exc}") from None

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One statement in its own transaction."""
        async with self.transaction() as tx:
            return await tx.execute(sql, args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Queries]:
        async with self._turns.turn():
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _error(exc)(f"cannot write to {self.where}: {exc}") from None
            except BaseException:
                # Cancelled while BEGIN was queued (a factory stopped, the daemon stopping):
                # the connection's thread still runs it, and the transaction would stay
                # open for the next writer ("cannot start a transaction within a
                # transaction"). The ROLLBACK is queued behind it, before the lock is let go.
                await self._rollback()
                raise
            try:
                yield self._queries
            except sqlite3.Error as exc:
                await self._rollback()
                raise _error(exc)(f"write to {self.where} refused: {exc}") from exc
            except BaseException:
                await self._rollback()
                raise
            try:
                await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise _error(exc)(f"cannot commit to {self.where}: {exc}") from None

    def lease_transaction(self) -> AbstractAsyncContextManager[_Queries]:
        """The one writer: SQLite has one per file, whatever the connection."""
        return self.transaction()

    async def _rollback(self) -> None:
        try:
            await self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # no transaction left to roll back
            log.debug("rollback: %s", exc)

    async def transact(self, statements: Sequence[Statement]) -> list[list[Row]]:
        # One job on the connection's thread (aiosqlite's own queue, so it runs in turn with
        # every other statement on the connection): one thread hop and one wake-up of the
        # event loop per transaction instead of one per BEGIN, statement, fetch, cursor
        # close and COMMIT. The job ends its transaction itself, committed or rolled back,
        # so a caller cancelled meanwhile leaves none open.
        run: Callable[..., Awaitable[list[list[Row]]]] = (
            self._db._execute
        )  # aiosqlite: run on its thread
        async with self._turns.turn(ahead=True):
            try:
                return await run(_transact_on_thread, self._db, statements)
            except _Refused as refused:
                exc = refused.error
                message = refused.message.format(where=self.where, exc=exc)
                raise _error(exc)(message) from (exc if refused.step == "statement" else None)

    # -- wake-ups ------------------------------------------------------------------------

    async def notify(self, factory: str) -> None:
        for listener in self._listeners:
            listener.put(factory)

    def wakeups(self, catch_up: CatchUp) -> LocalWakeups:
        # Nothing to catch up on: in-process wake-ups are never interrupted.
        return LocalWakeups(self._listeners)

    # -- schema --------------------------------------------------------------------------

    async def check_version(self) -> int:
        return self._checked(await self.fetchone("PRAGMA user_version"))

    def _checked(self, row: Row | None) -> int:
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise newer_schema(self.where, version, len(MIGRATIONS))
        return version

    async def migrate(self) -> None:
        version = await self.check_version()
        if version == len(MIGRATIONS):
            return
        # A migration that rebuilds a table drops the old one while other tables still
        # refer to it (SQLite's way of changing keys): foreign keys are off meanwhile (the
        # pragma is ignored inside a transaction, hence here) and checked before each
        # commit instead.
        await self._db.execute("PRAGMA foreign_keys = OFF")
        try:
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                async with self.transaction() as tx:
                    # Another process (the daemon, syncctl --write) may have migrated since
                    # we looked; BEGIN IMMEDIATE holds the file now, so this reading stands.
                    if self._checked(await tx.fetchone("PRAGMA user_version")) >= target:
                        continue
                    for statement in _statements(script):
                        await tx.execute(statement)
                    broken = await tx.fetchall("PRAGMA foreign_key_check")
                    if broken:
                        raise StoreError(
                            f"cannot migrate {self.where} to schema version {target}: "
                            f"{len(broken)} rows refer to rows that are gone "
                            f"(first: table {broken[0][0]}, row {broken[0][1]})"
                        )
                    await tx.execute(f"PRAGMA user_version = {target}")
        finally:
            await self._db.execute("PRAGMA foreign_keys = ON")

    async def integrity_check(self) -> list[str]:
        """SQLite's own integrity check."""
        rows = await self.fetchall("PRAGMA integrity_check")
        problems = [str(r[0]) for r in rows]
        return [] if problems == ["ok"] else problems


class _Refused(Exception):
    """A :meth:`SQLiteBackend.transact` job's driver error, and at which step it came."""

    #: The messages of :meth:`SQLiteBackend.transaction`, step by step.
    MESSAGES = {
        "begin": "cannot write to {where}: {exc}",
        "statement": "write to {where} refused: {exc}",
        "commit": "cannot commit to {where}: {exc}",
    }

    def __init__(self, step: str, error: sqlite3.Error) -> None:
        super().__init__(step, error)
        self.step = step
        self.message = self.MESSAGES[step]
        self.error = error


def _transact_on_thread(
    db: aiosqlite.Connection, statements: Sequence[Statement]
) -> list[list[Row]]:
    """The body of :meth:`SQLiteBackend.transact`, run on the connection's thread."""
    conn = db._conn  # the sqlite3 connection, on its own thread
    step = "begin"
    try:
        conn.execute("BEGIN IMMEDIATE")
        step = "statement"
        results = [
            [tuple(row) for row in conn.execute(sql, args).fetchall()] for sql, args in statements
        ]
        step = "commit"
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if step != "begin":
            _rollback_on_thread(conn)
        raise _Refused(step, exc) from None
    except BaseException:
        _rollback_on_thread(conn)
        raise
    return results


def _rollback_on_thread(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:  # no transaction left to roll back
        log.debug("rollback: %s", exc)


def _lock(path: str) -> int:
    """Take the database's lock file, or say which process holds it."""
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(
            f"cannot open database {path}: cannot create its lock file {lock_path(path)}: "
            f"{exc.strerror or exc}{_why_unwritable(path)}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(
            f"database {path} is in use by another syncd (pid {holder}); one daemon per "
            "database file (syncctl can still read it)"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(fd: int | None) -> None:
    # Closing the descriptor releases the flock; the file stays (removing it would race a
    # second daemon that has opened it but not yet locked it).
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _error(error: sqlite3.Error) -> type[StoreError]:
    """Locked, busy, I/O, full or read-only are errors of the moment, not of the data."""
    return StoreUnavailable if isinstance(error, sqlite3.OperationalError) else StoreError


def _probe(path: str) -> None:
    sqlite3.connect(path).close()


def _why_unwritable(path: str) -> str:
    """A hint when the database cannot be written: SQLite's own message does not say why."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f" (the file system holding {folder} is read-only)"
    except OSError:
        return ""
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return " (the file is not writable by this user)"
    if not os.access(folder, os.W_OK):
        return f" ({folder} is not writable by this user)"
    return ""


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def ensure_not_in_use(path: str) -> None:
    """Check that no daemon holds the SQLite file at ``path`` (the demo asks before it moves one).

    :raises StoreInUse: another syncd holds it.
    """
    if not Path(lock_path(path)).exists():
        return
    _unlock(_lock(path))
