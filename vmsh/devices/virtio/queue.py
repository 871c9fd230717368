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

import functools
import logging
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple

from vmsh.devices.state import expect_state
from vmsh.errors import DeviceStateError, GuestMemoryError, VirtQueueError
from vmsh.guest_memory import GuestMemory
from vmsh.state_types import U16, U64

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
_U16 = struct.Struct("<H")
#: a RAM region's view and an offset in it
_Place = tuple[memoryview, int]

# x86 may let a load pass an earlier store (TSO). Where the spec needs a full barrier - between
# publishing used idx and reading used_event (§2.7.10, the driver's side of the same race) - we
# acquire and release a lock, which executes a locked read-modify-write: a full fence on x86.
_FENCE = threading.Lock()


#: flags of a linear table's entries: chained (readable or writable), and the last one
_CHAINED = frozenset((VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE))
_LAST = frozenset((0, VIRTQ_DESC_F_WRITE))
#: byte -> its WRITE bit as 0 or 1
_WRITE_BIT = bytes((b & VIRTQ_DESC_F_WRITE) >> 1 for b in range(256))


@functools.lru_cache(maxsize=64)
def _desc_table_struct(n: int) -> struct.Struct:
    """A whole table of ``n`` descriptors in one ``unpack``."""
    return struct.Struct("<" + "QIHH" * n)


@functools.lru_cache(maxsize=64)
def _ascending(n: int) -> tuple[int, ...]:
    """The ``next`` fields of a linear table of ``n`` entries (the last one's is not looked at)."""
    return tuple(range(1, n))


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
        n = len(v)
        nxt = pos + n
        if nxt > offset:
            if pos >= offset and nxt <= end:
                out.append(v)  # wholly inside: no new view
            else:
                lo, hi = max(offset, pos), min(end, nxt)
                if lo < hi:
                    out.append(v[lo - pos:hi - pos])
        pos = nxt
        if pos >= end:
            break
    return out


class Descriptor(NamedTuple):
    """One buffer of a chain: guest physical ``addr``, ``length`` bytes, and its direction."""

    addr: int
    length: int
    write_only: bool


class DescriptorChain:
    """A validated chain: device-readable descriptors first, then device-writable ones.

    Indirect tables are flattened into ``descriptors`` (§2.7.5.3). Every buffer was checked to
    lie in guest RAM when the chain was popped, and its zero-copy views of guest RAM were made
    then (one per descriptor, two where a buffer crosses from one RAM region into the next),
    so a request costs no further address lookups.

    Example::

        chain = queue.pop()
        header = chain.read(0, 16)                       # from the readable part
        os.preadv(fd, chain.writable_views(0, 4096), 0)  # straight into guest RAM
        queue.add_used(chain.head, 4096)
    """

    __slots__ = ("_descs", "_rviews", "_wviews", "head", "memory", "readable_len", "writable_len")

    def __init__(self, memory: GuestMemory, head: int, descriptors: list[tuple[int, int, bool]],
                 views: tuple[list[memoryview], list[memoryview]] | None = None,
                 lengths: tuple[int, int] | None = None) -> None:
        self.memory = memory
        #: index of the chain's first descriptor in the descriptor table: the id for ``add_used``
        self.head = head
        self._descs = descriptors
        if views is None:
            # INVARIANTS: built by a caller that did not walk a ring (tests); the views are made here.
            rviews: list[memoryview] = []
            wviews: list[memoryview] = []
            for addr, length, w in descriptors:
                (wviews if w else rviews).extend(memory.slices(addr, length))
            views = (rviews, wviews)
        self._rviews, self._wviews = views
        if lengths is None:
            lengths = (sum(len(v) for v in self._rviews), sum(len(v) for v in self._wviews))
        #: total bytes of the readable and of the writable descriptors
        self.readable_len, self.writable_len = lengths

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, r={self.readable_len}, w={self.writable_len})"

    @property
    def descriptors(self) -> list[Descriptor]:
        """Every descriptor of the chain, in order."""
        return [Descriptor(*d) for d in self._descs]

    @property
    def readable(self) -> list[Descriptor]:
        """The device-readable descriptors."""
        return [Descriptor(*d) for d in self._descs if not d[2]]

    @property
    def writable(self) -> list[Descriptor]:
        """The device-writable descriptors."""
        return [Descriptor(*d) for d in self._descs if d[2]]

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

        :raises GuestMemoryError: if a range is not RAM.
        """
        out: list[memoryview] = []
        for addr, n in ranges:
            out.extend(self.memory.slices(addr, n))
        return out

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of part of the readable buffers (clipped to what exists)."""
        if offset <= 0 and (length is None or length >= self.readable_len):
            return list(self._rviews)
        return window_views(self._rviews, max(0, offset), self.readable_len if length is None else max(0, length))

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of part of the writable buffers (clipped to what exists)."""
        if offset <= 0 and (length is None or length >= self.writable_len):
            return list(self._wviews)
        return window_views(self._wviews, max(0, offset), self.writable_len if length is None else max(0, length))

    def write_tail(self, data: bytes) -> bool:
        """Copy ``data`` into the last ``len(data)`` bytes of the writable part (a status at the
        end of a request); False, and nothing written, if the part is shorter."""
        n = len(data)
        if n > self.writable_len:
            return False
        last = self._wviews[-1] if self._wviews else None
        if last is not None and len(last) >= n:
            last[len(last) - n:] = data
            return True
        self.write(data, self.writable_len - n)
        return True

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Copy bytes out of the readable part (fewer if the chain is shorter)."""
        views = self.readable_views(offset, length)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

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
    """Plain-data state of a ``VirtQueue``.

    ``size`` and the ring addresses are what the driver wrote; until DRIVER_OK they may be
    anything the registers hold (the transport validates them at activation), so only a queue
    of an activated device must have a valid layout (:func:`check_live_layout`).
    """

    max_size: int
    size: U16
    ready: bool = False
    desc_table: U64 = 0
    avail_ring: U64 = 0
    used_ring: U64 = 0
    next_avail: U16 = 0
    next_used: U16 = 0
    #: used idx at the last interrupt, or None before the first (EVENT_IDX bookkeeping)
    signalled_used: U16 | None = None
    event_idx: bool = False
    indirect: bool = False


