"""The device-state protocol (``vmsh.devices.state``) holds for every stateful device.

For each one: a state taken after the guest changed something survives save -> to_plain ->
JSON -> from_plain -> restore into a freshly built device; a state of another class is refused
naming the expected class; an out-of-range field is refused naming that field, and leaves the
device as it was. A walk over ``vmsh.devices`` makes sure no class with ``state()`` escapes.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import vmsh.devices
from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver
from tests.unit.fakes import FakeTrigger
from vmsh.devices.acpi import Ged, GedState, PciHotplugController
from vmsh.devices.backends.tap import Tap
from vmsh.devices.cpu_hotplug import CpuHotplugController
from vmsh.devices.dma import MAP_F_READ, IommuMappings, endpoint_id
from vmsh.devices.legacy.cmos import Cmos
from vmsh.devices.legacy.post import PostPort
from vmsh.devices.legacy.serial import Serial16550
from vmsh.devices.memory_hotplug import MemoryHotplugController
from vmsh.devices.pci.config_space import COMMAND, PciConfigSpace
from vmsh.devices.pci.msix import MSIX_CONTROL_ENABLE_BIT, MsixTable
from vmsh.devices.pci.root import PciBus, PciConfigIo
from vmsh.devices.pvpanic import PvPanicDevice
from vmsh.devices.state import expect_state
from vmsh.devices.vhost_user.device import VhostUserDevice
from vmsh.devices.virtio.balloon import VirtioBalloon
from vmsh.devices.virtio.block import VirtioBlock
from vmsh.devices.virtio.console import VirtioConsole
from vmsh.devices.virtio.device import VirtioDevice
from vmsh.devices.virtio.iommu import VirtioIommu
from vmsh.devices.virtio.mem import VirtioMem
from vmsh.devices.virtio.net import NetState, VirtioNet
from vmsh.devices.virtio.pci import VirtioPciDevice, VirtioPciState
from vmsh.devices.virtio.pmem import VirtioPmem
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.devices.virtio.vsock import VirtioVsock
from vmsh.devices.virtio.watchdog import VirtioWatchdog
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.persist import SnapshotError, from_plain, to_plain
from vmsh.errors import DeviceStateError


class NoWatcher:
    def add(self, fd: int, callback: object) -> None:
        pass

    def remove(self, fd: int) -> None:
        pass


@dataclass
class Case:
    """How to build a device, change it as a guest would, and one field to break."""

    cls: type
    build: Callable[[], Any]
    change: Callable[[Any], None]
    bad_field: str
    bad_value: Any


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemoryMmap]:
    m = GuestMemoryMmap.create(16 << 20)
    yield m
    m.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("devices")
    (base / "disk.raw").write_bytes(bytes(1 << 20))
    (base / "pmem.img").write_bytes(bytes(2 << 20))
    return base


def _pipe_tap() -> Tap:
    # A pipe is no tap: the device takes it (TUNSETVNETHDRSZ fails with ENOTTY) and nothing
    # here activates it, which is where a real tap would be needed.
    r, w = os.pipe()
    os.close(w)
    return Tap("fake", [r])


def _probed_rng(mem: GuestMemoryMmap) -> VirtioPciDevice:
    dev = VirtioPciDevice(VirtioRng(), mem, FakeRouter())
    dev.set_bar_address(0xE000_0000)
    PciDriver(dev, mem, Allocator(0x1000, 16 << 20)).probe()  # activated, queues live, MSI-X on
    return dev


def iommu_change(dev: VirtioIommu) -> None:
    assert dev.table.attach(4, endpoint_id(0, 3), bypass=False) == "ok"
    assert dev.table.map(4, 0x1000, 0x1FFF, 0x5000, MAP_F_READ) == "ok"
    dev.table.set_bypass(False)
    dev.requests = 3


def _cases(mem: GuestMemoryMmap, files: Path) -> list[Case]:
    def set_attrs(**values: Any) -> Callable[[Any], None]:
        def change(dev: Any) -> None:
            for name, value in values.items():
                setattr(dev, name, value)
        return change

    def queue_change(q: VirtQueue) -> None:
        q.size, q.ready, q.desc_table, q.avail_ring, q.used_ring = 64, True, 0x1000, 0x2000, 0x3000
        q.next_avail, q.next_used, q.signalled_used = 5, 4, 3

    def msix_change(t: MsixTable) -> None:
        t.control_write(MSIX_CONTROL_ENABLE_BIT)
        t.table_write(16, struct.pack("<IIII", 0xFEE0_0000, 0, 0x41, 1))
        t.signal(1)  # masked: pending

    def block_change(d: VirtioBlock) -> None:
        d._counts["read_ops"] = 3

    def net_change(d: VirtioNet) -> None:
        d.stats.update(rx_bytes=1500, rx_frames=1, tx_bytes=60, tx_frames=1, tx_dropped=2)

    def rng_transport_change(d: VirtioPciDevice) -> None:
        d.device.read_bytes = 7

    return [
        Case(Serial16550, lambda: Serial16550(FakeTrigger()),
             lambda d: (d.write(7, b"\x42"), d.write(1, b"\x01"), d.enqueue_raw_bytes(b"hi")),
             "interrupt_enable", 0x1FF),
        Case(Cmos, lambda: Cmos(256 << 20, 0), lambda d: (d.write(0, b"\x10"), d.write(1, b"\x55")),
             "index", 0x80),
        Case(Ged, lambda: Ged(FakeTrigger()), lambda d: d.notify(0x4), "pending", 0x100),
        Case(PciHotplugController, lambda: PciHotplugController(2, lambda seg, slot: None),
             lambda d: (d.plug(1, 3), d.unplug(0, 2), d.write(0xC, struct.pack("<I", 1))), "selected", 2),
        Case(CpuHotplugController, lambda: CpuHotplugController(4, 1, lambda index: None),
             lambda d: (d.insert(2), d.write(0, struct.pack("<I", 2))), "selected", 4),
        Case(MemoryHotplugController, MemoryHotplugController,
             lambda d: (d.insert(1 << 32, 128 << 20), d.write(0, struct.pack("<I", 1))), "selected", 8),
        Case(PostPort, PostPort, lambda d: d.write(0, b"\x40"), "last_code", 0x100),
        Case(PciConfigIo, lambda: PciConfigIo(PciBus()), lambda d: d.write(0, struct.pack("<I", 0x8000_0810)),
             "address", 0x8000_0813),
        Case(PciConfigSpace, lambda: PciConfigSpace(0x1AF4, 0x1044, 0xFF0000),
             lambda d: d.write(COMMAND, b"\x06\x00"), "data", b"\0" * 16),
        Case(MsixTable, lambda: MsixTable(3, FakeRouter()), msix_change, "pending", (False,) * 4),
        Case(PvPanicDevice, PvPanicDevice, lambda d: (d.set_bar_address(0xC000_0000), d.write(0, b"\x01")),
             "events", 0x4),
        Case(VirtQueue, lambda: VirtQueue(mem, 256), queue_change, "next_used", 0x1_0000),
        Case(VirtioPciDevice, lambda: VirtioPciDevice(VirtioRng(), mem, FakeRouter()),
             lambda d: (d.set_bar_address(0xE000_0000), d.bar_write(0x16, b"\x05\x00")), "config_msix_vector", 7),
        Case(VirtioRng, VirtioRng, set_attrs(read_bytes=9, read_ops=1), "read_ops", -1),
        Case(VirtioIommu, lambda: VirtioIommu(IommuMappings({endpoint_id(0, 3)})), iommu_change, "requests", -1),
        Case(VirtioConsole, lambda: VirtioConsole(cols=80, rows=25), lambda d: d.enqueue_input(b"ls\n"),
             "cols", 0x1_0000),
        Case(VirtioPmem, lambda: VirtioPmem(str(files / "pmem.img"), 0x1_4000_0000, 2 << 20),
             set_attrs(flush_ops=2), "start", 0x1_8000_0000),
        Case(VirtioWatchdog, lambda: VirtioWatchdog(FakeTrigger(), interval=3600), set_attrs(pings=4),
             "resets", 1 << 64),
        Case(VirtioBalloon, lambda: VirtioBalloon(64 << 20, stats=True), set_attrs(actual=12),
             "num_pages", 1 << 32),
        Case(VirtioMem, lambda: VirtioMem(1 << 32, 8 << 20), lambda d: d.resize(4 << 20), "requested_size",
             1 << 64),
        Case(VirtioBlock, lambda: VirtioBlock(str(files / "disk.raw")), block_change, "capacity", 4096),
        Case(VirtioNet, lambda: VirtioNet(_pipe_tap(), b"\x02\0\0\0\0\1", NoWatcher()), net_change,
             "rx_frames", -1),
        Case(VirtioVsock, lambda: VirtioVsock(3, str(files / f"v{os.getpid()}.sock"), NoWatcher()),
             lambda d: d._counts.update(rx_bytes=10), "cid", 4),
        # a transport that a driver probed, with its device's state inside
        Case(VirtioPciDevice, lambda: _probed_rng(mem), rng_transport_change, "queue_msix_vectors", (5,)),
    ]


CASE_IDS = ["serial", "cmos", "ged", "pci-hotplug", "cpu-hotplug", "post", "pci-config-io", "pci-config", "msix",
            "pvpanic", "virtqueue", "virtio-pci", "rng", "console", "pmem", "watchdog", "balloon", "block", "net",
            "vsock", "virtio-pci-probed"]


@pytest.fixture(params=range(len(CASE_IDS)), ids=CASE_IDS)
def case(request: pytest.FixtureRequest, mem: GuestMemoryMmap, files: Path) -> Case:
    return _cases(mem, files)[request.param]


def _close(dev: Any) -> None:
    if callable(getattr(dev, "close", None)):
        dev.close()


def _decode(dev: Any, plain: Any) -> Any:
    """What the engine does: the transport's state, then its device's by the device's class."""
    if isinstance(dev, VirtioPciDevice):
        outer = from_plain(VirtioPciState, {**plain, "device": None})
        return dataclasses.replace(outer, device=from_plain(dev.device.state_type, plain["device"], "device"))
    return from_plain(dev.state_type, plain)


