"""Shared harness: both simulators in-process, a recording transport, the daemon's config."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx

from syncd.config import (
    Config,
    DaemonConfig,
    KatanaConfig,
    MetricsConfig,
    TradeGeckoConfig,
    WebhooksConfig,
)
from syncd.errors import first_error
from syncd.sim import (
    KATANA_API_PREFIX,
    TRADEGECKO_WEBHOOK_SECRET,
    Simulators,
    free_port,
    free_ports,
    running_simulators,
)

__all__ = [
    "TESTS",
    "Recorder",
    "Sims",
    "Tally",
    "Unsound",
    "calls_between",
    "daemon_calls",
    "daemon_statuses",
    "delta",
    "find_unsound",
    "free_port",
    "free_ports",
    "load_test_module",
    "percentile",
    "running_sims",
    "start_postgres",
    "start_simulator",
    "tally",
    "wait_until",
]

KATANA_TOKEN = "katana-bench-token"
TRADEGECKO_TOKEN = "tradegecko-bench-token"
SECRET = TRADEGECKO_WEBHOOK_SECRET
_ID = re.compile(r"/\d+")
_IGNORED_QUERY = {"limit", "page"}


class Unsound(Exception):
    """A comparison failed its soundness check: the figure it would give is not to be trusted.

    ``python -m bench`` and each bench's own ``__main__`` print ``UNSOUND: <why>`` and exit 1.
    ``figures`` keeps what was measured, for the reader to see why.
    """

    def __init__(self, why: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.figures = figures or {}


def find_unsound(exc: BaseException) -> Unsound | None:
    """The :class:`Unsound` in ``exc``, looking inside task groups' exception groups."""
    return first_error(exc, Unsound)


def classify(service: str, method: str, path: str, query: set[str]) -> str:
    """``poll``, ``lookup``, ``effect`` or ``setup`` for one request the daemon made.

    A ``lookup`` reads named records (``?ids=``): what a webhook's notice makes the daemon
    fetch, since a notice carries only an id.
    """
    if path.endswith("/webhooks"):
        return "setup"
    if service == "katana" and method == "GET" and "ids" in query:
        return "lookup"
    if service == "katana":
        if method == "GET" and path.endswith("/sales_orders"):
            # The import's look-ups: by natural key (after an attempt) or by order_no.
            return "effect" if query & {"order_no", "ecommerce_order_id"} else "poll"
        if method == "GET" and path.endswith("/manufacturing_orders"):
            return "poll"
        return "effect"
    if method == "GET" and path.endswith("/purchase_orders") and "ids" in query:
        return "effect"  # the receipts' shared PO read (the poll filters by company)
    if method == "GET" and (path.endswith("/purchase_orders") or path.endswith("/companies")):
        return "poll"
    return "effect"


class Recorder(httpx.AsyncBaseTransport):
    """Counts each request the daemon sends, by ``kind`` and endpoint (query keys kept)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.inner = httpx.AsyncHTTPTransport()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[int] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        query = {k.rstrip("[]") for k in request.url.params} - _IGNORED_QUERY
        kind = classify(self.service, request.method, path, query)
        shown = _ID.sub("/{id}", path.removeprefix(KATANA_API_PREFIX))
        if query:
            shown += "?" + "&".join(sorted(query))
        self.counts[(kind, f"{request.method} {shown}")] += 1
        response = await self.inner.handle_async_request(request)
        self.statuses[response.status_code] += 1
        return response

    def snapshot(self) -> Counter[tuple[str, str]]:
        return Counter(self.counts)

    async def aclose(self) -> None:
        await self.inner.aclose()


def delta(after: Counter[Any], before: Counter[Any]) -> dict[Any, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@dataclass
class Sims(Simulators):
    """Both simulators, with a recorder of the daemon's requests to each."""

    katana_rec: Recorder = field(default_factory=lambda: Recorder("katana"))
    tradegecko_rec: Recorder = field(default_factory=lambda: Recorder("tradegecko"))

    def config(
        self,
        database: Path,
        *,
        poll: float = 30.0,
        katana_budget: int = 60,
        tradegecko_budget: int = 300,
        retry_initial: float = 5.0,
        webhook_port: int | None = None,
    ) -> Config:
        webhooks = WebhooksConfig()
        if webhook_port is not None:
            webhooks = WebhooksConfig(
                enabled=True,
                listen=f"127.0.0.1:{webhook_port}",
                public_base_url=f"https://127.0.0.1:{webhook_port}",
                tradegecko_secret=SECRET,
                # The default reconcile interval (what users run), longer when polls are.
                reconcile_interval=max(poll, WebhooksConfig().reconcile_interval),
            )
        return Config(
            daemon=DaemonConfig(
                database=str(database), retry_initial=retry_initial, log_level="warning"
            ),
            metrics=MetricsConfig(enabled=False),
            tradegecko=TradeGeckoConfig(
                base_url=self.tradegecko_url,
                token=TRADEGECKO_TOKEN,
                poll_interval=poll,
                rate_limit=tradegecko_budget,
            ),
            katana=KatanaConfig(
                base_url=self.katana_api_url,
                token=KATANA_TOKEN,
                poll_interval=poll,
                rate_limit=katana_budget,
            ),
            webhooks=webhooks,
        )


