"""Every failure syncd can raise, in one tree.

SyncdError
 ├── ConfigError          a configuration file or value is wrong (names the key)
 ├── StoreError           the store (SQLite or PostgreSQL) cannot be opened or written
 │    ├── StoreUnavailable    * locked past the timeout, a full or failing disk, a lost server
 │    ├── StoreConflict       another writer moved the order first: decide again
 │    ├── StoreInUse          another syncd holds the SQLite file: one daemon per file
 │    └── LeaseLost           another daemon took the factory over: stop its work
 ├── RuleViolation        an order breaks a mapping rule (e.g. a line without a SKU)
 ├── StatechartError      the statechart file is malformed, or a trigger is illegal
 ├── WriteWithheld        a shadow run stopped a writing request before it was sent
 └── ApiError             a service answered badly or not at all (names service and endpoint)
      ├── AuthError           * 401: the token was rejected
      ├── PaymentRequired     402: the account's plan does not allow the call
      ├── NotFound            404
      ├── ValidationFailed    422: the service refused the body; carries field details
      ├── RateLimited         * 429 that outlasted the waiting budget
      ├── ServerError         * 5xx
      ├── TransportError      * timeout, refused or dropped connection
      └── DecodeError         * a 2xx whose body is not what the contract says

``*`` marks the transient ones, those :func:`is_transient` says may pass by themselves: the
work waits and is tried again, and no person is asked to look. How it is tried again is a
:class:`RetryPolicy` (every one syncd uses is in :data:`syncd.config.RETRY`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "ApiError",
    "AuthError",
    "ConfigError",
    "DecodeError",
    "LeaseLost",
    "NotFound",
    "PaymentRequired",
    "RateLimited",
    "Retries",
    "RetryPolicy",
    "RuleViolation",
    "ServerError",
    "StatechartError",
    "StoreConflict",
    "StoreError",
    "StoreInUse",
    "StoreUnavailable",
    "SyncdError",
    "TransportError",
    "Try",
    "ValidationFailed",
    "WriteWithheld",
    "first_error",
    "is_transient",
    "leaf_errors",
]


class SyncdError(Exception):
    """The root of every error syncd raises on purpose."""


class ConfigError(SyncdError):
    """A configuration file or value is wrong; the message names the key."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class StoreError(SyncdError):
    """The store (a SQLite file or a PostgreSQL database) cannot be opened, migrated, read
    or written."""


class StoreUnavailable(StoreError):
    """The store cannot take a write just now: the file or a row is locked by another
    process past the timeout, the disk is failing or full, or the PostgreSQL server is
    restarting, unreachable or lost the connection (also a deadlock or serialization
    failure). The write is tried again later, never given up."""


class StoreConflict(StoreError):
    """An optimistic write found the order no longer where the caller read it: another
    writer moved it first. Nothing was written; the caller decides again from the order as
    it now is."""


class StoreInUse(StoreError):
    """Another syncd holds the SQLite file for writing: one daemon per file. Said at start
    (``syncd run`` exits 6); reading it (``syncctl``, ``syncd check``) is never refused."""


class LeaseLost(StoreError):
    """A write fenced by a factory's lease found the lease no longer current: it expired,
    or another daemon took the factory over (a higher fence). Nothing was written; the
    daemon must stop that factory's work (the new owner carries it on), never retry it."""


class RuleViolation(SyncdError):
    """An order cannot be synced as it stands; the message says why, for a person."""


class StatechartError(SyncdError):
    """The statechart file is malformed, or a trigger is not allowed in the current state."""


class WriteWithheld(SyncdError):
    """A shadow run (``syncd run --shadow``) stopped a writing request (POST, PUT, PATCH,
    DELETE) before it was sent: what it would have sent, for the order's plan.

    Not an :class:`ApiError` (no service was asked, so no effect mistakes it for a refusal)
    and not transient (trying again withholds the same request).

    :param service: ``"katana"`` or ``"tradegecko"``.
    :param method: the HTTP method.
    :param endpoint: the endpoint as a template (``/sales_orders/{id}``).
    :param path: the path that would have been called.
    :param body: the JSON body that would have been sent, decoded (``None``: no body).
    """

    def __init__(
        self, service: str, method: str, endpoint: str, path: str, body: Any = None
    ) -> None:
        self.service = service
        self.method = method
        self.endpoint = endpoint
        self.path = path
        self.body = body
        super().__init__(f"{service} {method} {path}: withheld (shadow run)")


