"""What the store needs from a database: one small protocol, one implementation per dialect.

:class:`~syncd.store.Store` writes each query once, in the SQL both dialects share: ``?``
placeholders, ``INSERT ... ON CONFLICT ... DO NOTHING | DO UPDATE``, ``RETURNING id`` for a
new row's id, and functions both know (``count``, ``min``, ``substr``, ``coalesce``). A
backend translates placeholders, runs transactions, keeps the schema at the latest
migration, and turns its driver's errors into :class:`~syncd.errors.StoreError`: a
:class:`~syncd.errors.StoreUnavailable` for what may pass by itself (locks, serialization
failures, lost connections, a full or failing disk).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from syncd.errors import StoreError

__all__ = [
    "Backend",
    "CatchUp",
    "Queries",
    "Row",
    "Statement",
    "Wakeups",
    "is_postgres_url",
    "newer_schema",
    "redact",
    "redacted",
]

#: One result row, columns in the order the query named them.
Row = tuple[Any, ...]
#: A statement in the shared SQL and its arguments.
Statement = tuple[str, Sequence[Any]]


class Queries(Protocol):
    """Statements in the shared SQL, with ``?`` placeholders."""

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        """The first row of the query's result, or ``None``."""
        ...

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Every row of the query's result."""
        ...

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; return how many rows it changed."""
        ...


class Wakeups(Protocol):
    """Factory names as :meth:`Backend.notify` sends them; listening from ``__aenter__`` to
    ``__aexit__``."""

    async def __aenter__(self) -> Wakeups: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> Wakeups: ...

    async def __anext__(self) -> str: ...


#: What :meth:`Backend.wakeups` names after a gap in listening: every factory with work.
CatchUp = Callable[[], Awaitable[list[str]]]


class Backend(Queries, Protocol):
    """An open syncd database.

    Reads may run at any time and see committed data; writes run inside
    :meth:`transaction`, one task at a time, and the coordinator's lease and heartbeat
    statements inside :meth:`lease_transaction`.
    """

    #: ``"sqlite"`` or ``"postgresql"``.
    dialect: str
    #: The database as messages name it: a file path, or a URL without its password.
    where: str

    def transaction(self) -> AbstractAsyncContextManager[Queries]:
        """Begin a write transaction, whose statements run on what the block is given;
        commit when the block ends, roll back if it raises.

        :raises StoreUnavailable: begin, a statement or commit failed for a reason that
            may pass by itself.
        :raises StoreError: they failed for a lasting reason.
        """
        ...

    def lease_transaction(self) -> AbstractAsyncContextManager[Queries]:
        """A write transaction like :meth:`transaction`'s, for leases and heartbeats: where
        the database allows several writers (PostgreSQL), on a session of its own, so that
        a renewal never waits for the factories' writes to finish; on SQLite (one writer
        per file) the same as :meth:`transaction`.

        :raises StoreUnavailable: as :meth:`transaction`.
        :raises StoreError: as :meth:`transaction`.
        """
        ...

    async def transact(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """Run ``statements`` in one write transaction, as :meth:`transaction` would, and
        return each one's rows. For a write decided before it starts (an inbox group
        commit): SQLite runs it as one job on the connection's thread, not one per
        statement, begin and commit.

        :raises StoreUnavailable: as :meth:`transaction`.
        :raises StoreError: as :meth:`transaction`.
        """
        ...

    async def migrate(self) -> None:
        """Bring the schema to the latest migration.

        :raises StoreError: the schema is newer than this syncd, or a migration failed.
        """
        ...

    async def check_version(self) -> int:
        """The schema version, without migrating.

        :raises StoreError: the schema is newer than this syncd.
        """
        ...

    async def integrity_check(self) -> list[str]:
        """What is wrong with the database; empty when it is sound."""
        ...

    async def notify(self, factory: str) -> None:
        """Wake whoever listens for ``factory``."""
        ...

    def wakeups(self, catch_up: CatchUp) -> Wakeups:
        """Listen for :meth:`notify`; ``catch_up`` names the factories to wake after
        listening was interrupted (a lost connection)."""
        ...

    async def close(self) -> None: ...


def newer_schema(where: str, version: int, latest: int) -> StoreError:
    return StoreError(
        f"database {where} has schema version {version}, newer than this syncd "
        f"({latest}): upgrade syncd"
    )


def is_postgres_url(location: str) -> bool:
    """Whether ``daemon.database`` names a PostgreSQL database rather than a file."""
    return location.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    url = re.sub(r"(?i)(password=)[^&]*", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def redacted(location: str) -> str:
    """``daemon.database`` as messages and logs may show it: a URL without its password."""
    return redact(location) if is_postgres_url(location) else location
