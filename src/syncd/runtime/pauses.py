"""A service whose token was rejected: every order waits until it works again.

Recorded in the store's meta (``paused.katana``) so that ``syncctl status``, the status page
and the metrics see it too.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from syncd.errors import AuthError, SyncdError
from syncd.store import Store

__all__ = ["PAUSED_PREFIX", "pause_service"]

log = logging.getLogger("syncd.pauses")

#: Meta key prefix of a service whose token was rejected: ``paused.katana``.
PAUSED_PREFIX = "paused."


async def pause_service(store: Store, service: str, error: AuthError) -> None:
    """A revoked token pauses every order (effects retry, nothing moves); the daemon keeps
    running and serving metrics. Whoever meets the 401 (a poll, an effect) records it; the
    service's poller resumes at its first call that works."""
    key = f"{PAUSED_PREFIX}{service}"
    try:
        if await store.get_meta(key) is None:
            log.error("%s rejected the token: every order is paused (%s)", service, error)
            await store.set_meta(
                key,
                f"{service} rejected the token (401) since "
                f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}: every order is "
                "paused until it works again",
            )
    except SyncdError as exc:
        log.warning("cannot record the pause: %s", exc)