class ApiError(SyncdError):
    """A call to TradeGecko or Katana failed.

    :param service: ``"katana"`` or ``"tradegecko"``.
    :param method: the HTTP method.
    :param endpoint: the path called, without query string.
    :param reason: a short human explanation.
    :param status: the HTTP status, when an answer came.
    :param details: field-level details of a validation error, when given.
    """

    def __init__(
        self,
        service: str,
        method: str,
        endpoint: str,
        reason: str,
        *,
        status: int | None = None,
        details: Any = None,
        request_id: str | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.endpoint = endpoint
        self.reason = reason
        self.status = status
        self.details = details
        self.request_id = request_id
        where = f"{service} {method} {endpoint}"
        code = f" {status}" if status is not None else ""
        super().__init__(f"{where}:{code} {reason}")


class AuthError(ApiError):
    """401: the token was missing or rejected."""


class PaymentRequired(ApiError):
    """402: the account's subscription does not allow the call."""


class NotFound(ApiError):
    """404: the record does not exist (or no longer does)."""


class ValidationFailed(ApiError):
    """422: the service refused the request body; ``details`` names the fields."""


class RateLimited(ApiError):
    """429 that outlasted the time syncd is willing to wait."""


class ServerError(ApiError):
    """5xx from the service."""


class TransportError(ApiError):
    """No answer: timeout, connection refused or dropped, truncated body."""


class DecodeError(ApiError):
    """A successful status whose body does not match the contract."""


#: What may pass by itself. A revoked token is here too: every order pauses until it
#: works again (the pollers say so) rather than each asking a person.
_TRANSIENT: tuple[type[SyncdError], ...] = (
    StoreUnavailable,
    AuthError,
    RateLimited,
    ServerError,
    TransportError,
    DecodeError,
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may go away by itself, so the work is retried later rather than
    handed to a person (or counted towards setting an event aside).

    A :class:`StoreConflict` is not transient: it is settled by deciding again, and one that
    keeps coming back is a fault.
    """
    return isinstance(error, _TRANSIENT)


@dataclass(frozen=True)
class RetryPolicy:
    """How work that failed for a passing reason is tried again: wait ``initial`` seconds,
    then ``coefficient`` times longer each time, never more than ``maximum``; give up after
    ``attempts`` tries in all (``None``: never give up). Modelled on Temporal's."""

    initial: float
    maximum: float
    coefficient: float = 2.0
    attempts: int | None = None
    #: Seconds past a write's timeout before its retry looks for what the write may have
    #: made: a request the client gave up on (a timeout, a dropped answer, a 5xx) may still
    #: land while a proxy or the service carries it through.
    settle: float = 0.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1 for the first)."""
        return min(self.maximum, self.initial * self.coefficient ** min(max(failures, 1) - 1, 64))


@dataclass(frozen=True)
class Try:
    """A failure as a :class:`Retries` counted it: which one in a row, and how long to wait
    before the next try (``None``: the attempts are spent; give up)."""

    number: int
    delay: float | None


_K = TypeVar("_K")


class Retries(Generic[_K]):
    """Failures in a row of each piece of work (``key``), under one :class:`RetryPolicy`."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._failures: dict[_K, int] = {}

    def failed(self, key: _K) -> Try:
        """Count a failure of ``key``; when its attempts are spent, it is forgotten."""
        number = self._failures.get(key, 0) + 1
        if self.policy.attempts is not None and number >= self.policy.attempts:
            self._failures.pop(key, None)
            return Try(number, None)
        self._failures[key] = number
        return Try(number, self.policy.delay(number))

    def succeeded(self, key: _K) -> None:
        """``key`` worked (or was dealt with): its next failure is the first again."""
        self._failures.pop(key, None)


_E = TypeVar("_E", bound=BaseException)


def leaf_errors(exc: BaseException) -> Iterator[BaseException]:
    """The errors inside ``exc``, unwrapping the exception groups task groups raise."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_errors(inner)
    else:
        yield exc


def first_error(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first error of ``kind`` in ``exc`` (itself, or inside its groups)."""
    return next((e for e in leaf_errors(exc) if isinstance(e, kind)), None)
