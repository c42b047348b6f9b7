"""Every failure syncd can raise, in one tree.

SyncdError
 ├── ConfigError          a configuration file or value is wrong (names the key)
 ├── StoreError           the SQLite store cannot be opened, migrated or written
 ├── RuleViolation        an order breaks a mapping rule (e.g. a line without a SKU)
 ├── StatechartError      the statechart file is malformed, or a trigger is illegal
 └── ApiError             a service answered badly or not at all (names service and endpoint)
      ├── AuthError           401: the token was rejected
      ├── PaymentRequired     402: the account's plan does not allow the call
      ├── NotFound            404
      ├── ValidationFailed    422: the service refused the body; carries field details
      ├── RateLimited         429 that outlasted the waiting budget
      ├── ServerError         5xx
      ├── TransportError      timeout, refused or dropped connection
      └── DecodeError         a 2xx whose body is not what the contract says
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "AuthError",
    "ConfigError",
    "DecodeError",
    "NotFound",
    "PaymentRequired",
    "RateLimited",
    "RuleViolation",
    "ServerError",
    "StatechartError",
    "StoreError",
    "SyncdError",
    "TransportError",
    "ValidationFailed",
]


class SyncdError(Exception):
    """The root of every error syncd raises on purpose."""


class ConfigError(SyncdError):
    """A configuration file or value is wrong; the message names the key."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class StoreError(SyncdError):
    """The SQLite store cannot be opened, migrated or written.

    ``transient`` marks what may pass by itself (the file locked by another process past the
    busy timeout, a failing or full disk): the write is tried again later, never given up.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        self.transient = transient
        super().__init__(message)


class RuleViolation(SyncdError):
    """An order cannot be synced as it stands; the message says why, for a person."""


class StatechartError(SyncdError):
    """The statechart file is malformed, or a trigger is not allowed in the current state."""


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
