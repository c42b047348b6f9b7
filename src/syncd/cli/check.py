"""``syncd check``: everything ``syncd run`` would refuse, found without running it.

Nothing is written: the database is opened read-only and never created, the listen
addresses are bound and released at once. Problems are listed in the order ``run`` meets
them (config, statechart, database, metrics address, services, webhook address), so the
first one's kind is the exit code ``run`` would give.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from syncd.config import Config, config_problems, read_config
from syncd.domain.statechart import Statechart, load_statechart
from syncd.errors import ApiError, AuthError, ConfigError, StatechartError, StoreError

__all__ = ["CheckReport", "Kind", "Problem", "check", "database_problems", "factory_lines"]

#: What kind of failure a problem is; ``syncd`` maps each to its exit code.
Kind = Literal["config", "store", "auth", "unreachable"]


@dataclass(frozen=True)
class Problem:
    kind: Kind
    message: str


@dataclass
class CheckReport:
    config: Config | None = None
    chart: Statechart | None = None
    problems: list[Problem] = field(default_factory=list)
    #: ``--online``: both services answered; ``False`` when they were not asked.
    services_ok: bool = False
    #: Why the services were not asked, with ``--online``.
    services_skipped: str | None = None


async def check(path: Path, *, online: bool = False) -> CheckReport:
    """Check the config at ``path`` and everything it names."""
    report = CheckReport()
    try:
        config = report.config = read_config(path)
    except ConfigError as exc:  # not even its shape: nothing else can be looked at
        report.problems.append(Problem("config", str(exc)))
        return report
    config_wrong = config_problems(config)
    report.problems += [Problem("config", str(exc)) for exc in config_wrong]
    from syncd.runtime.dispatcher import check_chart

    try:
        # Checked against the code as run checks it: a name the code lacks stops the start.
        report.chart = check_chart(
            load_statechart(config.daemon.statechart, holding=config.statechart_conditions())
        )
    except StatechartError as exc:
        report.problems.append(Problem("config", str(exc)))
    report.problems += [
        Problem("store", p) for p in await database_problems(config.daemon.database)
    ]
    # run binds the webhook address after asking the services: its problem comes last.
    webhook_problems: list[Problem] = []
    with _listening(config, report.problems, webhook_problems):
        if online:
            if config_wrong:
                report.services_skipped = "the config has problems"
            else:
                await _check_services(config, report)
    report.problems += webhook_problems
    return report


async def _check_services(config: Config, report: CheckReport) -> None:
    from syncd.runtime.daemon import check_services

    answered = True
    for name in config.factories:
        # Beside others, a problem says whose it is.
        whose = f"factory {name}: " if len(config.factories) > 1 else ""
        try:
            # One question to each service: check reports what it sees now, without run's
            # retries.
            await check_services(config.for_factory(name), within=0)
        except AuthError as exc:
            report.problems.append(Problem("auth", f"{whose}a token was rejected: {exc}"))
        except ApiError as exc:
            report.problems.append(
                Problem("unreachable", f"{whose}cannot reach the service: {exc}")
            )
        else:
            continue
        answered = False
    report.services_ok = answered


def factory_lines(config: Config) -> list[str]:
    """One line per factory found, for check's output: its name, where it is written, and
    what it matches and makes."""
    return [
        f"factory {factory.name} ({factory.where()}): supplier "
        f"{factory.tradegecko.supplier_name!r}, customer {factory.katana.customer_name!r}, "
        f"order_no_prefix {factory.katana.order_no_prefix!r}"
        for factory in config.factories.values()
    ]


@contextmanager
def _listening(
    config: Config, metrics_problems: list[Problem], webhook_problems: list[Problem]
) -> Iterator[None]:
    """Hold the metrics and webhook addresses bound while the block runs, as ``run`` does
    while it asks the services: the two must not clash with each other either."""
    from syncd.ops.asgi import bind_socket

    metrics, hooks = config.metrics, config.webhooks
    sockets: list[socket.socket] = []
    bound: dict[tuple[str, int], str] = {}
    try:
        for enabled, key, listen, address, problems in (
            (metrics.enabled, "metrics.listen", metrics.listen, metrics.address, metrics_problems),
            (hooks.enabled, "webhooks.listen", hooks.listen, hooks.address, webhook_problems),
        ):
            if not enabled:
                continue
            try:
                host, port = address()
            except ConfigError:
                continue  # already among the config's problems
            if port != 0 and (host, port) in bound:
                error = ConfigError(
                    f"{listen} is also {bound[host, port]}: give each its own", key=key
                )
                problems.append(Problem("config", str(error)))
                continue
            bound[host, port] = key
            try:
                sockets.append(bind_socket(host, port))
            except OSError as exc:
                why = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    why += " (is syncd already running?)"
                error = ConfigError(f"cannot listen on {listen}: {why}", key=key)
                problems.append(Problem("config", str(error)))
        yield
    finally:
        for sock in sockets:
            sock.close()


async def database_problems(path: str) -> list[str]:
    """What keeps ``run`` from opening (or creating) the database at ``path``, or what is
    damaged in it; empty when it is usable."""
    from syncd.store import Store, is_postgres_url

    if is_postgres_url(path):
        return await _postgres_problems(path)
    try:
        problems, exists = _file_problems(Path(path))
    except OSError as exc:  # a folder on the way that this user may not enter
        return [f"cannot open database {path}: {exc.strerror or exc}"]
    if not exists:
        return problems
    try:
        store = await Store.open(path, readonly=True)
    except StoreError as exc:
        return [*problems, str(exc)]
    try:
        damage = await store.integrity_check()
    finally:
        await store.close()
    if damage:
        problems.append(f"database {path} is damaged: {'; '.join(damage)}")
    return problems


async def _postgres_problems(url: str) -> list[str]:
    """Connect read-only (a wrong URL, password or database, a server out of reach are
    said here) and check the schema; a database with none yet is fine: ``run`` creates it."""
    from syncd.store import Store

    try:
        store = await Store.open(url, readonly=True, require_schema=False)
    except StoreError as exc:
        return [str(exc)]
    try:
        if await store.schema_version() == 0:
            return []
        damage = await store.integrity_check()
    except StoreError as exc:
        return [str(exc)]
    finally:
        await store.close()
    return [f"database {store.path} is damaged: {'; '.join(damage)}"] if damage else []


def _file_problems(file: Path) -> tuple[list[str], bool]:
    """The file system's objections to the database at ``file``, and whether there is a
    file to open."""
    if not file.exists():
        # run creates the file and its missing folders: the nearest existing one must be a
        # writable folder.
        folder = file.absolute().parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            return [f"cannot open database {file}: {folder} is not a directory"], False
        why = _unwritable(folder)
        return ([f"cannot open database {file}: {why}"] if why else []), False
    if not file.is_file():
        return [f"cannot open database {file}: not a regular file"], False
    # WAL mode writes -wal and -shm files next to the database: its folder must be
    # writable as well as the file.
    for target in (file, file.absolute().parent):
        why = _unwritable(target)
        if why:
            return [f"cannot write database {file}: {why}"], True
    return [], True


def _unwritable(target: Path) -> str | None:
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return f"the file system holding {target} is read-only"
    except OSError as exc:
        return f"{target}: {exc.strerror}"
    if not os.access(target, os.W_OK):
        return f"{target} is not writable by this user"
    return None
