"""What the running daemon tells whoever watches it: one observer, passed in once.

The dispatcher, the webhook listener and the HTTP clients report through it; metrics and the
demo's live view implement it. :class:`Observer` does nothing with any report, so a watcher
overrides only what it cares for; :class:`Observers` tells several at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from syncd.domain.orders import LinkedOrder

__all__ = ["Observer", "Observers", "TransitionNotice"]


@dataclass(frozen=True)
class TransitionNotice:
    """Told to observers after a transition is persisted."""

    link: LinkedOrder
    source: str | None
    dest: str
    trigger: str
    cause: str
    #: When the order entered ``source``; ``None`` for a new order.
    since: datetime | None = None


class Observer:
    """Every report the daemon makes; each one here is ignored."""

    def transitioned(self, notice: TransitionNotice) -> None:
        """An order moved (the move is persisted)."""

    def effect_ran(self, effect: str, result: str) -> None:
        """An effect ran: ``ok``, ``retry`` (failed for a passing reason) or ``failed`` (a
        person must look)."""

    def drift_found(self, side: str) -> None:
        """An order was found edited after import on ``side`` (``tradegecko``, ``katana``)."""

    def webhook_answered(self, service: str, result: str) -> None:
        """The listener answered a delivery from ``service``: ``accepted``, ``duplicate``,
        ``bad_signature``, ..."""

    def api_answered(
        self, service: str, method: str, endpoint: str, status: int, seconds: float
    ) -> None:
        """A request to ``service`` ended: its status (0 when no answer came) and time."""


class Observers(Observer):
    """Tells every one of ``observers`` each report, in order."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)

    def transitioned(self, notice: TransitionNotice) -> None:
        for observer in self.observers:
            observer.transitioned(notice)

    def effect_ran(self, effect: str, result: str) -> None:
        for observer in self.observers:
            observer.effect_ran(effect, result)

    def drift_found(self, side: str) -> None:
        for observer in self.observers:
            observer.drift_found(side)

    def webhook_answered(self, service: str, result: str) -> None:
        for observer in self.observers:
            observer.webhook_answered(service, result)

    def api_answered(
        self, service: str, method: str, endpoint: str, status: int, seconds: float
    ) -> None:
        for observer in self.observers:
            observer.api_answered(service, method, endpoint, status, seconds)
