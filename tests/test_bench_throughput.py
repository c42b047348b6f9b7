"""bench/throughput.py's soundness checks: fed wrong counts, moved leases, doubled
factories, each is caught (the bench itself is run by hand: it takes minutes)."""

from __future__ import annotations

from collections import Counter

from bench.throughput import (
    Calls,
    CallsReading,
    CpuReading,
    count_problems,
    cpu_between,
    lease_problems,
    summarise,
)


def calls(**per_factory: dict[str, int]) -> Calls:
    """Katana calls per factory (TradeGecko's: one poll each, to see both services kept)."""
    return {
        name: {"katana": Counter(katana), "tradegecko": Counter({"GET /purchase_orders": 1})}
        for name, katana in per_factory.items()
    }


START = CallsReading(
    before=calls(f00={"POST /sales_orders": 0}),
    sims=calls(f00={"POST /sales_orders": 0}),
    after=calls(f00={"POST /sales_orders": 0}),
)


def still(counts: dict[str, int]) -> CallsReading:
    """A reading taken while nothing was called: all three the same."""
    return CallsReading(calls(f00=counts), calls(f00=counts), calls(f00=counts))


def test_counts_that_agree_are_sound() -> None:
    assert count_problems(START, still({"POST /sales_orders": 10, "GET /inventory": 4})) == []


def test_a_call_the_daemons_did_not_count_is_caught() -> None:
    end = CallsReading(
        before=calls(f00={"POST /sales_orders": 10}),
        sims=calls(f00={"POST /sales_orders": 11}),
        after=calls(f00={"POST /sales_orders": 10}),
    )
    problems = count_problems(START, end)
    assert problems == [
        "f00 katana (daemons at least, sim, at most): {'POST /sales_orders': (10, 11, 10)}"
    ]


def test_a_call_counted_by_the_daemons_alone_is_caught() -> None:
    end = CallsReading(
        before=calls(f00={"GET /inventory": 5}),
        sims=calls(f00={"GET /inventory": 4}),
        after=calls(f00={"GET /inventory": 5}),
    )
    assert "(5, 4, 5)" in count_problems(START, end)[0]


def test_a_factory_the_daemons_never_counted_is_caught() -> None:
    end = CallsReading(before=calls(), sims=calls(f01={"GET /factory": 1}), after=calls())
    problems = count_problems(CallsReading(calls(), calls(), calls()), end)
    assert [p.split(" (")[0] for p in problems] == ["f01 katana", "f01 tradegecko"]


def test_a_poll_answered_while_reading_lies_between_the_daemons_readings() -> None:
    # The simulator counted a poll the daemon had not yet counted at its first reading.
    end = CallsReading(
        before=calls(f00={"GET /sales_orders": 7}),
        sims=calls(f00={"GET /sales_orders": 8}),
        after=calls(f00={"GET /sales_orders": 8}),
    )
    assert count_problems(START, end) == []


def test_a_request_left_unanswered_may_not_have_reached_the_simulator() -> None:
    # A receive cut by a connection error: the daemon counts it (status "none") in its
    # later reading of all calls, the simulator never saw it. Sound; one more is not.
    end = CallsReading(
        before=calls(f00={"POST /purchase_orders/{id}/actions/receive": 6}),
        sims=calls(f00={"POST /purchase_orders/{id}/actions/receive": 6}),
        after=calls(f00={"POST /purchase_orders/{id}/actions/receive": 7}),
    )
    assert count_problems(START, end) == []
    counted_twice = CallsReading(end.after, end.sims, end.after)
    assert "(7, 6, 7)" in count_problems(START, counted_twice)[0]


