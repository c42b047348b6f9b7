"""The error tree: every type is classified transient or not, and the tree at the top of
``errors.py`` shows every type with its classification."""

from __future__ import annotations

import re

import pytest

from syncd import errors
from syncd.errors import Retries, RetryPolicy, Try

#: Every error type and whether it may pass by itself. A new type fails
#: test_every_error_type_is_classified until it is added here, on purpose.
TRANSIENT: dict[type[errors.SyncdError], bool] = {
    errors.SyncdError: False,
    errors.ConfigError: False,
    errors.StoreError: False,
    errors.StoreUnavailable: True,
    errors.StoreConflict: False,
    errors.StoreInUse: False,
    # Settled by stopping the factory's work (its new owner carries on), never by retrying.
    errors.LeaseLost: False,
    errors.WriteWithheld: False,
    errors.RuleViolation: False,
    errors.StatechartError: False,
    errors.ApiError: False,
    errors.AuthError: True,
    errors.PaymentRequired: False,
    errors.NotFound: False,
    errors.ValidationFailed: False,
    errors.RateLimited: True,
    errors.ServerError: True,
    errors.TransportError: True,
    errors.DecodeError: True,
}

EXPORTED_TYPES = [
    value
    for value in (getattr(errors, name) for name in errors.__all__)
    if isinstance(value, type) and issubclass(value, BaseException)
]


def _instance(kind: type[errors.SyncdError]) -> errors.SyncdError:
    if issubclass(kind, errors.ApiError):
        status = {
            errors.AuthError: 401,
            errors.PaymentRequired: 402,
            errors.NotFound: 404,
            errors.ValidationFailed: 422,
            errors.RateLimited: 429,
            errors.ServerError: 503,
        }.get(kind)
        return kind("katana", "GET", "/factory", "reason", status=status)
    if kind is errors.WriteWithheld:
        return errors.WriteWithheld("katana", "POST", "/sales_orders", "/sales_orders", {})
    return kind("reason")


def test_every_error_type_is_classified() -> None:
    assert set(EXPORTED_TYPES) == set(TRANSIENT)


@pytest.mark.parametrize("kind", list(TRANSIENT), ids=lambda kind: kind.__name__)
def test_is_transient(kind: type[errors.SyncdError]) -> None:
    assert errors.is_transient(_instance(kind)) is TRANSIENT[kind]


def test_a_bare_api_error_of_any_status_is_not_transient() -> None:
    # The clients raise ServerError for a 5xx and RateLimited for a 429; what is left as a
    # bare ApiError is a 4xx that no retry can change.
    for status in (None, 400, 403, 409, 414):
        assert not errors.is_transient(
            errors.ApiError("tradegecko", "PUT", "/x", "r", status=status)
        )


def test_what_syncd_does_not_raise_is_not_transient() -> None:
    assert not errors.is_transient(OSError("disk"))
    assert not errors.is_transient(ValueError("x"))


def test_store_errors_stay_store_errors() -> None:
    # Callers that catch StoreError (the command-line tools, the dispatcher) still do.
    assert issubclass(errors.StoreUnavailable, errors.StoreError)
    assert issubclass(errors.StoreConflict, errors.StoreError)
    assert issubclass(errors.StoreInUse, errors.StoreError)
    assert issubclass(errors.LeaseLost, errors.StoreError)


def test_the_tree_shows_every_type_and_marks_the_transient_ones() -> None:
    doc = errors.__doc__ or ""
    # One line per type under the root: branches, the name, then ``*`` when transient.
    lines = doc.split("\n\n")[1].splitlines()
    tree = {
        match.group(1): match.group(2) == "*"
        for match in (re.match(r"[├└─│ ]*(\w+) +(\*?)", line) for line in lines)
        if match
    }
    assert tree == {
        kind.__name__: TRANSIENT[kind] for kind in TRANSIENT if kind is not errors.SyncdError
    }


def test_all_is_complete_and_sorted() -> None:
    public = {
        name
        for name, value in vars(errors).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == errors.__name__
    }
    assert set(errors.__all__) == public
    assert errors.__all__ == sorted(errors.__all__)


# -- retry policy --------------------------------------------------------------------------


def test_a_retry_policy_waits_longer_each_time_up_to_its_maximum() -> None:
    policy = RetryPolicy(initial=0.5, maximum=10.0, coefficient=2.0)
    assert [policy.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(10_000) == 10.0  # no overflow however long it fails


def test_retries_give_up_after_the_policys_attempts_and_start_again_after_success() -> None:
    retries: Retries[str] = Retries(RetryPolicy(initial=0.1, maximum=1.0, attempts=3))
    assert retries.failed("a") == Try(1, 0.1)
    assert retries.failed("a") == Try(2, 0.2)
    assert retries.failed("b") == Try(1, 0.1)  # counted per piece of work
    assert retries.failed("a") == Try(3, None)  # spent: give up
    assert retries.failed("a") == Try(1, 0.1)  # forgotten once given up
    retries.succeeded("a")
    assert retries.failed("a") == Try(1, 0.1)


def test_without_attempts_a_policy_never_gives_up() -> None:
    retries: Retries[int] = Retries(RetryPolicy(initial=5.0, maximum=300.0))
    tries = [retries.failed(1) for _ in range(50)]
    assert all(t.delay is not None for t in tries) and tries[-1] == Try(50, 300.0)
