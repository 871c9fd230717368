"""virtio-balloon: config, inflate/deflate with PFN checks, free page reporting, stats, state."""

from __future__ import annotations

import struct

import pytest

from tests.unit.devices.conftest import RAM_SIZE
from tests.unit.devices.virtio.driver import (
    Allocator,
    FakeInterrupt,
    FakeRouter,
    PciDriver,
    Ring,
)
from vmsh.config.model import BalloonConfig
from vmsh.devices.virtio.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
    VirtioBalloonState,
)
from vmsh.devices.virtio.device import COMMON_FEATURES, VIRTIO_STATUS_DEVICE_NEEDS_RESET
from vmsh.devices.virtio.pci import DEVICE_CONFIG_OFFSET, VirtioPciDevice
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceError, DeviceStateError

PAGE = 4096


def activate(dev: VirtioBalloon, mem: GuestMemoryMmap, alloc: Allocator,
             features: int) -> tuple[list[Ring], FakeInterrupt]:
    rings = [Ring.create(mem, alloc, 16) for _ in dev.queue_max_sizes]
    queues = [r.attach(VirtQueue(mem, size)) for r, size in zip(rings, dev.queue_max_sizes, strict=True)]
    irq = FakeInterrupt()
    dev.activate(mem, queues, irq, features)
    return rings, irq


def send_pfns(ring: Ring, mem: GuestMemoryMmap, alloc: Allocator, pfns: list[int]) -> int:
    buf = alloc.alloc(4 * max(1, len(pfns)), 4)
    mem.write(buf, struct.pack(f"<{len(pfns)}I", *pfns))
    return ring.add([(buf, 4 * len(pfns), False)])


