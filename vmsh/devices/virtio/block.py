"""virtio-blk (virtio 1.2 §5.2) over a raw image file.

Each request is one descriptor chain (§5.2.6)::

    struct virtio_blk_req { le32 type; le32 reserved; le64 sector;   (device-readable header)
                            u8 data[];                              (readable for OUT, writable for IN)
                            u8 status; }                            (the last writable byte)

The device does not rely on how the driver split that into descriptors (§2.6.4): it reads the
header from the first 16 readable bytes and writes the status into the last writable byte.
Data moves with ``os.preadv``/``os.pwritev`` directly between the image and ``memoryview`` s of
guest RAM. With ``direct`` (O_DIRECT) a request whose buffers are not 512-byte aligned, or
that the kernel refuses with EINVAL, goes through an aligned bounce buffer instead.

Request types: IN, OUT, FLUSH (fdatasync), GET_ID (the 20-byte serial), DISCARD (punch a hole)
and WRITE_ZEROES (zero range, or punch a hole when unmap is allowed); anything else is
VIRTIO_BLK_S_UNSUPP. Sectors beyond the capacity, and writes to a read-only disk, fail with
VIRTIO_BLK_S_IOERR.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from vmsh.config.model import DiskConfig
from vmsh.devices.ratelimit import FdWatcher, RateLimiter, ThrottleTimer
from vmsh.devices.state import expect_state
from vmsh.devices.virtio.device import COMMON_FEATURES, VIRTIO_ID_BLOCK, VirtioDevice
from vmsh.devices.virtio.queue import (
    DescriptorChain,
    VirtQueue,
    advance_views,
    window_views,
)
from vmsh.errors import DeviceError, DeviceStateError
from vmsh.state_types import U64

LOG = logging.getLogger(__name__)

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1  # size_max: largest segment
VIRTIO_BLK_F_SEG_MAX = 2  # seg_max: most segments per request
VIRTIO_BLK_F_GEOMETRY = 4  # legacy geometry
VIRTIO_BLK_F_RO = 5  # read-only
VIRTIO_BLK_F_BLK_SIZE = 6  # blk_size: the logical block size
VIRTIO_BLK_F_FLUSH = 9  # VIRTIO_BLK_T_FLUSH
VIRTIO_BLK_F_TOPOLOGY = 10  # physical_block_exp, alignment_offset, min_io_size, opt_io_size
VIRTIO_BLK_F_CONFIG_WCE = 11  # writeback toggle
VIRTIO_BLK_F_MQ = 12  # num_queues
VIRTIO_BLK_F_DISCARD = 13  # VIRTIO_BLK_T_DISCARD
VIRTIO_BLK_F_WRITE_ZEROES = 14  # VIRTIO_BLK_T_WRITE_ZEROES

# Request types (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status values (§5.2.6)
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

#: the unit of ``sector`` and of capacity, whatever blk_size says (§5.2.4)
SECTOR_SIZE = 512
SECTOR_SHIFT = 9
#: length of a GET_ID answer (include/uapi/linux/virtio_blk.h VIRTIO_BLK_ID_BYTES)
VIRTIO_BLK_ID_BYTES = 20
#: request header: type, reserved, sector
_REQ_HEADER = struct.Struct("<IIQ")
#: the status byte of each status value
_STATUS = {s: bytes([s]) for s in (0, 1, 2)}
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
_DWZ_SEGMENT = struct.Struct("<QII")
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x1  # the device may deallocate the zeroed range
#: discard / write-zeroes segments accepted per request (config max_*_seg)
MAX_DWZ_SEGMENTS = 1
MAX_DWZ_SECTORS = 0xFFFF_FFFF
#: config space up to and including write_zeroes_may_unmap and its padding (§5.2.4)
CONFIG_SIZE = 60
#: seg_max is the queue size minus header and status descriptors (cloud-hypervisor)
MINIMUM_QUEUE_SIZE = 2
#: O_DIRECT alignment used to choose the direct path (a logical block)
DIRECT_ALIGN = 512
BOUNCE_SIZE = 1 << 20
IOV_MAX = 1024

# fallocate(2) modes (include/uapi/linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module lacks.

    :raises OSError: with the call's errno.
    """
    # INVARIANTS: plain integer arguments; off_t is 64-bit on the Linux targets vmsh supports.
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class VirtioBlockState:
    """Plain-data state of a ``VirtioBlock``: the counters (requests are synchronous)."""

    capacity: U64 = 0
    read_bytes: U64 = 0
    write_bytes: U64 = 0
    read_ops: U64 = 0
    write_ops: U64 = 0
    flush_ops: U64 = 0
    discard_ops: U64 = 0
    write_zeroes_ops: U64 = 0
    errors: U64 = 0


