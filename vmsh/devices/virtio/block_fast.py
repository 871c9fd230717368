"""virtio-blk's native fast path: a kick's plain requests served in one C call (issue #18).

The Python request path (``VirtQueue.pop``, ``VirtioBlock._request``, ``RawFile.read``) runs a
few thousand bytecodes per request; for a real guest, whose requests arrive after milliseconds
of think time, that code and its data are out of the CPU's caches each time, and a 4 KiB read
cost the I/O thread 5-6x what the same request costs back to back (README, Benchmarks).
``vmsh_blk_fast`` (``native/blk_fast.c``, built as ``vmsh._blkfast``) walks the split ring (virtio
1.2 §2.7), validates each chain against the guest RAM regions, does the ``preadv``/``pwritev``/
``fdatasync`` on the image, writes the status byte and the used element, and returns; the
device then signals once.

It serves only IN, OUT and FLUSH requests that complete as the Python path would complete
them with VIRTIO_BLK_S_OK (or IOERR from the host's I/O), on a raw image with synchronous I/O,
without O_DIRECT and without a rate limiter. Any other chain - another request type, a range
past the capacity, a malformed or unusual chain, a buffer across two RAM regions - stops the
call with that chain still in the ring, and the Python path serves it (or fails the queue)
exactly as before. ``ENABLED`` turns the fast path off (the tests run both ways).

Threads: the call runs with the queue's lock held, as ``process_queue`` does, and without the
GIL (cffi releases it around C calls), so vCPU threads run while the disk is read. Guest RAM is
reached through the regions' host addresses (``GuestRegion.host_addr``, pinned until the region
is closed, which happens after the devices have stopped).

Example::

    fast = BlockFastPath.for_disk(disk, capacity, readonly, memory)   # None if it does not apply
    done, stop, err = fast.run(index, queue)
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vmsh.devices.storage.raw import RawFile
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.guest_memory import GuestMemory

LOG = logging.getLogger(__name__)

#: serve plain requests natively when the device allows it (False: always the Python path)
ENABLED = True

try:
    from vmsh._blkfast import ffi, lib
except ImportError:  # pragma: no cover - the module is built with vmsh
    ffi = lib = None

#: why ``run`` returned: the ring looked empty, the next chain is for Python, a request failed
STOP_EMPTY, STOP_PYTHON, STOP_ERROR = 0, 1, 2
#: the counters the C code adds to, as VirtioBlock names them
COUNTERS = ("read_ops", "read_bytes", "write_ops", "write_bytes", "flush_ops", "errors")


class BlockFastPath:
    """The C request path of one virtio-blk device: per-queue scratch space and the RAM table."""

    def __init__(self, fd: int, capacity: int, readonly: bool, num_queues: int) -> None:
        assert ffi is not None
        self._disk = ffi.new("vbf_disk *", {"fd": fd, "readonly": int(readonly), "capacity": capacity})
        self._queues = [ffi.new("vbf_queue *") for _ in range(num_queues)]
        self._scratch: list[Any] = [None] * num_queues  # 64 KiB each, made on first use
        self._counts = ffi.new("vbf_counts *")
        self._regions_key: object = None
        self._regions: Any = None
        self._nregions = 0
        #: requests served here (not a device counter: for tests and benchmarks)
        self.ops = 0

    @classmethod
    def for_disk(cls, disk: object, capacity: int, readonly: bool, num_queues: int) -> BlockFastPath | None:
        """A fast path for ``disk`` if it is a raw image read and written synchronously with
        the page cache (O_DIRECT's alignment rules stay with ``RawFile``), else None."""
        if not ENABLED or lib is None or type(disk) is not RawFile or disk.direct:
            return None
        return cls(disk.fd, capacity, readonly, num_queues)

    def _region_table(self, memory: GuestMemory) -> bool:
        """Point ``_regions`` at the RAM regions' host addresses; False if the memory has no
        host addresses to give (a test's fake)."""
        regions = getattr(memory, "regions", None)
        if regions is None:
            return False
        key = (id(memory), id(regions), len(regions))
        if key != self._regions_key:
            try:
                table = [(r.start, r.size, r.host_addr) for r in regions]
            except AttributeError:
                return False
            self._regions = ffi.new("vbf_region[]", [{"start": s, "size": n, "host": h} for s, n, h in table])
            self._nregions = len(table)
            self._regions_key = key
        return True

    def scratch(self, index: int) -> Any:
        """Queue ``index``'s scratch space (made on first use)."""
        if self._scratch[index] is None:
            self._scratch[index] = ffi.new("vbf_scratch *")
        return self._scratch[index]

    def run(self, index: int, queue: VirtQueue) -> tuple[int, int, int, dict[str, int]]:
        """Serve the plain requests at the head of ``queue``'s ring (its lock held): returns the
        requests completed, why it stopped (``STOP_*``), the errno of a failed request, and
        the counters to add."""
        if not self._region_table(queue.memory):
            return 0, STOP_PYTHON, 0, {}
        q = self._queues[index]
        q.desc_table, q.avail_ring, q.used_ring = queue.desc_table, queue.avail_ring, queue.used_ring
        q.size, q.indirect, q.event_idx = queue.size, queue.indirect, queue.event_idx
        q.next_avail, q.next_used = queue.next_avail, queue.next_used
        c = self._counts
        done = lib.vmsh_blk_fast(q, self._regions, self._nregions, self._disk, c, self.scratch(index))
        if not done:
            return 0, c.stop, c.err, {}
        self.ops += done
        queue.next_avail, queue.next_used = q.next_avail, q.next_used
        counts = {name: getattr(c, name) for name in COUNTERS}
        for name in COUNTERS:
            setattr(c, name, 0)
        return done, c.stop, c.err, counts


#: give each queue its own server thread once the guest uses it (False: the I/O loop serves every kick)
SERVERS_ENABLED = True
#: why a server thread handed over to Python (``QueueServer.take_handoff``)
HANDOFF_QUEUE = lib.VBS_HANDOFF_QUEUE if lib is not None else 1
HANDOFF_SIGNAL = lib.VBS_HANDOFF_SIGNAL if lib is not None else 2


class QueueServer:
    """One queue's server thread (``vmsh_blk_server_*``): it polls the queue's kick eventfd,
    serves plain requests with :meth:`BlockFastPath.run`'s C code and writes the vector's irqfd,
    so that a request of a real guest never wakes Python (README, Benchmarks).

    Ownership: between :meth:`start` and :meth:`stop` (both with the queue's lock held) the
    thread alone uses the queue's positions and the counts; ``stop`` joins it and gives them
    back to the :class:`VirtQueue`. The thread hands over (``python_fd`` turns readable, see
    :meth:`take_handoff`) a chain that is the Python path's, a failed request (it then ends),
    and an interrupt it may not raise itself (it goes on).

    Example::

        server = QueueServer(fast, 0, kick_fd, "_disk0_q0")
        server.start(queue, irq_fd)        # queue lock held
        ...
        err, counts = server.stop(queue)   # queue lock held
    """

    def __init__(self, fast: BlockFastPath, index: int, kick_fd: int, name: str) -> None:
        assert ffi is not None
        self._fast = fast
        self._index = index
        self._s = ffi.new("vbs_server *")
        self._s.kick_fd = kick_fd
        self._s.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._s.python_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._s.irq_fd = -1
        self._s.name = name.encode(errors="replace")[:15]
        self.name = name
        self._regions: Any = None
        #: the thread runs (set and cleared with the queue's lock held)
        self.running = False

    @property
    def python_fd(self) -> int:
        """Readable when the thread handed something over."""
        fd: int = self._s.python_fd
        return fd

    def start(self, queue: VirtQueue, irq_fd: int | None) -> bool:
        """Start serving ``queue`` from its current positions; False if it cannot be served
        here (its memory has no host addresses, or the thread does not start)."""
        fast = self._fast
        if not fast._region_table(queue.memory):
            return False
        s = self._s
        q = s.q
        q.desc_table, q.avail_ring, q.used_ring = queue.desc_table, queue.avail_ring, queue.used_ring
        q.size, q.indirect, q.event_idx = queue.size, queue.indirect, queue.event_idx
        q.next_avail, q.next_used = queue.next_avail, queue.next_used
        s.signalled_valid = int(queue.signalled_used is not None)
        s.signalled_used = queue.signalled_used or 0
        # the thread's own reference: another queue's Python path may replace the table
        self._regions = fast._regions
        s.regs, s.nregs, s.disk = self._regions, fast._nregions, fast._disk
        s.scratch = fast.scratch(self._index)
        for name in COUNTERS:
            setattr(s.c, name, 0)
        s.c.err = 0
        lib.vmsh_blk_server_set_irq_fd(s, -1 if irq_fd is None else irq_fd)
        rc = lib.vmsh_blk_server_start(s)
        if rc:
            LOG.warning("%s: no server thread (%s); the I/O loop serves the queue", self.name, os.strerror(-rc))
            return False
        self.running = True
        return True

    def set_irq_fd(self, irq_fd: int | None) -> None:
        """The vector's irqfd while the thread may raise it itself (None: hand it to Python)."""
        lib.vmsh_blk_server_set_irq_fd(self._s, -1 if irq_fd is None else irq_fd)

    def take_handoff(self) -> int:
        """The ``HANDOFF_*`` bits set since the last call (``python_fd`` read first)."""
        try:
            os.eventfd_read(self._s.python_fd)
        except BlockingIOError:
            pass
        bits: int = lib.vmsh_blk_server_take(self._s)
        return bits

    def stop(self, queue: VirtQueue) -> tuple[int, dict[str, int]]:
        """End the thread (if it did not end by itself) and give ``queue`` its positions back:
        the errno of a request that failed last (0 if none) and the counts to add."""
        s = self._s
        if self.running:
            lib.vmsh_blk_server_stop(s)
            self.running = False
            queue.next_avail, queue.next_used = s.q.next_avail, s.q.next_used
            queue.signalled_used = s.signalled_used if s.signalled_valid else None
        counts = self.counts()
        for name in COUNTERS:
            setattr(s.c, name, 0)
        err: int = s.c.err
        s.c.err = 0
        return err, counts

    def counts(self) -> dict[str, int]:
        """The counts not yet taken by :meth:`stop` (read while the thread runs: each is a
        64-bit load of a value only the thread writes)."""
        return {name: getattr(self._s.c, name) for name in COUNTERS}

    def close(self) -> None:
        """Close the eventfds (the thread is stopped)."""
        assert not self.running
        for fd in (self._s.wake_fd, self._s.python_fd):
            if fd >= 0:
                os.close(fd)
        self._s.wake_fd = self._s.python_fd = -1
