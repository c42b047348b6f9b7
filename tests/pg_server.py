"""A real PostgreSQL server for the tests: Debian's binaries, in a temporary directory.

``initdb`` and ``pg_ctl`` refuse to run as root, and CI runs as root: there the server runs
as ``nobody`` (through ``runuser``), in a directory handed to that user. It listens on a
free loopback port and on a unix socket in the same directory, asks for a password over TCP
(so a wrong one can be refused), and runs with ``fsync=off``: the tests are about
semantics, not about PostgreSQL's durability. The session's tests share one server; each
gets a fresh database (:meth:`PostgresServer.create_database`).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

__all__ = ["PostgresServer", "database_fixture", "find_binaries", "pg_server_fixture"]

USER = "syncd"
PASSWORD = "syncd-test-password"
#: Who runs the server when the tests run as root; made when the system has no ``nobody``.
SERVER_USER = "nobody"
FALLBACK_USER = "syncd-pg"


def find_binaries() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory, or ``None``."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd:
    for name in (SERVER_USER, FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return pwd.getpwnam(FALLBACK_USER)


class PostgresServer:
    """A running server; :meth:`url` names a database on it."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.home = Path(tempfile.mkdtemp(prefix="syncd-pg-"))
        self.data = self.home / "data"
        self.log = self.home / "server.log"
        self.port = 0
        self._as: list[str] = []
        self._names = itertools.count(1)
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = _unprivileged_user()
            os.chown(self.home, self._user.pw_uid, self._user.pw_gid)
            self._as = ["runuser", "-u", self._user.pw_name, "--"]

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}\n{log}"
            )

    def start(self) -> None:
        pwfile = self.home / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        self._run(
            str(self.binaries / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            USER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        # A port found free may be taken before the server binds it: try a few.
        for attempt in range(5):
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.home} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            try:
                self._run(
                    str(self.binaries / "pg_ctl"),
                    "start",
                    "--pgdata",
                    str(self.data),
                    "--log",
                    str(self.log),
                    "--wait",
                    "--timeout=60",
                    "-o",
                    options,
                )
                return
            except RuntimeError:
                if attempt == 4:
                    raise

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(
                    str(self.binaries / "pg_ctl"), "stop", "--pgdata", str(self.data), "-m", "fast"
                )
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def url(self, database: str = "postgres", *, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(), autocommit=True)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"syncd_test_{next(self._names)}"
        with self.admin() as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self.admin() as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session", name="pg_server")
def pg_server_fixture() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; skipped when PostgreSQL is not installed."""
    binaries = find_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    server = PostgresServer(binaries)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"], name="database")
def database_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a fresh store goes: a file path, or the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "syncd.db")
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    yield url
    server.drop_database(url)
