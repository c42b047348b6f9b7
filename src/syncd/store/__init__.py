"""The store: linked orders, their transition log, the inbox and cursors, in SQLite (a file,
the default) or PostgreSQL (a ``postgresql://`` URL)."""

from syncd.store._backend import is_postgres_url, redacted
from syncd.store._sqlite import ensure_not_in_use
from syncd.store._store import (
    ImportOutcome,
    ImportResult,
    InboxEvent,
    PurchaseOrderObservation,
    Store,
    TransitionRecord,
)

__all__ = [
    "ImportOutcome",
    "ImportResult",
    "InboxEvent",
    "PurchaseOrderObservation",
    "Store",
    "TransitionRecord",
    "ensure_not_in_use",
    "is_postgres_url",
    "redacted",
]