class _BadRequest(Exception):
    """A request that completes with the given status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


#: qcow2 header magic at offset 0 ("QFI\xfb", QEMU docs/interop/qcow2.txt)
QCOW2_MAGIC = b"QFI\xfb"
#: VHDX file type identifier at offset 0 (MS-VHDX §2.2.1)
VHDX_SIGNATURE = b"vhdxfile"
#: VHD footer cookie, in the last 512 bytes of a fixed VHD (Microsoft's VHD format spec)
VHD_COOKIE = b"conectix"
VHD_FOOTER_SIZE = 512


def detect_image_format(path: str, size: int) -> str | None:
    """The name of the non-raw format ``path`` is in ("qcow2", "VHD", "VHDX"), or None for raw.

    The checks are cloud-hypervisor's (``block/src/lib.rs``, ``detect_image_type``): the qcow2
    magic at 0, a VHD footer in the last 512 bytes, the VHDX signature at 0. It reads through its
    own buffered descriptor, so an image opened with O_DIRECT needs no aligned buffer here.

    :raises OSError: if the image cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 8, 0)
        tail = os.pread(fd, len(VHD_COOKIE), size - VHD_FOOTER_SIZE) if size >= VHD_FOOTER_SIZE else b""
    finally:
        os.close(fd)
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    if tail == VHD_COOKIE:
        return "VHD"
    if head == VHDX_SIGNATURE:
        return "VHDX"
    return None


