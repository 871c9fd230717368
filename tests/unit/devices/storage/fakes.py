"""Test doubles for asynchronous block I/O: an I/O loop run by hand and a kernel queue that
completes requests when, in the order, and with the results the test chooses."""

from __future__ import annotations

import ctypes
import errno
import os
import select
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.storage.kernel_io import IOVEC


class LoopWatcher:
    """The engine's I/O loop (``FdWatcher``): :meth:`run` calls the callbacks of readable fds."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        self.callbacks.pop(fd, None)

    def run(self, timeout: float = 5.0) -> int:
        """Wait up to ``timeout`` for readable fds and serve them once; how many were served."""
        if not self.callbacks:
            return 0
        ready, _, _ = select.select(list(self.callbacks), [], [], timeout)
        for fd in ready:
            callback = self.callbacks.get(fd)
            if callback is not None:
                callback()
        return len(ready)


@dataclass
class Op:
    """One request the fake kernel was given."""

    token: int
    kind: str  # "read", "write", "fsync"
    fd: int = -1
    iov_addr: int = 0
    iov_count: int = 0
    offset: int = 0
    drain: bool = False


class FakeKernel:
    """A ``KernelQueue`` that does the I/O only when the test says so (:meth:`complete`), in the
    order it says, with real ``preadv``/``pwritev`` on the iovecs it was given."""

    def __init__(self, depth: int, *, name: str = "fake", ordered_fsync: bool = True) -> None:
        self.name = name
        self.depth = depth
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ordered_fsync = ordered_fsync
        self.queued: list[Op] = []
        self.submitted: list[Op] = []
        self.ready: list[tuple[int, int]] = []
        #: every op in the order it completed
        self.history: list[Op] = []
        #: token -> -errno to fail it with
        self.fail: dict[int, int] = {}
        self.waits = 0
        self.closed = False

    def readv(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        self.queued.append(Op(token, "read", fd, iov_addr, iov_count, offset))

    def writev(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        self.queued.append(Op(token, "write", fd, iov_addr, iov_count, offset))

    def fdatasync(self, token: int, fd: int) -> bool:
        if not self.ordered_fsync:
            return False
        self.queued.append(Op(token, "fsync", fd, drain=True))
        return True

    def submit(self) -> None:
        self.submitted += self.queued
        self.queued = []

    def complete(self, tokens: list[int] | None = None) -> None:
        """Complete the submitted ops with these tokens (all, in submission order, by default)."""
        order = [op.token for op in self.submitted] if tokens is None else tokens
        for token in order:
            op = next(o for o in self.submitted if o.token == token)
            if op.drain:
                assert self.submitted[0] is op, "a draining fsync ran before the ops submitted before it"
            self.submitted.remove(op)
            self.history.append(op)
            self.ready.append((token, self._do(op)))
        os.eventfd_write(self.fd, 1)

    def _do(self, op: Op) -> int:
        if op.token in self.fail:
            return self.fail[op.token]
        if op.kind == "fsync":
            os.fdatasync(op.fd)
            return 0
        iovs = [IOVEC.unpack(ctypes.string_at(op.iov_addr + i * IOVEC.size, IOVEC.size)) for i in range(op.iov_count)]
        views = [memoryview((ctypes.c_char * n).from_address(addr)).cast("B") for addr, n in iovs]
        try:
            if op.kind == "read":
                return os.preadv(op.fd, views, op.offset)
            return os.pwritev(op.fd, views, op.offset)
        except OSError as err:
            return -(err.errno or errno.EIO)

    def reap(self, wait: int = 0) -> list[tuple[int, int]]:
        if wait > len(self.ready):
            self.waits += 1
            self.complete()
        out, self.ready = self.ready, []
        return out

    def close(self) -> None:
        assert not self.submitted, "closed with requests in flight"
        if not self.closed:
            os.close(self.fd)
            self.closed = True
