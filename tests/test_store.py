"""The SQLite store, against real files in ``tmp_path``."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from syncd.domain.orders import LinkedOrder, PurchaseOrderLine, PurchaseOrderSnapshot
from syncd.domain.statechart import Decision, load_statechart
from syncd.errors import StoreConflict, StoreError
from syncd.store import ImportResult, Store
from syncd.store._schema import MIGRATIONS
from syncd.store._store import OBSERVATIONS_KEPT

pytestmark = pytest.mark.anyio

CHART = load_statechart()
WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def opened(path: Path, clock: Clock | None = None) -> AsyncIterator[Store]:
    store = await Store.open(path)
    if clock is not None:
        store._clock = clock
    try:
        yield store
    finally:
        await store.close()


def snapshot(po_id: int, po_number: str | None = None) -> PurchaseOrderSnapshot:
    return PurchaseOrderSnapshot(
        po_id=po_id,
        po_number=po_number or f"PO{po_id:04d}",
        status="active",
        company_id=7,
        currency_id=3,
        created_at=WHEN,
        updated_at=WHEN,
        lines=(
            PurchaseOrderLine(
                line_id=po_id * 10, variant_id=5, quantity=Decimal("2"), price=Decimal("9.5")
            ),
        ),
    )


def decide(state: str, trigger: str, resume_state: str | None = None) -> Decision:
    decision = CHART.decide(state, trigger, resume_state=resume_state)
    assert decision is not None, (state, trigger)
    return decision


async def new_link(store: Store, po_id: int, po_number: str | None = None) -> LinkedOrder:
    link = await store.create_link(
        snapshot(po_id, po_number),
        state=CHART.initial,
        trigger="po_discovered",
        cause="seen",
        event_id=None,
    )
    assert link is not None
    return link


def raw(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


# -- opening --------------------------------------------------------------------------------


async def test_migrations_set_user_version_and_wal(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "syncd.db"
    async with opened(db):
        pass
    with raw(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "links", "transitions", "inbox", "cursors", "po_observations"} <= tables


async def test_a_database_of_the_first_schema_is_migrated_in_place(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    with raw(db) as con:
        con.executescript(MIGRATIONS[0])
        con.execute("PRAGMA user_version = 1")
        con.execute("INSERT INTO meta (key, value) VALUES ('activated_at', 'then')")
        con.commit()
    async with opened(db) as store:
        assert await store.get_meta("activated_at") == "then"
        assert await store.purchase_order_observation("PO1") is None
    with raw(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_a_reader_of_an_unmigrated_database_gets_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    with raw(db) as con:
        con.executescript(MIGRATIONS[0])
        con.execute("PRAGMA user_version = 1")
        con.commit()
    store = await Store.open(db, readonly=True)
    try:
        with pytest.raises(StoreError, match="restart syncd to upgrade"):
            await store.last_import_outcome("PO1")
    finally:
        await store.close()


async def test_reopening_is_idempotent_and_keeps_the_data(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with opened(db) as store:
        link = await new_link(store, 1)
        await store.set_cursor("tradegecko.po", "2024-05-01")
    with raw(db) as con:
        schema = con.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    async with opened(db) as store:
        again = await store.get_link(link.id)
        assert again is not None and again.po_number == "PO0001"
        assert await store.get_cursor("tradegecko.po") == "2024-05-01"
        assert len(await store.history(link.id)) == 1
    with raw(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert con.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_newer_database_is_refused(tmp_path: Path, readonly: bool) -> None:
    db = tmp_path / "future.db"
    with raw(db) as con:
        con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this syncd"):
        await Store.open(db, readonly=readonly)
    with raw(db) as con:  # left untouched
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1


async def test_readonly_open_of_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="not found"):
        await Store.open(missing, readonly=True)
    assert not missing.exists()


async def test_readonly_open_reads_an_existing_store(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with opened(db) as store:
        await new_link(store, 1)
    store = await Store.open(db, readonly=True)
    try:
        assert await store.counts_by_state() == {"discovered": 1}
        with pytest.raises(StoreError):
            await new_link(store, 2)
    finally:
        await store.close()


async def test_integrity_check_of_a_fresh_file_is_clean(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        assert await store.integrity_check() == []


# -- inbox ------------------------------------------------------------------------------------


async def test_add_event_deduplicates_on_its_key(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        first = await store.add_event("poller", "so_observed", b"{}", dedup_key="so:9:t1")
        again = await store.add_event("webhook", "so_observed", b"{}", dedup_key="so:9:t1")
        other = await store.add_event("poller", "so_observed", b"{}", dedup_key="so:9:t2")
        keyless_a = await store.add_event("effect", "outcome", b"a")
        keyless_b = await store.add_event("effect", "outcome", b"a")
        assert isinstance(first, int)
        assert again is None
        assert len({first, other, keyless_a, keyless_b}) == 4
        pending = await store.pending_events()
        assert [e.id for e in pending] == [first, other, keyless_a, keyless_b]
        assert pending[0].source == "poller"


async def test_inbox_backlog_counts_and_dates_the_waiting_events(tmp_path: Path) -> None:
    clock = Clock(100.0)
    async with opened(tmp_path / "syncd.db", clock) as store:
        assert await store.inbox_backlog() == (0, None)
        first = await store.add_event("poller", "po_observed", b"{}")
        clock.now = 200.0
        await store.add_event("poller", "po_observed", b"{}")
        assert await store.inbox_backlog() == (2, 100.0)
        assert first is not None
        await store.mark_processed(first, "done")
        assert await store.inbox_backlog() == (1, 200.0)


# -- links ------------------------------------------------------------------------------------


async def test_create_link_is_once_per_po(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        first_event = await store.add_event("poller", "po_discovered", b"1", po_id=1)
        link = await store.create_link(
            snapshot(1),
            state="discovered",
            trigger="po_discovered",
            cause="seen",
            event_id=first_event,
        )
        assert link is not None
        assert (link.state, link.po_id, link.po_number) == ("discovered", 1, "PO0001")
        assert link.snapshot == snapshot(1)

        second_event = await store.add_event("webhook", "po_discovered", b"2", po_id=1)
        duplicate = await store.create_link(
            snapshot(1),
            state="discovered",
            trigger="po_discovered",
            cause="seen again",
            event_id=second_event,
        )
        assert duplicate is None
        assert await store.counts_by_state() == {"discovered": 1}
        history = await store.history(link.id)
        assert [(h.from_state, h.to_state, h.trigger) for h in history] == [
            (None, "discovered", "po_discovered")
        ]
        # Both events are settled and attached to the one link.
        assert await store.pending_events() == []
        assert [e.id for e in await store.events_for_link(link.id)] == [first_event, second_event]


async def test_apply_moves_logs_and_settles_the_event_together(tmp_path: Path) -> None:
    clock = Clock(1_000.0)
    async with opened(tmp_path / "syncd.db", clock) as store:
        link = await new_link(store, 1)
        event = await store.add_event("effect", "outcome", b"{}", link_id=link.id)
        clock.now = 1_500.0
        updated = await store.apply(
            link,
            decide("discovered", "so_created"),
            cause="SO made",
            event_id=event,
            so_id=77,
            so_number="TG-PO0001",
            currency="EUR",
            notes=["line 3 left out"],
        )
        assert updated.state == "imported"
        assert (updated.so_id, updated.so_number, updated.currency) == (77, "TG-PO0001", "EUR")
        assert updated.notes == ("line 3 left out",)
        assert updated.state_since == datetime.fromtimestamp(1_500.0, UTC)
        history = await store.history(link.id)
        assert [(h.from_state, h.to_state, h.trigger, h.cause) for h in history][-1] == (
            "discovered",
            "imported",
            "so_created",
            "SO made",
        )
        assert history[-1].at == 1_500.0
        assert await store.pending_events() == []
        assert await store.link_by_so(77) == updated


async def test_apply_refuses_a_link_that_moved_and_writes_nothing(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        stale = await new_link(store, 1)
        await store.apply(stale, decide("discovered", "so_created"), cause="SO made")
        event = await store.add_event("operator", "command", b"{}", link_id=stale.id)
        with pytest.raises(StoreConflict, match="no longer in discovered"):
            await store.apply(
                stale, decide("discovered", "cancel"), cause="operator", event_id=event
            )
        current = await store.get_link(stale.id)
        assert current is not None and current.state == "imported"
        assert [h.to_state for h in await store.history(stale.id)] == ["discovered", "imported"]
        assert [e.id for e in await store.pending_events()] == [event]


async def test_apply_records_attention_and_retry(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        link = await new_link(store, 1)
        await store.note(link.id, last_error="import_order: 502")
        noted = await store.get_link(link.id)
        assert noted is not None
        failed = await store.apply(
            noted, decide("discovered", "import_failed"), cause="no SKU", reason="no SKU"
        )
        assert (failed.state, failed.resume_state, failed.reason) == (
            "needs_attention",
            "discovered",
            "no SKU",
        )
        assert failed.last_error == "import_order: 502"  # kept while attention is needed
        back = await store.apply(
            failed,
            decide("needs_attention", "retry", resume_state=failed.resume_state),
            cause="operator retry",
        )
        assert (back.state, back.resume_state, back.reason, back.last_error) == (
            "discovered",
            None,
            None,
            None,
        )
        assert CHART.valid_path(
            [(h.from_state, h.to_state, h.trigger) for h in await store.history(link.id)]
        )


async def test_transitions_are_append_only(tmp_path: Path) -> None:
    db = tmp_path / "syncd.db"
    async with opened(db) as store:
        link = await new_link(store, 1)
    with raw(db) as con:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE transitions SET cause = 'rewritten'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM transitions")
        con.commit()
    async with opened(db) as store:
        history = await store.history(link.id)
        assert [(h.to_state, h.cause) for h in history] == [("discovered", "seen")]


async def test_notes_deduplicate(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        link = await new_link(store, 1)
        await store.note(link.id, notes=["a", "b"])
        await store.note(link.id, notes=["b", "c"])
        noted = await store.get_link(link.id)
        assert noted is not None and noted.notes == ("a", "b", "c")
        moved = await store.apply(
            noted, decide("discovered", "so_created"), cause="SO made", notes=["c", "d"]
        )
        assert moved.notes == ("a", "b", "c", "d")


async def test_note_on_a_missing_link_is_refused(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        with pytest.raises(StoreError, match="no linked order with id 42"):
            await store.note(42, notes=["x"])


# -- questions --------------------------------------------------------------------------------


async def _three_links(store: Store, clock: Clock) -> list[LinkedOrder]:
    clock.now = 1_000.0
    a = await new_link(store, 1)
    clock.now = 2_000.0
    b = await new_link(store, 2)
    clock.now = 3_000.0
    c = await new_link(store, 3)
    clock.now = 3_500.0
    b = await store.apply(b, decide("discovered", "so_created"), cause="SO", so_id=202)
    clock.now = 4_000.0
    c = await store.apply(c, decide("discovered", "so_created"), cause="SO", so_id=303)
    return [a, b, c]


async def test_counts_and_oldest_by_state(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path / "syncd.db", clock) as store:
        assert await store.counts_by_state() == {}
        assert await store.oldest_by_state() == {}
        await _three_links(store, clock)
        assert await store.counts_by_state() == {"discovered": 1, "imported": 2}
        assert await store.oldest_by_state() == {
            "discovered": ("PO0001", 1_000.0),
            "imported": ("PO0002", 3_500.0),
        }


async def test_links_in_states(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path / "syncd.db", clock) as store:
        a, b, c = await _three_links(store, clock)
        clock.now = 5_000.0

        def ids(links: list[LinkedOrder]) -> list[int]:
            return [link.id for link in links]

        assert ids(await store.links_in_states(["imported"])) == [b.id, c.id]
        assert ids(await store.links_in_states(["imported", "discovered"])) == [a.id, b.id, c.id]
        # older_than counts from entering the state, not from creation.
        assert ids(await store.links_in_states(["imported"], older_than=1_200)) == [b.id]
        assert ids(await store.links_in_states(["imported"], older_than=1_000)) == [b.id, c.id]
        assert ids(await store.links_in_states(["imported"], older_than=2_000)) == []
        assert ids(await store.links_in_states(["imported"], limit=1)) == [b.id]
        assert await store.links_in_states([]) == []
        assert await store.links_in_states(["received"]) == []


async def test_so_ids_and_linked_po_ids(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path / "syncd.db", clock) as store:
        _, b, c = await _three_links(store, clock)
        assert await store.so_ids_in_states(["imported"]) == {202: b.id, 303: c.id}
        assert await store.so_ids_in_states(["discovered"]) == {}
        assert await store.so_ids_in_states([]) == {}
        assert await store.linked_po_ids([1, 3, 99]) == {1, 3}
        assert await store.linked_po_ids([99]) == set()
        assert await store.linked_po_ids([]) == set()


async def test_find_link_by_po_number_or_id(tmp_path: Path) -> None:
    async with opened(tmp_path / "syncd.db") as store:
        first = await new_link(store, 1, "PO0435")
        second = await new_link(store, 2, "PO0436")
        found = await store.find_link("PO0436")
        assert found is not None and found.id == second.id
        by_id = await store.find_link(str(first.id))
        assert by_id is not None and by_id.po_number == "PO0435"
        assert await store.find_link("PO9999") is None
        assert await store.find_link("999") is None


# -- observations and imports ---------------------------------------------------------------


async def test_an_observation_is_one_row_per_po_updated_in_place(tmp_path: Path) -> None:
    clock = Clock(100.0)
    db = tmp_path / "syncd.db"
    async with opened(db, clock) as store:
        await store.observe_purchase_order(
            5, "PO0005", status="draft", reason="draft", supplier="Katana", po_created_at=WHEN
        )
        clock.now = 200.0
        await store.observe_purchase_order(5, "PO0005", status="void", reason="void")
        seen = await store.purchase_order_observation("PO0005")
        assert seen is not None
        assert (seen.status, seen.reason, seen.supplier) == ("void", "void", "Katana")
        assert (seen.first_seen_at, seen.seen_at, seen.po_created_at) == (100.0, 200.0, None)
        assert await store.purchase_order_observation("PO0006") is None
    with raw(db) as con:
        assert con.execute("SELECT count(*) FROM po_observations").fetchone()[0] == 1


async def test_observations_keep_only_the_most_recently_seen(tmp_path: Path) -> None:
    clock = Clock(0.0)
    db = tmp_path / "syncd.db"
    async with opened(db, clock) as store:
        with raw(db) as con:  # fill to the bound without 10 000 transactions
            con.executemany(
                "INSERT INTO po_observations (po_id, po_number, status, reason, first_seen_at, "
                "seen_at) VALUES (?, ?, 'draft', 'draft', ?, ?)",
                [(i, f"PO{i}", float(i), float(i)) for i in range(1, OBSERVATIONS_KEPT + 1)],
            )
            con.commit()
        clock.now = 1e9
        await store.observe_purchase_order(0, "PO-NEW", status="draft", reason="draft")
        assert await store.purchase_order_observation("PO-NEW") is not None
        assert await store.purchase_order_observation("PO1") is None  # the least recent
        assert await store.purchase_order_observation("PO2") is not None
    with raw(db) as con:
        count = con.execute("SELECT count(*) FROM po_observations").fetchone()[0]
    assert count == OBSERVATIONS_KEPT


async def test_an_import_outcome_settles_its_event(tmp_path: Path) -> None:
    clock = Clock(50.0)
    async with opened(tmp_path / "syncd.db", clock) as store:
        first = await store.add_event("syncctl", "import_requested", b"{}")
        second = await store.add_event("syncctl", "import_requested", b"{}")
        assert first is not None and second is not None
        assert await store.event_outcome(first) == (None, None)
        assert await store.event_outcome(9999) is None
        assert await store.import_outcome(first) is None
        await store.record_import_outcome(
            first, "PO7", ImportResult.NOT_FOUND, "no PO PO7 in TradeGecko"
        )
        await store.record_import_outcome(
            second, "PO7", ImportResult.DISCOVERED, "PO PO7 (id 3) discovered", po_id=3
        )
        assert await store.event_outcome(first) == (50.0, "no PO PO7 in TradeGecko")
        outcome = await store.import_outcome(first)
        assert outcome is not None and outcome.result is ImportResult.NOT_FOUND
        last = await store.last_import_outcome("PO7")
        assert last is not None and (last.event_id, last.po_id) == (second, 3)
        assert last.result is ImportResult.DISCOVERED
        assert await store.inbox_backlog() == (0, None)
        assert await store.last_import_outcome("PO8") is None
