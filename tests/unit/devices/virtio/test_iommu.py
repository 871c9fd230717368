"""virtio-iommu: requests and their validation, PROBE, fault events, snapshots, and the
translated memory of a device behind it."""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.devices.storage.fakes import LoopWatcher
from tests.unit.devices.virtio.driver import Allocator, FakeInterrupt, FakeRouter, Ring
from tests.unit.devices.virtio.test_block import BACKENDS, Disk
from vmsh.devices.dma import (
    FAULT_F_ADDRESS,
    FAULT_F_WRITE,
    FAULT_R_DOMAIN,
    FAULT_R_MAPPING,
    MAP_F_READ,
    MAP_F_WRITE,
    IommuMappings,
    TranslatedMemory,
    endpoint_id,
)
from vmsh.devices.virtio.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from vmsh.devices.virtio.device import VIRTIO_F_VERSION_1
from vmsh.devices.virtio.iommu import (
    ATTACH_F_BYPASS,
    MSI_RANGE,
    PAGE_SIZE_MASK,
    PROBE_SIZE,
    S_DEVERR,
    S_INVAL,
    S_NOENT,
    S_NOMEM,
    S_OK,
    S_RANGE,
    S_UNSUPP,
    T_ATTACH,
    T_DETACH,
    T_MAP,
    T_PROBE,
    T_UNMAP,
    VIRTIO_IOMMU_F_BYPASS_CONFIG,
    IommuDomainState,
    IommuMappingState,
    VirtioIommu,
    VirtioIommuState,
)
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import DeviceStateError, GuestMemoryError

EP = endpoint_id(0, 3)
RW = MAP_F_READ | MAP_F_WRITE
FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG


class Driver:
    """The request and event queues of a virtio-iommu, driven as Linux's virtio-iommu.c does."""

    def __init__(self, mem: GuestMemoryMmap, alloc: Allocator, table: IommuMappings | None = None,
                 features: int = FEATURES) -> None:
        self.mem, self.alloc = mem, alloc
        self.table = table if table is not None else IommuMappings({EP})
        self.dev = VirtioIommu(self.table)
        self.req = Ring.create(mem, alloc, 16)
        self.evt = Ring.create(mem, alloc, 16)
        self.irq = FakeInterrupt()
        self.dev.activate(mem, [self.req.attach(VirtQueue(mem, 256)), self.evt.attach(VirtQueue(mem, 256))],
                          self.irq, features)

    def send(self, kind: int, body: bytes, *, props: int = 0, head: bytes | None = None) -> tuple[int, bytes]:
        """One request: its status and the properties the device wrote."""
        req = (head if head is not None else bytes((kind, 0, 0, 0))) + body
        r = self.alloc.alloc(len(req))
        w = self.alloc.alloc(props + 4)
        self.mem.write(r, req)
        self.mem.fill(w, props + 4, 0xAA)
        h = self.req.add([(r, len(req), False), (w, props + 4, True)])
        self.dev.queue_notify(0)
        assert self.req.take_used() == [(h, props + 4)]
        return self.mem.read_u8(w + props), self.mem.read(w, props)

    def attach(self, domain: int, endpoint: int = EP, flags: int = 0, reserved: bytes = bytes(4)) -> int:
        return self.send(T_ATTACH, struct.pack("<III4s", domain, endpoint, flags, reserved))[0]

    def detach(self, domain: int, endpoint: int = EP) -> int:
        return self.send(T_DETACH, struct.pack("<II8x", domain, endpoint))[0]

    def map(self, domain: int, start: int, end: int, phys: int, flags: int = RW) -> int:
        return self.send(T_MAP, struct.pack("<IQQQI", domain, start, end, phys, flags))[0]

    def unmap(self, domain: int, start: int, end: int) -> int:
        return self.send(T_UNMAP, struct.pack("<IQQ4x", domain, start, end))[0]


