"""Waiting for a state instead of sleeping a fixed time: one polling helper for the harness and
the tests.

A test that sleeps N seconds and then looks is slow when the state comes early and flaky when it
comes late (a loaded CI host). Polling a predicate until a deadline is neither; on timeout the
error names what was awaited and the last value seen, and when the process that should produce
the state has died the wait ends at once with its exit status instead of running to the deadline.
:func:`wait_cpu_quiet` waits for a process to stop computing (a guest done with its boot's
aftermath), measured from the kernel's per-thread CPU accounting.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")

# A process to watch: a Popen, or a function returning the exit status (None while it runs).
Process: TypeAlias = "subprocess.Popen[Any] | Callable[[], int | None]"

STDERR_TAIL = 4000  # characters of a dead process's captured stderr put into the message


class WaitTimeout(AssertionError):
    """A wait that ran out of time, or whose process died first (an AssertionError, so pytest
    reports it as a failed check)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
               process: Process | None = None) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value, and return it.

    Raises :class:`WaitTimeout` with ``what`` and the last value when ``timeout`` seconds pass, or
    as soon as ``process`` has exited (the predicate is checked once more first, so a state the
    process reached just before exiting still counts).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        status = _exit_status(process)
        if status is not None:
            value = predicate()
            if value:
                return value
            raise WaitTimeout(f"waiting for {what}: the process exited with status {status} "
                              f"(last value {value!r}){_stderr_tail(process)}")
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"waiting for {what}: nothing after {timeout:g} s (last value {value!r})")
        time.sleep(interval)


def cpu_time(pid: int) -> float:
    """Seconds of CPU that every thread of process ``pid`` has used so far (the first field of
    each thread's ``/proc/PID/task/TID/schedstat``: nanoseconds on a CPU); 0 for a process that
    is gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def wait_cpu_quiet(pid: int, timeout: float, *, window: float = 0.25, busy: float = 0.02) -> bool:
    """Wait until process ``pid`` uses at most ``busy`` of a CPU over a ``window`` (seconds).

    True when it did within ``timeout``, False otherwise (a guest whose background work never
    stops is not an error to the callers: they only prefer a quiet one).
    """
    deadline = time.monotonic() + timeout
    before = cpu_time(pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_time(pid)
        if now - before <= busy * window:
            return True
        before = now
    return False


def _exit_status(process: Process | None) -> int | None:
    if process is None:
        return None
    if isinstance(process, subprocess.Popen):
        return process.poll()
    return process()


def _stderr_tail(process: Process | None) -> str:
    """What a dead Popen wrote to a captured stderr pipe, without blocking on a pipe that a
    surviving child of it still holds open."""
    if not isinstance(process, subprocess.Popen) or process.stderr is None:
        return ""
    fd = process.stderr.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    text = b"".join(chunks).decode(errors="replace").strip()
    return f"\n--- stderr ---\n{text[-STDERR_TAIL:]}" if text else ""
