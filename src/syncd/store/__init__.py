"""The store: linked orders, their transition log, the inbox and cursors, in SQLite (a file,
the default) or PostgreSQL (a ``postgresql://`` URL)."""

from syncd.store._backend import StoreInUse
from syncd.store._store import InboxEvent, Store, TransitionRecord

__all__ = ["InboxEvent", "Store", "StoreInUse", "TransitionRecord"]