def test_state_survives_plain_json_and_restore(case: Case) -> None:
    dev = case.build()
    fresh = case.build()
    try:
        case.change(dev)
        state = dev.state()
        assert state != fresh.state(), "the change should show in the state"
        plain = json.loads(json.dumps(to_plain(state)))
        fresh.restore(_decode(fresh, plain))
        assert fresh.state() == state
    finally:
        _close(dev)
        _close(fresh)


class OtherState:
    """No device's state class."""


def test_restore_refuses_another_state_class(case: Case) -> None:
    dev = case.build()
    try:
        with pytest.raises(DeviceStateError, match=f"expected a {dev.state_type.__name__}, got OtherState"):
            dev.restore(OtherState())
    finally:
        _close(dev)


def test_restore_refuses_an_out_of_range_field_and_leaves_the_device(case: Case) -> None:
    dev = case.build()
    try:
        case.change(dev)
        before = dev.state()
        bad = dataclasses.replace(before, **{case.bad_field: case.bad_value})
        with pytest.raises(DeviceStateError) as info:
            dev.restore(bad)
        assert info.value.field.split("[")[0] == case.bad_field
        assert str(info.value).startswith(f"{info.value.field}: ")
        assert dev.state() == before
    finally:
        _close(dev)


# --- nested fields, messages, the decoder ---------------------------------------------------------


