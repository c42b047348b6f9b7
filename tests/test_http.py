"""The shared request budget: no window the service can look at holds more than the limit."""

from __future__ import annotations

import pytest

from syncd.adapters._http import RequestBudget, parse_reset

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_request_counts_until_period_after_its_answer() -> None:
    clock = Clock()
    budget = RequestBudget(2, 60.0, clock=clock)
    await budget.acquire()
    await budget.acquire()
    assert budget.used == 2
    # Both on the wire: a third must wait even though nothing was answered yet.
    assert budget._wait_time() > 0
    clock.now += 5.0  # the answers take 5 s; the service counted them somewhere in between
    budget.complete()
    budget.complete()
    clock.now += 59.0  # 64 s after sending, but only 59 s after the answers
    assert budget._wait_time() == pytest.approx(1.0)
    clock.now += 1.0
    assert budget._wait_time() == 0
    assert budget.used == 0


async def test_a_429_blocks_every_caller() -> None:
    clock = Clock()
    budget = RequestBudget(10, 60.0, clock=clock)
    budget.block_for(12.0)
    assert budget._wait_time() == pytest.approx(12.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1795420000000", 1795420000.0), ("1795420000", 1795420000.0), ("30", 1030.0), ("x", None)],
)
def test_reset_headers_in_milliseconds_seconds_or_delta(value: str, expected: float | None) -> None:
    assert parse_reset(value, 1000.0) == expected
