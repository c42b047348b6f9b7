"""The plumbing both clients share: the request budget (no window the service can look at
holds more than the limit), paging, chunking and the time format of filters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from syncd.adapters._http import RequestBudget, chunks, format_time, is_last_page, parse_reset

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


@pytest.mark.parametrize(
    ("header", "page", "count", "last"),
    [
        # TradeGecko: booleans and numbers.
        ('{"total_pages": 3, "last_page": false, "out_of_bounds": false}', 2, 250, False),
        ('{"total_pages": 3, "last_page": true}', 3, 250, True),
        ('{"last_page": false, "out_of_bounds": true}', 4, 1, True),
        ('{"last_page": false}', 1, 10, False),  # the header's word beats the short page
        # Katana: the same facts as strings.
        ('{"total_pages": "3", "last_page": "false"}', 2, 250, False),
        ('{"total_pages": "3", "last_page": "false"}', 3, 250, True),
        ('{"last_page": "TRUE"}', 1, 250, True),
        # Nothing usable: a short page is the last, a full one is not.
        (None, 1, 250, False),
        (None, 1, 249, True),
        ("not json", 1, 249, True),
        ('{"total_pages": "²"}', 1, 250, False),  # isdigit() but not a number int() reads
        ('{"total_pages": true}', 1, 249, True),
        ("[" * 10_000, 1, 250, False),
        # An empty page ends the walk whatever the header says.
        ('{"total_pages": 9, "last_page": false}', 1, 0, True),
    ],
)
def test_last_page_from_either_services_pagination_header(
    header: str | None, page: int, count: int, last: bool
) -> None:
    assert is_last_page(header, page, count, 250) is last


def test_chunks_drop_repeats_and_keep_order() -> None:
    assert chunks([3, 1, 3, 2, 1, 4], 2) == [[3, 1], [2, 4]]
    assert chunks([], 100) == []


def test_time_filters_are_utc_with_milliseconds_and_z() -> None:
    assert format_time(datetime(2024, 5, 1, 12, 0, 7, 123456)) == "2024-05-01T12:00:07.123Z"
    plus_two = timezone(timedelta(hours=2))
    assert format_time(datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)) == "2024-05-01T12:00:00.000Z"