def test_nested_refusals_name_the_path(mem: GuestMemoryMmap) -> None:
    dev = _probed_rng(mem)
    try:
        good = dev.state()
        queue = dataclasses.replace(good.queues[0], desc_table=good.queues[0].desc_table + 8)
        with pytest.raises(DeviceStateError, match=r"^queues\[0\]\.desc_table: 0x[0-9a-f]+ is not 16-byte aligned"):
            dev.restore(dataclasses.replace(good, queues=(queue,)))
        entry = dataclasses.replace(good.msix.entries[0], data=1 << 32)
        msix = dataclasses.replace(good.msix, entries=(entry, *good.msix.entries[1:]))
        with pytest.raises(DeviceStateError, match=r"^msix\.entries\[0\]\.data: 4294967296 is out of range"):
            dev.restore(dataclasses.replace(good, msix=msix))
        # refusals found while the nested parts load: the transport is put back as it was
        with pytest.raises(DeviceStateError, match=r"^device: expected a VirtioRngState, got NetState"):
            dev.restore(dataclasses.replace(good, device=NetState()))
        assert dev.state() == good and dev.activated
        other = PciConfigSpace(0x1AF4, 0x1041, 0x020000).state()  # a virtio-net function's space
        with pytest.raises(DeviceStateError, match=r"^config\.data\.device_id: 0x1041 is not this function's 0x1044"):
            dev.restore(dataclasses.replace(good, config=other))
        assert dev.state() == good and dev.activated
    finally:
        dev.close()


