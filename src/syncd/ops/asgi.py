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

__all__ = ["bind_socket", "serve", "serving", "serving_socket"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The process's owner (daemon, demo, test) decides what a signal means.
        yield


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free one.

    :raises OSError: the address cannot be listened on (in use, not local, no rights).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket's ``proto`` says TCP. With proto 0 Nagle held uvicorn's body (written
    # after its headers) until the client's delayed ACK: ~44 ms on every keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
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
    try:
        async with serving_socket(app, sock, log_level=log_level) as url:
            yield url
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def serving_socket(
    app: Any, sock: socket.socket, *, log_level: str = "warning"
) -> AsyncIterator[str]:
    """Serve ``app`` on an already bound ``sock`` while the block runs; yields the base URL.

    Leaving the block, even by cancellation, asks uvicorn to shut down and waits until it
    has. uvicorn itself is never cancelled: cancelled halfway, it leaves its listening socket
    registered with the event loop, and once the socket is closed the next socket to reuse
    that file descriptor number is silently never read (a hang in another server).
    """
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="off", access_log=False, timeout_graceful_shutdown=2
    )
    server = _Server(config)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):
                await server.serve([sock])
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            # Inside the try: cancelled while uvicorn starts, it must still be told to exit,
            # or its shielded task keeps the task group (and the process) waiting forever.
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn only sets a flag
                    await anyio.sleep(0.005)
            yield _base_url(sock)
        finally:
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5):
                    await stopped.wait()
                # Open connections that outlast the grace period are dropped.
                server.force_exit = True
                await stopped.wait()