def test_balloon_through_pci(mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
    dev = VirtioBalloon.from_config(BalloonConfig(size=8 << 20, deflate_on_oom=True, free_page_reporting=True))
    pci = VirtioPciDevice(dev, mem, router)
    driver = PciDriver(pci, mem, alloc)
    offered = driver.device_features()
    assert offered & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and offered & (1 << VIRTIO_BALLOON_F_REPORTING)
    assert not offered & (1 << VIRTIO_BALLOON_F_STATS_VQ)
    rings = driver.probe()
    assert len(rings) == 3
    assert driver.device_config(0, 4) == (8 << 20) // PAGE
    assert driver.device_config(4, 4) == 0
    # virtballoon_changed -> update_balloon_size: the driver writes actual
    driver.write(DEVICE_CONFIG_OFFSET + 4, 100, 4)
    assert dev.actual == 100 and dev.actual_bytes == 100 * PAGE
    driver.write(DEVICE_CONFIG_OFFSET + 5, 1, 1)  # a byte write lands in the right place
    assert dev.actual == 356
    driver.write(DEVICE_CONFIG_OFFSET, 7, 4)  # num_pages is read-only
    assert driver.device_config(0, 4) == 2048
    fired = len(router.fired)
    dev.resize(16 << 20)
    assert driver.device_config(0, 4) == 4096 and len(router.fired) == fired + 1
    # inflate through the PCI notify path
    mem.fill(0x40 * PAGE, 4 * PAGE, 0xAA)
    head = send_pfns(rings[0], mem, alloc, [0x40, 0x41, 0x43])
    driver.kick(0)
    assert rings[0].take_used() == [(head, 0)]
    assert mem.read(0x40 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert mem.read(0x42 * PAGE, 1) == b"\xaa" and mem.read(0x43 * PAGE, PAGE) == bytes(PAGE)
    assert dev.counters()["inflated_pages"] == 3
    pci.close()


def test_balloon_bad_pfns_are_skipped(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioBalloon(0)
    rings, irq = activate(dev, mem, alloc, COMMON_FEATURES)
    mem.fill(0x100 * PAGE, PAGE, 0x55)
    last = RAM_SIZE // PAGE
    head = send_pfns(rings[0], mem, alloc, [last, 0xFFFF_FFFF, 0x100, last + 10, 0x100])
    dev.queue_notify(0)
    assert rings[0].take_used() == [(head, 0)]
    assert mem.read(0x100 * PAGE, PAGE) == bytes(PAGE)
    c = dev.counters()
    assert c["inflated_pages"] == 1 and c["bad_pfns"] == 3
    assert not dev.needs_reset and irq.used == [0]
    # deflate counts the good ones
    head = send_pfns(rings[1], mem, alloc, [0x100, last])
    dev.queue_notify(1)
    assert rings[1].take_used() == [(head, 0)]
    assert dev.counters()["deflated_pages"] == 1 and dev.counters()["bad_pfns"] == 4


def test_balloon_hostile_chains(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioBalloon(0)
    rings, _ = activate(dev, mem, alloc, COMMON_FEATURES)
    # a huge readable buffer is read only up to the cap; a write-only or odd-sized one gives no PFN
    big = rings[0].add([(0x10_0000, 8 << 20, False)])
    odd = rings[0].add([(alloc.alloc(3), 3, False)])
    wo = rings[0].add([(alloc.alloc(8), 8, True)])
    dev.queue_notify(0)
    assert rings[0].take_used() == [(big, 0), (odd, 0), (wo, 0)]
    assert not dev.needs_reset
    # a chain outside RAM is a broken ring: DEVICE_NEEDS_RESET, nothing raised
    rings[0].add([(RAM_SIZE + PAGE, 8, False)])
    dev.queue_notify(0)
    assert dev.needs_reset


def test_balloon_free_page_reporting(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioBalloon(0, free_page_reporting=True, stats=True)
    # The driver acked reporting but not stats: Linux compacts the queue indexes, reporting is 2.
    rings, _ = activate(dev, mem, alloc, COMMON_FEATURES | 1 << VIRTIO_BALLOON_F_REPORTING)
    assert dev.report_index == 2 and dev.stats_index is None
    mem.fill(0x200 * PAGE, 8 * PAGE, 1)
    head = rings[2].add([(0x200 * PAGE, 4 * PAGE, True), (0x205 * PAGE + 8, PAGE, True),
                         (0x206 * PAGE, PAGE, True)])
    dev.queue_notify(2)
    assert rings[2].take_used() == [(head, 0)]
    assert mem.read(0x200 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
    assert mem.read(0x205 * PAGE, 1) == b"\1"  # misaligned range: left alone
    assert mem.read(0x206 * PAGE, PAGE) == bytes(PAGE)
    assert dev.counters()["reported_pages"] == 5 and dev.counters()["bad_pfns"] == 1
    # queue 3 is not in use with these features: kicks leave it alone
    rings[3].add([(alloc.alloc(8), 8, False)])
    dev.queue_notify(3)
    assert rings[3].take_used() == []


def test_balloon_stats(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioBalloon(0, free_page_reporting=True, stats=True)
    feats = COMMON_FEATURES | 1 << VIRTIO_BALLOON_F_REPORTING | 1 << VIRTIO_BALLOON_F_STATS_VQ
    rings, irq = activate(dev, mem, alloc, feats)
    assert (dev.stats_index, dev.report_index) == (2, 3)
    assert not dev.request_stats()
    buf = alloc.alloc(30)
    mem.write(buf, struct.pack("<HQHQHQ", 4, 1 << 20, 5, 2 << 20, 0x77, 9))
    head = rings[2].add([(buf, 30, False)])
    dev.queue_notify(2)
    assert rings[2].take_used() == []  # held by the device
    assert dev.named_stats() == {"free_memory": 1 << 20, "total_memory": 2 << 20, "tag_119": 9}
    assert dev.request_stats()
    assert rings[2].take_used() == [(head, 0)] and 2 in irq.used
    assert not dev.request_stats()


def test_balloon_resize_and_limits() -> None:
    dev = VirtioBalloon(0)
    dev.resize(1 << 30)
    assert dev.num_pages == 1 << 18
    with pytest.raises(DeviceError):
        dev.resize(1 << 45)
    with pytest.raises(DeviceError):
        VirtioBalloon(-1)


def test_balloon_state_round_trip(mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
    dev = VirtioBalloon(64 << 20, stats=True)
    pci = VirtioPciDevice(dev, mem, router)
    driver = PciDriver(pci, mem, alloc)
    rings = driver.probe()
    driver.write(DEVICE_CONFIG_OFFSET + 4, 10, 4)
    send_pfns(rings[0], mem, alloc, [0x300, 0x301])
    driver.kick(0)
    buf = alloc.alloc(10)
    mem.write(buf, struct.pack("<HQ", 4, 5))
    head = rings[2].add([(buf, 10, False)])
    driver.kick(2)
    state = pci.state()
    plain = to_plain(state.device)
    restored = from_plain(VirtioBalloonState, plain)
    assert restored == state.device and restored.stats_head == head
    clone_dev = VirtioBalloon(64 << 20, stats=True)
    clone = VirtioPciDevice(clone_dev, mem, FakeRouter())
    clone.restore(state)
    assert clone_dev.counters() == dev.counters()
    assert clone_dev.request_stats()
    assert rings[2].take_used() == [(head, 0)]
    with pytest.raises(DeviceStateError):
        VirtioBalloon(0).restore(VirtioBalloonState(num_pages=1 << 33))
    with pytest.raises(DeviceStateError):
        VirtioBalloon(0).restore(VirtioBalloonState(stats_head=1 << 20))
    assert not pci.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
