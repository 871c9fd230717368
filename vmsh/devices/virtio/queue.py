"""Split virtqueues (virtio 1.2 §2.7): the device side of the descriptor table and the rings.

``VirtQueue.pop`` hands out the next available descriptor chain, fully walked and validated,
as a ``DescriptorChain``; ``add_used`` returns it; ``needs_notification`` decides whether the
driver wants an interrupt (§2.7.7.2, ``VIRTIO_F_EVENT_IDX`` or ``VRING_AVAIL_F_NO_INTERRUPT``).

The guest is hostile: every index, address, length and chain is checked before it is used,
and a walk is bounded by the queue size, so a malformed ring costs at most ``size``
descriptor reads and raises ``VirtQueueError`` - after which the device stops using the queue
and asks for a reset (§2.1.2, DEVICE_NEEDS_RESET). Buffers are reached through
``GuestMemory.slices``: zero-copy ``memoryview`` s of guest RAM for ``os.preadv``/``os.pwritev``.

Ring layout (§2.7.2, table "Virtqueue Part Alignment/Size", queue size ``n``)::

    descriptor table  16 * n       align 16   {le64 addr; le32 len; le16 flags; le16 next}
    available ring    6 + 2 * n    align 2    {le16 flags; le16 idx; le16 ring[n]; le16 used_event}
    used ring         6 + 8 * n    align 4    {le16 flags; le16 idx; {le32 id; le32 len} ring[n]; le16 avail_event}
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass

from vmsh.engine.memory import GuestMemory
from vmsh.errors import GuestMemoryError, VirtQueueError

LOG = logging.getLogger(__name__)

# Descriptor flags (§2.7.5)
VIRTQ_DESC_F_NEXT = 1  # the chain continues in ``next``
VIRTQ_DESC_F_WRITE = 2  # device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # the buffer is a table of descriptors (§2.7.5.3)
# Available ring flags (§2.7.6)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # the driver does not want used-buffer notifications
# Used ring flags (§2.7.8)
VIRTQ_USED_F_NO_NOTIFY = 1  # the device does not want available-buffer notifications

#: largest queue size of a split virtqueue (§2.7: "Queue Size ... maximum 32768")
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
DESC_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4
USED_ELEM_SIZE = 8

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

# x86 may let a load pass an earlier store (TSO). Where the spec needs a full barrier - between
# publishing used idx and reading used_event (§2.7.10, the driver's side of the same race) - we
# acquire and release a lock, which executes a locked read-modify-write: a full fence on x86.
_FENCE = threading.Lock()


def full_fence() -> None:
    """Order earlier stores to guest RAM before later loads (a full memory barrier)."""
    with _FENCE:
        pass


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, ..."""
    return n > 0 and n & (n - 1) == 0


