"""The store: linked orders, their transition log, the inbox and cursors, per factory, in
SQLite (a file, the default) or PostgreSQL (a ``postgresql://`` URL); the factories' leases
when several daemons share one PostgreSQL database."""

from syncd.store._backend import Wakeups, is_postgres_url, redacted
from syncd.store._sqlite import ensure_not_in_use
from syncd.store._store import (
    DEFAULT_FACTORY,
    ImportOutcome,
    ImportResult,
    InboxEvent,
    Lease,
    LeaseRecord,
    Placement,
    PlannedWrite,
    PurchaseOrderObservation,
    SalesOrderEvidence,
    Store,
    TransitionRecord,
    new_owner_id,
)

__all__ = [
    "DEFAULT_FACTORY",
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
    "Wakeups",
    "ensure_not_in_use",
    "is_postgres_url",
    "new_owner_id",
    "redacted",
]
