"""Asynchronous block I/O for a disk image: the optional extension of
:class:`~vmsh.devices.storage.disk_file.DiskFile` that a format offers when its data can go
straight to the kernel (raw images, as cloud-hypervisor v40's ``raw_async`` disks; qcow2 and
VHDX stay synchronous there too).

A :class:`AsyncDisk` is one queue's engine: the device hands it reads, writes and flushes
tagged with a token, :meth:`AsyncDisk.submit` passes a batch to the kernel in one system call,
and :meth:`AsyncDisk.complete` returns ``(token, error)`` pairs as the kernel finishes them (in
any order), once :attr:`AsyncDisk.fd` is readable. The kernel queue is io_uring where the host
has it, Linux AIO otherwise (``open_kernel_queue``); the device serves requests synchronously
when neither is available or both are disabled (``--disk _disable_io_uring=on,_disable_aio=on``).

A request the kernel cannot take as it is (O_DIRECT with unaligned buffers, more iovecs than a
slot holds, a read-only view) is refused by :meth:`AsyncDisk.read`/``write`` and the device serves
it synchronously; a short transfer or an O_DIRECT EINVAL is finished synchronously at completion.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vmsh.devices.storage.kernel_io import IOVEC, KernelQueue, buffer_address, pin_views
from vmsh.devices.virtio.queue import advance_views

LOG = logging.getLogger(__name__)

#: iovecs one request can carry asynchronously (more go the synchronous way)
SLOT_IOVECS = 256
#: what the kernel reports when a flush cannot be queued and is done here
_SYNC_FLUSH = -1


class SyncIo(Protocol):
    """The synchronous side of the image an engine falls back to (a ``RawFile``)."""

    fd: int
    direct: bool

    def read(self, views: list[memoryview], offset: int) -> None: ...

    def write(self, views: list[memoryview], offset: int) -> None: ...

    def flush(self) -> None: ...


def open_kernel_queue(depth: int, *, io_uring: bool = True, aio: bool = True) -> KernelQueue | None:
    """io_uring if allowed and the host has it, else Linux AIO if allowed and present, else None."""
    from vmsh.devices.storage.aio import LinuxAio
    from vmsh.devices.storage.uring import IoUring

    makers: list[tuple[str, Callable[[int], KernelQueue]]] = []
    if io_uring:
        makers.append(("io_uring", IoUring))
    if aio:
        makers.append(("aio", LinuxAio))
    for name, make in makers:
        try:
            return make(depth)
        except OSError as err:
            LOG.info("%s is not available (%s): trying the next block I/O back-end", name, err)
    return None


@functools.lru_cache(maxsize=SLOT_IOVECS)
def _iovecs(count: int) -> struct.Struct:
    """``count`` struct iovec in a row."""
    return struct.Struct("<" + "QQ" * count)


@dataclass(slots=True)
class _Request:
    """One request in flight: what to finish it with if the kernel moves less than asked."""

    write: bool
    views: list[memoryview]
    offset: int
    length: int
    slot: int
    pins: list[object]
    flush: bool = False


class AsyncDisk:
    """One virtqueue's asynchronous engine over an image's file descriptor.

    :param sync: the image's synchronous methods (fallbacks and O_DIRECT bounce).
    :param kernel: the kernel queue (taken over: closed by :meth:`close`).
    """

    def __init__(self, sync: SyncIo, kernel: KernelQueue) -> None:
        self.sync = sync
        self.kernel = kernel
        self.name = kernel.name
        self.fd = kernel.fd
        self._iov = mmap.mmap(-1, kernel.depth * SLOT_IOVECS * IOVEC.size)
        self._iov_addr, self._iov_pin = buffer_address(self._iov)
        self._free = list(range(kernel.depth - 1, -1, -1))
        self._flights: dict[int, _Request] = {}
        #: completions found while waiting (a flush the kernel could not queue)
        self._done: list[tuple[int, OSError | None]] = []

    @property
    def in_flight(self) -> int:
        """Requests handed over and not yet returned by :meth:`complete`."""
        return len(self._flights)

    @property
    def full(self) -> bool:
        """No room for another request until a completion."""
        return not self._free

    # -- submission ------------------------------------------------------------------------

    def read(self, token: int, views: list[memoryview], offset: int) -> bool:
        """Queue a read into ``views``; False if it must be served synchronously."""
        return self._queue(token, views, offset, write=False)

    def write(self, token: int, views: list[memoryview], offset: int) -> bool:
        """Queue a write from ``views``; False if it must be served synchronously."""
        return self._queue(token, views, offset, write=True)

    def _queue(self, token: int, views: list[memoryview], offset: int, *, write: bool) -> bool:
        count = len(views)
        if not self._free or count > SLOT_IOVECS or (self.sync.direct and any(len(v) % 512 for v in views)):
            return False
        pinned = pin_views(views)
        if pinned is None:
            return False
        addrs, pins = pinned
        slot = self._free.pop()
        base = slot * SLOT_IOVECS * IOVEC.size
        lengths = [len(v) for v in views]
        flat = [x for pair in zip(addrs, lengths, strict=True) for x in pair]
        _iovecs(count).pack_into(self._iov, base, *flat)
        iov = self._iov_addr + base
        if write:
            self.kernel.writev(token, self.sync.fd, iov, count, offset)
        else:
            self.kernel.readv(token, self.sync.fd, iov, count, offset)
        self._flights[token] = _Request(write, views, offset, sum(lengths), slot, pins)
        return True

    def flush(self, token: int) -> None:
        """Queue a flush that covers every write queued before it (not when :attr:`full`)."""
        if self.kernel.fdatasync(token, self.sync.fd):
            # it takes a slot too: the submission ring holds ``depth`` entries
            self._flights[token] = _Request(False, [], 0, 0, self._free.pop(), [], flush=True)
            return
        # The back-end cannot order it: wait for what is in flight, then sync here.
        self.submit()
        self._done.extend(self._drain())
        try:
            self.sync.flush()
            self._done.append((token, None))
        except OSError as err:
            self._done.append((token, err))
        os.eventfd_write(self.fd, 1)  # the device's completion callback picks it up

    def submit(self) -> None:
        """Hand what was queued to the kernel (one system call)."""
        try:
            self.kernel.submit()
        except OSError as err:
            LOG.warning("%s: submitting block I/O failed: %s", self.name, err)

    # -- completion ------------------------------------------------------------------------

    def complete(self) -> list[tuple[int, OSError | None]]:
        """Requests finished since the last call: ``(token, None)`` or ``(token, error)``."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        done, self._done = self._done, []
        done.extend(self._finish(token, res) for token, res in self.kernel.reap())
        return done

    def drain(self) -> list[tuple[int, OSError | None]]:
        """Wait until nothing is in flight; what completed, as :meth:`complete` returns it."""
        self.submit()
        done, self._done = self._done, []
        done.extend(self._drain())
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        return done

    def _drain(self) -> list[tuple[int, OSError | None]]:
        out: list[tuple[int, OSError | None]] = []
        while self._flights:
            out.extend(self._finish(token, res) for token, res in self.kernel.reap(wait=len(self._flights)))
        return out

    def _finish(self, token: int, res: int) -> tuple[int, OSError | None]:
        if token not in self._flights:
            LOG.warning("%s: completion for unknown request %d", self.name, token)
            return token, OSError(errno.EIO, "unknown completion")
        req = self._flights.pop(token)
        self._free.append(req.slot)
        if req.flush:
            return token, (OSError(-res, os.strerror(-res)) if res < 0 else None)
        req.pins.clear()
        try:
            if res == -errno.EINVAL and self.sync.direct:
                # O_DIRECT refused the buffers' alignment: the bounce path does it
                (self.sync.write if req.write else self.sync.read)(req.views, req.offset)
            elif res < 0:
                raise OSError(-res, os.strerror(-res))
            elif res < req.length:
                # a short transfer (end of a file that shrank, a signal): finish synchronously
                rest = advance_views(req.views, res)
                (self.sync.write if req.write else self.sync.read)(rest, req.offset + res)
        except OSError as err:
            return token, err
        return token, None

    def close(self) -> None:
        """Wait for what is in flight, then release the kernel queue; a second call does nothing."""
        if self._iov.closed:
            return
        if self._flights:
            self.drain()
        self.kernel.close()
        del self._iov_pin
        self._iov.close()


class AsyncCapable(Protocol):
    """The :class:`~vmsh.devices.storage.disk_file.DiskFile` extension of formats whose data
    the kernel can move asynchronously (raw)."""

    def open_async(self, depth: int, *, io_uring: bool = True, aio: bool = True) -> AsyncDisk | None:
        """An engine for one queue, ``depth`` requests deep, or None where the host has no allowed back-end."""
