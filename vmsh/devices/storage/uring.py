"""An io_uring instance driven through the raw system calls (``io_uring_setup``,
``io_uring_enter``, ``io_uring_register``; Linux ``include/uapi/linux/io_uring.h``), its rings
mapped with ``mmap``: the :class:`~vmsh.devices.storage.kernel_io.KernelQueue` that
cloud-hypervisor's ``raw_async`` disks use.

The rings are shared with the kernel: the submission queue tail and the completion queue head
are ours to store, the others the kernel's. On x86 (the only architecture vmsh runs on) stores
are not reordered with other stores nor loads with other loads, so writing an entry before
publishing the tail, and reading the tail before the entries, is all the ordering needed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct

from vmsh.devices.storage.kernel_io import syscall

LOG = logging.getLogger(__name__)

# x86_64 system call numbers
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

# mmap offsets of the rings
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

IORING_ENTER_GETEVENTS = 1 << 0
IORING_REGISTER_EVENTFD = 4
IORING_FEAT_NODROP = 1 << 1

IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_FSYNC_DATASYNC = 1 << 0
#: the request starts once every request submitted before it has completed
IOSQE_IO_DRAIN = 1 << 1

#: struct io_uring_params: sq_entries .. resv[3], then io_sqring_offsets and io_cqring_offsets
_PARAMS = struct.Struct("<IIIIII4I" + "8IQ" + "8IQ")
#: struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, rw_flags,
#: user_data, buf_index, personality, splice_fd_in, addr3, pad
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
#: struct io_uring_cqe: user_data, res, flags
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")


class IoUring:
    """One io_uring with ``depth`` submission entries and its completions signalled on an eventfd.

    :raises OSError: if the kernel has no io_uring, or it is disabled
        (``/proc/sys/kernel/io_uring_disabled``), or a seccomp filter refuses it.
    """

    name = "io_uring"

    def __init__(self, depth: int) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        self.fd = -1
        self._ring_fd = syscall(SYS_IO_URING_SETUP, depth, ctypes.addressof(params))
        self._maps: list[mmap.mmap] = []
        try:
            fields = _PARAMS.unpack(params.raw)
            sq_entries, cq_entries, features = fields[0], fields[1], fields[5]
            sq_off, cq_off = fields[10:19], fields[19:28]
            if not features & IORING_FEAT_NODROP:
                # Without it a full completion ring drops completions (Linux before 5.5).
                raise OSError(0, "io_uring without IORING_FEAT_NODROP")
            sq_head, sq_tail, sq_mask, _, _, _, sq_array = sq_off[:7]
            cq_head, cq_tail, cq_mask, _, _, cqes = cq_off[:6]
            sq = self._map(sq_array + 4 * sq_entries, IORING_OFF_SQ_RING)
            cq = self._map(cqes + _CQE.size * cq_entries, IORING_OFF_CQ_RING)
            self._sqes = self._map(_SQE.size * sq_entries, IORING_OFF_SQES)
            self._sq, self._cq = sq, cq
            self._sq_head, self._sq_tail, self._sq_array = sq_head, sq_tail, sq_array
            self._sq_mask = _U32.unpack_from(sq, sq_mask)[0]
            self._cq_head, self._cq_tail, self._cqes = cq_head, cq_tail, cqes
            self._cq_mask = _U32.unpack_from(cq, cq_mask)[0]
            self.depth = sq_entries
            #: our copy of the submission tail (published by ``submit``)
            self._tail = _U32.unpack_from(sq, sq_tail)[0]
            self._queued = 0
            self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            efd = ctypes.c_int32(self.fd)
            syscall(SYS_IO_URING_REGISTER, self._ring_fd, IORING_REGISTER_EVENTFD, ctypes.addressof(efd), 1)
        except BaseException:
            self.close()
            raise

    def _map(self, length: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self._ring_fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return m

    # -- submission ------------------------------------------------------------------------

    def _push(self, opcode: int, flags: int, fd: int, offset: int, addr: int, length: int, op_flags: int,
              token: int) -> None:
        index = self._tail & self._sq_mask
        _SQE.pack_into(self._sqes, index * _SQE.size, opcode, flags, 0, fd, offset, addr, length, op_flags,
                       token, 0, 0, 0, 0, 0)
        _U32.pack_into(self._sq, self._sq_array + 4 * index, index)
        self._tail = (self._tail + 1) & 0xFFFF_FFFF
        self._queued += 1

    def readv(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        self._push(IORING_OP_READV, 0, fd, offset, iov_addr, iov_count, 0, token)

    def writev(self, token: int, fd: int, iov_addr: int, iov_count: int, offset: int) -> None:
        self._push(IORING_OP_WRITEV, 0, fd, offset, iov_addr, iov_count, 0, token)

    def fdatasync(self, token: int, fd: int) -> bool:
        self._push(IORING_OP_FSYNC, IOSQE_IO_DRAIN, fd, 0, 0, 0, IORING_FSYNC_DATASYNC, token)
        return True

    def submit(self) -> None:
        if not self._queued:
            return
        # the entries are written: publish the tail, then tell the kernel
        _U32.pack_into(self._sq, self._sq_tail, self._tail)
        while self._queued:
            try:
                done = syscall(SYS_IO_URING_ENTER, self._ring_fd, self._queued, 0, 0, 0, 0)
            except InterruptedError:
                continue
            self._queued -= done

    # -- completion ------------------------------------------------------------------------

    def reap(self, wait: int = 0) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while True:
            head = _U32.unpack_from(self._cq, self._cq_head)[0]
            tail = _U32.unpack_from(self._cq, self._cq_tail)[0]
            while head != tail:
                token, res, _ = _CQE.unpack_from(self._cq, self._cqes + (head & self._cq_mask) * _CQE.size)
                out.append((token, res))
                head = (head + 1) & 0xFFFF_FFFF
            _U32.pack_into(self._cq, self._cq_head, head)
            if len(out) >= wait:
                return out
            try:
                # entries a refused submit left in the ring go along (else nothing would complete)
                self._queued -= syscall(SYS_IO_URING_ENTER, self._ring_fd, self._queued, wait - len(out),
                                        IORING_ENTER_GETEVENTS, 0, 0)
            except InterruptedError:
                pass

    def close(self) -> None:
        for m in self._maps:
            m.close()
        self._maps = []
        if self._ring_fd >= 0:
            os.close(self._ring_fd)
            self._ring_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
