"""The virtio-pci transport driven the way Linux's virtio_pci_modern drives it."""

from __future__ import annotations

import random
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.devices.virtio.driver import (
    Allocator,
    FakeRouter,
    PciDriver,
    bar_sizing,
)
from vmsh.devices.pci.config_space import BAR0, COMMAND, STATUS
from vmsh.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FEATURES_OK,
)
from vmsh.devices.virtio.pci import (
    BAR_SIZE,
    COMMON_CONFIG_GENERATION,
    COMMON_CONFIG_MSIX_VECTOR,
    COMMON_NUM_QUEUES,
    COMMON_QUEUE_DESC_LO,
    COMMON_QUEUE_ENABLE,
    COMMON_QUEUE_MSIX_VECTOR,
    COMMON_QUEUE_SELECT,
    COMMON_QUEUE_SIZE,
    ISR_CONFIG_OFFSET,
    VIRTIO_MSI_NO_VECTOR,
    VirtioPciDevice,
)
from vmsh.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import DeviceStateError


@pytest.fixture
def rng_dev(mem: GuestMemoryMmap, router: FakeRouter) -> VirtioPciDevice:
    dev = VirtioPciDevice(VirtioRng(), mem, router)
    dev.set_bar_address(0xE000_0000)
    yield dev
    dev.close()


@pytest.fixture
def driver(rng_dev: VirtioPciDevice, mem: GuestMemoryMmap, alloc: Allocator) -> PciDriver:
    return PciDriver(rng_dev, mem, alloc)


def test_pci_identity(rng_dev: VirtioPciDevice) -> None:
    c = rng_dev.config
    assert struct.unpack("<HH", c.read(0, 4)) == (0x1AF4, 0x1044)
    assert c.read(0x08, 4) == bytes([1, 0x00, 0xFF, 0xFF])  # revision 1, class ff/ff
    assert struct.unpack("<HH", c.read(0x2C, 4)) == (0x1AF4, 0x1044)
    assert c.get(STATUS, 2) & 0x10  # capability list


def test_pci_capabilities(driver: PciDriver) -> None:
    assert driver.caps[1][1:] == (0x0, 56)
    assert driver.caps[3][1:] == (0x2000, 1)
    assert driver.caps[4][1:] == (0x4000, 0x1000)
    assert driver.caps[2][1:] == (0x6000, 0x1000)
    assert driver.cfg_read(driver.caps[2][0] + 16, 4) == 4  # notify_off_multiplier
    assert 5 in driver.caps
    ctrl = driver.cfg_read(driver.msix_cap + 2, 2)
    assert ctrl & 0x7FF == 1  # 2 vectors: one queue + config
    assert driver.cfg_read(driver.msix_cap + 4, 4) == 0x8000
    assert driver.cfg_read(driver.msix_cap + 8, 4) == 0x48000


@pytest.mark.parametrize("bar64", [True, False])
def test_pci_bar_sizing(mem: GuestMemoryMmap, router: FakeRouter, bar64: bool) -> None:
    dev = VirtioPciDevice(VirtioRng(), mem, router, bar64=bar64)
    moves: list[tuple[int, int]] = []
    dev.on_bar_change = lambda old, new: moves.append((old, new))
    dev.set_bar_address(0xE000_0000)
    assert bar_sizing(dev) == BAR_SIZE
    assert dev.bar_address() == 0xE000_0000 and moves == []
    assert dev.config.read(BAR0, 4)[0] & 0x6 == (0x4 if bar64 else 0)
    dev.close()


def test_pci_bar_move_64bit_reported_once(rng_dev: VirtioPciDevice) -> None:
    moves: list[tuple[int, int]] = []
    rng_dev.on_bar_change = lambda old, new: moves.append((old, new))
    rng_dev.config.write(COMMAND, b"\0\0")  # pci_std_update_resource disables decoding
    rng_dev.config.write(BAR0, struct.pack("<I", 0x0008_0000 | 0x4))
    assert moves == []  # only the low half so far
    rng_dev.config.write(BAR0 + 4, struct.pack("<I", 0x1))
    assert moves == [(0xE000_0000, 0x1_0008_0000)] and rng_dev.bar_address() == 0x1_0008_0000
    rng_dev.config.write(BAR0, struct.pack("<I", 0xC000_0000))
    rng_dev.config.write(COMMAND, b"\x02\0")  # decoding back on: the pending low half counts
    assert moves[-1] == (0x1_0008_0000, 0x1_C000_0000)


