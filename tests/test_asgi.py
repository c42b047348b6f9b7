"""Serving: every server syncd runs sets TCP_NODELAY on the connections it accepts.

Without it, uvicorn's body (written after its headers) waited for the client's delayed ACK:
~44 ms on every keep-alive request to the simulators, the webhook listener and /metrics.
"""

from __future__ import annotations

import ast
import os
import socket
from pathlib import Path
from typing import TypeGuard

import anyio
import httpx
import pytest

from syncd.config import load_config
from syncd.ops.asgi import bind_socket, serving
from syncd.ops.metrics import Metrics, serve_metrics
from syncd.runtime.daemon import _metrics_socket
from syncd.sim.katana import create_app as katana_app
from syncd.sim.tradegecko import create_app as tradegecko_app

pytestmark = pytest.mark.anyio

SRC = Path(__file__).resolve().parents[1] / "src" / "syncd"


def _accepted_nodelay(port: int) -> list[bool]:
    """TCP_NODELAY of this process's accepted connections on ``port`` (server side)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                local, peer = sock.getsockname(), sock.getpeername()
            except OSError:
                continue  # a listening or unconnected socket has no peer
            if local[1] == port and peer[1] != port:
                found.append(bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
    return found


async def _check_keepalive(url: str, path: str) -> None:
    port = httpx.URL(url).port
    assert port is not None
    async with httpx.AsyncClient(base_url=url) as client:
        await client.get(path)
        await client.get(path)  # the same kept-alive connection
        assert _accepted_nodelay(port) == [True]


@pytest.mark.parametrize("make_app", [katana_app, tradegecko_app], ids=["katana", "tradegecko"])
async def test_simulators_accept_with_nodelay(make_app: object) -> None:
    app = make_app()  # type: ignore[operator]
    async with serving(app) as url:
        await _check_keepalive(url, "/")


async def test_metrics_endpoint_accepts_with_nodelay(tmp_path: Path) -> None:
    config_file = tmp_path / "syncd.toml"
    config_file.write_text(
        '[tradegecko]\ntoken = "t"\n[katana]\ntoken = "k"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[daemon]\ndatabase = "x.db"\n'
    )
    sock = _metrics_socket(load_config(config_file))
    assert sock is not None
    port = sock.getsockname()[1]
    async with anyio.create_task_group() as tg:
        await tg.start(serve_metrics, Metrics(), sock)
        await _check_keepalive(f"http://127.0.0.1:{port}", "/metrics")
        tg.cancel_scope.cancel()
    sock.close()


def test_bind_socket_is_tcp() -> None:
    with bind_socket() as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_every_server_binds_through_bind_socket() -> None:
    """No module but ``ops/asgi.py`` makes a TCP socket of its own (the webhook listener and
    the metrics endpoint call ``bind_socket``; the simulators and the demo ``serving``)."""
    offenders = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in SRC.rglob("*.py")
        if path.name != "asgi.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if _makes_tcp_socket(node)
    ]
    assert offenders == []


def _makes_tcp_socket(node: ast.AST) -> TypeGuard[ast.Call]:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "socket"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "socket"
        and not any(isinstance(arg, ast.Attribute) and arg.attr == "AF_UNIX" for arg in node.args)
    )
