"""Serving an ASGI app with uvicorn inside an anyio task group.

The simulators, the webhook listener and the tests all run uvicorn in-process on a socket
bound here, so the caller knows the port before the first request and several servers can
share one event loop. Signals stay with the caller: the daemon owns SIGTERM handling.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any

import anyio
import uvicorn

__all__ = ["bind_socket", "serve", "serving"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The process's owner (daemon, demo, test) decides what a signal means.
        yield


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def serve(
    app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> None:
    """Serve ``app`` until cancelled."""
    async with serving(app, host, port, log_level=log_level):
        await anyio.sleep_forever()


@contextlib.asynccontextmanager
async def serving(
    app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> AsyncIterator[str]:
    """Serve ``app`` in the background while the block runs; yields the base URL."""
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="off", access_log=False, timeout_graceful_shutdown=2
    )
    server = _Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn only sets a flag
                    await anyio.sleep(0.005)
            try:
                yield _base_url(sock)
            finally:
                server.should_exit = True
    finally:
        sock.close()