def test_pci_bar_move_32bit(mem: GuestMemoryMmap, router: FakeRouter) -> None:
    dev = VirtioPciDevice(VirtioRng(), mem, router, bar64=False)
    moves: list[tuple[int, int]] = []
    dev.on_bar_change = lambda old, new: moves.append((old, new))
    dev.config.write(BAR0, struct.pack("<I", 0xD008_1234))  # low bits are not writable
    assert moves == [(0, 0xD008_0000)]
    with pytest.raises(ValueError):
        dev.set_bar_address(0x1_0000_0000)
    dev.close()


def test_pci_negotiation(driver: PciDriver, rng_dev: VirtioPciDevice) -> None:
    rings = driver.probe()
    assert rng_dev.activated and driver.status & VIRTIO_STATUS_DRIVER_OK
    assert rng_dev.device.acked_features == (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << 28)
    assert len(rings) == 1 and rings[0].size == 256
    assert driver.common(COMMON_NUM_QUEUES, 2) == 1


def test_pci_refuses_unoffered_feature(driver: PciDriver, rng_dev: VirtioPciDevice) -> None:
    assert not driver.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 5))
    assert not driver.status & VIRTIO_STATUS_FEATURES_OK


def test_pci_refuses_legacy_driver(driver: PciDriver) -> None:
    assert not driver.negotiate(1 << VIRTIO_F_EVENT_IDX)


def test_pci_driver_ok_without_features_ok_needs_reset(driver: PciDriver, rng_dev: VirtioPciDevice) -> None:
    driver.set_common(0x14, 1 | 2 | 4, 1)
    assert not rng_dev.activated and driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_pci_rng_request_and_msix(driver: PciDriver, router: FakeRouter, mem: GuestMemoryMmap,
                                  alloc: Allocator) -> None:
    (ring,) = driver.probe()
    buf = alloc.alloc(64)
    head = ring.add([(buf, 64, True)])
    driver.kick(0)
    assert ring.take_used() == [(head, 64)]
    assert mem.read(buf, 64) != bytes(64)
    assert router.fired == [1]  # queue 0 uses vector 1
    assert router.routes[1] == (0xFEE0_0000, 0x31, False)


def test_pci_isr_read_clears(driver: PciDriver, alloc: Allocator) -> None:
    (ring,) = driver.probe()
    ring.add([(alloc.alloc(8), 8, True)])
    driver.kick(0)
    assert driver.read(ISR_CONFIG_OFFSET, 1) == 1
    assert driver.read(ISR_CONFIG_OFFSET, 1) == 0


def test_pci_msix_masked_vector_pending(driver: PciDriver, router: FakeRouter, alloc: Allocator) -> None:
    (ring,) = driver.probe()
    driver.write(0x8000 + 16 + 12, 1, 4)  # mask vector 1
    ring.add([(alloc.alloc(8), 8, True)])
    driver.kick(0)
    assert router.fired == [] and driver.read(0x48000, 8) == 0b10
    driver.write(0x8000 + 16 + 12, 0, 4)
    assert router.fired == [1] and driver.read(0x48000, 8) == 0


