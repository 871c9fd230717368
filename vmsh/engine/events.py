"""The event monitor: cloud-hypervisor's event records, written to ``--event-monitor``.

A record is pretty-printed JSON (two-space indent) followed by a blank line::

    {
      "timestamp": {
        "secs": 0,
        "nanos": 5127041
      },
      "source": "vm",
      "event": "booted",
      "properties": null
    }

The timestamp is the time since the monitor was opened. Writes never block the VMM: the
file is non-blocking, and a record that does not fit is logged and dropped. Every event is
also logged at info level.

:class:`GuestEvent` names what a running guest (or the host, for ``STOP``) asks of its VMM;
the machine layer reports them and the control layer (:mod:`vmsh.engine.vmm`) acts on them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

LOG = logging.getLogger(__name__)


class GuestEvent:
    """What a running guest can ask of its VMM (delivered from vCPU or device threads)."""

    POWEROFF = "poweroff"
    RESET = "reset"
    #: the VM cannot go on (a vCPU failed)
    FATAL = "fatal"
    #: the VMM was asked to stop (SIGTERM, SIGINT)
    STOP = "stop"
    #: the VM was migrated away: it runs in another VMM now
    MIGRATED = "migrated"


def format_record(elapsed_ns: int, source: str, event: str, properties: dict[str, str] | None) -> str:
    """One event record, exactly as cloud-hypervisor writes it (trailing blank line included)."""
    record = {
        "timestamp": {"secs": elapsed_ns // 1_000_000_000, "nanos": elapsed_ns % 1_000_000_000},
        "source": source,
        "event": event,
        "properties": properties,
    }
    return json.dumps(record, indent=2) + "\n\n"


class EventMonitor:
    """Writes event records to a file descriptor; without one it only logs them."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = fd
        self._start = time.monotonic_ns()
        self._lock = threading.Lock()
        if fd is not None:
            os.set_blocking(fd, False)

    @classmethod
    def open(cls, path: str | None = None, fd: int | None = None) -> EventMonitor:
        """Open ``path`` (created, truncated) or adopt ``fd``.

        :raises OSError: when the file cannot be opened.
        """
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return cls(fd)

    def emit(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        """Record ``source``/``event`` with optional string properties."""
        props = ", ".join(f"{k} = {v}" for k, v in (properties or {}).items())
        LOG.info("Event: source = %s event = %s%s", source, event, f" {props}" if props else "")
        if self._fd is None:
            return
        with self._lock:
            data = format_record(time.monotonic_ns() - self._start, source, event, properties).encode()
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError as err:
                LOG.warning("event monitor write failed: %s", err)
                return
            if written != len(data):
                LOG.warning("event monitor is full: dropped %s %s", source, event)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

