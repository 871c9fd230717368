"""A guest driver in miniature: split rings in a ``GuestMemoryMmap``, and a virtio-pci driver that
talks to ``VirtioPciDevice`` through configuration space and BAR 0 the way Linux's
drivers/virtio/virtio_pci_modern.c does (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK,
queue setup with MSI-X vectors, queue_enable, DRIVER_OK, notify).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmsh.devices.pci.config_space import BAR0, CAPABILITIES_POINTER, COMMAND
from vmsh.devices.pci.msix import (
    MSIX_CONTROL_ENABLE_BIT,
    MSIX_CONTROL_FUNCTION_MASK_BIT,
    PCI_CAP_ID_MSIX,
)
from vmsh.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FEATURES_OK,
)
from vmsh.devices.virtio.pci import (
    COMMON_CONFIG_MSIX_VECTOR,
    COMMON_DEVICE_FEATURE,
    COMMON_DEVICE_FEATURE_SELECT,
    COMMON_DEVICE_STATUS,
    COMMON_DRIVER_FEATURE,
    COMMON_DRIVER_FEATURE_SELECT,
    COMMON_NUM_QUEUES,
    COMMON_QUEUE_DESC_LO,
    COMMON_QUEUE_DEVICE_LO,
    COMMON_QUEUE_DRIVER_LO,
    COMMON_QUEUE_ENABLE,
    COMMON_QUEUE_MSIX_VECTOR,
    COMMON_QUEUE_NOTIFY_OFF,
    COMMON_QUEUE_SELECT,
    COMMON_QUEUE_SIZE,
    PCI_CAP_ID_VNDR,
    VIRTIO_MSI_NO_VECTOR,
    VirtioPciDevice,
)
from vmsh.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueue,
)
from vmsh.engine.memory import GuestMemoryMmap


class FakeRouter:
    """An ``MsiRouter`` that records routes and deliveries."""

    def __init__(self) -> None:
        self.routes: dict[int, tuple[int, int, bool]] = {}
        self.fired: list[int] = []

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.routes[vector] = (address, data, masked)

    def trigger(self, vector: int) -> None:
        self.fired.append(vector)


class FakeInterrupt:
    """A ``VirtioInterrupt`` that records what was signalled."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config = 0

    def signal_used_queue(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config_change(self) -> None:
        self.config += 1


class Allocator:
    """A bump allocator over guest RAM."""

    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("test allocator exhausted")
        self.next = addr + size
        return addr


@dataclass
class Ring:
    """The driver side of one split virtqueue (virtio 1.2 §2.7)."""

    mem: GuestMemoryMmap
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0
    next_free: int = 0
    in_flight: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def create(cls, mem: GuestMemoryMmap, alloc: Allocator, size: int) -> Ring:
        desc = alloc.alloc(16 * size, 16)
        avail = alloc.alloc(6 + 2 * size, 2)
        used = alloc.alloc(6 + 8 * size, 4)
        mem.fill(desc, 16 * size)
        mem.fill(avail, 6 + 2 * size)
        mem.fill(used, 6 + 8 * size)
        return cls(mem, size, desc, avail, used)

    def attach(self, q: VirtQueue, *, event_idx: bool = False, indirect: bool = False) -> VirtQueue:
        """Configure a bare ``VirtQueue`` on this ring (no transport)."""
        q.size, q.desc_table, q.avail_ring, q.used_ring, q.ready = self.size, self.desc, self.avail, self.used, True
        q.event_idx, q.indirect = event_idx, indirect
        return q

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and bump idx."""
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def _take(self) -> int:
        for _ in range(self.size):
            i = self.next_free
            self.next_free = (self.next_free + 1) % self.size
            if not any(i in v for v in self.in_flight.values()):
                return i
        raise RuntimeError("ring full")

    def add(self, bufs: list[tuple[int, int, bool]], *, alloc: Allocator | None = None, indirect: bool = False) -> int:
        """Add a chain of ``(addr, len, device_writable)`` buffers; returns its head."""
        if indirect:
            assert alloc is not None
            table = alloc.alloc(16 * len(bufs), 16)
            for i, (addr, length, w) in enumerate(bufs):
                more = i + 1 < len(bufs)
                self.write_desc(i, addr, length, (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if more else 0),
                                i + 1 if more else 0, table=table)
            head = self._take()
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            self.in_flight[head] = [head]
        else:
            idx = [self._take() for _ in bufs]
            for i, (addr, length, w) in enumerate(bufs):
                more = i + 1 < len(bufs)
                self.write_desc(idx[i], addr, length,
                                (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if more else 0),
                                idx[i + 1] if more else 0)
            head = idx[0]
            self.in_flight[head] = idx
        self.publish(head)
        return head

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements since the last call."""
        out = []
        while self.last_used != self.used_idx():
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.mem.read(elem, 8))
            self.in_flight.pop(head, None)
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        # virtqueue_get_buf_ctx_split: with callbacks on, ask for an interrupt at the next buffer
        self.set_used_event(self.last_used)
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)


