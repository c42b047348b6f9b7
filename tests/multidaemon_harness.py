"""Several ``syncd run`` processes on one PostgreSQL database, killed, frozen, added,
removed and reloaded while purchase orders come in; then the end state is checked.

Both simulators run in this process, serving one account per factory. Each daemon talks to
them through its own recording proxy (so every API request is known by daemon, account and
time), and each connects to the database under its own ``application_name``; triggers
record every row written to the factories' tables and every lease taken (by whom, with
which fence, at the database's clock: the same host's clock as the proxies'). From those:

- **no act after a lost lease**: a daemon frozen past its leases (SIGSTOP) and resumed
  makes no API request and writes no row for a factory it lost until it takes that
  factory's lease again;
- **every PO once**: every PO of every active factory ends with exactly one SO in its own
  Katana account and one receipt in its own TradeGecko account, and every history is a path
  of the statechart.

Used by ``tests/test_multidaemon.py`` (short) and ``bench/multidaemon.py`` (long).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
from starlette.types import Receive, Scope, Send

from syncd.domain.statechart import load_statechart
from syncd.ops.asgi import serving
from syncd.sim import FactoryTokens, Simulators, running_simulators
from syncd.sim.katana import API_PREFIX
from syncd.store import Store

__all__ = ["Cluster", "DaemonProcess", "FrozenCheck", "Verdict", "cluster"]

BIN = Path(sys.executable).parent
_AUDIT = """
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS audit.rows (
    at double precision, app text, tbl text, factory text, owner text, fence bigint);
CREATE OR REPLACE FUNCTION audit.note() RETURNS trigger AS $$
BEGIN
    IF TG_TABLE_NAME = 'leases' THEN
        -- A lease taken: a new row, another owner or a new fence (not a renewal).
        IF TG_OP = 'INSERT' OR OLD.owner IS DISTINCT FROM NEW.owner
                OR OLD.fence <> NEW.fence THEN
            INSERT INTO audit.rows VALUES (extract(epoch FROM clock_timestamp()),
                current_setting('application_name'), TG_TABLE_NAME, NEW.factory,
                NEW.owner, NEW.fence);
        END IF;
    ELSE
        INSERT INTO audit.rows VALUES (extract(epoch FROM clock_timestamp()),
            current_setting('application_name'), TG_TABLE_NAME, NEW.factory, NULL, NULL);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
