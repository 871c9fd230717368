"""What the asynchronous block back-ends share: the system-call plumbing (``syscall(2)`` through
ctypes: liburing and libaio are not needed), pinned host addresses of guest-RAM views, and the
:class:`KernelQueue` interface that :mod:`~vmsh.devices.storage.uring` (io_uring) and
:mod:`~vmsh.devices.storage.aio` (Linux AIO) implement.

A kernel queue takes vectored reads and writes tagged with an integer token, and reports their
results (bytes moved, or ``-errno``) on an eventfd, in the order the kernel completes them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from typing import Protocol

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

#: struct iovec (include/uapi/linux/uio.h): base, length
IOVEC = struct.Struct("<QQ")


def syscall(number: int, *args: int | ctypes.c_void_p | ctypes.Array[ctypes.c_char] | None) -> int:
    """``syscall(number, args...)`` with integer and pointer arguments.

    :raises OSError: with the call's errno when it returns -1.
    """
    # INVARIANTS: every argument is an int that fits a long, a pointer or a ctypes buffer.
    ret = int(_syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args)))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def buffer_address(buf: mmap.mmap | bytearray) -> tuple[int, ctypes.Array[ctypes.c_char]]:
    """The address of a writable buffer the kernel reads, and the ctypes object that keeps it
    exported (so it is neither moved nor unmapped while the object lives)."""
    pin = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(pin), pin


def view_address(view: memoryview) -> tuple[int, object] | None:
    """The host address of a view of guest RAM and the object that pins it (the mapping cannot
    be closed while it lives), or None for a view ctypes cannot address (read-only)."""
    try:
        pin = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return None
    return ctypes.addressof(pin), pin


class KernelQueue(Protocol):
    """An asynchronous I/O context of the kernel, ``depth`` requests deep.

    Requests are queued with :meth:`readv`/:meth:`writev`/:meth:`fdatasync` and handed to the
    kernel by :meth:`submit` (one system call for a batch); :meth:`reap` returns what completed.
    """

    #: "io_uring" or "aio": what ``vm.counters`` and the logs call the back-end
    name: str
    #: an eventfd that becomes readable when a completion waits to be reaped
    fd: int
    #: requests that can be outstanding at once
    depth: int

    def readv(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        """Queue a ``preadv`` of the ``iov_count`` iovecs at ``iov_addr`` (pinned by the caller)."""

    def writev(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        """Queue a ``pwritev``."""

    def fdatasync(self, token: int, fd: int) -> bool:
        """Queue an ``fdatasync`` that starts after everything submitted before it completed;
        False if the back-end cannot (the caller then waits and syncs itself)."""

    def submit(self) -> None:
        """Hand the queued requests to the kernel.

        :raises OSError: if the kernel refuses them (they are then reported failed by ``reap``).
        """

    def reap(self, wait: int = 0) -> list[tuple[int, int]]:
        """``(token, result)`` of completed requests: bytes moved or ``-errno``. With ``wait``,
        block until at least that many have completed."""

    def close(self) -> None:
        """Release the context (every request must have been reaped); a second call does nothing."""
