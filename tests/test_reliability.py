"""Faults of the machine itself: the database locked by another process for longer than the
busy timeout, a disk that fills up. Every order still completes, exactly once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from conftest import Sims
from test_flow import is_state, wait_for

pytestmark = pytest.mark.anyio


async def test_a_database_locked_past_the_busy_timeout_loses_nothing(
    sims: Sims, tmp_path: Path
) -> None:
    database = tmp_path / "syncd.db"
    lines = [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "150.00"}]
    async with sims.daemon(database) as daemon, sims.factory():
        numbers = [(await sims.create_po(lines))["order_number"] for _ in range(3)]
        daemon.poll_now()
        await wait_for(daemon, numbers[:1], is_state("discovered", "imported", "in_production"))
        # Another process (syncctl writing, a backup) holds the write lock for 7 s, longer
        # than the daemon's 5 s busy timeout: its writes fail meanwhile. Taking the lock waits
        # for the daemon's own write in flight (the test once used timeout=0 and failed
        # whenever it asked while the daemon was committing: a race in the test, not syncd).
        # The wait runs in a thread: blocking the event loop would stop the daemon's COMMIT
        # too, and the two would wait on each other until the timeout.
        other = sqlite3.connect(database, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            await anyio.to_thread.run_sync(other.execute, "BEGIN IMMEDIATE")
            more = [(await sims.create_po(lines))["order_number"] for _ in range(2)]
            daemon.poll_now()
            await anyio.sleep(7.0)
            other.execute("COMMIT")
        finally:
            other.close()
        links = await wait_for(daemon, numbers + more, is_state("received"), seconds=60)
        assert {link.state for link in links} == {"received"}
        backlog, _ = await daemon.store.inbox_backlog()
        assert backlog == 0
    katana_counts, tg_counts = await sims.counters()
    assert set(katana_counts["sales_orders_by_order_no"].values()) == {1}
    assert len(katana_counts["sales_orders_by_order_no"]) == 5
    assert set(tg_counts["receipts_per_po"].values()) == {1}
    assert len(tg_counts["receipts_per_po"]) == 5


def _fill(path: Path) -> None:
    try:
        with path.open("wb", buffering=0) as out:
            while True:
                out.write(b"\0" * 65536)
    except OSError:  # ENOSPC: the disk is full, as wanted
        return


async def test_a_failing_disk_write_loses_nothing(sims: Sims, tmp_path: Path) -> None:
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = await anyio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a file system here: {mounted.stderr.decode().strip()}")
    lines = [{"sku": "STOOL-PINE", "name": "Pine stool", "quantity": "2", "price": "30.00"}]
    try:
        async with sims.daemon(mountpoint / "syncd.db") as daemon, sims.factory():
            numbers = [(await sims.create_po(lines))["order_number"] for _ in range(2)]
            daemon.poll_now()
            await wait_for(daemon, numbers[:1], is_state("imported", "in_production"))
            # The disk fills up: every write fails for 3 s (SQLITE_FULL), then space is freed.
            filler = mountpoint / "filler"
            await anyio.to_thread.run_sync(_fill, filler)
            try:
                more = [(await sims.create_po(lines))["order_number"] for _ in range(2)]
                daemon.poll_now()
                await anyio.sleep(3.0)
                assert (await daemon.store.inbox_backlog())[0] >= 0
            finally:
                filler.unlink()
            links = await wait_for(daemon, numbers + more, is_state("received"), seconds=60)
            assert {link.state for link in links} == {"received"}
    finally:
        await anyio.run_process(["umount", "-l", str(mountpoint)], check=False)
    katana_counts, tg_counts = await sims.counters()
    assert sorted(katana_counts["sales_orders_by_order_no"].values()) == [1, 1, 1, 1]
    assert sorted(tg_counts["receipts_per_po"].values()) == [1, 1, 1, 1]