def test_config_space(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    mask, _, input_end, _, domain_end, probe, bypass = struct.unpack("<QQQIIIB3x", d.dev.read_config(0, 40))
    assert (mask, input_end, domain_end, probe, bypass) == (PAGE_SIZE_MASK, (1 << 64) - 1, 0xFFFF_FFFF, 24, 1)
    d.dev.write_config(36, b"\0")  # BYPASS_CONFIG negotiated: the driver turns bypass off
    assert d.dev.read_config(36, 1) == b"\0" and not d.table.bypass
    d.dev.write_config(0, b"\0" * 8)  # page_size_mask is read-only
    assert d.dev.read_config(0, 8) == struct.pack("<Q", PAGE_SIZE_MASK)


def test_bypass_config_needs_the_feature(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc, features=1 << VIRTIO_F_VERSION_1)
    d.dev.write_config(36, b"\0")
    assert d.table.bypass
    assert d.attach(1, flags=ATTACH_F_BYPASS) == S_INVAL


def test_attach_map_translate_unmap_detach(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    assert d.attach(7) == S_OK
    assert d.map(7, 0x10_0000, 0x10_1FFF, 0x40_0000) == S_OK
    assert d.map(7, 0x10_2000, 0x10_2FFF, 0x80_0000, MAP_F_READ) == S_OK
    view = TranslatedMemory(mem, d.table, EP)
    view.write(0x10_0FFE, b"abcd")  # straddles two pages of one mapping
    assert mem.read(0x40_0FFE, 4) == b"abcd"
    mem.write(0x80_0000, b"XY")
    assert view.read(0x10_1FFF, 3) == mem.read(0x40_1FFF, 1) + b"XY"  # straddles two mappings
    assert [bytes(v) for v in view.slices(0x10_1FFE, 4)] == [mem.read(0x40_1FFE, 2), b"XY"]
    with pytest.raises(GuestMemoryError):
        view.write(0x10_2000, b"no")  # a read-only mapping
    assert mem.read(0x80_0000, 2) == b"XY"
    assert d.attach(7) == S_OK  # attached again to its own domain: the mappings stay
    assert view.read(0x10_1FFF, 3) == mem.read(0x40_1FFF, 1) + b"XY"
    assert d.unmap(7, 0x10_0000, 0x10_0FFF) == S_RANGE  # would split the first mapping
    assert view.read(0x10_0000, 1) == mem.read(0x40_0000, 1)
    assert d.unmap(7, 0x10_0000, 0x10_FFFF) == S_OK  # both, and more
    with pytest.raises(GuestMemoryError):
        view.read(0x10_0000, 1)
    assert d.unmap(7, 0, 0xFFF) == S_OK  # nothing there: fine (§5.13.6.6)
    assert d.detach(7) == S_OK
    assert d.table.domains == {}  # the last endpoint left: the domain is gone
    assert d.map(7, 0, 0xFFF, 0) == S_NOENT


def test_request_validation(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    assert d.send(9, b"")[0] == S_UNSUPP
    assert d.send(T_ATTACH, b"\0" * 8)[0] == S_DEVERR  # shorter than an attach request
    assert d.attach(1, endpoint=endpoint_id(0, 4)) == S_NOENT
    assert d.attach(1, reserved=b"\1\0\0\0") == S_INVAL
    assert d.attach(1, flags=8) == S_INVAL
    assert d.attach(1) == S_OK
    assert d.attach(2, flags=ATTACH_F_BYPASS) == S_OK  # moves the endpoint to a bypass domain
    assert set(d.table.domains) == {2}
    assert d.map(2, 0, 0xFFF, 0) == S_INVAL  # no mappings in a bypass domain
    assert d.unmap(2, 0, 0xFFF) == S_INVAL
    assert d.attach(1) == S_OK
    assert d.map(1, 0x1000, 0x1FFF, 0x2000, 8) == S_INVAL  # unknown flag
    assert d.map(1, 0x1800, 0x1FFF, 0x2000) == S_RANGE  # not page aligned
    assert d.map(1, 0x1000, 0x17FF, 0x2000) == S_RANGE
    assert d.map(1, 0x1000, 0x1FFF, 0x2800) == S_RANGE
    assert d.map(1, 0x2000, 0x1FFF, 0x2000) == S_RANGE  # end before start
    assert d.map(1, 0, 0xFFF, (1 << 64) - 0x1000) == S_OK  # the last page of the space
    assert d.map(1, 0x1000, 0x2FFF, (1 << 64) - 0x1000) == S_RANGE  # phys wraps
    assert d.map(1, 0x1000, 0x2FFF, 0x2000) == S_OK
    assert d.map(1, 0x2000, 0x3FFF, 0x9000) == S_INVAL  # overlaps
    assert d.unmap(1, 0x3000, 0x2000) == S_RANGE
    assert d.detach(3) == S_NOENT
    assert d.send(T_DETACH, struct.pack("<II8s", 1, EP, b"\1" + bytes(7)))[0] == S_INVAL
    assert d.send(T_ATTACH, struct.pack("<III4x", 1, EP, 0), head=bytes((T_ATTACH, 0, 0, 0)))[0] == S_OK
    assert d.dev.counters()["requests"] == 23


def test_status_needs_a_writable_tail(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    r = alloc.alloc(20)
    mem.write(r, struct.pack("<BxxxIII4x", T_ATTACH, 1, EP, 0))
    h = d.req.add([(r, 20, False)])
    d.dev.queue_notify(0)
    assert d.req.take_used() == [(h, 0)]
    assert not d.dev.needs_reset


def test_probe_reports_the_msi_window(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    status, props = d.send(T_PROBE, struct.pack("<I64x", EP), props=PROBE_SIZE + 8)
    assert status == S_OK
    kind, length, subtype, start, end = struct.unpack_from("<HHB3xQQ", props)
    assert (kind, length, subtype, (start, end)) == (1, 20, 1, MSI_RANGE)
    assert props[PROBE_SIZE:] == bytes(8)  # a NONE property ends the list
    assert d.send(T_PROBE, struct.pack("<I64x", endpoint_id(1, 3)), props=PROBE_SIZE)[0] == S_NOENT
    assert d.send(T_PROBE, struct.pack("<I64x", EP), props=4)[0] == S_INVAL  # no room for the answer
    assert d.send(T_PROBE, struct.pack("<I63xB", EP, 1), props=PROBE_SIZE)[0] == S_INVAL


def _rng_behind(mem: GuestMemoryMmap, alloc: Allocator, d: Driver, src: Path) -> tuple[VirtioRng, Ring]:
    """A virtio-rng whose ring lives at IOVA 0x1000_0000 (mapped to RAM the allocator gives)."""
    ring_gpa = alloc.alloc(0x2000, 0x1000)
    assert d.map(1, 0x1000_0000, 0x1000_1FFF, ring_gpa) == S_OK
    view = TranslatedMemory(mem, d.table, EP)
    ring = Ring.create(view, Allocator(0x1000_0000, 0x1000_2000), 8)  # type: ignore[arg-type]  # a GuestMemory too
    rng = VirtioRng(str(src))
    rng.activate(view, [ring.attach(VirtQueue(view, 256))], FakeInterrupt(), 1 << 32)
    return rng, ring


def test_device_behind_the_iommu_translates_and_faults(tmp_path: Path, mem: GuestMemoryMmap,
                                                       alloc: Allocator) -> None:
    src = tmp_path / "entropy"
    src.write_bytes(bytes(range(256)))
    d = Driver(mem, alloc)
    assert d.attach(1) == S_OK
    notified: list[int] = []
    d.table.on_fault = lambda: notified.append(1)
    rng, ring = _rng_behind(mem, alloc, d, src)
    a, b = alloc.alloc(0x1000, 0x1000), alloc.alloc(0x1000, 0x1000)
    # one buffer at IOVA 0x2000_0ff0..0x2000_100f over two mappings, to pages apart in RAM
    assert d.map(1, 0x2000_0000, 0x2000_0FFF, a, MAP_F_WRITE) == S_OK
    assert d.map(1, 0x2000_1000, 0x2000_1FFF, b, MAP_F_WRITE) == S_OK
    h = ring.add([(0x2000_0FF0, 32, True)])
    rng.queue_notify(0)
    assert ring.take_used() == [(h, 32)]
    assert mem.read(a + 0xFF0, 16) + mem.read(b, 16) == bytes(range(32))
    # a buffer at an IOVA nothing maps: the chain fails, the device needs a reset, a fault waits
    ring.add([(0x3000_0000, 16, True)])
    rng.queue_notify(0)
    assert rng.needs_reset and notified
    ev = alloc.alloc(64)
    h = d.evt.add([(ev, 64, True)])
    d.dev.deliver_faults()
    assert d.evt.take_used() == [(h, 24)]
    reason, flags, endpoint, address = struct.unpack("<B3xII4xQ", mem.read(ev, 24))
    assert (reason, flags & FAULT_F_ADDRESS, endpoint, address) == (FAULT_R_MAPPING, FAULT_F_ADDRESS, EP, 0x3000_0000)
    assert d.dev.counters()["faults"] == 1
    rng.close()


def test_unattached_endpoint_bypass_and_fault(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    view = TranslatedMemory(mem, d.table, EP)
    mem.write(0x5000, b"hi")
    assert view.read(0x5000, 2) == b"hi"  # bypass (the reset value)
    d.dev.write_config(36, b"\0")
    with pytest.raises(GuestMemoryError):
        view.write(0x5000, b"no")
    assert mem.read(0x5000, 2) == b"hi"
    assert d.table.take_fault() is not None and d.table.take_fault() is None
    assert d.attach(1, flags=ATTACH_F_BYPASS) == S_OK
    assert view.read(0x5000, 2) == b"hi"  # a bypass domain
    other = TranslatedMemory(mem, d.table, endpoint_id(0, 9))
    with pytest.raises(GuestMemoryError):
        other.read(0x5000, 2)
    fault = d.table.take_fault()
    assert fault is not None and (fault.reason, fault.endpoint) == (FAULT_R_DOMAIN, endpoint_id(0, 9))


def test_translation_refuses_what_ram_refuses(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    assert d.attach(1) == S_OK
    # the guest may map any physical address (MMIO, nothing): access then fails as RAM access does
    assert d.map(1, 0x1000, 0x2FFF, (16 << 20) - 0x1000) == S_OK
    view = TranslatedMemory(mem, d.table, EP)
    assert view.is_valid_range(0x1000, 0x1000) and not view.is_valid_range(0x1000, 0x2000)
    with pytest.raises(GuestMemoryError):
        view.write(0x1FF0, bytes(32))  # the first half is RAM: nothing is written
    assert mem.read((16 << 20) - 16, 16) == bytes(16)
    with pytest.raises(GuestMemoryError):
        view.slice(0x1000, -1)
    with pytest.raises(GuestMemoryError):
        view.find_region(0x1000)
    fault = d.table.take_fault()
    assert fault is None  # the IOVA was mapped: RAM, not the IOMMU, refused it


def test_fault_write_flag_and_queue_limits(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    assert d.attach(1) == S_OK
    view = TranslatedMemory(mem, d.table, EP)
    for _ in range(200):
        with pytest.raises(GuestMemoryError):
            view.write_u32(0x9000, 1)
    assert len(d.table.faults) == 128 and d.table.dropped_faults == 72
    fault = d.table.take_fault()
    assert fault is not None and fault.flags == FAULT_F_ADDRESS | FAULT_F_WRITE
    # an event buffer too small for a fault is returned empty
    tiny = alloc.alloc(8)
    h = d.evt.add([(tiny, 8, True)])
    d.dev.deliver_faults()
    assert d.evt.take_used() == [(h, 0)]
    d.dev.reset()
    assert not d.table.faults and d.table.bypass


def test_state_round_trip(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    assert d.attach(5) == S_OK
    assert d.map(5, 0x1000, 0x1FFF, 0x8000, MAP_F_READ) == S_OK
    assert d.map(5, 0x10_0000, 0x2F_FFFF, 0x20_0000) == S_OK
    d.dev.write_config(36, b"\0")
    s = d.dev.state()
    assert s == VirtioIommuState(False, (IommuDomainState(5, False, (
        IommuMappingState(0x1000, 0x1FFF, 0x8000, MAP_F_READ),
        IommuMappingState(0x10_0000, 0x2F_FFFF, 0x20_0000, RW))),), ((EP, 5),), 3, 0)
    fresh = VirtioIommu(IommuMappings({EP}))
    fresh.restore(s)
    assert fresh.state() == s
    assert TranslatedMemory(mem, fresh.table, EP).read(0x1000, 4) == mem.read(0x8000, 4)


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: replace(s, attached=((endpoint_id(0, 4), 5),)), "attached[0]"),
    (lambda s: replace(s, attached=((EP, 6),)), "attached[0]"),
    (lambda s: replace(s, attached=()), "domains"),
    (lambda s: replace(s, domains=s.domains * 2), "domains[1].id"),
    (lambda s: replace(s, domains=(replace(s.domains[0], mappings=s.domains[0].mappings * 2),)),
     "domains[0].mappings[1]"),
    (lambda s: replace(s, domains=(replace(s.domains[0], mappings=(IommuMappingState(2, 1, 0, 1),)),)),
     "domains[0].mappings[0]"),
    (lambda s: replace(s, domains=(replace(s.domains[0], mappings=(IommuMappingState(0, 1, 0, 16),)),)),
     "domains[0].mappings[0].flags"),
    (lambda s: replace(s, domains=(replace(s.domains[0], bypass=True),)), "domains[0].mappings"),
])
def test_restore_refuses_a_bad_table(change: object, field: str, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    d = Driver(mem, alloc)
    assert d.attach(5) == S_OK
    assert d.map(5, 0x1000, 0x1FFF, 0x8000) == S_OK
    good = d.dev.state()
    fresh = VirtioIommu(IommuMappings({EP}))
    with pytest.raises(DeviceStateError) as info:
        fresh.restore(change(good))  # type: ignore[operator]  # the parametrized lambda
    assert info.value.field == field
    assert fresh.table.domains == {} and fresh.table.attached == {}  # left as it was


def test_mappings_are_bounded(mem: GuestMemoryMmap, alloc: Allocator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmsh.devices.dma.MAX_MAPPINGS", 2)
    d = Driver(mem, alloc, IommuMappings({EP, endpoint_id(0, 4)}))
    assert d.attach(1) == S_OK and d.attach(2, endpoint=endpoint_id(0, 4)) == S_OK
    assert d.map(1, 0, 0xFFF, 0) == S_OK
    assert d.map(2, 0, 0xFFF, 0) == S_OK
    assert d.map(1, 0x1000, 0x1FFF, 0) == S_NOMEM  # the limit is for all domains together
    assert d.unmap(2, 0, 0xFFF) == S_OK
    assert d.map(1, 0x1000, 0x1FFF, 0) == S_OK


@pytest.mark.parametrize("backend", ["io_uring", "aio", "sync"])
def test_block_behind_the_iommu(backend: str, tmp_path: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                router: FakeRouter) -> None:
    """virtio-blk over a domain that maps RAM 1:1 in 64 KiB mappings: requests whose buffers
    cross mappings complete; one whose buffer lost its mapping fails, and the fault is kept."""
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    table = IommuMappings({EP})
    assert table.attach(1, EP, bypass=False) == "ok"
    for start in range(0, 16 << 20, 0x1_0000):
        assert table.map(1, start, start + 0xFFFF, start, RW) == "ok"
    watcher = None if backend == "sync" else LoopWatcher()
    blk = VirtioBlock(str(image), watcher=watcher, **BACKENDS[backend])
    disk = Disk(blk, mem, alloc, router, watcher, device_memory=TranslatedMemory(mem, table, EP))
    try:
        alloc.alloc(0x1_0000 - alloc.next % 0x1_0000 - 700, 1)  # the next buffers straddle a mapping boundary
        status, data, _ = disk.request(VIRTIO_BLK_T_IN, 8, in_len=8192, split=3)
        assert status == VIRTIO_BLK_S_OK and data == image.read_bytes()[4096:12288]
        payload = os.urandom(4096)
        status, _, _ = disk.request(VIRTIO_BLK_T_OUT, 100, out=payload, split=2)
        assert status == VIRTIO_BLK_S_OK and image.read_bytes()[51200:55296] == payload
        hole = (alloc.next + 0x1_0000) & ~0xFFFF
        assert table.unmap(1, hole, hole + 0xFFFF) == "ok"
        alloc.alloc(hole - alloc.next, 1)
        ring = disk.rings[0]
        hdr = alloc.alloc(16)
        mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        ring.add([(hdr, 16, False), (hole, 512, True), (alloc.alloc(1), 1, True)])
        disk.driver.kick(0)
        assert blk.needs_reset and ring.take_used() == []
        fault = table.take_fault()
        assert fault is not None and fault.reason == FAULT_R_MAPPING
    finally:
        disk.pci.close()