class PciDriver:
    """Drives a ``VirtioPciDevice`` like virtio_pci_modern.c plus virtio.c's probe sequence."""

    def __init__(self, dev: VirtioPciDevice, mem: GuestMemoryMmap, alloc: Allocator) -> None:
        self.dev, self.mem, self.alloc = dev, mem, alloc
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (config offset, bar offset, length)
        self.msix_cap = 0
        self.rings: list[Ring] = []
        off = self.cfg_read(CAPABILITIES_POINTER, 1)
        while off:
            cap_id = self.cfg_read(off, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type = self.cfg_read(off + 3, 1)
                self.caps.setdefault(cfg_type, (off, self.cfg_read(off + 8, 4), self.cfg_read(off + 12, 4)))
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_cap = off
            off = self.cfg_read(off + 1, 1)

    # config space and BAR helpers
    def cfg_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.config.read(offset, size), "little")

    def cfg_write(self, offset: int, value: int, size: int) -> None:
        self.dev.config.write(offset, value.to_bytes(size, "little"))

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.bar_read(offset, size), "little")

    def write(self, offset: int, value: int, size: int) -> None:
        self.dev.bar_write(offset, value.to_bytes(size, "little"))

    def common(self, reg: int, size: int) -> int:
        return self.read(self.caps[1][1] + reg, size)

    def set_common(self, reg: int, value: int, size: int) -> None:
        self.write(self.caps[1][1] + reg, value, size)

    @property
    def status(self) -> int:
        return self.common(COMMON_DEVICE_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.set_common(COMMON_DEVICE_STATUS, self.status | bits, 1)

    # the probe sequence
    def enable_msix(self) -> None:
        """pci_msix_enable: enable with everything masked, program entries, unmask the function."""
        ctrl = self.msix_cap + 2
        self.cfg_write(ctrl, MSIX_CONTROL_ENABLE_BIT | MSIX_CONTROL_FUNCTION_MASK_BIT, 2)
        n = (self.cfg_read(ctrl, 2) & 0x7FF) + 1
        table = self.cfg_read(self.msix_cap + 4, 4) & ~7
        for v in range(n):
            base = table + 16 * v
            self.write(base, 0xFEE0_0000, 4)
            self.write(base + 4, 0, 4)
            self.write(base + 8, 0x30 + v, 4)
            self.write(base + 12, 0, 4)  # unmask
        self.cfg_write(ctrl, MSIX_CONTROL_ENABLE_BIT, 2)

    def device_features(self) -> int:
        feats = 0
        for sel in (0, 1):
            self.set_common(COMMON_DEVICE_FEATURE_SELECT, sel, 4)
            feats |= self.common(COMMON_DEVICE_FEATURE, 4) << (32 * sel)
        return feats

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; True if the device kept it."""
        self.set_common(COMMON_DEVICE_STATUS, 0, 1)
        assert self.status == 0
        self.add_status(VIRTIO_STATUS_ACKNOWLEDGE)
        self.add_status(VIRTIO_STATUS_DRIVER)
        offered = self.device_features()
        if features is None:
            features = offered & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
                                  | 0xFFFFFF)
        for sel in (0, 1):
            self.set_common(COMMON_DRIVER_FEATURE_SELECT, sel, 4)
            self.set_common(COMMON_DRIVER_FEATURE, (features >> (32 * sel)) & 0xFFFF_FFFF, 4)
        self.add_status(VIRTIO_STATUS_FEATURES_OK)
        return bool(self.status & VIRTIO_STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None, vector: int | None = None) -> Ring:
        self.set_common(COMMON_QUEUE_SELECT, index, 2)
        max_size = self.common(COMMON_QUEUE_SIZE, 2)
        size = size or max_size
        self.set_common(COMMON_QUEUE_SIZE, size, 2)
        ring = Ring.create(self.mem, self.alloc, size)
        # vp_modern_set_queue_address writes each 64-bit address as two 32-bit halves
        for reg, addr in ((COMMON_QUEUE_DESC_LO, ring.desc), (COMMON_QUEUE_DRIVER_LO, ring.avail),
                          (COMMON_QUEUE_DEVICE_LO, ring.used)):
            self.set_common(reg, addr & 0xFFFF_FFFF, 4)
            self.set_common(reg + 4, addr >> 32, 4)
        self.set_common(COMMON_QUEUE_MSIX_VECTOR, index + 1 if vector is None else vector, 2)
        assert self.common(COMMON_QUEUE_MSIX_VECTOR, 2) != VIRTIO_MSI_NO_VECTOR or vector == VIRTIO_MSI_NO_VECTOR
        ring.notify_off = self.common(COMMON_QUEUE_NOTIFY_OFF, 2)  # type: ignore[attr-defined]  # the driver's own note on a Ring
        return ring

    def probe(self, features: int | None = None, sizes: dict[int, int] | None = None,
              queues: int | None = None) -> list[Ring]:
        """The whole sequence up to DRIVER_OK; returns the rings."""
        self.cfg_write(COMMAND, 0x6, 2)  # memory space + bus master
        self.enable_msix()
        assert self.negotiate(features)
        self.set_common(COMMON_CONFIG_MSIX_VECTOR, 0, 2)
        n = self.common(COMMON_NUM_QUEUES, 2) if queues is None else queues
        self.rings = [self.setup_queue(i, (sizes or {}).get(i)) for i in range(n)]
        for i in range(n):
            self.set_common(COMMON_QUEUE_SELECT, i, 2)
            self.set_common(COMMON_QUEUE_ENABLE, 1, 2)
        self.add_status(VIRTIO_STATUS_DRIVER_OK)
        return self.rings

    def kick(self, index: int) -> None:
        notify_bar_off, mult = self.caps[2][1], self.cfg_read(self.caps[2][0] + 16, 4)
        self.write(notify_bar_off + mult * self.rings[index].notify_off, index, 2)  # type: ignore[attr-defined]  # the driver's own note on a Ring

    def device_config(self, offset: int, size: int) -> int:
        return self.read(self.caps[4][1] + offset, size)


def bar_sizing(dev: VirtioPciDevice) -> int:
    """Size BAR 0 as drivers/pci/probe.c __pci_read_base does; returns its size."""
    low = int.from_bytes(dev.config.read(BAR0, 4), "little")
    is64 = low & 0x6 == 0x4
    dev.config.write(BAR0, b"\xff" * 4)
    mask = int.from_bytes(dev.config.read(BAR0, 4), "little") & ~0xF
    dev.config.write(BAR0, low.to_bytes(4, "little"))
    if is64:
        high = int.from_bytes(dev.config.read(BAR0 + 4, 4), "little")
        dev.config.write(BAR0 + 4, b"\xff" * 4)
        mask |= int.from_bytes(dev.config.read(BAR0 + 4, 4), "little") << 32
        dev.config.write(BAR0 + 4, high.to_bytes(4, "little"))
        return (~mask & ((1 << 64) - 1)) + 1
    return (~mask & 0xFFFF_FFFF) + 1
