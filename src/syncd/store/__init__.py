"""The store: linked orders, their transition log, the inbox and cursors, in SQLite."""

from syncd.store._store import InboxEvent, Store, TransitionRecord

__all__ = ["InboxEvent", "Store", "TransitionRecord"]
