"""The store: linked orders, their transition log, the inbox and cursors, in SQLite."""

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
]