def check_live_layout(s: VirtQueueState) -> None:
    """Check the layout of a queue that a running device uses (§2.7: a power-of-two size up
    to the maximum; descriptor table 16-, available ring 2-, used ring 4-byte aligned).

    :raises DeviceStateError: naming the field that breaks the rule.
    """
    if not is_power_of_two(s.size) or s.size > s.max_size:
        raise DeviceStateError("size", f"{s.size} is not a power of two <= {s.max_size}")
    for name, align in (("desc_table", DESC_TABLE_ALIGN), ("avail_ring", AVAIL_RING_ALIGN),
                        ("used_ring", USED_RING_ALIGN)):
        addr = getattr(s, name)
        if addr % align:
            raise DeviceStateError(name, f"{addr:#x} is not {align}-byte aligned")


class VirtQueue:
    """The device's view of one split virtqueue.

    The transport sets ``size``, the three ring addresses and ``ready`` from the driver's
    writes, and ``event_idx``/``indirect`` from the negotiated features. Not thread-safe: the
    device processes one queue from one thread at a time.

    :param memory: guest RAM.
    :param max_size: the largest size the device supports (a power of two <= 32768).
    """

    state_type = VirtQueueState

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
        self._view_key: tuple[int, int, int, int] | None = None
        #: the driver's available idx as last read (``pop`` reads it again once it is reached)
        self._shadow_avail = 0
        self._views: tuple[_Place | None, _Place | None, _Place | None] = (None, None, None)

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

    # -- ring access -------------------------------------------------------------------------
    #
    # The three ring areas are reached through their RAM region's own view and an offset,
    # looked up once per ring layout (the driver sets the addresses before the queue is
    # enabled; a restore or a reset changes them, hence the key). No new view is kept, so
    # the region can still be unmapped. A ring that is not wholly inside one RAM region gets
    # none: it is read through GuestMemory instead, which raises for bytes outside RAM.

    def _ring_views(self) -> tuple[_Place | None, _Place | None, _Place | None]:
        n = self.size
        key = (self.desc_table, self.avail_ring, self.used_ring, n)
        if key != self._view_key:
            self._views = (self._one_view(self.desc_table, DESC_SIZE * n),
                           self._one_view(self.avail_ring, 6 + 2 * n),
                           self._one_view(self.used_ring, 6 + USED_ELEM_SIZE * n))
            self._view_key = key
        return self._views

    def _one_view(self, addr: int, length: int) -> _Place | None:
        try:
            r = self.memory.find_region(addr)
        except GuestMemoryError:
            return None
        off = addr - r.start
        return (r.view, off) if off + length <= r.size else None

    def _read_u16(self, place: _Place | None, base: int, offset: int, what: str) -> int:
        try:
            if place is not None:
                return int(_U16.unpack_from(place[0], place[1] + offset)[0])
            return self.memory.read_u16(base + offset)
        except GuestMemoryError as err:
            raise VirtQueueError(f"{what} is not readable") from err

    # -- the available ring ------------------------------------------------------------------

    def _avail_idx(self) -> int:
        return self._read_u16(self._ring_views()[1], self.avail_ring, 2, "available ring")

    def pending(self) -> int:
        """How many chains the driver made available that the device has not popped.

        :raises VirtQueueError: if the driver's idx ran more than ``size`` ahead (§2.7.6).
        """
        idx = self._avail_idx()
        n = (idx - self.next_avail) & 0xFFFF
        if n > self.size:
            raise VirtQueueError(f"available idx is {n} entries ahead of a queue of {self.size}")
        self._shadow_avail = idx
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None when the ring is empty.

        With EVENT_IDX, an empty ring re-arms notifications (avail_event = next_avail, §2.7.10)
        and looks once more, so a buffer added meanwhile is not missed.

        :raises VirtQueueError: for any malformed ring or chain.
        """
        # The driver's idx is read only when the last one read has been used up (its entries
        # were checked then; a legitimate driver never takes them back).
        if not 0 < (self._shadow_avail - self.next_avail) & 0xFFFF <= self.size and not self.pending():
            if not self.event_idx:
                return None
            self._set_avail_event(self.next_avail)
            full_fence()
            if not self.pending():
                return None
        avail = self._ring_views()[1]
        head = self._read_u16(avail, self.avail_ring, 4 + 2 * (self.next_avail % self.size), "available ring")
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _set_avail_event(self, value: int) -> None:
        used = self._ring_views()[2]
        offset = 4 + USED_ELEM_SIZE * self.size
        try:
            if used is not None:
                _U16.pack_into(used[0], used[1] + offset, value)
            else:
                self.memory.write_u16(self.used_ring + offset, value)
        except GuestMemoryError as err:
            raise VirtQueueError("used ring is not writable") from err

    def _walk(self, head: int) -> DescriptorChain:
        """Follow the chain from ``head`` (§2.7.5), flattening an indirect table (§2.7.5.3).

        Every buffer's views of guest RAM are made here (``GuestMemory.slices`` checks the
        range), so a buffer outside RAM fails the chain before the device sees it.
        """
        descs: list[tuple[int, int, bool]] = []
        rviews: list[memoryview] = []
        wviews: list[memoryview] = []
        try:
            return self._walk_into(head, descs, rviews, wviews)
        except VirtQueueError:
            # no view of guest RAM outlives a failed walk (a traceback kept by a log record
            # would otherwise keep the RAM mapped)
            rviews.clear()
            wviews.clear()
            raise

    def _walk_into(self, head: int, descs: list[tuple[int, int, bool]], rviews: list[memoryview],
                   wviews: list[memoryview]) -> DescriptorChain:
        slices = self.memory.slices
        place = self._ring_views()[0]
        table_view, table_off = place if place is not None else (None, 0)
        table, table_len = self.desc_table, self.size
        if table_view is not None and head < table_len:
            addr, length, flags, _ = _DESC.unpack_from(table_view, table_off + DESC_SIZE * head)
            if not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
                # one buffer (a receive buffer, a small frame): no walk
                try:
                    views = slices(addr, length) if length else []
                except GuestMemoryError:
                    raise VirtQueueError(f"buffer at {addr:#x}+{length:#x} is not in guest RAM") from None
                if flags & VIRTQ_DESC_F_WRITE:
                    return DescriptorChain(self.memory, head, [(addr, length, True)], ([], views), (0, length))
                return DescriptorChain(self.memory, head, [(addr, length, False)], (views, []), (length, 0))
        index = head
        rlen = wlen = 0
        in_indirect = False
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
            try:
                if table_view is not None:
                    addr, length, flags, nxt = _DESC.unpack_from(table_view, table_off + DESC_SIZE * index)
                else:
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
                    # read in one piece (a block request's segments are all in one table), and
                    # copied: the driver cannot change the table under the walk
                    table_view, table_off = memoryview(self.memory.read(addr, length)), 0
                except GuestMemoryError:
                    raise VirtQueueError(f"indirect table at {addr:#x}+{length:#x} is not in guest RAM") from None
                table, table_len, index = addr, length // DESC_SIZE, 0
                in_indirect, count = True, 0
                if not descs:
                    chain = self._linear_table(head, table_view, table_len)
                    if chain is not None:
                        return chain
                continue
            write_only = bool(flags & VIRTQ_DESC_F_WRITE)
            if write_only:
                seen_writable = True
            elif seen_writable:
                raise VirtQueueError("device-readable descriptor after a device-writable one")
            if length:
                try:
                    if write_only:
                        wviews.extend(slices(addr, length))
                        wlen += length
                    else:
                        rviews.extend(slices(addr, length))
                        rlen += length
                except GuestMemoryError:
                    raise VirtQueueError(f"buffer at {addr:#x}+{length:#x} is not in guest RAM") from None
            descs.append((addr, length, write_only))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(self.memory, head, descs, (rviews, wviews), (rlen, wlen))
            index = nxt

    def _linear_table(self, head: int, raw: memoryview, n: int) -> DescriptorChain | None:
        """An indirect table laid out as drivers lay them out - entry i chained to i + 1, the
        readable entries first, no nested table - as a chain, decoded in one piece; None for
        any other table (the general walk then checks it entry by entry)."""
        values = _desc_table_struct(n).unpack(raw)
        flags, nexts = values[2::4], values[3::4]
        if nexts[:-1] != _ascending(n) or not set(flags[:-1]) <= _CHAINED or flags[-1] not in _LAST:
            return None
        # every flag is now 0..3: one byte each, bit 1 (WRITE) as 0/1
        writes = bytes(flags).translate(_WRITE_BIT)
        first_write = writes.find(1)
        if first_write < 0:
            first_write = n
        elif 0 in writes[first_write:]:
            raise VirtQueueError("device-readable descriptor after a device-writable one")
        addrs, lengths = values[0::4], values[1::4]
        descs = list(zip(addrs, lengths, [False] * first_write + [True] * (n - first_write), strict=True))
        try:
            rviews = self.memory.slices_of(addrs[:first_write], lengths[:first_write])
            wviews = self.memory.slices_of(addrs[first_write:], lengths[first_write:])
        except GuestMemoryError as err:
            raise VirtQueueError(f"a buffer of the table is not in guest RAM: {err}") from None
        rlen = sum(lengths[:first_write])
        return DescriptorChain(self.memory, head, descs, (rviews, wviews), (rlen, sum(lengths) - rlen))

    # -- the used ring ---------------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written (§2.7.8).

        :raises VirtQueueError: if the used ring is not in RAM or ``head`` is no index.
        """
        if not 0 <= head < self.size:
            raise VirtQueueError(f"used id {head} outside a queue of {self.size}")
        used = self._ring_views()[2]
        elem = 4 + USED_ELEM_SIZE * (self.next_used % self.size)
        nxt = (self.next_used + 1) & 0xFFFF
        try:
            # x86 keeps stores in order, so the element is visible before the idx (§2.7.13.3).
            if used is not None:
                view, base = used
                _USED_ELEM.pack_into(view, base + elem, head, length & 0xFFFF_FFFF)
                _U16.pack_into(view, base + 2, nxt)
            else:
                self.memory.write(self.used_ring + elem, _USED_ELEM.pack(head, length & 0xFFFF_FFFF))
                self.memory.write_u16(self.used_ring + 2, nxt)
        except GuestMemoryError as err:
            raise VirtQueueError("used ring is not in guest RAM") from err
        self.next_used = nxt

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added so far (§2.7.10).

        With EVENT_IDX: only if used idx passed ``used_event`` since the last interrupt
        (``vring_need_event``); otherwise unless the driver set VRING_AVAIL_F_NO_INTERRUPT.
        """
        full_fence()
        avail = self._ring_views()[1]
        try:
            if self.event_idx:
                used_event = self._read_u16(avail, self.avail_ring, 4 + 2 * self.size, "available ring")
                old, new = self.signalled_used, self.next_used
                self.signalled_used = new
                if old is None:
                    return True
                return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            return not self._read_u16(avail, self.avail_ring, 0, "available ring") & VIRTQ_AVAIL_F_NO_INTERRUPT
        except VirtQueueError:
            return True

    # -- snapshot --------------------------------------------------------------------------

    def state(self) -> VirtQueueState:
        """The queue's registers and ring positions as plain data."""
        return VirtQueueState(self.max_size, self.size, self.ready, self.desc_table, self.avail_ring,
                              self.used_ring, self.next_avail, self.next_used, self.signalled_used,
                              self.event_idx, self.indirect)

    def restore(self, state: VirtQueueState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, another maximum size, or a
            register wider than it is.
        """
        s = expect_state(state, VirtQueueState)
        if s.max_size != self.max_size:
            raise DeviceStateError("max_size", f"{s.max_size} is not this queue's {self.max_size}")
        self.size, self.ready = s.size, s.ready
        self.desc_table, self.avail_ring, self.used_ring = s.desc_table, s.avail_ring, s.used_ring
        self.next_avail, self.next_used, self.signalled_used = s.next_avail, s.next_used, s.signalled_used
        self._shadow_avail = s.next_avail
        self.event_idx, self.indirect = s.event_idx, s.indirect