class VirtioBlock(VirtioDevice):
    """A block device on a raw image.

    :param path: image file or block device.
    :param readonly: offer VIRTIO_BLK_F_RO and refuse writes.
    :param direct: open with O_DIRECT.
    :param num_queues: request queues (VIRTIO_BLK_F_MQ when more than one).
    :param queue_size: maximum size of each queue.
    :param serial: GET_ID answer (at most 20 bytes); default derived from the image's inode.
    :param rate_limiter: bandwidth/ops limit (possibly shared with other disks of a group):
        while it refuses, requests stay in the ring and the queue is re-run after its delay.
    :param watcher: the engine's I/O loop, which runs that retry timer (a thread timer without).
    :raises DeviceError: if the image cannot be opened, or is in a format other than raw
        (:func:`detect_image_format`).

    Example::

        disk = VirtioBlock("/var/lib/disk.raw", num_queues=2)
        disk = VirtioBlock.from_config(DiskConfig(path="disk.raw", readonly=True))
    """

    state_type = VirtioBlockState

    device_type = VIRTIO_ID_BLOCK

    def __init__(self, path: str, *, readonly: bool = False, direct: bool = False, num_queues: int = 1,
                 queue_size: int = 128, serial: str | None = None, rate_limiter: RateLimiter | None = None,
                 watcher: FdWatcher | None = None) -> None:
        if num_queues < 1 or queue_size <= MINIMUM_QUEUE_SIZE:
            raise DeviceError(f"virtio-blk: bad queue layout {num_queues}x{queue_size}")
        self.queue_max_sizes = (queue_size,) * num_queues
        super().__init__()
        self.path = path
        self.readonly = readonly
        self.direct = direct
        self.num_queues = num_queues
        self.queue_size = queue_size
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            self.fd = os.open(path, flags)
            st = os.fstat(self.fd)
            size = os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        except OSError as err:
            raise DeviceError(f"cannot open disk image {path}") from err
        try:
            image_format = detect_image_format(path, size)
        except OSError as err:
            os.close(self.fd)
            raise DeviceError(f"cannot read disk image {path}") from err
        if image_format is not None:
            os.close(self.fd)
            raise DeviceError(f"disk image {path} is in {image_format} format: vmsh serves raw images only "
                              "(exposed as raw, the guest's writes would destroy its metadata)")
        #: disk size in 512-byte sectors (a partial last sector is not visible)
        self.capacity = size >> SECTOR_SHIFT
        if serial is None:
            # cloud-hypervisor's build_disk_image_id: device, rdev and inode numbers
            serial = f"{st.st_dev}{st.st_rdev}{st.st_ino}"
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.physical_block_exp = 0
        while self.physical_block_exp < 3 and SECTOR_SIZE << (self.physical_block_exp + 1) <= st.st_blksize:
            self.physical_block_exp += 1
        self.avail_features = (COMMON_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                               | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_TOPOLOGY)
        if readonly:
            self.avail_features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        if num_queues > 1:
            self.avail_features |= 1 << VIRTIO_BLK_F_MQ
        self._bounce: mmap.mmap | None = None
        self._counts = dict.fromkeys(("read_bytes", "write_bytes", "read_ops", "write_ops", "flush_ops",
                                      "discard_ops", "write_zeroes_ops", "errors"), 0)
        self.rate_limiter = rate_limiter
        self._throttle = ThrottleTimer(self.queue_notify, watcher) if rate_limiter is not None else None
        #: requests held back by the rate limiter (not part of the snapshot state)
        self.throttled = 0

    @classmethod
    def from_config(cls, config: DiskConfig) -> VirtioBlock:
        """A disk from ``--disk`` keys (path, readonly, direct, num_queues, queue_size, serial).

        :raises DeviceError: without a path, or if the image cannot be opened.
        """
        if not config.path:
            raise DeviceError("virtio-blk needs a path")
        return cls(config.path, readonly=config.readonly, direct=config.direct, num_queues=config.num_queues,
                   queue_size=config.queue_size, serial=config.serial)

    # -- configuration -----------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """struct virtio_blk_config (§5.2.4) up to write_zeroes_may_unmap."""
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity, 0, self.queue_size - MINIMUM_QUEUE_SIZE,  # capacity, size_max, seg_max
            0, 0, 0,  # geometry (not offered)
            SECTOR_SIZE,  # blk_size
            self.physical_block_exp, 0, 1, 0,  # topology: exp, alignment, min_io_size, opt_io_size
            1, 0, self.num_queues,  # writeback, unused0, num_queues
            MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS, 1,  # discard: max sectors, max segments, alignment
            MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS, 1)  # write zeroes: max sectors, max segments, may unmap

    # -- requests --------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        used = False
        limiter = self.rate_limiter
        while True:
            if limiter is not None and limiter.blocked():
                # Leave the requests in the ring; the timer brings us back (no kick needed).
                self._hold_back(index)
                break
            chain = queue.pop()
            if chain is None:
                break
            if limiter is not None and not limiter.consume(self._cost(chain), 1):
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # give the chain back
                self._hold_back(index)
                break
            queue.add_used(chain.head, self._request(chain))
            used = True
        if used:
            self.signal_used(index)

    def _cost(self, chain: DescriptorChain) -> int:
        """Bytes a request moves for the bandwidth bucket: IN/OUT data, 0 for the others."""
        if chain.readable_len < _REQ_HEADER.size:
            return 0
        rtype = _REQ_HEADER.unpack(chain.read(0, _REQ_HEADER.size))[0]
        if rtype == VIRTIO_BLK_T_IN:
            return max(0, chain.writable_len - 1)
        if rtype == VIRTIO_BLK_T_OUT:
            return chain.readable_len - _REQ_HEADER.size
        return 0

    def _hold_back(self, index: int) -> None:
        assert self.rate_limiter is not None and self._throttle is not None
        self.throttled += 1
        self._throttle.wait(index, self.rate_limiter.delay())

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written into the chain (data + status)."""
        if chain.writable_len < 1:
            # Nowhere to put a status: the driver broke §5.2.6.1. Return the chain untouched.
            LOG.debug("virtio-blk: request without a status byte")
            self._counts["errors"] += 1
            return 0
        status_at = chain.writable_len - 1
        written = 0
        try:
            if chain.readable_len < _REQ_HEADER.size:
                raise _BadRequest(VIRTIO_BLK_S_IOERR)
            rtype, _, sector = _REQ_HEADER.unpack(chain.read(0, _REQ_HEADER.size))
            written = self._dispatch(chain, rtype, sector, status_at)
            status = VIRTIO_BLK_S_OK
        except _BadRequest as bad:
            status, written = bad.status, 0
        except OSError as err:
            LOG.warning("virtio-blk %s: %s", self.path, err)
            status, written = VIRTIO_BLK_S_IOERR, 0
        if status != VIRTIO_BLK_S_OK:
            self._counts["errors"] += 1
        chain.write_tail(_STATUS[status])  # the last writable byte (§5.2.6)
        return written + 1

    def _dispatch(self, chain: DescriptorChain, rtype: int, sector: int, status_at: int) -> int:
        if rtype == VIRTIO_BLK_T_IN:
            self._check_range(sector, status_at)
            self._read(chain, status_at, sector << SECTOR_SHIFT)
            self._counts["read_ops"] += 1
            self._counts["read_bytes"] += status_at
            return status_at
        if rtype == VIRTIO_BLK_T_OUT:
            length = chain.readable_len - _REQ_HEADER.size
            if self.readonly:
                raise _BadRequest(VIRTIO_BLK_S_IOERR)
            self._check_range(sector, length)
            self._write(chain, length, sector << SECTOR_SHIFT)
            self._counts["write_ops"] += 1
            self._counts["write_bytes"] += length
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.readonly:
                os.fdatasync(self.fd)
            self._counts["flush_ops"] += 1
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            # The answer is the serial, NUL-padded, or as much as fits (§5.2.6.1).
            return chain.write(self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:status_at])
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if self.readonly:
                raise _BadRequest(VIRTIO_BLK_S_IOERR)
            self._discard_write_zeroes(chain, rtype)
            return 0
        raise _BadRequest(VIRTIO_BLK_S_UNSUPP)

    def _check_range(self, sector: int, length: int) -> None:
        # IN and OUT carry whole sectors (§5.2.6.1) and must stay inside the disk (§5.2.6.2).
        if length % SECTOR_SIZE or sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise _BadRequest(VIRTIO_BLK_S_IOERR)

    def _discard_write_zeroes(self, chain: DescriptorChain, rtype: int) -> None:
        body = chain.readable_len - _REQ_HEADER.size
        if body <= 0 or body % _DWZ_SEGMENT.size or body // _DWZ_SEGMENT.size > MAX_DWZ_SEGMENTS:
            raise _BadRequest(VIRTIO_BLK_S_UNSUPP)
        data = chain.read(_REQ_HEADER.size, body)
        for i in range(body // _DWZ_SEGMENT.size):
            sector, count, flags = _DWZ_SEGMENT.unpack_from(data, i * _DWZ_SEGMENT.size)
            if sector + count > self.capacity:
                raise _BadRequest(VIRTIO_BLK_S_IOERR)
            offset, length = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
            if rtype == VIRTIO_BLK_T_DISCARD:
                # §5.2.6.2: unmap is reserved for discard, and other flags are unsupported.
                if flags:
                    raise _BadRequest(VIRTIO_BLK_S_UNSUPP)
                self._deallocate(offset, length)
                self._counts["discard_ops"] += 1
            else:
                if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                    raise _BadRequest(VIRTIO_BLK_S_UNSUPP)
                self._zero(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                self._counts["write_zeroes_ops"] += 1

    def _deallocate(self, offset: int, length: int) -> None:
        if not length:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            # Discard is a hint: a file system without hole punching just keeps the data.
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
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
        zeros = bytes(min(length, BOUNCE_SIZE))
        pos = 0
        while pos < length:
            n = min(len(zeros), length - pos)
            pos += self._pwrite_all([memoryview(zeros)[:n]], offset + pos)

    # -- data movement ---------------------------------------------------------------------

    @staticmethod
    def _aligned(ranges: list[tuple[int, int]]) -> bool:
        # Guest RAM regions are page-aligned mmaps at page-aligned guest addresses, so a guest
        # address's alignment is its host address's alignment.
        return all(addr % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0 for addr, n in ranges)

    def _read(self, chain: DescriptorChain, length: int, offset: int) -> None:
        """``length`` bytes at ``offset`` into the writable part: one preadv into guest RAM."""
        views = chain.writable_views(0, length)
        if self.direct and not self._aligned(chain.writable_ranges(0, length)):
            self._bounce_read(views, offset)
            return
        try:
            self._pread_all(views, offset, length)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            self._bounce_read(views, offset)

    def _write(self, chain: DescriptorChain, length: int, offset: int) -> None:
        """The readable part after the header to ``offset``: one pwritev from guest RAM."""
        views = chain.readable_views(_REQ_HEADER.size, length)
        if self.direct and not self._aligned(chain.readable_ranges(_REQ_HEADER.size, length)):
            self._bounce_write(views, offset)
            return
        try:
            self._pwrite_all(views, offset, length)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            self._bounce_write(views, offset)

    def _pread_all(self, views: list[memoryview], offset: int, length: int | None = None) -> int:
        if length is not None and len(views) <= IOV_MAX:
            n = os.preadv(self.fd, views, offset)
            if n == length:
                return n  # the usual case: the whole request in one call
            if n <= 0:
                self._zero_tail(views, 0)
                return length
            views = advance_views(views, n)
            done = n
        else:
            done = 0
        while views:
            n = os.preadv(self.fd, views[:IOV_MAX], offset + done)
            if n <= 0:
                self._zero_tail(views, done)
                break
            done += n
            views = advance_views(views, n)
        return done

    @staticmethod
    def _zero_tail(views: list[memoryview], done: int) -> None:
        # Past the end of a file that shrank under us: the rest reads as zeros.
        for v in views:
            v[:] = bytes(len(v))

    def _pwrite_all(self, views: list[memoryview], offset: int, length: int | None = None) -> int:
        done = 0
        if length is not None and len(views) <= IOV_MAX:
            n = os.pwritev(self.fd, views, offset)
            if n == length:
                return n  # the usual case: the whole request in one call
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            views = advance_views(views, n)
            done = n
        while views:
            n = os.pwritev(self.fd, views[:IOV_MAX], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
            views = advance_views(views, n)
        return done

    def _bounce_buffer(self) -> memoryview:
        if self._bounce is None:
            # INVARIANTS: an anonymous mmap is page-aligned, as O_DIRECT needs; it lives as long as the device.
            self._bounce = mmap.mmap(-1, BOUNCE_SIZE)
        return memoryview(self._bounce)

    def _bounce_read(self, views: list[memoryview], offset: int) -> None:
        buf = self._bounce_buffer()
        total = sum(len(v) for v in views)
        pos = 0
        while pos < total:
            n = min(BOUNCE_SIZE, total - pos)
            self._pread_all([buf[:n]], offset + pos)
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
            self._pwrite_all([buf[:n]], offset + pos)
            pos += n

    # -- lifecycle, snapshot, counters -------------------------------------------------------

    def on_reset(self) -> None:
        if self._throttle is not None:
            self._throttle.cancel()

    def close(self) -> None:
        super().close()
        if self._throttle is not None:
            self._throttle.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def state(self) -> VirtioBlockState:
        return VirtioBlockState(capacity=self.capacity, **self._counts)

    def restore(self, state: VirtioBlockState) -> None:
        """Load counters; a snapshot of a disk of another size is refused.

        :raises DeviceStateError: for another state class, another capacity than the image's,
            or a counter beyond 64 bits.
        """
        s = expect_state(state, VirtioBlockState)
        if s.capacity != self.capacity:
            raise DeviceStateError("capacity", f"{s.capacity} sectors, the image {self.path} has {self.capacity}")
        for key in self._counts:
            self._counts[key] = getattr(s, key)

    def counters(self) -> dict[str, int]:
        counts = dict(self._counts)
        if self.rate_limiter is not None:
            counts["throttled"] = self.throttled
        return counts

