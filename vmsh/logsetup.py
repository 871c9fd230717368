"""Logging for the launcher in cloud-hypervisor's line format.

``-v`` raises the level (none: warnings, ``-v`` info, ``-vv`` debug, ``-vvv`` trace) and
``--log-file`` sends the lines to a file instead of standard error. A line reads::

    vmsh: 1.234567ms: <vcpu0> INFO:vmsh/engine/vcpu.py:120 -- vCPU started
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

#: Python has no TRACE level; it sits below DEBUG.
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_START = time.time()


def format_duration(seconds: float) -> str:
    """A duration as Rust's ``{:.6?}`` prints it (``1.500000s``, ``12.000000ms``, ``3.000000µs``)."""
    if seconds >= 1:
        return f"{seconds:.6f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6f}ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.6f}µs"
    return f"{seconds * 1e9:.6f}ns"


class ChFormatter(logging.Formatter):
    """cloud-hypervisor's log line: elapsed time, thread, level, location, message."""

    def format(self, record: logging.LogRecord) -> str:
        elapsed = format_duration(record.created - _START) if record.created >= _START else "0ns"
        location = f"{record.pathname.split('/vmsh/', 1)[-1] if '/vmsh/' in record.pathname else record.pathname}"
        return (f"vmsh: {elapsed}: <{record.threadName}> {record.levelname}:vmsh/{location}:{record.lineno} -- "
                f"{record.getMessage()}")


def level_for(verbosity: int) -> int:
    """The logging level of ``-v`` repeated ``verbosity`` times."""
    return {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}.get(verbosity, TRACE)


def setup(verbosity: int, log_file: str | None) -> None:
    """Send vmsh's log records to ``log_file`` (or stderr) at the level of ``verbosity``.

    :raises OSError: when the log file cannot be created.
    """
    stream: IO[str] = open(log_file, "w", encoding="utf-8") if log_file else sys.stderr  # noqa: SIM115
    handler = logging.StreamHandler(stream)
    handler.terminator = "\r\n"
    handler.setFormatter(ChFormatter())
    root = logging.getLogger("vmsh")
    root.handlers[:] = [handler]
    root.setLevel(level_for(verbosity))
    root.propagate = False
