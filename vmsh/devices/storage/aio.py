"""A Linux AIO context (``io_setup``, ``io_submit``, ``io_getevents``; Linux
``include/uapi/linux/aio_abi.h``) with completions signalled on an eventfd (``IOCB_FLAG_RESFD``):
the :class:`~vmsh.devices.storage.kernel_io.KernelQueue` cloud-hypervisor falls back to when the
host has no io_uring.

Most file systems refuse ``IOCB_CMD_FDSYNC``, so :meth:`LinuxAio.fdatasync` declines and the
caller syncs once the writes before it have completed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct

from vmsh.devices.storage.kernel_io import buffer_address, syscall

LOG = logging.getLogger(__name__)

# x86_64 system call numbers
SYS_IO_SETUP = 206
SYS_IO_DESTROY = 207
SYS_IO_GETEVENTS = 208
SYS_IO_SUBMIT = 209

IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1 << 0

#: struct iocb (64 bytes, little endian): data, key, rw_flags, lio_opcode, reqprio, fildes,
#: buf, nbytes, offset, reserved2, flags, resfd
_IOCB = struct.Struct("<QIIHhIQQqQII")
#: struct io_event: data, obj, res, res2
_EVENT = struct.Struct("<QQqq")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class LinuxAio:
    """One AIO context of ``depth`` requests.

    :raises OSError: if the kernel has no AIO (``CONFIG_AIO`` off) or refuses the context
        (``/proc/sys/fs/aio-max-nr`` reached).
    """

    name = "aio"

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.fd = -1
        ctx = ctypes.c_ulong(0)
        syscall(SYS_IO_SETUP, depth, ctypes.addressof(ctx))
        self._ctx = ctx.value
        self._iocbs: mmap.mmap | None = None
        self._events: mmap.mmap | None = None
        try:
            self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            # one iocb per slot, and the pointers io_submit takes, at fixed addresses
            self._iocbs = mmap.mmap(-1, _IOCB.size * depth)
            self._iocb_addr, self._iocb_pin = buffer_address(self._iocbs)
            self._events = mmap.mmap(-1, _EVENT.size * depth)
            self._event_addr, self._event_pin = buffer_address(self._events)
            self._pointers = (ctypes.c_void_p * depth)()
            self._free = list(range(depth - 1, -1, -1))
            self._queued: list[int] = []
            #: (token, -errno) of requests io_submit refused
            self._failed: list[tuple[int, int]] = []
            #: slot of each token in flight
            self._slots: dict[int, int] = {}
        except BaseException:
            self.close()
            raise

    def _push(self, opcode: int, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        assert self._iocbs is not None
        slot = self._free.pop()
        _IOCB.pack_into(self._iocbs, slot * _IOCB.size, token, 0, 0, opcode, 0, fd, iov_addr, iov_count, offset,
                        0, IOCB_FLAG_RESFD, self.fd)
        self._slots[token] = slot
        self._queued.append(slot)

    def readv(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        self._push(IOCB_CMD_PREADV, token, fd, iov_addr, iov_count, offset)

    def writev(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        self._push(IOCB_CMD_PWRITEV, token, fd, iov_addr, iov_count, offset)

    def fdatasync(self, token: int, fd: int) -> bool:
        return False

    def submit(self) -> None:
        queued, self._queued = self._queued, []
        for i, slot in enumerate(queued):
            self._pointers[i] = self._iocb_addr + slot * _IOCB.size
        done = 0
        while done < len(queued):
            try:
                done += syscall(SYS_IO_SUBMIT, self._ctx, len(queued) - done,
                                ctypes.addressof(self._pointers) + done * ctypes.sizeof(ctypes.c_void_p))
            except InterruptedError:
                continue
            except OSError as err:
                # io_submit fails for the first iocb it could not take (EBADF, EINVAL for an
                # unsupported file): that request fails, the ones after it are tried again
                assert self._iocbs is not None
                token = _IOCB.unpack_from(self._iocbs, queued[done] * _IOCB.size)[0]
                self._failed.append((token, -(err.errno or errno.EIO)))
                done += 1
        if self._failed:
            os.eventfd_write(self.fd, 1)  # reported by the next reap

    def reap(self, wait: int = 0) -> list[tuple[int, int]]:
        assert self._events is not None
        out: list[tuple[int, int]] = []
        failed, self._failed = self._failed, []
        for token, res in failed:
            self._free.append(self._slots.pop(token))
            out.append((token, res))
        timeout = _Timespec(0, 0)
        while True:
            want = max(0, wait - len(out))
            try:
                n = syscall(SYS_IO_GETEVENTS, self._ctx, want, self.depth, self._event_addr,
                            0 if want else ctypes.addressof(timeout))
            except InterruptedError:
                continue
            for i in range(n):
                token, _, res, _ = _EVENT.unpack_from(self._events, i * _EVENT.size)
                slot = self._slots.pop(token, None)
                if slot is not None:
                    self._free.append(slot)
                out.append((token, res))
            if len(out) >= wait and (n < self.depth or not n):
                return out

    def close(self) -> None:
        if self._ctx:
            try:
                syscall(SYS_IO_DESTROY, self._ctx)
            except OSError as err:
                LOG.debug("io_destroy: %s", err)
            self._ctx = 0
        for name in ("_iocb_pin", "_event_pin"):
            if hasattr(self, name):
                delattr(self, name)
        for m in (self._iocbs, self._events):
            if m is not None:
                m.close()
        self._iocbs = self._events = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
