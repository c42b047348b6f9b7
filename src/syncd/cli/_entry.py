"""What both commands share at the very top: a reader that goes away ends them quietly."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from syncd.errors import leaf_errors

__all__ = ["EXIT_PIPE_CLOSED", "run_command"]

#: What a shell reports for a writer killed by SIGPIPE (128 + 13).
EXIT_PIPE_CLOSED = 141


def run_command(command: Callable[[], object]) -> None:
    """Run a click command; ``syncd demo | head`` ends with no traceback.

    The pipe's reader may go away mid-print, inside task groups that wrap the error in
    exception groups; click only recognises a bare one.
    """
    try:
        command()
    except BaseException as exc:
        if not all(isinstance(e, BrokenPipeError) for e in leaf_errors(exc)):
            raise
        # Python flushes stdout again at exit and would complain: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_PIPE_CLOSED)