def advance_views(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a list of buffers (after a short readv/writev)."""
    out = list(views)
    while out and n >= len(out[0]):
        n -= len(out[0])
        out.pop(0)
    if out and n:
        out[0] = out[0][n:]
    return out


def window_views(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """The sub-views covering ``[offset, offset+length)`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    pos = 0
    end = offset + length
    for v in views:
        lo, hi = max(offset, pos), min(end, pos + len(v))
        if lo < hi:
            out.append(v[lo - pos:hi - pos])
        pos += len(v)
        if pos >= end:
            break
    return out


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One buffer of a chain: guest physical ``addr``, ``length`` bytes, and its direction."""

    addr: int
    length: int
    write_only: bool


class DescriptorChain:
    """A validated chain: device-readable descriptors first, then device-writable ones.

    Indirect tables are flattened into ``descriptors`` (§2.7.5.3). Every buffer was checked to
    lie in guest RAM when the chain was popped.

    Example::

        chain = queue.pop()
        header = chain.read(0, 16)                       # from the readable part
        os.preadv(fd, chain.writable_views(0, 4096), 0)  # straight into guest RAM
        queue.add_used(chain.head, 4096)
    """

    def __init__(self, memory: GuestMemory, head: int, descriptors: list[Descriptor]) -> None:
        self.memory = memory
        #: index of the chain's first descriptor in the descriptor table: the id for ``add_used``
        self.head = head
        self.descriptors = descriptors
        self.readable = [d for d in descriptors if not d.write_only]
        self.writable = [d for d in descriptors if d.write_only]
        #: total bytes of the readable and of the writable descriptors
        self.readable_len = sum(d.length for d in self.readable)
        self.writable_len = sum(d.length for d in self.writable)

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, r={self.readable_len}, w={self.writable_len})"

    @staticmethod
    def _ranges(descs: list[Descriptor], offset: int, length: int | None) -> list[tuple[int, int]]:
        total = sum(d.length for d in descs)
        offset = max(0, offset)
        end = total if length is None else min(total, offset + max(0, length))
        out: list[tuple[int, int]] = []
        pos = 0
        for d in descs:
            lo, hi = max(offset, pos), min(end, pos + d.length)
            if lo < hi:
                out.append((d.addr + lo - pos, hi - lo))
            pos += d.length
            if pos >= end:
                break
        return out

    def readable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """``(guest_addr, length)`` pieces of ``[offset, offset+length)`` of the readable part."""
        return self._ranges(self.readable, offset, length)

    def writable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """``(guest_addr, length)`` pieces of ``[offset, offset+length)`` of the writable part."""
        return self._ranges(self.writable, offset, length)

    def views(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """Zero-copy views of guest RAM for ``ranges``.

        :raises GuestMemoryError: if RAM changed since the chain was validated.
        """
        out: list[memoryview] = []
        for addr, n in ranges:
            out.extend(self.memory.slices(addr, n))
        return out

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of part of the readable buffers (clipped to what exists)."""
        return self.views(self.readable_ranges(offset, length))

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of part of the writable buffers (clipped to what exists)."""
        return self.views(self.writable_ranges(offset, length))

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Copy bytes out of the readable part (fewer if the chain is shorter)."""
        return b"".join(bytes(v) for v in self.readable_views(offset, length))

    def read_all(self) -> bytes:
        """Copy the whole readable part."""
        return self.read(0, None)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable part at ``offset``; returns the bytes that fit."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.writable_views(offset, len(src)):
            n = len(view)
            view[:] = src[pos:pos + n]
            pos += n
        return pos


@dataclass(frozen=True, slots=True)
class VirtQueueState:
    """Plain-data state of a ``VirtQueue``."""

    max_size: int
    size: int
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    next_avail: int = 0
    next_used: int = 0
    #: used idx at the last interrupt, or None before the first (EVENT_IDX bookkeeping)
    signalled_used: int | None = None
    event_idx: bool = False
    indirect: bool = False


class VirtQueue:
    """The device's view of one split virtqueue.

    The transport sets ``size``, the three ring addresses and ``ready`` from the driver's
    writes, and ``event_idx``/``indirect`` from the negotiated features. Not thread-safe: the
    device processes one queue from one thread at a time.

    :param memory: guest RAM.
    :param max_size: the largest size the device supports (a power of two <= 32768).
    """

    def __init__(self, memory: GuestMemory, max_size: int) -> None:
        if not is_power_of_two(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"virtqueue size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (§2.4): size = max, not ready, no addresses."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        #: VIRTIO_F_EVENT_IDX was negotiated: used_event / avail_event are in use
        self.event_idx = False
        #: VIRTIO_F_INDIRECT_DESC was negotiated
        self.indirect = False

    # -- validation ------------------------------------------------------------------------

    def validate(self) -> None:
        """Check what the driver configured, before the device uses it (§2.7.1, §4.1.4.3.2).

        :raises VirtQueueError: for a bad size, misaligned rings, or rings outside RAM.
        """
        n = self.size
        if not is_power_of_two(n) or n > self.max_size:
            raise VirtQueueError(f"queue size {n} is not a power of two <= {self.max_size}")
        for name, addr, align, length in (
                ("descriptor table", self.desc_table, DESC_TABLE_ALIGN, DESC_SIZE * n),
                ("available ring", self.avail_ring, AVAIL_RING_ALIGN, 6 + 2 * n),
                ("used ring", self.used_ring, USED_RING_ALIGN, 6 + USED_ELEM_SIZE * n)):
            if addr % align:
                raise VirtQueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.is_valid_range(addr, length):
                raise VirtQueueError(f"{name} at {addr:#x}+{length:#x} is not in guest RAM")

    def is_valid(self) -> bool:
        """True if ``validate`` passes."""
        try:
            self.validate()
        except VirtQueueError:
            return False
        return True

    # -- the available ring ------------------------------------------------------------------

    def _avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_ring + 2)

    def pending(self) -> int:
        """How many chains the driver made available that the device has not popped.

        :raises VirtQueueError: if the driver's idx ran more than ``size`` ahead (§2.7.6).
        """
        try:
            n = (self._avail_idx() - self.next_avail) & 0xFFFF
        except GuestMemoryError as err:
            raise VirtQueueError("available ring is not readable") from err
        if n > self.size:
            raise VirtQueueError(f"available idx is {n} entries ahead of a queue of {self.size}")
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None when the ring is empty.

        With EVENT_IDX, an empty ring re-arms notifications (avail_event = next_avail, §2.7.10)
        and looks once more, so a buffer added meanwhile is not missed.

        :raises VirtQueueError: for any malformed ring or chain.
        """
        if not self.pending():
            if not self.event_idx:
                return None
            self._set_avail_event(self.next_avail)
            full_fence()
            if not self.pending():
                return None
        slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size)
        try:
            head = self.memory.read_u16(slot)
        except GuestMemoryError as err:
            raise VirtQueueError("available ring is not readable") from err
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _set_avail_event(self, value: int) -> None:
        try:
            self.memory.write_u16(self.used_ring + 4 + USED_ELEM_SIZE * self.size, value)
        except GuestMemoryError as err:
            raise VirtQueueError("used ring is not writable") from err

    def _walk(self, head: int) -> DescriptorChain:
        """Follow the chain from ``head`` (§2.7.5), flattening an indirect table (§2.7.5.3)."""
        descs: list[Descriptor] = []
        table, table_len = self.desc_table, self.size
        index = head
        in_indirect = False
        #: an indirect table, read in one piece (a block request's segments are in one)
        indirect_raw = b""
        seen_writable = False
        count = 0
        while True:
            if index >= table_len:
                raise VirtQueueError(f"descriptor index {index} outside a table of {table_len}")
            count += 1
            # §2.7.5.3.1 / §2.7.4.2: a chain is never longer than the table it lives in, so a
            # longer walk is a loop.
            if count > table_len:
                raise VirtQueueError(f"descriptor chain from {head} is longer than {table_len} (a loop?)")
            if in_indirect:
                addr, length, flags, nxt = _DESC.unpack_from(indirect_raw, DESC_SIZE * index)
            else:
                try:
                    addr, length, flags, nxt = _DESC.unpack(self.memory.read(table + DESC_SIZE * index, DESC_SIZE))
                except GuestMemoryError as err:
                    raise VirtQueueError(f"descriptor {index} is not in guest RAM") from err
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtQueueError("nested indirect descriptor table")
                if not self.indirect:
                    raise VirtQueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtQueueError("indirect descriptor with VIRTQ_DESC_F_NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
                    raise VirtQueueError(f"indirect table of {length} bytes")
                try:
                    indirect_raw = self.memory.read(addr, length)
                except GuestMemoryError:
                    raise VirtQueueError(f"indirect table at {addr:#x}+{length:#x} is not in guest RAM") from None
                table, table_len, index = addr, length // DESC_SIZE, 0
                in_indirect, count = True, 0
                continue
            write_only = bool(flags & VIRTQ_DESC_F_WRITE)
            if write_only:
                seen_writable = True
            elif seen_writable:
                raise VirtQueueError("device-readable descriptor after a device-writable one")
            if length and not self.memory.is_valid_range(addr, length):
                raise VirtQueueError(f"buffer at {addr:#x}+{length:#x} is not in guest RAM")
            descs.append(Descriptor(addr, length, write_only))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(self.memory, head, descs)
            index = nxt

    # -- the used ring ---------------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written (§2.7.8).

        :raises VirtQueueError: if the used ring is not in RAM or ``head`` is no index.
        """
        if not 0 <= head < self.size:
            raise VirtQueueError(f"used id {head} outside a queue of {self.size}")
        elem = self.used_ring + 4 + USED_ELEM_SIZE * (self.next_used % self.size)
        try:
            self.memory.write(elem, _USED_ELEM.pack(head, length & 0xFFFF_FFFF))
            # x86 keeps stores in order, so the element is visible before the idx (§2.7.13.3).
            self.next_used = (self.next_used + 1) & 0xFFFF
            self.memory.write_u16(self.used_ring + 2, self.next_used)
        except GuestMemoryError as err:
            raise VirtQueueError("used ring is not in guest RAM") from err

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added so far (§2.7.10).

        With EVENT_IDX: only if used idx passed ``used_event`` since the last interrupt
        (``vring_need_event``); otherwise unless the driver set VRING_AVAIL_F_NO_INTERRUPT.
        """
        full_fence()
        try:
            if self.event_idx:
                used_event = self.memory.read_u16(self.avail_ring + 4 + 2 * self.size)
                old, new = self.signalled_used, self.next_used
                self.signalled_used = new
                if old is None:
                    return True
                return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            return not self.memory.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError:
            return True

    # -- snapshot --------------------------------------------------------------------------

    def state(self) -> VirtQueueState:
        """The queue's registers and ring positions as plain data."""
        return VirtQueueState(self.max_size, self.size, self.ready, self.desc_table, self.avail_ring,
                              self.used_ring, self.next_avail, self.next_used, self.signalled_used,
                              self.event_idx, self.indirect)

    def restore(self, s: VirtQueueState) -> None:
        """Load ``s`` (untrusted).

        :raises ValueError: if it does not fit this queue.
        """
        if s.max_size != self.max_size or not 0 < s.size <= MAX_QUEUE_SIZE:
            raise ValueError(f"virtqueue state: size {s.size}/{s.max_size} does not fit {self.max_size}")
        for name in ("desc_table", "avail_ring", "used_ring"):
            if not 0 <= getattr(s, name) < 1 << 64:
                raise ValueError(f"virtqueue state: {name} out of range")
        for name in ("next_avail", "next_used"):
            if not 0 <= getattr(s, name) <= 0xFFFF:
                raise ValueError(f"virtqueue state: {name} out of range")
        if s.signalled_used is not None and not 0 <= s.signalled_used <= 0xFFFF:
            raise ValueError("virtqueue state: signalled_used out of range")
        self.size, self.ready = s.size, bool(s.ready)
        self.desc_table, self.avail_ring, self.used_ring = s.desc_table, s.avail_ring, s.used_ring
        self.next_avail, self.next_used, self.signalled_used = s.next_avail, s.next_used, s.signalled_used
        self.event_idx, self.indirect = bool(s.event_idx), bool(s.indirect)
