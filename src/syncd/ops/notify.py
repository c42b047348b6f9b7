"""systemd's notify protocol, without a dependency: one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the service started, and
``STOPPING=1`` tells it shutdown has begun. With ``WatchdogSec=`` it sets ``$WATCHDOG_USEC``
and restarts the service unless ``WATCHDOG=1`` arrives in time; :func:`watchdog` sends it from
the event loop, so a blocked loop stops the pings. Outside systemd every call does nothing.
"""

from __future__ import annotations

import os
import socket

import anyio

__all__ = ["notify", "watchdog", "watchdog_interval"]


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) to systemd; ``False`` when not
    under systemd or when the message could not be sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half systemd's timeout), or ``None`` if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


async def watchdog() -> None:
    """Ping systemd's watchdog from the event loop until cancelled (returns if not asked)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await anyio.sleep(interval)