"""
#: The factories' tables with a factory column (transitions go with their link's row).
_AUDITED = ("links", "inbox", "cursors", "meta", "po_observations", "leases")


class Recorder:
    """A reverse proxy in front of a simulator that notes each request: (time, daemon,
    token)."""

    def __init__(self, slot: int, target: str, client: httpx.AsyncClient, log: list[Any]):
        self.slot = slot
        self.target = target
        self.client = client
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in (b"host", b"content-length")
        ]
        token = dict((k.lower(), v) for k, v in headers).get("authorization", "")
        self.log.append((time.time(), self.slot, token.removeprefix("Bearer ")))
        query = scope.get("query_string", b"").decode()
        url = self.target + scope["path"] + (f"?{query}" if query else "")
        try:
            answer = await self.client.request(scope["method"], url, headers=headers, content=body)
        except httpx.HTTPError:
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        kept = [
            (k.encode(), v.encode())
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
        ]
        kept.append((b"content-length", str(len(answer.content)).encode()))
        await send({"type": "http.response.start", "status": answer.status_code, "headers": kept})
        await send({"type": "http.response.body", "body": answer.content})


class DaemonProcess:
    """One ``syncd run``; its log lines kept with the time each was read."""

    def __init__(self, slot: int, config: Path, log_path: Path) -> None:
        self.slot = slot
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        self.proc = subprocess.Popen(
            [str(BIN / "syncd"), "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self._log = log_path.open("a")
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for line in iter(stdout.readline, ""):
                self.lines.append((time.time(), line))
                self._log.write(line)
            self._log.flush()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def logged(self, text: str, after: float = 0.0) -> list[str]:
        return [line for at, line in list(self.lines) if at >= after and text in line]

    def close(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@dataclass
class FrozenCheck:
    """What a daemon frozen past its leases did after it was resumed."""

    lost: list[str]
    frozen_for: float
    #: Seconds from the freeze until another daemon held every factory it lost.
    taken_over_after: float
    #: Requests and rows of a lost factory before the daemon took it again: must be none.
    requests: list[tuple[float, str]] = field(default_factory=list)
    writes: list[tuple[float, str, str]] = field(default_factory=list)
    stopped_on_resume: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.lost) and not self.requests and not self.writes


@dataclass
class Verdict:
    orders: int
    received: int
    duplicate_sales_orders: dict[str, int]
    duplicate_receipts: dict[str, int]
    lost: dict[str, str]
    invalid_histories: dict[str, list[tuple[str | None, str, str]]]

    @property
    def ok(self) -> bool:
        return not (
            self.duplicate_sales_orders
            or self.duplicate_receipts
            or self.lost
            or self.invalid_histories
        )


class Cluster:
    """The simulators, the database, and the daemons: see the module's doc."""

    def __init__(
        self, sims: Simulators, url: str, workdir: Path, *, ttl: float, renew: float
    ) -> None:
        self.sims = sims
        self.url = url
        self.workdir = workdir
        self.ttl = ttl
        self.renew = renew
        self.folder = workdir / "factories.d"
        self.folder.mkdir(exist_ok=True)
        #: Every API request through the proxies: (time, slot, token).
        self.requests: list[tuple[float, int, str]] = []
        self.proxies: dict[int, tuple[str, str]] = {}
        #: The process of each slot now (a restart replaces it); every process started.
        self.daemons: dict[int, DaemonProcess] = {}
        self.processes: list[DaemonProcess] = []
        self.tokens: dict[str, FactoryTokens] = {}
        self.active: set[str] = set()
        #: (factory, PO id) → PO number, of every PO created (ids are per account).
        self.pos: dict[tuple[str, int], str] = {}
        self._stack = contextlib.AsyncExitStack()
        self._client = httpx.AsyncClient(timeout=30.0)
        # One connection for the harness's queries: its waits poll every 50 ms, and a new
        # connection each time (a backend forked, a SCRAM exchange) took CPU from the
        # daemons it was timing.
        self._db: psycopg.AsyncConnection[tuple[Any, ...]] | None = None

    # -- factories and daemons -------------------------------------------------------------

    def add_factory(self, name: str, tokens: FactoryTokens) -> None:
        """A factories.d file (the daemons read it at their start or at SIGHUP)."""
        self.tokens[name] = tokens
        (self.folder / f"{name}.toml").write_text(
            f'[tradegecko]\ntoken = "{tokens.tradegecko_token}"\n'
            f'[katana]\ntoken = "{tokens.katana_token}"\n'
        )
        self.active.add(name)

    def remove_factory(self, name: str) -> None:
        (self.folder / f"{name}.toml").rename(self.folder / f"{name}.toml.off")
        self.active.discard(name)

    async def _proxies(self, slot: int) -> tuple[str, str]:
        if slot not in self.proxies:
            urls = []
            for target in (self.sims.tradegecko_url, self.sims.katana_url):
                app = Recorder(slot, target, self._client, self.requests)
                urls.append(await self._stack.enter_async_context(serving(app)))
            self.proxies[slot] = (urls[0], urls[1])
        return self.proxies[slot]

    async def start(self, slot: int) -> DaemonProcess:
        """``syncd run`` as daemon ``slot`` (its own proxies, ``application_name=d<slot>``)."""
        assert slot not in self.daemons or not self.daemons[slot].alive
        tradegecko, katana = await self._proxies(slot)
        config = self.workdir / f"d{slot}.toml"
        config.write_text(
            f'[daemon]\ndatabase = "{self.url}?application_name=d{slot}"\n'
            f'log_level = "info"\nfactories_dir = "{self.folder}"\n'
            f"lease_ttl = {self.ttl}\nlease_renew = {self.renew}\n"
            "retry_initial = 0.1\nretry_max = 0.5\nconcurrency = 4\n"
            # A create cut short by a kill is retried only once it can no longer land
            # (timeout + settle): short here, or a takeover would wait 35 s.
            "retry_settle = 0.5\n"
            "[metrics]\nenabled = false\n"
            f'[tradegecko]\nbase_url = "{tradegecko}"\npoll_interval = 0.5\n'
            "rate_limit = 100000\n"
            f'[katana]\nbase_url = "{katana}{API_PREFIX}"\npoll_interval = 0.5\n'
            "rate_limit = 100000\ntimeout = 5.0\n"
        )
        daemon = DaemonProcess(slot, config, self.workdir / f"d{slot}.log")
        self.daemons[slot] = daemon
        self.processes.append(daemon)
        return daemon

    def running(self) -> list[DaemonProcess]:
        return [d for d in self.daemons.values() if d.alive]

    async def wait_running(self, daemon: DaemonProcess, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while not daemon.logged("syncd running"):
            if not daemon.alive:
                raise AssertionError(f"d{daemon.slot} exited: {self.tail(daemon)}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"d{daemon.slot} not running in {seconds} s\n" + await self.diagnosis()
                )
            await anyio.sleep(0.05)

    def tail(self, daemon: DaemonProcess, lines: int = 30) -> str:
        return "".join(line for _, line in daemon.lines[-lines:])

    def reload_all(self) -> None:
        for daemon in self.running():
            daemon.signal(signal.SIGHUP)

    # -- the database ----------------------------------------------------------------------

    async def prepare_database(self) -> None:
        """The schema (as a daemon would make it) and the audit triggers."""
        store = await Store.open(self.url)
        await store.close()
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as db:
            await db.execute(_AUDIT)
            for table in _AUDITED:
                await db.execute(
                    f"CREATE TRIGGER audit_{table} AFTER INSERT OR UPDATE ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION audit.note()"
                )

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self._db is None or self._db.closed:
            self._db = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        cursor = await self._db.execute(sql, params)
        return list(await cursor.fetchall())

    async def holders(self) -> dict[str, str]:
        """Factory → the owner of its current lease (by the database's clock)."""
        rows = await self.query(
            "SELECT factory, owner FROM leases WHERE expires_at >= extract(epoch FROM now())"
        )
        return {str(f): str(o) for f, o in rows}

    async def diagnosis(self, lines: int = 40) -> str:
        """What a failed wait says: the leases and heartbeats by the database's clock, every
        session on the database (who waits for whom), and each daemon's last log lines
        (the whole logs are ``d<slot>.log`` in the work directory)."""
        parts: list[str] = []
        queries = {
            "leases (remaining s by the database's clock)": (
                "SELECT factory, owner, fence, round((expires_at - extract(epoch FROM now()))"
                "::numeric, 2) FROM leases ORDER BY factory"
            ),
            "heartbeats (age s)": (
                "SELECT owner, round((extract(epoch FROM now()) - seen_at)::numeric, 2) "
                "FROM daemons ORDER BY owner"
            ),
            "sessions (app, pid, state, in transaction for s, waiting on, blocked by, query)": (
                "SELECT application_name, pid, state, round(extract(epoch FROM "
                "clock_timestamp() - xact_start)::numeric, 2), wait_event_type, "
                "pg_blocking_pids(pid), left(query, 120) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "ORDER BY application_name, pid"
            ),
        }
        for title, sql in queries.items():
            try:
                rows = await self.query(sql)
            except psycopg.Error as exc:
                parts.append(f"-- {title}: cannot query: {exc}")
                continue
            parts.append(f"-- {title}:")
            parts += [f"   {' | '.join(str(v) for v in row)}" for row in rows]
        for slot, daemon in sorted(self.daemons.items()):
            state = "running" if daemon.alive else f"exited {daemon.proc.returncode}"
            parts.append(f"-- d{slot} (pid {daemon.pid}, {state}), last {lines} lines:")
            parts.append(self.tail(daemon, lines).rstrip())
        return "\n".join(parts)

    async def owner_of(self, daemon: DaemonProcess) -> str | None:
        rows = await self.query("SELECT owner FROM daemons")
        found = [str(o) for (o,) in rows if f":{daemon.pid}:" in str(o)]
        return found[0] if found else None

    async def spread(self, seconds: float = 30.0) -> dict[str, int]:
        """Wait until every active factory is held and the live daemons hold shares
        differing by at most one; the shares by owner."""
        deadline = time.monotonic() + seconds
        while True:
            held = await self.holders()
            owners: dict[str, int] = {}
            for name in self.active:
                if name in held:
                    owners[held[name]] = owners.get(held[name], 0) + 1
            live = len(self.running())
            if (
                all(name in held for name in self.active)
                and len(owners) == live
                and max(owners.values()) - min(owners.values()) <= 1
            ):
                return owners
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not spread in {seconds} s: {held} ({live} daemons)\n" + await self.diagnosis()
                )
            await anyio.sleep(0.1)

    # -- orders ----------------------------------------------------------------------------

    async def create_pos(self, names: list[str] | None = None) -> None:
        for name in sorted(names if names is not None else self.active):
            po = await self.sims.create_po(factory=self.tokens[name])
            self.pos[(name, int(po["id"]))] = str(po["order_number"])

    async def states(self) -> dict[tuple[str, str], str]:
        rows = await self.query("SELECT factory, po_number, state FROM links")
        return {(str(f), str(n)): str(s) for f, n, s in rows}

    async def finish(self, seconds: float = 60.0) -> bool:
        """Wait until every PO of every active factory is received."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            states = await self.states()
            if all(
                states.get((f, n)) == "received"
                for (f, _), n in self.pos.items()
                if f in self.active
            ):
                return True
            await anyio.sleep(0.2)
        return False

    async def verdict(self) -> Verdict:
        states = await self.states()
        lost: dict[str, str] = {}
        duplicate_sos: dict[str, int] = {}
        duplicate_receipts: dict[str, int] = {}
        for name, tokens in self.tokens.items():
            katana, tradegecko = await self.sims.counters(tokens)
            by_no: dict[str, int] = katana["sales_orders_by_order_no"]
            receipts: dict[str, int] = tradegecko["receipts_per_po"]
            duplicate_sos |= {f"{name}:{k}": v for k, v in by_no.items() if v > 1}
            duplicate_receipts |= {f"{name}:{k}": v for k, v in receipts.items() if v > 1}
            if name not in self.active:
                continue  # removed: what it did is checked for doubles only
            for (factory, po_id), number in self.pos.items():
                if factory != name:
                    continue
                if states.get((name, number)) != "received":
                    lost[f"{name}:{number}"] = states.get((name, number), "never linked")
                elif by_no.get(f"TG-{number}", 0) != 1:
                    lost[f"{name}:{number}"] = "no sales order in Katana"
                elif receipts.get(str(po_id), 0) != 1:
                    lost[f"{name}:{number}"] = "not received in TradeGecko"
        active = [(f, n) for (f, _), n in self.pos.items() if f in self.active]
        return Verdict(
            orders=len(active),
            received=sum(1 for p in active if states.get(p) == "received"),
            duplicate_sales_orders=duplicate_sos,
            duplicate_receipts=duplicate_receipts,
            lost=lost,
            invalid_histories=await self._invalid_histories(),
        )

    async def _invalid_histories(self) -> dict[str, list[tuple[str | None, str, str]]]:
        chart = load_statechart()
        root = await Store.open(self.url, readonly=True)
        bad: dict[str, list[tuple[str | None, str, str]]] = {}
        try:
            for (factory, _), number in self.pos.items():
                store = root.for_factory(factory)
                link = await store.link_by_po_number(number)
                if link is None:
                    continue
                steps = [
                    (h.from_state, h.to_state, h.trigger) for h in await store.history(link.id)
                ]
                if not chart.valid_path(steps):
                    bad[f"{factory}:{number}"] = steps
        finally:
            await root.close()
        return bad

    # -- the freeze ------------------------------------------------------------------------

    async def freeze(self, daemon: DaemonProcess, *, after_resume: float = 3.0) -> FrozenCheck:
        """SIGSTOP ``daemon`` until the others hold every factory it had, then SIGCONT, wait
        ``after_resume`` seconds, and look at what it sent and wrote meanwhile."""
        owner = await self.owner_of(daemon)
        assert owner is not None, "the daemon has no heartbeat"
        lost = sorted(f for f, o in (await self.holders()).items() if o == owner)
        stopped = time.time()
        daemon.signal(signal.SIGSTOP)
        deadline = time.monotonic() + self.ttl * 4 + 10
        while True:
            held = await self.holders()
            left = [f for f in lost if held.get(f, owner) == owner]
            if not left:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"d{daemon.slot} ({owner}) frozen {time.time() - stopped:.1f} s: "
                    f"{left} of {lost} not taken over\n" + await self.diagnosis()
                )
            await anyio.sleep(0.05)
        taken_over = time.time() - stopped
        # Frozen a little longer: its deadlines are well past when it resumes.
        await anyio.sleep(0.5)
        resumed = time.time()
        daemon.signal(signal.SIGCONT)
        await anyio.sleep(after_resume)
        check = FrozenCheck(lost, resumed - stopped, taken_over)
        # The requests and rows first, the daemon's takings again last: a write or request
        # under a lease it took again comes after that lease was committed, so the takings
        # read later include its lease, whereas read first they could miss one taken
        # meanwhile (and the act under it would look like one after a lost lease).
        requests = list(self.requests)
        writes = await self.query(
            "SELECT at, tbl, factory FROM audit.rows WHERE app = %s AND at >= %s "
            "AND tbl <> 'leases'",
            f"d{daemon.slot}",
            resumed,
        )
        retaken: dict[str, float] = {}
        for at, factory in await self.query(
            "SELECT at, factory FROM audit.rows WHERE tbl = 'leases' AND owner = %s AND at >= %s "
            "ORDER BY at",
            owner,
            resumed,
        ):
            retaken.setdefault(str(factory), float(at))
        tokens = {
            token: name
            for name in lost
            for token in (self.tokens[name].katana_token, self.tokens[name].tradegecko_token)
        }
        for at, slot, token in requests:
            name = tokens.get(token)
            if slot == daemon.slot and name and resumed <= at < retaken.get(name, float("inf")):
                check.requests.append((at - resumed, name))
        for at, tbl, factory in writes:
            name = str(factory)
            if name in lost and float(at) < retaken.get(name, float("inf")):
                check.writes.append((float(at) - resumed, str(tbl), name))
        check.stopped_on_resume = bool(daemon.logged("lease not renewed in time", after=resumed))
        return check

    async def aclose(self) -> None:
        for daemon in self.processes:
            daemon.close()
        await self._stack.aclose()
        await self._client.aclose()
        if self._db is not None:
            await self._db.close()


@contextlib.asynccontextmanager
async def cluster(
    url: str, workdir: Path, *, factories: int, spare: int = 1, ttl: float, renew: float
) -> AsyncIterator[Cluster]:
    """Simulators with ``factories + spare`` accounts (the first ``factories`` configured as
    ``f00``...), the database prepared; no daemon started yet."""
    async with running_simulators(accounts=factories + spare) as sims, sims.factory():
        running = Cluster(sims, url, workdir, ttl=ttl, renew=renew)
        try:
            await running.prepare_database()
            for i, tokens in enumerate(sims.factories[:factories]):
                running.add_factory(f"f{i:02d}", tokens)
            yield running
        finally:
            await running.aclose()