def test_serial_message_reads_field_colon_reason() -> None:
    uart = Serial16550(FakeTrigger())
    bad = dataclasses.replace(uart.state(), interrupt_enable=300)
    with pytest.raises(DeviceStateError) as info:
        uart.restore(bad)
    assert str(info.value) == "interrupt_enable: 300 is out of range 0..255"
    assert info.value.field == "interrupt_enable"


def test_decoder_refuses_a_register_wider_than_its_field() -> None:
    with pytest.raises(SnapshotError, match=r"^__ged\.pending: 256 is out of range 0\.\.255$"):
        from_plain(GedState, {"pending": 256}, "__ged")
    assert from_plain(GedState, {"pending": 5}) == GedState(5)  # the plain form vm.py writes


def test_net_counters_survive_and_a_null_state_is_a_fresh_device() -> None:
    net = VirtioNet(_pipe_tap(), b"\x02\0\0\0\0\1", NoWatcher())
    other = VirtioNet(_pipe_tap(), b"\x02\0\0\0\0\1", NoWatcher())
    try:
        net.stats.update(rx_bytes=100, tx_frames=3)
        other.restore(from_plain(NetState, json.loads(json.dumps(to_plain(net.state())))))
        assert other.counters()["rx_bytes"] == 100 and other.counters()["tx_frames"] == 3
        # snapshots of the release before NetState hold null for the net device
        other.restore(from_plain(NetState, None))
        assert other.counters()["rx_bytes"] == 0
    finally:
        net.close()
        other.close()


def test_other_states_do_not_decode_null() -> None:
    with pytest.raises(SnapshotError, match="expected an object"):
        from_plain(GedState, None, "__ged")


def test_expect_state_returns_the_state() -> None:
    state = GedState(3)
    assert expect_state(state, GedState) is state


# --- no stateful class skips the protocol -------------------------------------------------------


def _device_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(vmsh.devices.__path__, "vmsh.devices."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if getattr(obj, "_is_protocol", False):
                continue  # vmsh.devices.state.Stateful itself
            if obj.__module__ == module.__name__ and callable(getattr(obj, "state", None)):
                found.append(obj)
    return found


def test_every_class_with_state_follows_the_protocol() -> None:
    classes = _device_classes()
    assert Serial16550 in classes and VirtioNet in classes  # the walk finds what it should
    for cls in classes:
        if cls is VirtioDevice:
            continue  # the abstract base: its subclasses are checked
        state_type = getattr(cls, "state_type", None)
        assert state_type is not None, f"{cls.__qualname__} has state() but no state_type"
        assert dataclasses.is_dataclass(state_type) and state_type.__dataclass_params__.frozen, \
            f"{cls.__qualname__}.state_type is not a frozen dataclass"
        assert "restore" in {n for k in cls.__mro__ if k is not VirtioDevice for n in vars(k)}, \
            f"{cls.__qualname__} has state() but no restore()"


def test_every_stateful_class_has_a_round_trip_case(mem: GuestMemoryMmap, files: Path) -> None:
    covered = {c.cls for c in _cases(mem, files)}  # building a Case builds no device
    missing = [cls.__qualname__ for cls in _device_classes()
               if cls is not VirtioDevice and cls not in covered
               # its backend's state cannot be saved: restore is refused (tests/unit/devices/vhost_user)
               and not issubclass(cls, VhostUserDevice)
               # a subclass that keeps its base's state and restore is covered by the base's case
               and not ({"state", "restore", "state_type"} & set(vars(cls)) == set() and set(cls.__mro__) & covered)]
    assert not missing, f"add a Case for {missing}"