def test_pci_unknown_vector_reads_no_vector(driver: PciDriver) -> None:
    driver.set_common(COMMON_CONFIG_MSIX_VECTOR, 7, 2)
    assert driver.common(COMMON_CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    driver.set_common(COMMON_QUEUE_SELECT, 0, 2)
    driver.set_common(COMMON_QUEUE_MSIX_VECTOR, 1, 2)
    assert driver.common(COMMON_QUEUE_MSIX_VECTOR, 2) == 1


def test_pci_reset(driver: PciDriver, rng_dev: VirtioPciDevice, alloc: Allocator) -> None:
    driver.probe()
    driver.set_common(0x14, 0, 1)
    assert driver.status == 0 and not rng_dev.activated and not rng_dev.device.activated
    driver.set_common(COMMON_QUEUE_SELECT, 0, 2)
    assert driver.common(COMMON_QUEUE_ENABLE, 2) == 0
    assert driver.common(COMMON_QUEUE_SIZE, 2) == 256
    assert driver.common(COMMON_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    # and the device comes back after a second probe
    (ring,) = driver.probe()
    head = ring.add([(alloc.alloc(8), 8, True)])
    driver.kick(0)
    assert ring.take_used() == [(head, 8)]


def test_pci_queue_fields_locked_once_enabled(driver: PciDriver) -> None:
    driver.probe()
    driver.set_common(COMMON_QUEUE_SELECT, 0, 2)
    before = driver.common(COMMON_QUEUE_DESC_LO, 4)
    driver.set_common(COMMON_QUEUE_DESC_LO, 0x1230, 4)
    driver.set_common(COMMON_QUEUE_SIZE, 2, 2)
    assert driver.common(COMMON_QUEUE_DESC_LO, 4) == before and driver.common(COMMON_QUEUE_SIZE, 2) == 256


def test_pci_bad_queue_at_driver_ok_needs_reset(driver: PciDriver, rng_dev: VirtioPciDevice) -> None:
    driver.cfg_write(COMMAND, 6, 2)
    driver.enable_msix()
    assert driver.negotiate()
    driver.setup_queue(0, size=100)  # not a power of two
    driver.set_common(COMMON_QUEUE_ENABLE, 1, 2)
    driver.add_status(VIRTIO_STATUS_DRIVER_OK)
    assert driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET and not rng_dev.activated
    driver.write(0x6000, 0, 2)  # a kick is ignored
    driver.set_common(0x14, 0, 1)
    assert driver.status == 0


def test_pci_hostile_chain_needs_reset_and_config_interrupt(driver: PciDriver, rng_dev: VirtioPciDevice,
                                                            router: FakeRouter, alloc: Allocator) -> None:
    (ring,) = driver.probe()
    gen = driver.common(COMMON_CONFIG_GENERATION, 1)
    ring.write_desc(0, alloc.alloc(8), 8, VIRTQ_DESC_F_NEXT, 0)  # a chain pointing at itself
    ring.publish(0)
    start = time.monotonic()
    driver.kick(0)
    assert time.monotonic() - start < 1.0
    assert driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    assert router.fired == [0]  # the config vector
    assert driver.read(ISR_CONFIG_OFFSET, 1) & 2
    assert driver.common(COMMON_CONFIG_GENERATION, 1) != gen
    driver.kick(0)  # further kicks are ignored until reset
    assert ring.take_used() == []
    (ring,) = driver.probe()
    assert not driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_pci_pci_cfg_window(driver: PciDriver) -> None:
    cap = driver.caps[5][0]
    driver.cfg_write(cap + 4, 0, 1)  # bar 0
    driver.cfg_write(cap + 8, 0x12, 4)  # num_queues
    driver.cfg_write(cap + 12, 2, 4)
    assert driver.cfg_read(cap + 16, 4) == 1
    driver.cfg_write(cap + 8, 0x14, 4)  # device_status, one byte
    driver.cfg_write(cap + 12, 1, 4)
    driver.cfg_write(cap + 16, 1, 4)  # ACKNOWLEDGE through config space
    assert driver.status == 1


def test_pci_notify_offsets(rng_dev: VirtioPciDevice) -> None:
    assert rng_dev.notify_offset(0) == 0x6000 and rng_dev.notify_offset(3) == 0x600C
    rng_dev.notify(5)  # no such queue
    rng_dev.notify(0)  # not activated


def test_pci_random_accesses_never_raise(rng_dev: VirtioPciDevice, alloc: Allocator, mem: GuestMemoryMmap) -> None:
    driver = PciDriver(rng_dev, mem, alloc)
    driver.probe()
    rnd = random.Random(1234)
    regions = [0, 0x2000, 0x4000, 0x6000, 0x8000, 0x48000, 0x7FFF8]
    for _ in range(3000):
        base = rnd.choice(regions)
        offset = base + rnd.randrange(-8, 64)
        size = rnd.choice([0, 1, 2, 3, 4, 8, 9])
        if rnd.random() < 0.5:
            rng_dev.bar_read(offset, size)
        else:
            rng_dev.bar_write(offset, rnd.randbytes(size))
        cfg = rnd.randrange(-4, 0x1004)
        if rnd.random() < 0.5:
            rng_dev.config.read(cfg, rnd.choice([1, 2, 4, 3]))
        else:
            rng_dev.config.write(cfg, rnd.randbytes(rnd.choice([1, 2, 4, 3])))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x38), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
                max_size=40))
