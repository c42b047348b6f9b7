"""The simulators as a package: who may use them, and ``syncd sim`` as a real process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.ops.asgi import bind_socket

SRC = Path(__file__).resolve().parents[1] / "src" / "syncd"
BIN = Path(sys.executable).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_command_line_imports_the_simulators() -> None:
    # The daemon must never depend on a stand-in for the services.
    users = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "sim" not in path.relative_to(SRC).parts[:1]
        and any(name == "syncd.sim" or name.startswith("syncd.sim.") for name in _imports(path))
    }
    assert users and all(user.startswith("cli/") for user in users), sorted(users)


def test_the_simulators_do_not_use_syncds_api_clients() -> None:
    # They stand in for the services independently of the clients they are tested against.
    for path in (SRC / "sim").rglob("*.py"):
        bad = {name for name in _imports(path) if name.startswith("syncd.adapters")}
        assert not bad, (path.name, bad)


@pytest.mark.parametrize("service", ["katana", "tradegecko"])
def test_a_port_in_use_is_a_clear_usage_error(service: str) -> None:
    taken = bind_socket()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            [str(BIN / "syncd"), "sim", service, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    assert f"syncd: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
