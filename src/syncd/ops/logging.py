"""Structured log lines for journald: ``logfmt`` on stdout, one event a line.

A line reads ``level=info logger=syncd.dispatcher msg="order moved" po=PO0001 so=TG-PO0001
from=imported to=in_production``. Fields come from ``extra=`` on the logging call. Values
that look like secrets are never printed: the formatter masks every registered secret.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["LogfmtFormatter", "configure_logging", "register_secrets"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}
_SECRETS: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Values (tokens) that must never appear in a log line."""
    _SECRETS.update(v for v in values if v and len(v) >= 4)


def _mask(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _quote(value: Any) -> str:
    text = _mask(str(value))
    if text == "" or any(c in text for c in ' ="\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


class LogfmtFormatter(logging.Formatter):
    """Formats a record as ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_") or value is None:
                continue
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send syncd's logs to stdout as logfmt at ``level``."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Per-request lines from the HTTP stack are noise at info; so is the state machine
    # library's own chatter ("Executed callback ...", naming no order): the dispatcher logs
    # every transition with its PO and SO.
    for noisy in ("httpx", "httpcore", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