@asynccontextmanager
async def running_sims(*, limits: bool, webhooks: bool = False) -> AsyncIterator[Sims]:
    """Both simulators, at their real rate limits when ``limits``."""
    async with running_simulators(
        katana_token=KATANA_TOKEN,
        tradegecko_token=TRADEGECKO_TOKEN,
        katana_rate_limit=(60, 60.0) if limits else None,
        tradegecko_rate_limit=(300, 300.0) if limits else None,
        webhooks=webhooks,
        control_timeout=30.0,
    ) as simulators:
        sims = Sims(**{f.name: getattr(simulators, f.name) for f in fields(Simulators)})
        try:
            yield sims
        finally:
            await sims.katana_rec.aclose()
            await sims.tradegecko_rec.aclose()


async def wait_until(check: Any, seconds: float, step: float = 0.02) -> float:
    """Await ``check()`` until true; returns the seconds it took."""
    started = time.monotonic()
    with anyio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110 - polls state owned elsewhere
            await anyio.sleep(step)
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _template(endpoint: str) -> str:
    """One spelling for both counters: no API prefix, ``{id}`` for ids and ``{id:int}``."""
    return _ID.sub("/{id}", endpoint.removeprefix(KATANA_API_PREFIX)).replace("{id:int}", "{id}")


@dataclass(frozen=True)
class Tally:
    """What was called so far, as each party counts it: service -> ``"METHOD /template"``."""

    #: The daemon's own ``syncd_api_requests_total`` (all statuses).
    daemon: dict[str, Counter[str]]
    #: The simulators' ``/_sim/counters``.
    sims: dict[str, Counter[str]]
    #: The recording transport: ``(kind, endpoint with query keys)`` (poll, effect, setup).
    recorder: dict[str, Counter[tuple[str, str]]]
    #: The simulators' 429 answers.
    responses_429: dict[str, int]
    #: The daemon's own count of answers by status (``none``: no answer).
    daemon_statuses: dict[str, Counter[str]]


def _api_samples(metrics: Any) -> Iterator[tuple[dict[str, str], int]]:
    if metrics is None:  # before the daemon starts: nothing counted yet
        return
    for family in metrics.registry.collect():
        if family.name == "syncd_api_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    yield sample.labels, int(sample.value)


def daemon_calls(metrics: Any) -> dict[str, Counter[str]]:
    """The daemon's ``syncd_api_requests_total`` by service and ``"METHOD /template"``."""
    out: dict[str, Counter[str]] = {"katana": Counter(), "tradegecko": Counter()}
    for labels, value in _api_samples(metrics):
        out[labels["service"]][f"{labels['method']} {_template(labels['endpoint'])}"] += value
    return out


def daemon_statuses(metrics: Any) -> dict[str, Counter[str]]:
    """The daemon's ``syncd_api_requests_total`` by service and answer status."""
    out: dict[str, Counter[str]] = {"katana": Counter(), "tradegecko": Counter()}
    for labels, value in _api_samples(metrics):
        out[labels["service"]][labels["status"]] += value
    return out