def test_calls_before_the_first_reading_do_not_count() -> None:
    # The start's checks and registrations: before the interval, in every reading.
    start = still({"GET /factory": 3, "POST /webhooks": 1})
    end = still({"GET /factory": 3, "POST /webhooks": 1, "POST /sales_orders": 2})
    assert count_problems(start, end) == []
    wrong = CallsReading(
        before=calls(f00={"GET /factory": 3, "POST /webhooks": 1, "POST /sales_orders": 2}),
        sims=calls(f00={"GET /factory": 4, "POST /webhooks": 1, "POST /sales_orders": 2}),
        after=calls(f00={"GET /factory": 3, "POST /webhooks": 1, "POST /sales_orders": 2}),
    )
    assert "'GET /factory': (0, 1, 0)" in count_problems(start, wrong)[0]


NAMES = ["f00", "f01", "f02"]
HELD = {"f00": "a", "f01": "b", "f02": "a"}
RUNNING = {"f00": 1, "f01": 1, "f02": 1}


def test_leases_held_still_by_the_daemons_are_sound() -> None:
    assert lease_problems(NAMES, HELD, dict(HELD), [], 2, RUNNING) == []


def test_a_factory_that_moved_while_measured_is_caught() -> None:
    moved = {**HELD, "f02": "b"}
    problems = lease_problems(NAMES, HELD, moved, [("f02", "b")], 2, RUNNING)
    assert problems == [
        "factories that changed owner while measured: {'f02': ('a', 'b')}",
        "leases taken while measured: [('f02', 'b')]",
    ]


def test_a_lease_taken_again_by_its_owner_is_caught() -> None:
    # A daemon that lost a lease (not renewed in time) and took it back: same owner.
    assert lease_problems(NAMES, HELD, dict(HELD), [("f00", "a")], 2, RUNNING) == [
        "leases taken while measured: [('f00', 'a')]"
    ]


def test_a_factory_not_held_or_running_twice_is_caught() -> None:
    problems = lease_problems(
        NAMES, {"f00": "a", "f01": "b"}, dict(HELD), [], 2, {**RUNNING, "f01": 2}
    )
    assert problems == [
        "not held at the first PO: ['f02']",
        "sum(syncd_factory_running) is not 1 for {'f01': 2}",
    ]


def test_fewer_owners_than_daemons_is_caught() -> None:
    alone = dict.fromkeys(NAMES, "a")
    assert lease_problems(NAMES, alone, alone, [], 3, RUNNING) == [
        "1 daemons held the factories, not 3"
    ]


def test_a_part_at_one_core_and_a_busy_machine_are_named() -> None:
    start = CpuReading(0.0, {"sim_katana": 0.0, "d0": 0.0}, (100.0, 200.0))
    end = CpuReading(10.0, {"sim_katana": 9.5, "d0": 4.0}, (119.8, 220.0))
    cpu = cpu_between(start, end)
    assert cpu["bound_suspects"] == [
        "sim_katana at 0.95 of a core",
        "the machine: 1.98 of 2.00 cores busy",
    ]
    assert cpu["others_cores"] == 0.63  # 19.8 s busy, 13.5 s of it ours
    assert cpu["ours_cores"] == 1.35


def test_the_summary_quotes_medians_and_ratios_to_one_daemon() -> None:
    def run(n: int, rate: float) -> dict[str, object]:
        share = {"sim_katana": 0.1, "sim_tradegecko": 0.1, "bench": 0.1, "postgres": 0.1}
        return {
            "mode": "webhooks",
            "daemons": n,
            "orders_per_s": rate,
            "daemons_cpu_ms_per_order": 50.0,
            "postgres_cpu_ms_per_order": 20.0,
            "machine_busy_cores": 2.0,
            "others_cores": 0.0,
            "ours_cores": 0.4,
            "orders_per_cpu_s": 5.0,
            "core_share": share,
        }

    trials = [run(1, 10.0), run(2, 15.0), run(1, 12.0), run(2, 18.0), run(1, 11.0), run(2, 1.0)]
    rows = summarise(trials)["webhooks"]
    assert rows["1"]["orders_per_s"] == 11.0
    assert rows["2"]["orders_per_s"] == 15.0
    assert rows["2"]["ratio_to_1"] == 1.36
    assert rows["2"]["orders_per_s_each"] == [15.0, 18.0, 1.0]
