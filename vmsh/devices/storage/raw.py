"""A raw image (or a host block device): the virtual disk is the file, byte for byte.

Data moves with ``os.preadv``/``os.pwritev`` directly between the file and guest RAM, or through
io_uring / Linux AIO (:meth:`RawFile.open_async`, :mod:`vmsh.devices.storage.async_io`). With
``direct`` (O_DIRECT) a request whose buffers are not 512-byte multiples, or that the kernel
refuses with EINVAL (an unaligned buffer address), goes through an aligned bounce buffer.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat

from vmsh.devices.storage.async_io import AsyncDisk, open_kernel_queue
from vmsh.devices.virtio.queue import advance_views, window_views
from vmsh.syscalls import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MEMORY_FS_MAGICS,
    fallocate,
    fstatfs_type,
)

LOG = logging.getLogger(__name__)

#: O_DIRECT alignment used to choose the direct path (a logical block)
DIRECT_ALIGN = 512
BOUNCE_SIZE = 1 << 20
IOV_MAX = 1024


class RawFile:
    """A :class:`~vmsh.devices.storage.disk_file.DiskFile` over a raw file or block device.

    :param fd: the open image (taken over: closed by :meth:`close`).
    :param size: bytes of the file the guest sees (a fixed VHD leaves its footer out).
    :raises OSError: if the file cannot be examined.
    """

    def __init__(self, path: str, fd: int, *, readonly: bool, direct: bool, size: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.readonly = readonly
        self.direct = direct
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_rdev, st.st_ino)
        self.block_size = st.st_blksize
        self.size = file_size(fd) if size is None else size
        self._bounce: mmap.mmap | None = None

    # -- data --------------------------------------------------------------------------------

    def read(self, views: list[memoryview], offset: int) -> None:
        if self.direct and not _block_multiples(views):
            self._bounce_read(views, offset)
            return
        try:
            pread_all(self.fd, views, offset)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            self._bounce_read(views, offset)

    def write(self, views: list[memoryview], offset: int) -> None:
        if self.direct and not _block_multiples(views):
            self._bounce_write(views, offset)
            return
        try:
            pwrite_all(self.fd, views, offset)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            self._bounce_write(views, offset)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if not length:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            # Discard is a hint: a file system without hole punching just keeps the data.
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if not length:
            return
        zero = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, zero] if unmap else [zero]
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # No fallocate support: write zeros.
        zeros = memoryview(bytes(min(length, BOUNCE_SIZE)))
        pos = 0
        while pos < length:
            n = min(len(zeros), length - pos)
            self.write([zeros[:n]], offset + pos)
            pos += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    # -- asynchronous I/O (AsyncCapable) --------------------------------------------------

    def open_async(self, depth: int, *, io_uring: bool = True, aio: bool = True) -> AsyncDisk | None:
        """One queue's engine over this file (io_uring, else AIO), or None without either, or for
        a file in memory (tmpfs, ramfs, hugetlbfs).

        A file in memory never waits for storage, so asynchronous I/O has nothing to overlap;
        and these file systems have no non-blocking reads, so io_uring would hand every request
        to a worker thread: a thread switch and a second wake-up of the I/O thread per request,
        measured at about 3x the synchronous path's CPU for a real guest's 4 KiB reads (README,
        Benchmarks).
        """
        if (io_uring or aio) and memory_backed(self.fd):
            LOG.info("%s is in memory (tmpfs): synchronous I/O", self.path)
            return None
        kernel = open_kernel_queue(depth, io_uring=io_uring, aio=aio)
        return AsyncDisk(self, kernel) if kernel is not None else None

    # -- plumbing ----------------------------------------------------------------------------

    def _bounce_buffer(self) -> memoryview:
        if self._bounce is None:
            # INVARIANTS: an anonymous mmap is page-aligned, as O_DIRECT needs; it lives as long as the file.
            self._bounce = mmap.mmap(-1, BOUNCE_SIZE)
        return memoryview(self._bounce)

    def _bounce_read(self, views: list[memoryview], offset: int) -> None:
        buf = self._bounce_buffer()
        total = sum(len(v) for v in views)
        pos = 0
        while pos < total:
            n = min(BOUNCE_SIZE, total - pos)
            pread_all(self.fd, [buf[:n]], offset + pos)
            src = 0
            for v in window_views(views, pos, n):
                v[:] = buf[src:src + len(v)]
                src += len(v)
            pos += n

    def _bounce_write(self, views: list[memoryview], offset: int) -> None:
        buf = self._bounce_buffer()
        total = sum(len(v) for v in views)
        pos = 0
        while pos < total:
            n = min(BOUNCE_SIZE, total - pos)
            dst = 0
            for v in window_views(views, pos, n):
                buf[dst:dst + len(v)] = v
                dst += len(v)
            pwrite_all(self.fd, [buf[:n]], offset + pos)
            pos += n


def memory_backed(fd: int) -> bool:
    """True if ``fd`` is a file on tmpfs, ramfs or hugetlbfs (``fstatfs``'s ``f_type``)."""
    try:
        return fstatfs_type(fd) in MEMORY_FS_MAGICS
    except OSError:
        return False


def pread_all(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill ``views`` from ``offset`` of ``fd`` (usually one ``preadv``); bytes past the end of the
    file (one that shrank under us) read as zeros. Returns the bytes the file had."""
    total, done = sum(map(len, views)), 0
    while done < total:
        n = os.preadv(fd, views[:IOV_MAX], offset + done)
        if n <= 0:
            for v in views:
                v[:] = bytes(len(v))
            break
        done += n
        if done < total:
            views = advance_views(views, n)
    return done


def pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write all of ``views`` at ``offset`` of ``fd`` (usually one ``pwritev``).

    :raises OSError: EIO when the file takes no more bytes.
    """
    total, done = sum(map(len, views)), 0
    while done < total:
        n = os.pwritev(fd, views[:IOV_MAX], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n
        if done < total:
            views = advance_views(views, n)


def file_size(fd: int) -> int:
    """Bytes in a regular file, or in a block device (which ``st_size`` calls 0)."""
    st = os.fstat(fd)
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def _block_multiples(views: list[memoryview]) -> bool:
    # Guest RAM regions are page-aligned mmaps at page-aligned guest addresses, so buffers of
    # whole blocks are usually aligned too; the kernel's EINVAL catches the rest.
    return all(len(v) % DIRECT_ALIGN == 0 for v in views)
