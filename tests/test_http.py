"""The plumbing both clients share: the request budget (no window the service can look at
holds more than syncd's share; waiting requests go by priority; others on the key keep
their room), paging, chunking and the time format of filters."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import msgspec
import pytest

from conftest import running_sims
from syncd.adapters._http import (
    HostPool,
    Priority,
    RequestBudget,
    ServiceClient,
    Slot,
    _sending_for,
    chunks,
    current_priority,
    format_time,
    guarded_transport,
    is_last_page,
    parse_reset,
    request_priority,
    slot_given_back,
)
from syncd.errors import LeaseLost, TransportError
from syncd.ops.asgi import serving
from syncd.runtime.daemon import running_daemon
from test_flow import is_state, wait_for

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


class Queue:
    """Callers waiting on one budget; what they got, in order."""

    def __init__(self, budget: RequestBudget, clock: Clock) -> None:
        self.budget = budget
        self.clock = clock
        self.served: list[str] = []

    async def ask(self, tg: anyio.abc.TaskGroup, name: str, priority: Priority) -> None:
        async def caller() -> None:
            await self.budget.acquire(priority)
            self.served.append(name)

        tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()  # queued in this order

    async def release_one(self) -> None:
        """The request on the wire is answered and ages out of the window."""
        self.budget.complete()
        self.clock.now += self.budget.period
        self.budget._notify()
        await anyio.wait_all_tasks_blocked()


async def test_waiting_requests_go_highest_priority_first_then_in_arrival_order() -> None:
    clock = Clock()
    budget = RequestBudget(1, 60.0, clock=clock, promote_after=1000.0)
    queue = Queue(budget, clock)
    await budget.acquire()  # the window is full
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await queue.ask(tg, "poll", Priority.BACKGROUND)
            await queue.ask(tg, "import 1", Priority.START)
            await queue.ask(tg, "receipt", Priority.FINISH)
            await queue.ask(tg, "import 2", Priority.START)
            assert budget.waiting == 4
            assert queue.served == []
            for served in range(1, 5):
                await queue.release_one()
                assert len(queue.served) == served  # one at a time: the window holds one
    assert queue.served == ["receipt", "import 1", "import 2", "poll"]
    assert budget.sent_by_priority == {
        Priority.BACKGROUND: 1,
        Priority.START: 3,  # the first acquire had no priority set: START
        Priority.FINISH: 1,
    }


async def test_a_low_priority_request_moves_up_while_it_waits() -> None:
    # Starvation bound: after promote_after seconds a request ranks one higher; after
    # 2 * promote_after a poll ranks as FINISH and goes before every later request.
    clock = Clock()
    budget = RequestBudget(1, 60.0, clock=clock, promote_after=10.0)
    queue = Queue(budget, clock)
    await budget.acquire()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await queue.ask(tg, "poll", Priority.BACKGROUND)
            clock.now += 5.0
            await queue.ask(tg, "import", Priority.START)
            await queue.release_one()  # poll waited 65 s: FINISH now, and first to come
            await queue.ask(tg, "receipt", Priority.FINISH)
            await queue.release_one()
            await queue.release_one()
    assert queue.served == ["poll", "import", "receipt"]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    clock = Clock()
    budget = RequestBudget(1, 60.0, clock=clock)
    queue = Queue(budget, clock)
    await budget.acquire()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await budget.acquire(Priority.FINISH)
            await queue.ask(tg, "import", Priority.START)
            assert budget.waiting == 1
            await queue.release_one()
    assert queue.served == ["import"]
    assert budget.waiting == 0


async def test_a_request_that_can_go_at_once_keeps_its_slot() -> None:
    limiter = anyio.CapacityLimiter(1)
    budget = RequestBudget(5, 60.0, clock=Clock())
    async with Slot(limiter) as slot:
        await budget.acquire()
        assert slot.held
        assert limiter.borrowed_tokens == 1
    assert limiter.borrowed_tokens == 0


async def test_a_request_that_waits_gives_its_slot_back_and_takes_it_again() -> None:
    clock = Clock()
    limiter = anyio.CapacityLimiter(1)
    budget = RequestBudget(1, 60.0, clock=clock)
    await budget.acquire()  # the window is full: the next request waits
    steps: list[str] = []

    async def parked() -> None:
        async with Slot(limiter) as slot:
            await budget.acquire()
            assert slot.held
            steps.append("parked request sent")

    async def other_service() -> None:
        async with Slot(limiter):
            steps.append("other effect ran")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(parked)
            await wait_until(lambda: budget.waiting == 1)
            assert limiter.borrowed_tokens == 0  # parked: its slot is free
            tg.start_soon(other_service)
            await wait_until(lambda: steps == ["other effect ran"])
            await Queue(budget, clock).release_one()  # now the parked request fits
    assert steps == ["other effect ran", "parked request sent"]
    assert limiter.borrowed_tokens == 0


async def test_an_effect_waiting_on_anothers_read_frees_its_slot_for_it() -> None:
    # The reader parks on a full budget (its slot given back), the joiner takes the only
    # slot and waits for the reader's answer: holding it there, the reader could never
    # take its slot again to send (the read-ahead deadlock the sustained bench found).
    clock = Clock()
    limiter = anyio.CapacityLimiter(1)
    budget = RequestBudget(1, 60.0, clock=clock)
    await budget.acquire()
    answered, joined = anyio.Event(), anyio.Event()
    steps: list[str] = []

    async def reader() -> None:
        async with Slot(limiter):
            await budget.acquire()
            steps.append("read sent")
            answered.set()

    async def joiner() -> None:
        async with Slot(limiter) as slot:
            async with slot_given_back():
                assert not slot.held
                joined.set()
                await answered.wait()
            assert slot.held
            steps.append("joiner served")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await wait_until(lambda: budget.waiting == 1)
            tg.start_soon(joiner)
            await joined.wait()
            assert limiter.borrowed_tokens == 0
            await Queue(budget, clock).release_one()
    assert steps == ["read sent", "joiner served"]
    assert limiter.borrowed_tokens == 0


async def test_a_parked_request_cancelled_leaks_no_slot_and_releases_none_twice() -> None:
    clock = Clock()
    limiter = anyio.CapacityLimiter(1)
    budget = RequestBudget(1, 60.0, clock=clock)
    await budget.acquire()

    async def parked(scope: anyio.CancelScope) -> None:
        with scope:
            async with Slot(limiter):
                await budget.acquire()
        # Releasing a slot twice would have raised (RuntimeError) out of Slot's exit.

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(parked, scope)
            await wait_until(lambda: budget.waiting == 1)
            scope.cancel()
    assert limiter.borrowed_tokens == 0
    assert budget.waiting == 0
    assert budget.used == 1  # only the request that was sent


async def test_a_request_cancelled_while_taking_its_slot_again_is_uncounted() -> None:
    clock = Clock()
    limiter = anyio.CapacityLimiter(1)
    budget = RequestBudget(1, 60.0, clock=clock)
    await budget.acquire()
    busy = anyio.Event()
    finish = anyio.Event()

    async def parked(scope: anyio.CancelScope) -> None:
        with scope:
            async with Slot(limiter):
                await budget.acquire()

    async def working() -> None:
        async with Slot(limiter):
            busy.set()
            await finish.wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(parked, scope)
            await wait_until(lambda: budget.waiting == 1)
            tg.start_soon(working)
            await busy.wait()
            await Queue(budget, clock).release_one()
            # The budget let it go; now it waits for the slot the other effect holds.
            await wait_until(lambda: budget.waiting == 0 and limiter.statistics().tasks_waiting)
            assert budget.used == 1
            scope.cancel()
            await wait_until(lambda: budget.used == 0)
            assert limiter.borrowed_tokens == 1  # the working effect's, nothing else
            finish.set()
    assert limiter.borrowed_tokens == 0
    assert budget.sent_by_priority[Priority.START] == 1  # the first request, not the cancelled


async def wait_until(condition: Callable[[], object]) -> None:
    """Poll ``condition`` until it holds (the caller's ``fail_after`` bounds the wait)."""
    while True:
        if condition():
            return
        await anyio.sleep(0.005)


async def test_the_priority_comes_from_the_caller_context() -> None:
    assert current_priority() is Priority.START

    @request_priority(Priority.BACKGROUND)
    async def poll() -> Priority:
        return current_priority()

    with request_priority(Priority.FINISH):
        assert current_priority() is Priority.FINISH
        assert await poll() is Priority.BACKGROUND
        assert current_priority() is Priority.FINISH  # restored after the call
        budget = RequestBudget(5, 60.0)
        await budget.acquire()
        assert budget.sent_by_priority[Priority.FINISH] == 1
        # Tasks started inside inherit it.
        async with anyio.create_task_group() as tg:
            tg.start_soon(budget.acquire)
        assert budget.sent_by_priority[Priority.FINISH] == 2
    assert current_priority() is Priority.START


async def test_lower_priorities_leave_the_last_slots_to_higher_ones() -> None:
    # Polls must not take the slot a receipt will need the moment after.
    clock = Clock()
    budget = RequestBudget(60, 60.0, reserve=10, clock=clock)
    assert budget.headroom == 2  # a twentieth of the 50 syncd may use
    for _ in range(46):
        await budget.acquire(Priority.BACKGROUND)
    assert budget._wait_time(Priority.BACKGROUND) > 0  # 4 left: for imports and receipts
    assert budget._wait_time(Priority.START) == 0
    for _ in range(2):
        await budget.acquire(Priority.START)
    assert budget._wait_time(Priority.START) > 0
    for _ in range(2):
        await budget.acquire(Priority.FINISH)
    assert budget._wait_time(Priority.FINISH) > 0
    assert budget.used == 50


async def test_the_reserve_is_never_taken() -> None:
    clock = Clock()
    budget = RequestBudget(10, 60.0, reserve=3, clock=clock)
    for _ in range(7):
        assert budget._wait_time() == 0
        await budget.acquire()
    assert budget._wait_time() > 0  # 7 of 10: the other 3 are the key's other users'


async def test_others_on_the_key_shrink_syncds_share_until_their_requests_age_out() -> None:
    clock = Clock()
    budget = RequestBudget(60, 60.0, reserve=10, headroom=0, clock=clock)
    for _ in range(5):
        await budget.acquire()
        budget.complete()
    # After our 5 the service says 35 remain: 20 are someone else's.
    budget.observe(35)
    assert budget.remaining_reported == 35
    assert budget.others() == 20
    # 60 - 10 reserve - 20 others - 5 ours: 25 more, then the 26th waits.
    for _ in range(24):
        await budget.acquire()
    assert budget._wait_time() == 0
    await budget.acquire()
    assert budget.used == 30
    # No room until ours and the others seen leave the window, a period from now.
    assert budget._wait_time() == pytest.approx(60.0)
    # Others were seen spending: the guess of their share grows while we hear nothing.
    assert budget.others(clock.now + 3.0) == 21
    assert budget.others(clock.now + 30.0) == 30
    # Past the period those seen are gone and newcomers at their pace stand in for them.
    assert budget.others(clock.now + 60.0) == 20


async def test_remaining_falling_faster_than_our_sends_is_others_spending() -> None:
    clock = Clock()
    budget = RequestBudget(60, 60.0, reserve=10, headroom=0, clock=clock)
    remaining = 60
    for step in range(4):
        await budget.acquire()
        budget.complete()
        remaining -= 1 + 3  # ours, and 3 of someone else's
        budget.observe(remaining)
        assert budget.others() == 3 * (step + 1)
    # The service says what remains: room is what it says minus the reserve.
    assert budget.remaining_reported == 44
    for _ in range(44 - 10):
        assert budget._wait_time() == 0
        await budget.acquire()
    assert budget._wait_time() > 0
    # A later answer saying others stopped gives their room back at once.
    for _ in range(34):
        budget.complete()
    budget.observe(60 - 38)  # 22 left: all 38 in the window are ours
    assert budget.others() == 0


async def test_a_fixed_window_gives_others_room_back_at_its_reset() -> None:
    clock = Clock()
    budget = RequestBudget(300, 300.0, reserve=30, clock=clock)
    await budget.acquire()
    budget.complete()
    budget.observe(20, empties_in=2.0)  # TradeGecko: the window empties in 2 s
    assert budget.others() == 279
    assert budget._wait_time() == pytest.approx(2.0)
    assert budget.others(clock.now + 2.0) == 0


async def test_a_key_others_emptied_is_tried_again_within_two_periods() -> None:
    clock = Clock()
    budget = RequestBudget(60, 60.0, reserve=10, clock=clock)
    await budget.acquire()
    budget.complete()
    budget.observe(0)  # others took all the rest: 59 of 60
    # Ours leaves at 60 s, the 59 seen by then too; the guess of newcomers in their place
    # fades until it leaves room for one: 60 + 60 * (1 - 49/59) s.
    wait = budget._wait_time()
    assert wait == pytest.approx(60.0 + 60.0 * (1 - 49 / 59))
    assert 60.0 < wait < 120.0


async def test_no_reserve_means_the_key_is_syncds_alone() -> None:
    clock = Clock()
    budget = RequestBudget(60, 60.0, clock=clock)
    await budget.acquire()
    budget.complete()
    budget.observe(30)
    assert budget.others() == 0  # nothing to make room for: only our own count holds
    assert budget._wait_time() == 0


async def test_a_client_reads_the_remaining_header_into_its_budget() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={}, headers={"X-RateLimit-Remaining": "40"})

    budget = RequestBudget(60, 60.0, reserve=10, clock=Clock())
    async with ServiceClient(
        "http://service.test", "tok", budget=budget, transport=httpx.MockTransport(handler)
    ) as client:
        await client.request("GET", "/thing")
    assert budget.remaining_reported == 40
    assert budget.others() == 19  # 60 - 40 remaining - our 1


