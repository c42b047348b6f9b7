"""Named crash points, for the crash harness (``tests/crash_harness.py``).

``SYNCD_CRASH_AT`` names the points at which the process dies at once, as if killed with
SIGKILL (``os._exit(137)``: no cleanup, no flush, no ``finally``): ``so_created`` dies at the
first hit, ``price_updated:3`` at the third. Several are separated by commas. Unset (always,
in production) a crash point is one lookup in an empty dict.

The points sit where a crash hurts most: after an API call has done something and before
syncd has written that it did.
"""

from __future__ import annotations

import os
import sys

__all__ = ["CRASH_POINTS", "ENV", "EXIT_CODE", "crash_point"]

ENV = "SYNCD_CRASH_AT"
#: The exit status of a crash point: that of a process killed by SIGKILL under a shell.
EXIT_CODE = 137

#: Every point placed in the code, and where.
CRASH_POINTS: dict[str, str] = {
    "po_discovered": "a poller wrote po_discovered to the inbox; the dispatcher has not seen it",
    "customer_created": "Katana created the customer; nothing recorded it",
    "product_created": "Katana created a product for a new SKU; nothing recorded it",
    "so_create_noted": "the import attempt is noted in the store; the sales order POST not sent",
    "so_created": "Katana created the sales order; its outcome is not written",
    "mo_made": "Katana made a row's manufacturing order (make to order); nothing recorded it",
    "price_updated": "TradeGecko took a PO line's new price; the receipt has not happened",
    "po_received": "TradeGecko received the PO; its outcome is not written",
    "outcome_written": "an effect's outcome is in the inbox; the statechart has not applied it",
    "transition_applied": "a transition is committed; the next effect is not started",
    "webhook_acknowledged": "a delivery is in the inbox and its 200 sent; nothing processed it",
}


def _armed(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in spec.split(","):
        name, _, nth = item.strip().partition(":")
        if not name:
            continue
        if name not in CRASH_POINTS:
            raise ValueError(f"{ENV}: no crash point is called {name!r}")
        armed[name] = int(nth) if nth else 1
    return armed


_ARMED: dict[str, int] = _armed(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here, as if killed, when ``SYNCD_CRASH_AT`` arms ``name`` for this hit."""
    if name not in _ARMED:
        return
    _hits[name] = hit = _hits.get(name, 0) + 1
    if hit >= _ARMED[name]:
        sys.stderr.write(f"syncd: crash point {name} (hit {hit}): exiting {EXIT_CODE}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
