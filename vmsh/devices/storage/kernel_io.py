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
#: syscall(2) with six integer arguments (pointers passed as integers): a prototype with fixed
#: argument types converts plain ints without building ctypes objects per call (the hot path)
_syscall6 = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                             ctypes.c_long, ctypes.c_long, ctypes.c_long, use_errno=True)(("syscall", _libc))

#: struct iovec (include/uapi/linux/uio.h): base, length
IOVEC = struct.Struct("<QQ")


def syscall(number: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0, e: int = 0, f: int = 0) -> int:
    """``syscall(number, a, ..., f)`` with integer arguments (pointers as addresses).

    :raises OSError: with the call's errno when it returns -1.
    """
    ret = int(_syscall6(number, a, b, c, d, e, f))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def buffer_address(buf: mmap.mmap | bytearray) -> tuple[int, ctypes.Array[ctypes.c_char]]:
    """The address of a writable buffer the kernel reads, and the ctypes object that keeps it
    exported (so it is neither moved nor unmapped while the object lives)."""
    pin = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(pin), pin


def pin_views(views: list[memoryview]) -> tuple[list[int], list[object]] | None:
    """The host addresses of views of guest RAM and the objects that pin them (the mapping
    cannot be closed while they live), or None if ctypes cannot address one (read-only)."""
    try:
        pins: list[object] = [ctypes.c_char.from_buffer(v) for v in views]
    except (TypeError, ValueError):
        return None
    return [ctypes.addressof(p) for p in pins], pins  # type: ignore[arg-type]  # each pin is a c_char


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