def test_pci_common_config_fuzz(writes: list[tuple[int, int, int]]) -> None:
    mem = GuestMemoryMmap.create(1 << 20)
    dev = VirtioPciDevice(VirtioRng(), mem, FakeRouter())
    try:
        for offset, size, value in writes:
            dev.bar_write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            dev.notify(0)
        dev.bar_read(0x14, 1)
    finally:
        dev.close()
        mem.close()


def test_pci_state_round_trip_mid_operation(driver: PciDriver, rng_dev: VirtioPciDevice, mem: GuestMemoryMmap,
                                             alloc: Allocator) -> None:
    (ring,) = driver.probe()
    first = ring.add([(alloc.alloc(8), 8, True)])
    driver.kick(0)
    assert ring.take_used() == [(first, 8)]
    # the driver queues a request; the VM is snapshotted before the device sees the kick
    second = ring.add([(alloc.alloc(16), 16, True)])
    state = rng_dev.state()
    router2 = FakeRouter()
    clone = VirtioPciDevice(VirtioRng(), mem, router2)
    clone.restore(state)
    assert clone.state() == state
    assert clone.activated and clone.bar_address() == 0xE000_0000
    assert router2.routes[1] == (0xFEE0_0000, 0x31, False)
    clone.notify(0)
    assert ring.take_used() == [(second, 16)]
    assert router2.fired == [1]
    assert clone.counters() == {"read_bytes": 24, "read_ops": 2}
    clone.close()


def test_pci_state_restore_rejects_mismatch(rng_dev: VirtioPciDevice, mem: GuestMemoryMmap, router: FakeRouter) -> None:
    import tempfile

    from vmsh.devices.virtio.block import VirtioBlock

    state = rng_dev.state()
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(1 << 20)
        blk = VirtioPciDevice(VirtioBlock(f.name, num_queues=2), mem, router)
        with pytest.raises(DeviceStateError):
            blk.restore(state)
        blk.close()


def test_pci_kicks_from_a_thread_race_resets(driver: PciDriver, rng_dev: VirtioPciDevice, alloc: Allocator) -> None:
    import threading

    driver.probe()
    stop = threading.Event()

    def kicker() -> None:
        while not stop.is_set():
            rng_dev.notify(0)

    thread = threading.Thread(target=kicker)
    thread.start()
    try:
        for _ in range(20):
            (ring,) = driver.probe()
            ring.add([(alloc.alloc(8), 8, True)])
            driver.set_common(0x14, 0, 1)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    (ring,) = driver.probe()
    head = ring.add([(alloc.alloc(8), 8, True)])
    driver.kick(0)
    assert ring.take_used() == [(head, 8)]


def test_pci_lifecycle_events_as_cloud_hypervisor_s(driver: PciDriver, rng_dev: VirtioPciDevice,
                                                     mem: GuestMemoryMmap) -> None:
    """``activated`` at DRIVER_OK, ``reset`` only when a started device is reset (the probe's own
    reset of a fresh device, and a failed activation, say nothing), ``activated`` again when a
    restore brings a running device back."""
    told: list[str] = []
    rng_dev.on_lifecycle = told.append
    driver.set_common(0x14, 0, 1)  # Linux's probe resets first: the device never started
    assert told == []
    driver.probe()
    assert told == ["activated"]
    state = rng_dev.state()
    driver.set_common(0x14, 0, 1)
    driver.set_common(0x14, 0, 1)
    assert told == ["activated", "reset"]
    driver.cfg_write(COMMAND, 6, 2)
    driver.enable_msix()
    assert driver.negotiate()
    driver.setup_queue(0, size=100)  # not a power of two: activation fails
    driver.set_common(COMMON_QUEUE_ENABLE, 1, 2)
    driver.add_status(VIRTIO_STATUS_DRIVER_OK)
    driver.set_common(0x14, 0, 1)
    assert told == ["activated", "reset"]
    clone = VirtioPciDevice(VirtioRng(), mem, FakeRouter())
    clone_told: list[str] = []
    clone.on_lifecycle = clone_told.append
    clone.restore(state)
    assert clone_told == ["activated"]
    clone.close()
    assert clone_told == ["activated"]  # teardown is not the driver's reset
