"""The kinds of event that enter the inbox, and their payloads.

Sources (pollers, webhooks, effects) write these; only the dispatcher reads them. Each kind
has one payload type, encoded as JSON in the inbox row.
"""

from __future__ import annotations

import msgspec

from syncd.domain.orders import PurchaseOrderSnapshot, SalesOrderFacts
from syncd.runtime.effects import Outcome

__all__ = [
    "EFFECT_OUTCOME",
    "PO_DISCOVERED",
    "PO_OBSERVED",
    "SO_OBSERVED",
    "PurchaseOrderObserved",
    "decode",
    "encode",
]

PO_DISCOVERED = "po_discovered"
PO_OBSERVED = "purchase_order_observed"
SO_OBSERVED = "sales_order_observed"
EFFECT_OUTCOME = "effect_outcome"


class PurchaseOrderObserved(msgspec.Struct, kw_only=True, frozen=True):
    """A linked PO's status as last seen in TradeGecko."""

    po_id: int
    status: str


_TYPES: dict[str, type[msgspec.Struct]] = {
    PO_DISCOVERED: PurchaseOrderSnapshot,
    PO_OBSERVED: PurchaseOrderObserved,
    SO_OBSERVED: SalesOrderFacts,
    EFFECT_OUTCOME: Outcome,
}
_DECODERS = {kind: msgspec.json.Decoder(t) for kind, t in _TYPES.items()}

encode = msgspec.json.Encoder().encode


def decode(kind: str, payload: bytes) -> msgspec.Struct:
    """Decode an inbox payload of ``kind``.

    :raises KeyError: an unknown kind.
    :raises msgspec.DecodeError: a payload that does not fit its kind.
    """
    result: msgspec.Struct = _DECODERS[kind].decode(payload)
    return result
