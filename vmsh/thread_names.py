"""Thread names the kernel shows: ``/proc/PID/task/TID/comm``, ``ps -T``, ``top -H``, audit lines.

Python's thread name stays inside Python (before 3.14); tools and test suites written for
cloud-hypervisor find its threads by their kernel names (``vcpu0``, ``http-server``, ...) to check
or set their CPU affinity. Every thread vmsh starts names itself with ``prctl(PR_SET_NAME)`` as the
first thing it does: :class:`NamedThread` and :class:`NamedTimer` are ``threading.Thread`` and
``threading.Timer`` that do so with their Python name. The kernel keeps the first 15 bytes.

The main thread is never renamed: its kernel name is the process's (``ps``, ``pgrep``).
"""

from __future__ import annotations

import ctypes
import logging
import threading

LOG = logging.getLogger(__name__)

#: <linux/prctl.h>
PR_SET_NAME = 15
#: TASK_COMM_LEN - 1: the bytes of a name the kernel keeps
NAME_MAX = 15

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def kernel_name(name: str) -> bytes:
    """What the kernel shows of ``name`` (its first 15 bytes)."""
    return name.encode(errors="replace")[:NAME_MAX]


def name_current_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name) for the kernel.

    Does nothing on the main thread. A failure (none is expected: a thread may always name
    itself) is logged, never raised: a name is not worth stopping a thread for.
    """
    current = threading.current_thread()
    if current is threading.main_thread():
        return
    if _prctl(PR_SET_NAME, kernel_name(name or current.name), 0, 0, 0) != 0:
        LOG.debug("cannot name thread %s: errno %d", name or current.name, ctypes.get_errno())


class NamedThread(threading.Thread):
    """A ``threading.Thread`` that names itself for the kernel with its name when it starts."""

    def run(self) -> None:
        name_current_thread(self.name)
        super().run()


class NamedTimer(threading.Timer):
    """A ``threading.Timer`` that names itself for the kernel with its name when it starts."""

    def run(self) -> None:
        name_current_thread(self.name)
        super().run()
