"""virtio-blk (virtio 1.2 §5.2) over a disk image (:mod:`vmsh.devices.storage`: any format).

Each request is one descriptor chain (§5.2.6)::

    struct virtio_blk_req { le32 type; le32 reserved; le64 sector;   (device-readable header)
                            u8 data[];                              (readable for OUT, writable for IN)
                            u8 status; }                            (the last writable byte)

The device does not rely on how the driver split that into descriptors (§2.6.4): it reads the
header from the first 16 readable bytes and writes the status into the last writable byte.
Data moves between the image and ``memoryview`` s of guest RAM, through the image's
:class:`~vmsh.devices.storage.DiskFile`.

Asynchronous I/O (as cloud-hypervisor v40): when the image offers it (raw images,
:mod:`vmsh.devices.storage.async_io`) and the device has an I/O loop, each queue gets its own
io_uring (or Linux AIO context, with ``_disable_io_uring``; neither with ``_disable_aio`` too):
IN, OUT and FLUSH requests are handed to the kernel, up to ``min(queue size, MAX_DEPTH)`` per
queue, and put in the used ring as they complete (in completion order, which §2.7.14 allows),
one interrupt per batch. A FLUSH starts once the writes queued before it on its queue have
completed (``IOSQE_IO_DRAIN``; with AIO the device waits for them). Reset, pause (a snapshot)
and close wait for the requests in flight, so the kernel never writes guest RAM that the device
has given back. Every other request, and one the kernel cannot take as it is, is served
synchronously.

Synchronous raw images without O_DIRECT or a rate limiter serve their IN, OUT and FLUSH
requests natively (:mod:`vmsh.devices.virtio.block_fast`): one C call per kick walks the ring and
does the I/O, and any chain it does not serve exactly as this module would stays in the ring
for the Python path below. With an I/O loop such a disk also owns its queues' kick eventfds
(``kick_fds``, the engine's ioeventfds): the loop serves a queue's first kick, then a native
thread per queue (``_disk0_q0``) polls the eventfd, serves plain requests and writes the
vector's irqfd, and hands back to the loop what is Python's (another chain, a masked vector).

Request types: IN, OUT, FLUSH, GET_ID (the 20-byte serial), DISCARD and WRITE_ZEROES (the image
frees the range when unmap is allowed); anything else is
VIRTIO_BLK_S_UNSUPP. Sectors beyond the capacity, and writes to a read-only disk, fail with
VIRTIO_BLK_S_IOERR.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from functools import partial

from vmsh.config.model import DiskConfig
from vmsh.devices.ratelimit import FdWatcher, RateLimiter, ThrottleTimer
from vmsh.devices.state import expect_state
from vmsh.devices.storage import open_disk
from vmsh.devices.storage.async_io import AsyncDisk
from vmsh.devices.virtio import block_fast
from vmsh.devices.virtio.block_fast import STOP_EMPTY, STOP_ERROR, BlockFastPath, QueueServer
from vmsh.devices.virtio.device import COMMON_FEATURES, VIRTIO_ID_BLOCK, VirtioDevice
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue
from vmsh.errors import DeviceError, DeviceStateError, GuestMemoryError, VirtQueueError
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
#: most requests in flight per queue with asynchronous I/O
MAX_DEPTH = 256


@dataclass(frozen=True, slots=True)
class VirtioBlockState:
    """Plain-data state of a ``VirtioBlock``: the counters (no request is in flight in a
    snapshot: pause waits for them)."""

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


class VirtioBlock(VirtioDevice):
    """A block device on a disk image.

    :param path: image file or block device, in any format :func:`~vmsh.devices.storage.open_disk` serves.
    :param readonly: offer VIRTIO_BLK_F_RO and refuse writes.
    :param direct: open with O_DIRECT.
    :param num_queues: request queues (VIRTIO_BLK_F_MQ when more than one).
    :param queue_size: maximum size of each queue.
    :param serial: GET_ID answer (at most 20 bytes); default derived from the image's inode.
    :param rate_limiter: bandwidth/ops limit (possibly shared with other disks of a group):
        while it refuses, requests stay in the ring and the queue is re-run after its delay.
    :param watcher: the engine's I/O loop, which runs that retry timer (a thread timer without)
        and watches the asynchronous I/O completions (without it requests are synchronous).
    :param disable_io_uring: do not use io_uring (``--disk _disable_io_uring=on``).
    :param disable_aio: do not use Linux AIO (``--disk _disable_aio=on``).
    :raises DeviceError: if the image cannot be opened, or its format is not served.

    Example::

        disk = VirtioBlock("/var/lib/disk.raw", num_queues=2)
        disk = VirtioBlock.from_config(DiskConfig(path="disk.raw", readonly=True))
    """

    state_type = VirtioBlockState

    device_type = VIRTIO_ID_BLOCK

    def __init__(self, path: str, *, readonly: bool = False, direct: bool = False, num_queues: int = 1,
                 queue_size: int = 128, serial: str | None = None, rate_limiter: RateLimiter | None = None,
                 watcher: FdWatcher | None = None, disable_io_uring: bool = False,
                 disable_aio: bool = False, dev_id: str = "_disk") -> None:
        if num_queues < 1 or queue_size <= MINIMUM_QUEUE_SIZE:
            raise DeviceError(f"virtio-blk: bad queue layout {num_queues}x{queue_size}")
        self.queue_max_sizes = (queue_size,) * num_queues
        super().__init__()
        self.path = path
        self.readonly = readonly
        self.direct = direct
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.disk = open_disk(path, readonly=readonly, direct=direct)
        #: disk size in 512-byte sectors (a partial last sector is not visible)
        self.capacity = self.disk.size >> SECTOR_SHIFT
        if serial is None:
            # cloud-hypervisor's build_disk_image_id: device, rdev and inode numbers
            serial = "".join(str(n) for n in self.disk.identity)
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.physical_block_exp = 0
        while self.physical_block_exp < 3 and SECTOR_SIZE << (self.physical_block_exp + 1) <= self.disk.block_size:
            self.physical_block_exp += 1
        self.avail_features = (COMMON_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                               | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_TOPOLOGY)
        if readonly:
            self.avail_features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        if num_queues > 1:
            self.avail_features |= 1 << VIRTIO_BLK_F_MQ
        self._counts = dict.fromkeys(("read_bytes", "write_bytes", "read_ops", "write_ops", "flush_ops",
                                      "discard_ops", "write_zeroes_ops", "errors"), 0)
        self.rate_limiter = rate_limiter
        self._throttle = ThrottleTimer(self.queue_notify, watcher) if rate_limiter is not None else None
        #: requests held back by the rate limiter (not part of the snapshot state)
        self.throttled = 0
        self._watcher = watcher
        #: one asynchronous engine per queue, or none (synchronous I/O)
        self._engines: list[AsyncDisk] = []
        #: per queue: token -> (chain, request type, data bytes) of the requests in flight
        self._flights: list[dict[int, tuple[DescriptorChain, int, int]]] = [{} for _ in range(num_queues)]
        #: per queue: chains were left in the ring because the engine was full
        self._stalled = [False] * num_queues
        self._next_token = 0
        #: requests served through the engines (not part of the snapshot state)
        self.async_ops = 0
        try:
            self._open_engines(watcher, not disable_io_uring, not disable_aio)
        except BaseException:
            self.close()
            raise
        #: "io_uring", "aio" or "sync": how requests reach the image
        self.io_backend = self._engines[0].name if self._engines else "sync"
        #: the native request path (synchronous raw images without a rate limiter), or None
        self._fast = (BlockFastPath.for_disk(self.disk, self.capacity, readonly, num_queues)
                      if not self._engines and rate_limiter is None else None)
        #: per queue, when the native path serves it from its own thread: the eventfd the
        #: guest's notifications signal (the engine makes them the queues' ioeventfds and
        #: leaves them to this device) and the thread (:class:`block_fast.QueueServer`)
        self.kick_fds: list[int] = []
        self._servers: list[QueueServer] = []
        if self._fast is not None and watcher is not None and block_fast.SERVERS_ENABLED:
            self._start_watching(watcher, dev_id)
        LOG.info("virtio-blk %s: %s I/O", path, self.io_backend)

    def _start_watching(self, watcher: FdWatcher, dev_id: str) -> None:
        """Own the queues' kick eventfds: the I/O loop reads them until a queue's server
        thread starts, and serves what the threads hand over."""
        assert self._fast is not None
        for index in range(self.num_queues):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.kick_fds.append(fd)
            # cloud-hypervisor's name for a disk queue's thread
            self._servers.append(QueueServer(self._fast, index, fd, f"{dev_id}_q{index}"))
        for index, (fd, server) in enumerate(zip(self.kick_fds, self._servers, strict=True)):
            watcher.add(fd, partial(self._kicked, index))
            watcher.add(server.python_fd, partial(self._handed_over, index))

    def _open_engines(self, watcher: FdWatcher | None, io_uring: bool, aio: bool) -> None:
        open_async = getattr(self.disk, "open_async", None)
        if watcher is None or open_async is None or not (io_uring or aio):
            return
        depth = min(self.queue_size, MAX_DEPTH)
        engines: list[AsyncDisk] = []
        try:
            for _ in range(self.num_queues):
                engine = open_async(depth, io_uring=io_uring, aio=aio)
                if engine is None or (engines and engine.name != engines[0].name):
                    # every queue the same way, or none (the host ran out of contexts)
                    if engine is not None:
                        engines.append(engine)
                    for e in engines:
                        e.close()
                    return
                engines.append(engine)
        except BaseException:
            for e in engines:
                e.close()
            raise
        self._engines = engines
        for index, engine in enumerate(engines):
            watcher.add(engine.fd, partial(self._on_completion, index))

    @classmethod
    def from_config(cls, config: DiskConfig) -> VirtioBlock:
        """A disk from ``--disk`` keys (path, readonly, direct, num_queues, queue_size, serial).

        :raises DeviceError: without a path, or if the image cannot be opened.
        """
        if not config.path:
            raise DeviceError("virtio-blk needs a path")
        return cls(config.path, readonly=config.readonly, direct=config.direct, num_queues=config.num_queues,
                   queue_size=config.queue_size, serial=config.serial, disable_io_uring=config.disable_io_uring,
                   disable_aio=config.disable_aio)

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
        engine = self._engines[index] if self._engines else None
        while True:
            if limiter is not None and limiter.blocked():
                # Leave the requests in the ring; the timer brings us back (no kick needed).
                self._hold_back(index)
                break
            if engine is not None and engine.full:
                self._stalled[index] = True  # the next completion brings us back
                break
            if self._fast is not None:
                served, empty = self._run_fast(index, queue)
                used = used or served
                if empty:
                    break
            chain = queue.pop()
            if chain is None:
                break
            if limiter is not None and not limiter.consume(self._cost(chain), 1):
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # give the chain back
                self._hold_back(index)
                break
            if engine is not None and self._start(index, engine, chain):
                continue
            queue.add_used(chain.head, self._request(chain))
            used = True
        if engine is not None and self._flights[index]:
            engine.submit()
            # page-cache hits complete inside the submitting system call: no need to wait for
            # the loop to see the eventfd
            used = self._finish(index, queue, engine.complete()) or used
        if used:
            self.signal_used(index)

    # -- queue server threads (block_fast.QueueServer) ----------------------------------------

    def queue_notify(self, index: int) -> None:
        """A notification: served here, or passed to the queue's server thread if it runs
        (the queue is the thread's then)."""
        if not self._servers or not 0 <= index < len(self._servers):
            super().queue_notify(index)
            return
        with self._locks[index]:
            if self._servers[index].running:
                os.eventfd_write(self.kick_fds[index], 1)
                return
            self._serve_here(index)

    def _kicked(self, index: int) -> None:
        """The I/O loop: the queue's kick eventfd while no server thread reads it. Serve the
        ring, then let a thread serve the next kicks (started here, on the I/O thread, so it
        runs under the I/O thread's seccomp filter)."""
        with self._locks[index]:
            if self._servers[index].running:
                return
            try:
                os.eventfd_read(self.kick_fds[index])
            except BlockingIOError:
                return
            if self._serve_here(index):
                self._start_server(index)

    def _handed_over(self, index: int) -> None:
        """The I/O loop: the queue's thread handed over an interrupt, or the queue."""
        with self._locks[index]:
            server = self._servers[index]
            what = server.take_handoff()
            if what & block_fast.HANDOFF_SIGNAL and self.activated and self.interrupt is not None:
                self.interrupt.signal_used_queue(index)
            if what & block_fast.HANDOFF_QUEUE:
                # (a pause may have stopped the thread already: the chain is still to serve)
                self._stop_server(index)
                if self._serve_here(index):
                    self._start_server(index)

    def _serve_here(self, index: int) -> bool:
        """``VirtioDevice.queue_notify``'s body (queue lock held): True if the queue is live."""
        if not self.activated or self.needs_reset or index >= len(self.queues) or not self.queues[index].ready:
            return False
        try:
            self.process_queue(index, self.queues[index])
        except (VirtQueueError, GuestMemoryError) as err:
            self.fail(err)
            return False
        return True

    def _irqfd(self, index: int) -> int | None:
        queue_irqfd = getattr(self.interrupt, "queue_irqfd", None)
        return queue_irqfd(index) if queue_irqfd is not None else None

    def _start_server(self, index: int) -> None:
        """Hand the queue to its thread (queue lock held); the loop stops reading the kicks."""
        if self._watcher is not None and self._servers[index].start(self.queues[index], self._irqfd(index)):
            self._watcher.remove(self.kick_fds[index])

    def _stop_server(self, index: int) -> None:
        """Take the queue back from its thread (queue lock held); kicks go to the loop again."""
        server = self._servers[index]
        if not server.running:
            return
        err, counts = server.stop(self.queues[index])  # reset stops the threads before the queues go
        for key, n in counts.items():
            self._counts[key] += n
        if err:
            LOG.warning("virtio-blk %s: %s", self.path, OSError(err, os.strerror(err)))
        if self._watcher is not None:
            self._watcher.add(self.kick_fds[index], partial(self._kicked, index))

    def interrupts_changed(self) -> None:
        """The driver (un)masked a vector or moved a queue to another: tell the threads."""
        for index, server in enumerate(self._servers):
            # the lock: a thread the I/O loop is starting gets the new answer too
            with self._locks[index]:
                if server.running:
                    server.set_irq_fd(self._irqfd(index))

    def _run_fast(self, index: int, queue: VirtQueue) -> tuple[bool, bool]:
        """Serve the plain requests at the head of the ring natively (``block_fast``): whether
        any completed, and whether the ring is empty (as ``queue.pop`` would have found it,
        avail_event re-armed). Otherwise the chain it stopped at is the Python path's."""
        assert self._fast is not None
        any_done = False
        while True:
            done, stop, err, counts = self._fast.run(index, queue)
            any_done = any_done or done > 0
            for key, n in counts.items():
                self._counts[key] += n
            if stop != STOP_ERROR:
                return any_done, stop == STOP_EMPTY
            LOG.warning("virtio-blk %s: %s", self.path, OSError(err, os.strerror(err)))

    # -- asynchronous requests -------------------------------------------------------------

    def _start(self, index: int, engine: AsyncDisk, chain: DescriptorChain) -> bool:
        """Hand IN, OUT and FLUSH requests to the engine; False to serve ``chain`` synchronously
        (another type, a malformed request, or one the engine cannot take)."""
        if chain.writable_len < 1 or chain.readable_len < _REQ_HEADER.size:
            return False
        rtype, _, sector = _REQ_HEADER.unpack(chain.read(0, _REQ_HEADER.size))
        token = self._next_token = (self._next_token + 1) & 0xFFFF_FFFF_FFFF_FFFF
        if rtype == VIRTIO_BLK_T_IN:
            length = chain.writable_len - 1
            if not length or length % SECTOR_SIZE or sector + (length >> SECTOR_SHIFT) > self.capacity:
                return False
            if not engine.read(token, chain.writable_views(0, length), sector << SECTOR_SHIFT):
                return False
        elif rtype == VIRTIO_BLK_T_OUT:
            length = chain.readable_len - _REQ_HEADER.size
            if (self.readonly or not length or length % SECTOR_SIZE
                    or sector + (length >> SECTOR_SHIFT) > self.capacity):
                return False
            if not engine.write(token, chain.readable_views(_REQ_HEADER.size, length), sector << SECTOR_SHIFT):
                return False
        elif rtype == VIRTIO_BLK_T_FLUSH and not self.readonly:
            length = 0
            engine.flush(token)
        else:
            return False
        self._flights[index][token] = (chain, rtype, length)
        return True

    def _finish(self, index: int, queue: VirtQueue, done: list[tuple[int, OSError | None]]) -> bool:
        """Complete the requests in ``done``: status, counters, used ring. True if any."""
        flights = self._flights[index]
        used = False
        for token, err in done:
            entry = flights.pop(token, None)
            if entry is None:
                continue
            chain, rtype, length = entry
            self.async_ops += 1
            written = 0
            if err is not None:
                LOG.warning("virtio-blk %s: %s", self.path, err)
                self._counts["errors"] += 1
                status = VIRTIO_BLK_S_IOERR
            else:
                status = VIRTIO_BLK_S_OK
                if rtype == VIRTIO_BLK_T_IN:
                    self._counts["read_ops"] += 1
                    self._counts["read_bytes"] += length
                    written = length
                elif rtype == VIRTIO_BLK_T_OUT:
                    self._counts["write_ops"] += 1
                    self._counts["write_bytes"] += length
                else:
                    self._counts["flush_ops"] += 1
            chain.write_tail(_STATUS[status])
            queue.add_used(chain.head, written + 1)
            used = True
        return used

    def _on_completion(self, index: int) -> None:
        """The engine of queue ``index`` signalled completions (on the I/O loop's thread)."""
        with self._locks[index]:
            if index >= len(self._engines):
                return  # closed meanwhile (a hot-unplug on the control thread)
            done = self._engines[index].complete()
            if not self.activated or index >= len(self.queues):
                self._flights[index].clear()  # nothing can be in flight without a queue (reset drains)
                return
            queue = self.queues[index]
            try:
                if self._finish(index, queue, done):
                    self.signal_used(index)
                if self._stalled[index] and not self.needs_reset:
                    self._stalled[index] = False
                    self.process_queue(index, queue)
            except (VirtQueueError, GuestMemoryError) as err:
                self.fail(err)

    def _drain(self, index: int, complete: bool) -> None:
        """Wait for queue ``index``'s requests in flight (its lock held); ``complete`` puts them
        in the used ring, else they are dropped (a reset: the queue is gone)."""
        if not self._engines:
            return
        done = self._engines[index].drain()
        if complete and self.activated and index < len(self.queues) and done:
            try:
                if self._finish(index, self.queues[index], done):
                    self.signal_used(index)
            except (VirtQueueError, GuestMemoryError) as err:
                self.fail(err)
        self._flights[index].clear()
        self._stalled[index] = False

    def pause(self) -> None:
        """The VM pauses (its I/O loop already is): complete every request in flight and stop
        the server threads, so a snapshot holds none and nothing writes guest RAM."""
        for index, lock in enumerate(self._locks):
            with lock:
                self._drain(index, complete=True)
                if self._servers:
                    self._stop_server(index)

    def resume(self) -> None:
        """The VM runs again: a queue left stalled is served by the next kick or completion."""

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
                self.disk.flush()
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
                self.disk.discard(offset, length)
                self._counts["discard_ops"] += 1
            else:
                if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                    raise _BadRequest(VIRTIO_BLK_S_UNSUPP)
                self.disk.write_zeroes(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                self._counts["write_zeroes_ops"] += 1

    # -- data movement ---------------------------------------------------------------------

    def _read(self, chain: DescriptorChain, length: int, offset: int) -> None:
        """``length`` bytes at ``offset`` into the writable part, straight into guest RAM."""
        self.disk.read(chain.writable_views(0, length), offset)

    def _write(self, chain: DescriptorChain, length: int, offset: int) -> None:
        """The readable part after the header to ``offset``, straight from guest RAM."""
        self.disk.write(chain.readable_views(_REQ_HEADER.size, length), offset)

    # -- lifecycle, snapshot, counters -------------------------------------------------------

    def on_reset(self) -> None:
        for index in range(len(self._servers)):
            self._stop_server(index)
        if self._throttle is not None:
            self._throttle.cancel()
        # the guest may reuse the buffers of requests in flight once the device is reset
        for index in range(len(self._engines)):
            self._drain(index, complete=False)

    def close(self) -> None:
        super().close()
        if self._throttle is not None:
            self._throttle.close()
        # a completion callback that already left the loop finds no engine once this is done
        with self._all_locks():
            engines, self._engines = self._engines, []
        for engine in engines:
            if self._watcher is not None:
                self._watcher.remove(engine.fd)
            engine.close()
        for fd, server in zip(self.kick_fds, self._servers, strict=True):
            if self._watcher is not None:
                self._watcher.remove(fd)
                self._watcher.remove(server.python_fd)
            server.close()
            os.close(fd)
        self.kick_fds, self._servers = [], []
        self.disk.close()

    def state(self) -> VirtioBlockState:
        # A snapshot is restored over the image file as it is now: what a format caches (qcow2's
        # tables) must reach the file first, or writes the guest saw complete would be lost.
        if not self.disk.readonly:
            try:
                self.disk.flush()
            except OSError as err:
                raise DeviceError(f"cannot flush disk image {self.path} for the snapshot") from err
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
        for server in self._servers:
            if server.running:
                for key, n in server.counts().items():
                    counts[key] += n
        if self.rate_limiter is not None:
            counts["throttled"] = self.throttled
        if self._engines:
            counts[f"{self.io_backend}_ops"] = self.async_ops
        return counts