async def tally(sims: Sims, metrics: Any) -> Tally:
    katana, tradegecko = await sims.counters()
    return Tally(
        daemon=daemon_calls(metrics),
        sims={
            "katana": Counter({_template(k): v for k, v in katana["requests"].items()}),
            "tradegecko": Counter({_template(k): v for k, v in tradegecko["requests"].items()}),
        },
        recorder={
            "katana": sims.katana_rec.snapshot(),
            "tradegecko": sims.tradegecko_rec.snapshot(),
        },
        responses_429={
            "katana": int(katana["responses_429"]),
            "tradegecko": int(tradegecko["responses_429"]),
        },
        daemon_statuses=daemon_statuses(metrics),
    )


def calls_between(before: Tally, after: Tally, *, what: str) -> dict[str, Any]:
    """Calls made between two tallies, by service: total, by endpoint, by kind.

    :raises Unsound: the daemon's count of an endpoint differs from the simulator's, or the
        recording transport's total from the daemon's (something called the API that the
        bench did not account for, or a counter misses calls).
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    for service in ("katana", "tradegecko"):
        mine = delta(after.daemon[service], before.daemon[service])
        theirs = delta(after.sims[service], before.sims[service])
        recorded = delta(after.recorder[service], before.recorder[service])
        if mine != theirs:
            diff = {
                k: (mine.get(k, 0), theirs.get(k, 0))
                for k in sorted(set(mine) | set(theirs))
                if mine.get(k, 0) != theirs.get(k, 0)
            }
            problems.append(f"{service}: daemon vs simulator (daemon, sim) differ: {diff}")
        if sum(recorded.values()) != sum(mine.values()):
            problems.append(
                f"{service}: recording transport saw {sum(recorded.values())}, "
                f"daemon's metrics {sum(mine.values())}"
            )
        kinds: Counter[str] = Counter()
        for (kind, _), n in recorded.items():
            kinds[kind] += n
        out[service] = {
            "total": sum(mine.values()),
            "by_kind": dict(sorted(kinds.items())),
            "endpoints": dict(sorted(mine.items())),
            "endpoints_by_kind": {
                f"{kind} {endpoint}": n for (kind, endpoint), n in sorted(recorded.items())
            },
            "responses_429": after.responses_429[service] - before.responses_429[service],
            "daemon_saw_429": after.daemon_statuses[service]["429"]
            - before.daemon_statuses[service]["429"],
        }
        if out[service]["responses_429"] != out[service]["daemon_saw_429"]:
            problems.append(
                f"{service}: simulator answered {out[service]['responses_429']} 429s, "
                f"the daemon counted {out[service]['daemon_saw_429']}"
            )
    if problems:
        raise Unsound(f"{what}: " + "; ".join(problems), out)
    return out


#: The tests' folder: some benches reuse its helpers (the PostgreSQL server, harnesses).
TESTS = Path(__file__).resolve().parents[1] / "tests"


def load_test_module(name: str) -> ModuleType:
    """A module of tests/ loaded from its file, without putting tests/ on ``sys.path``."""
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {name} from {TESTS}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def start_postgres() -> Any:
    """The tests' PostgreSQL server (tests/pg_server.py), started; the caller stops it.

    :raises SystemExit: PostgreSQL is not installed.
    """
    pg = load_test_module("pg_server")
    binaries = pg.find_binaries()
    if binaries is None:
        raise SystemExit("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    server = pg.PostgresServer(binaries)
    server.start()
    return server


def start_simulator(service: str, accounts: int = 1) -> tuple[subprocess.Popen[str], str]:
    """``syncd sim SERVICE --no-rate-limit`` as its own process; its base URL (without
    Katana's ``/v1``) read from the banner it prints once listening."""
    syncd = str(Path(sys.executable).parent / "syncd")
    flags = ["--no-rate-limit", "--port", "0", "--accounts", str(accounts)]
    proc = subprocess.Popen(
        [syncd, "sim", service, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {service} simulator exited with {proc.wait()}")
        for word in line.split():
            if word.startswith("http://"):
                # Its log goes on to stdout: read and dropped, or the full pipe blocks the
                # simulator's event loop (at 1,000 accounts its webhook log fills it).
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return proc, word.rstrip("/").removesuffix("/v1")
    raise RuntimeError(f"the {service} simulator printed no address")
