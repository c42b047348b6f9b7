"""The names of the triggers syncd's code fires: the one place the code spells them.

The statechart file decides what each does; :meth:`Statechart.check_code` checks at start-up
that every name here is one of its triggers and that each of its triggers is fired by
something, so a typo on either side stops the daemon instead of setting events aside.
"""

from __future__ import annotations

__all__ = [
    "CANCEL",
    "FOUND_DELIVERED",
    "IMPORT_FAILED",
    "MAKE_TO_ORDER_FAILED",
    "NOTHING_TO_MAKE",
    "OBSERVATION_TRIGGERS",
    "OPERATOR_TRIGGERS",
    "PO_RECEIVED",
    "PO_WITHDRAWN",
    "PRODUCTION_ORDERED",
    "PRODUCTION_STARTED",
    "RECEIVE_FAILED",
    "RETRY",
    "SO_CREATED",
    "SO_DELETED",
    "SO_DELIVERED",
]

# -- fired by effects' outcomes ------------------------------------------------------------
SO_CREATED = "so_created"
IMPORT_FAILED = "import_failed"
PRODUCTION_ORDERED = "production_ordered"
NOTHING_TO_MAKE = "nothing_to_make"
FOUND_DELIVERED = "found_delivered"
MAKE_TO_ORDER_FAILED = "make_to_order_failed"
PO_RECEIVED = "po_received"
RECEIVE_FAILED = "receive_failed"

# -- fired by what a look at either service shows (the rules) -------------------------------
SO_DELETED = "so_deleted"
SO_DELIVERED = "so_delivered"
PRODUCTION_STARTED = "production_started"
PO_WITHDRAWN = "po_withdrawn"
OBSERVATION_TRIGGERS = (SO_DELETED, SO_DELIVERED, PRODUCTION_STARTED, PO_WITHDRAWN)

# -- fired by operators (syncctl) -----------------------------------------------------------
RETRY = "retry"
CANCEL = "cancel"
OPERATOR_TRIGGERS = (RETRY, CANCEL)