@pytest.mark.parametrize(
    ("limit", "reserve", "promote_after", "headroom"),
    [
        (0, 0, None, None),
        (10, 10, None, None),
        (10, -1, None, None),
        (10, 1, 0.0, None),
        (10, 1, None, -1),
        (10, 1, None, 5),  # a poll could never go out
    ],
)
def test_a_budget_refuses_impossible_settings(
    limit: int, reserve: int, promote_after: float | None, headroom: int | None
) -> None:
    with pytest.raises(ValueError, match="request budget"):
        RequestBudget(limit, 60.0, reserve=reserve, promote_after=promote_after, headroom=headroom)


@dataclass
class Recorder(httpx.AsyncBaseTransport):
    """syncd's Katana traffic, passed on to ``inner``: what remained after each request."""

    inner: httpx.AsyncBaseTransport
    remaining: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.statuses.append(response.status_code)
        if "X-Ratelimit-Remaining" in response.headers:
            self.remaining.append(int(response.headers["X-Ratelimit-Remaining"]))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_syncd_leaves_the_reserve_to_a_competing_client_on_the_same_key(
    tmp_path: Path,
) -> None:
    reserve = 10
    async with running_sims(katana_rate_limit=(60, 60.0)) as sims:
        config = sims.config(tmp_path / "syncd.db")
        # Katana's real limit and the default reserve; polls every 2 s want ~60 requests a
        # minute besides the imports and receipts, so syncd's share, not its appetite, sets
        # the pace: the run crosses the first window.
        config = msgspec.structs.replace(
            config,
            katana=msgspec.structs.replace(
                config.katana, rate_limit=60, rate_period=60.0, reserve=reserve, poll_interval=2.0
            ),
        )
        recorder = Recorder(sims.katana_contract)
        competitor: list[int] = []
        competitor_statuses: list[int] = []
        async with httpx.AsyncClient(
            base_url=sims.katana_api_url,
            headers={"Authorization": f"Bearer {sims.katana_token}"},
        ) as other:

            async def spend(requests: int) -> None:
                for _ in range(requests):
                    answer = await other.get("/factory")
                    competitor_statuses.append(answer.status_code)
                    competitor.append(int(answer.headers["X-Ratelimit-Remaining"]))

            async def keep_spending() -> None:
                while True:
                    await anyio.sleep(5.0)
                    await spend(1)

            # The factory's Shopify link has just used a quarter of the minute.
            await spend(15)
            started = time.monotonic()
            async with (
                running_daemon(config, katana_transport=recorder) as daemon,
                sims.factory(step_delay=3.0),
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(keep_spending)  # and goes on at 12 a minute
                pos = []
                for sku in ("CHAIR-OAK", "STOOL-PINE", "TABLE-OAK"):
                    line = {"sku": sku, "name": sku.title(), "quantity": "2", "price": "50"}
                    pos.append(await sims.create_po([line]))
                    daemon.poll_now()
                    await anyio.sleep(5)
                await wait_for(
                    daemon, [po["order_number"] for po in pos], is_state("received"), 120
                )
                by_priority = dict(daemon.katana.budget.sent_by_priority)
                tg.cancel_scope.cancel()
            took = time.monotonic() - started
        katana_counts, _ = await sims.counters()
    print(
        f"\nshared key: syncd {len(recorder.statuses)} requests, the other client "
        f"{len(competitor)}, in {took:.1f} s; lowest remaining after syncd's "
        f"{min(recorder.remaining)}, after the other's {min(competitor)}; by priority {by_priority}"
    )
    assert len(recorder.remaining) == len(recorder.statuses) > 0
    # The callers said who they are: imports start work; Katana's polls (webhooks off: the
    # way production and deliveries are seen) and the receipts' cost reads finish it.
    assert by_priority[Priority.START] > 0, by_priority
    assert by_priority[Priority.FINISH] > 0, by_priority
    assert by_priority[Priority.BACKGROUND] == 0, by_priority
    # syncd never took what remained of the key below the reserve...
    assert min(recorder.remaining) >= reserve
    # ...so neither it nor the other client met a 429.
    assert katana_counts["responses_429"] == 0
    assert 429 not in competitor_statuses
    assert katana_counts["sales_orders_by_order_no"] == {
        f"TG-{po['order_number']}": 1 for po in pos
    }


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


# -- a shadow run: writes planned or withheld, never sent -----------------------------------


def _nothing_sent(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"a shadow client sent {request.method} {request.url}")


async def test_a_shadow_client_plans_each_write_it_knows_and_sends_none() -> None:
    from syncd.adapters._http import planning
    from syncd.adapters.katana import KatanaClient, NewSalesOrder, NewSalesOrderRow
    from syncd.adapters.tradegecko import TradeGeckoClient
    from syncd.errors import WriteWithheld

    transport = httpx.MockTransport(_nothing_sent)
    katana = KatanaClient("http://katana.test", "k", transport=transport, shadow=True)
    tradegecko = TradeGeckoClient("http://tg.test", "t", transport=transport, shadow=True)
    async with katana, tradegecko:
        with planning() as plan:
            product = await katana.create_product(name="Shelf", sku="SHELF")
            order = await katana.create_sales_order(
                NewSalesOrder(
                    customer_id=4,
                    order_no="TG-PO1",
                    sales_order_rows=[
                        NewSalesOrderRow(
                            variant_id=product.variants[0].id,
                            quantity=Decimal(2),
                            price_per_unit=Decimal("88.50"),
                        )
                    ],
                )
            )
            await tradegecko.update_line_item_price(31, Decimal("77.90"))
            receipt = await tradegecko.receive_purchase_order(30, idempotency_key="k")
            # No plan for a webhook (a shadow run registers none): withheld, still unsent.
            with pytest.raises(WriteWithheld, match="katana POST /webhooks"):
                await katana.create_webhook("https://x.test/hook", ["sales_order.updated"])
        # Placeholder ids are negative and distinct; the SO names the placeholder variant.
        ids = [product.id, product.variants[0].id, order.id, order.sales_order_rows[0].id]
        assert all(i < 0 for i in ids) and len(set(ids)) == 4
        assert order.sales_order_rows[0].variant_id == product.variants[0].id
        assert (receipt.id < 0, receipt.purchase_order_id) == (True, 30)
        assert [(r.service, r.method, r.path) for r in plan.requests] == [
            ("katana", "POST", "/products"),
            ("katana", "POST", "/sales_orders"),
            ("tradegecko", "PUT", "/purchase_order_line_items/31"),
            ("tradegecko", "POST", "/purchase_orders/30/actions/receive"),
        ]
        assert plan.requests[0].body["variants"][0]["sku"] == "SHELF"
        assert plan.requests[2].body == {"purchase_order_line_item": {"price": "77.90"}}
        # Outside a plan every write is withheld at once (the safety net).
        with pytest.raises(WriteWithheld, match="tradegecko PUT"):
            await tradegecko.update_line_item_price(31, Decimal("1"))


class _Guard:
    """A lease guard stand-in: valid for ``seconds`` of the test's clock, or revoked."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        self.revoked = False

    def check(self) -> None:
        if self.revoked or time.monotonic() >= self.until:
            raise LeaseLost("factory north: the lease may be lost: nothing sent")

    def remaining(self) -> float:
        return 0.0 if self.revoked else max(0.0, self.until - time.monotonic())


async def test_a_guarded_client_sends_nothing_once_its_lease_may_be_lost() -> None:
    """Checked before each send, the timeout cut to the lease's time; and on the daemon's
    pools checked again right before the bytes are written (after a wait for a pooled
    connection, say)."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(scope["path"])
        if scope["path"] == "/slow":
            await anyio.sleep(5)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async with serving(app) as url:
        guard = _Guard(60.0)
        async with ServiceClient(url, "tok", guard=guard, attempts=1) as client:
            await client.request("GET", "/one")
            guard.revoked = True
            with pytest.raises(LeaseLost):
                await client.request("GET", "/two")
        assert seen == ["/one"]

        # The timeout is what remains of the lease, not the client's 30 s.
        short = _Guard(0.5)
        async with ServiceClient(url, "tok", guard=short, attempts=1) as client:
            started = time.monotonic()
            with pytest.raises(TransportError, match="timed out"):
                await client.request("GET", "/slow")
            assert time.monotonic() - started < 2.0

        # The connection-level check: a request that passed the client's check and then
        # waited (here: the guard revoked in between) writes nothing.
        transport = guarded_transport()
        late = _Guard(60.0)

        class Revoking(ServiceClient):
            async def _send_once(self, *args: Any, **kwargs: Any) -> httpx.Response:
                late.check()  # the client's check passes...
                late.revoked = True  # ...then the lease lapses, before the write
                sending = _sending_for.set(late)
                try:
                    return await self._http.request("GET", "/three")
                finally:
                    _sending_for.reset(sending)

        async with Revoking(url, "tok", guard=late, transport=transport, attempts=1) as client:
            with pytest.raises(LeaseLost):
                await client.request("GET", "/three")
        await transport.aclose()
        assert seen == ["/one", "/slow"]


async def test_a_host_pool_queues_requests_first_come_and_a_long_wait_sends_nothing() -> None:
    """The daemon's pool per host: never more requests on the wire than its connections,
    the others queued in arrival order (no pool timeout while they wait their turn), and a
    request that waited ``wait`` seconds fails as a transport error with nothing sent."""
    on_wire, most, order = 0, 0, []
    release = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal on_wire, most
        if scope["type"] != "http":
            return
        order.append(scope["path"])
        on_wire += 1
        most = max(most, on_wire)
        await release.wait()
        on_wire -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async with serving(app) as url:
        pool = HostPool(connections=3, shard=2)
        assert len(pool.transports) == 2  # 3 connections in pools of at most 2
        # A request timeout far shorter than the queue's wait: it starts with the slot.
        async with ServiceClient(url, "tok", transport=pool, timeout=5.0, attempts=1) as client:
            async with anyio.create_task_group() as tg:
                for i in range(9):
                    tg.start_soon(client.request, "GET", f"/{i}")
                    await anyio.sleep(0.02)  # each queued after the one before
                with anyio.fail_after(5):
                    while len(order) < 3:  # noqa: ASYNC110 - a test's bounded look
                        await anyio.sleep(0.01)
                await anyio.sleep(0.2)
                assert len(order) == 3 and pool.waiting == 6 and pool.in_use == 3
                release.set()
            assert most == 3 and pool.in_use == 0
            # First come, first served: the three queued first go when the first three end.
            assert set(order[3:6]) == {"/3", "/4", "/5"} and set(order[6:]) == {"/6", "/7", "/8"}

            # Every slot held: the next request gives up after `wait`, having sent nothing.
            release = anyio.Event()
            pool.wait = 0.3
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(client.request, "GET", f"/held{i}")
                with anyio.fail_after(5):
                    while pool.in_use < 3:  # noqa: ASYNC110 - a test's bounded look
                        await anyio.sleep(0.01)
                with pytest.raises(TransportError, match="nothing sent: no connection"):
                    await client.request("POST", "/late", body=b"{}")
                release.set()
            assert "/late" not in order
        await pool.aclose()
