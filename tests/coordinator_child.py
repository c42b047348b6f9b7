"""A daemon's coordinator in a process of its own, for tests/test_coordinator.py and
bench/failover.py to freeze (SIGSTOP) or kill (SIGKILL).

``python coordinator_child.py URL TTL RENEW FACTORY...``: runs a :class:`Coordinator` on
the database at URL with a runtime whose every factory does an "effect" (a fenced write,
after checking its guard) every 50 ms. Prints one JSON object a line, each with ``t``
(``time.monotonic()``, one clock for every process of the host), ``event`` and
``factory``: ``start`` (with ``fence``), ``effect`` (a guarded, fenced write went
through), ``refused`` (the guard or the store refused it, with ``by``), ``stop``, and
after each stop ``probe``: the outcome of one more fenced write with the old lease,
bypassing the guard (``written`` or ``LeaseLost``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio

from syncd.errors import LeaseLost
from syncd.runtime.coordinator import Coordinator, LeaseGuard, LeaseTimes
from syncd.store import Store

__all__ = ["ChildRuntime", "main"]

EFFECT_EVERY = 0.05


def say(event: str, factory: str, **more: Any) -> None:
    line = {"t": time.monotonic(), "event": event, "factory": factory, **more}
    print(json.dumps(line), flush=True)  # the parent reads stdout


class ChildRuntime:
    """Each factory: a task doing a guarded, fenced write every ``EFFECT_EVERY``."""

    def __init__(self, store: Store, tasks: anyio.abc.TaskGroup) -> None:
        self.store = store
        self.tasks = tasks
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.guards: dict[str, LeaseGuard] = {}

    async def start_factory(self, name: str, guard: LeaseGuard) -> None:
        scope = anyio.CancelScope()
        self.scopes[name], self.guards[name] = scope, guard
        say("start", name, fence=guard.lease.fence)
        self.tasks.start_soon(self._effects, name, guard, scope)

    async def _effects(self, name: str, guard: LeaseGuard, scope: anyio.CancelScope) -> None:
        view = self.store.for_factory(name, lease=guard.lease)
        with scope:
            while True:
                try:
                    guard.check()
                except LeaseLost:
                    say("refused", name, by="guard")
                    return
                try:
                    await view.set_meta("effect", str(time.monotonic()))
                except LeaseLost:
                    say("refused", name, by="store")
                    return
                say("effect", name, fence=guard.lease.fence)
                await anyio.sleep(EFFECT_EVERY)

    async def stop_factory(self, name: str) -> None:
        self.scopes.pop(name).cancel()
        guard = self.guards.pop(name)
        say("stop", name)
        try:
            await self.store.for_factory(name, lease=guard.lease).set_meta("probe", "x")
        except LeaseLost:
            say("probe", name, outcome="LeaseLost")
        else:
            say("probe", name, outcome="written")

    def wake(self, name: str) -> None:
        say("wake", name)


async def main(argv: list[str]) -> None:
    url, ttl, renew, *factories = argv
    store = await Store.open(url)
    try:
        async with anyio.create_task_group() as tasks:
            runtime = ChildRuntime(store, tasks)
            times = LeaseTimes(ttl=float(ttl), renew=float(renew))
            await Coordinator(store, runtime, factories, times=times).run()
    finally:
        await store.close()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
