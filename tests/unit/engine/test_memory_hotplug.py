"""Memory hotplug in the engine: where the hotplug areas go, which configs are refused, and the
resize rules of ``vm.resize desired_ram`` / ``vm.resize-zone`` (cloud-hypervisor's
``MemoryManager::resize``), with guest RAM in this process and a fake KVM VM."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vmsh.config import model as m
from vmsh.devices.acpi import GED_MEMORY_CHANGE
from vmsh.devices.memory_hotplug import ENABLED, INSERTING, MemoryHotplugController
from vmsh.devices.virtio.mem import VirtioMem
from vmsh.engine.boot.bootparams import e820_map
from vmsh.engine.memory_hotplug import MemoryHotplug
from vmsh.engine.memory_manager import HotplugArea, check_hotplug_config, create_memory, hotplug_areas, hotplug_end
from vmsh.engine.snapshot import check_memory_table, memory_table
from vmsh.errors import SnapshotError, VmshError

MIB, GIB = 1 << 20, 1 << 30
ACPI, VIRTIO_MEM = m.HotplugMethod.ACPI, m.HotplugMethod.VIRTIO_MEM


class FakeVmFd:
    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int]] = {}

    def set_user_memory_region(self, slot: int, gpa: int, size: int, _host: int) -> None:
        self.slots[slot] = (gpa, size)


def memory_config(**keys: Any) -> m.MemoryConfig:
    return m.MemoryConfig(**keys)


def test_areas_follow_boot_ram() -> None:
    assert hotplug_areas(memory_config(size=512 * MIB)) == ()
    # RAM ending below the 32-bit hole: hotplug RAM from 4 GiB
    assert hotplug_areas(memory_config(size=512 * MIB, hotplug_size=GIB)) == (HotplugArea(4 * GIB, GIB, "mem0", ACPI),)
    # RAM above 4 GiB: the next 128 MiB boundary after it
    cfg = memory_config(size=3 * GIB + 200 * MIB, hotplug_size=GIB, hotplug_method=VIRTIO_MEM)
    assert hotplug_areas(cfg) == (HotplugArea(4 * GIB + 256 * MIB, GIB, "mem0", VIRTIO_MEM),)
    assert hotplug_end(cfg, 4 * GIB + 200 * MIB) == 5 * GIB + 256 * MIB
    zones = memory_config(size=0, hotplug_method=VIRTIO_MEM, zones=[
        m.MemoryZoneConfig(id="z0", size=256 * MIB, hotplug_size=256 * MIB),
        m.MemoryZoneConfig(id="z1", size=256 * MIB),
        m.MemoryZoneConfig(id="z2", size=256 * MIB, hotplug_size=128 * MIB)])
    assert hotplug_areas(zones) == (HotplugArea(4 * GIB, 256 * MIB, "z0", VIRTIO_MEM),
                                    HotplugArea(4 * GIB + 256 * MIB, 128 * MIB, "z2", VIRTIO_MEM))


@pytest.mark.parametrize("keys, message", [
    ({"hotplug_size": 100 * MIB}, "not a multiple of 128 MiB"),
    ({"hotplug_size": 256 * MIB, "hotplugged_size": 384 * MIB, "hotplug_method": VIRTIO_MEM},
     "'hotplugged_size' 402653184 can't be bigger than 'hotplug_size' 268435456"),
    # cloud-hypervisor v40 plugs nothing through ACPI at boot
    ({"hotplug_size": 256 * MIB, "hotplugged_size": 128 * MIB}, "Invalid to define 'hotplugged_size' with hotplug "
                                                                "method 'acpi'"),
    ({"hotplug_size": 256 * MIB, "hotplugged_size": 3 * MIB, "hotplug_method": VIRTIO_MEM}, "block size (2 MiB)"),
    ({"size": 0, "zones": [m.MemoryZoneConfig(id="z", size=GIB, hotplug_size=GIB)]},
     "Invalid hotplug method associated with memory zones resizing capability"),
])
def test_refused_configs(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(VmshError, match=re.escape(message)):
        check_hotplug_config(memory_config(**({"size": 512 * MIB} | keys)))


@pytest.fixture
def acpi() -> Iterator[tuple[MemoryHotplug, FakeVmFd, list[int]]]:
    cfg = m.VmConfig(memory=memory_config(size=256 * MIB, hotplug_size=512 * MIB))
    memory = create_memory(cfg.memory)
    vm_fd, events = FakeVmFd(), []
    memory.register(vm_fd)
    yield MemoryHotplug(cfg, memory, vm_fd, events.append, MemoryHotplugController()), vm_fd, events
    memory.close()


def test_acpi_grows_by_slots(acpi: tuple[MemoryHotplug, FakeVmFd, list[int]]) -> None:
    hotplug, vm_fd, events = acpi
    assert vm_fd.slots == {0: (0, 256 * MIB)}  # the area is empty until a resize
    hotplug.resize(384 * MIB)
    hotplug.resize(640 * MIB)
    assert vm_fd.slots == {0: (0, 256 * MIB), 1: (4 * GIB, 128 * MIB), 2: (4 * GIB + 128 * MIB, 256 * MIB)}
    assert events == [GED_MEMORY_CHANGE] * 2
    # cloud-hypervisor v40: the configured size becomes the new total (a reboot starts with it)
    assert hotplug.config.memory.size == 640 * MIB and hotplug.config.memory.hotplugged_size is None
    assert hotplug.acpi_ram() == 384 * MIB
    assert hotplug.controller is not None
    assert hotplug.controller.ranges() == [(4 * GIB, 128 * MIB), (4 * GIB + 128 * MIB, 256 * MIB)]
    assert hotplug.controller.state().slots[1].status == ENABLED | INSERTING
    hotplug.memory.write(4 * GIB + 384 * MIB - 8, b"new RAM!")
    # not in the e820 map: the guest finds it through the ACPI memory devices
    assert max(addr + size for addr, size, kind in e820_map(hotplug.memory, reserve_ecam=False)) == 256 * MIB
    hotplug.resize(640 * MIB)  # no change: nothing happens
    assert len(events) == 2 and len(vm_fd.slots) == 3
    table = memory_table(hotplug.memory)
    assert table == [(0, 256 * MIB), (4 * GIB, 128 * MIB), (4 * GIB + 128 * MIB, 256 * MIB)]
    # a snapshot of it: the saved boot RAM places the area, the config's size is the total
    assert check_memory_table([list(r) for r in table], hotplug.config.memory, 256 * MIB) == table
    with pytest.raises(SnapshotError):
        check_memory_table([list(r) for r in table], hotplug.config.memory)  # without it: 640 MiB at boot
    # restored, it grows on from there
    again = MemoryHotplug(hotplug.config, hotplug.memory, vm_fd, events.append, hotplug.controller, 256 * MIB)
    again.resize(768 * MIB)
    assert vm_fd.slots[3] == (4 * GIB + 384 * MIB, 128 * MIB)


@pytest.mark.parametrize("desired, message", [
    (600 * MIB, "not a valid size"),
    (128 * MIB, "cannot be removed"),
    (896 * MIB, "Not enough space in the hotplug RAM region"),
])
def test_acpi_bad_requests(acpi: tuple[MemoryHotplug, FakeVmFd, list[int]], desired: int, message: str) -> None:
    hotplug, vm_fd, events = acpi
    hotplug.resize(384 * MIB)
    with pytest.raises(VmshError, match=message):
        hotplug.resize(desired)
    assert events == [GED_MEMORY_CHANGE] and len(vm_fd.slots) == 2 and hotplug.config.memory.size == 384 * MIB


def test_resize_needs_a_hotplug_area() -> None:
    cfg = m.VmConfig(memory=memory_config(size=256 * MIB))
    memory = create_memory(cfg.memory)
    try:
        with pytest.raises(VmshError, match="no memory hotplug area"):
            MemoryHotplug(cfg, memory, None, lambda _flags: None, None).resize(512 * MIB)
    finally:
        memory.close()


def test_acpi_slots_run_out() -> None:
    cfg = m.VmConfig(memory=memory_config(size=256 * MIB, hotplug_size=2 * GIB))
    memory = create_memory(cfg.memory)
    try:
        hotplug = MemoryHotplug(cfg, memory, None, lambda _flags: None, MemoryHotplugController())
        for i in range(8):
            hotplug.resize(256 * MIB + (i + 1) * 128 * MIB)
        with pytest.raises(VmshError, match="No ACPI slot available"):
            hotplug.resize(256 * MIB + 9 * 128 * MIB)
    finally:
        memory.close()


def test_virtio_mem_resize_and_zones() -> None:
    mem = memory_config(size=0, hotplug_method=VIRTIO_MEM, zones=[
        m.MemoryZoneConfig(id="z0", size=256 * MIB, hotplug_size=256 * MIB),
        m.MemoryZoneConfig(id="z1", size=256 * MIB)])
    cfg = m.VmConfig(memory=mem)
    memory = create_memory(mem)
    try:
        hotplug = MemoryHotplug(cfg, memory, None, lambda _flags: None, None)
        area = hotplug.areas["z0"]
        device = VirtioMem(area.base, area.size)
        hotplug.virtio_mem["z0"] = (device, threading.Lock())
        with pytest.raises(VmshError, match="user defined memory regions"):
            hotplug.resize(GIB)
        hotplug.resize_zone("z0", 384 * MIB)
        assert device.requested_size == 128 * MIB
        assert mem.zones is not None and mem.zones[0].hotplugged_size == 128 * MIB
        with pytest.raises(VmshError, match="unknown memory zone nope"):
            hotplug.resize_zone("nope", 384 * MIB)
        with pytest.raises(VmshError, match="invalid to ask less"):
            hotplug.resize_zone("z0", 128 * MIB)
        with pytest.raises(VmshError, match="No virtio-mem resizing handler found"):
            hotplug.resize_zone("z1", 384 * MIB)
        with pytest.raises(VmshError, match="Failed to virtio-mem resize") as info:
            hotplug.resize_zone("z0", 384 * MIB + MIB)
        assert "not aligned on block_size" in str(info.value.__cause__)
        with pytest.raises(VmshError, match="Failed to virtio-mem resize") as info:
            hotplug.resize_zone("z0", 768 * MIB)
        assert "bigger than region_size" in str(info.value.__cause__)
        assert device.requested_size == 128 * MIB and mem.zones[0].hotplugged_size == 128 * MIB
        # the virtio-mem region is RAM KVM maps, but not boot RAM
        assert memory_table(memory) == [(0, 512 * MIB), (4 * GIB, 256 * MIB)]
    finally:
        memory.close()


def test_snapshot_memory_table_checks() -> None:
    mem = memory_config(size=512 * MIB, hotplug_size=512 * MIB)  # 256 MiB at boot, 256 hot-added
    boot = [[0, 256 * MIB]]
    assert check_memory_table([*boot, [4 * GIB, 256 * MIB]], mem, 256 * MIB) == [(0, 256 * MIB), (4 * GIB, 256 * MIB)]
    for bad in ([[0, 128 * MIB]],                                       # not the boot RAM
                [*boot, [3 * GIB, 256 * MIB]],                          # outside the hotplug area
                [*boot, [4 * GIB, 768 * MIB]],                          # past its end
                [*boot, [4 * GIB + 128 * MIB, 128 * MIB], [4 * GIB, 128 * MIB]],  # out of order
                [*boot, [4 * GIB, 4097]],                               # not whole pages
                [*boot, [4 * GIB, 128 * MIB]],                          # not the config's size
                [*boot, ["4G", 1]], "ranges"):
        with pytest.raises(SnapshotError):
            check_memory_table(bad, mem, 256 * MIB)
    for boot_ram in (0, 4097, "256M", -1):
        with pytest.raises(SnapshotError):
            check_memory_table([*boot, [4 * GIB, 256 * MIB]], mem, boot_ram)
    virtio = memory_config(size=256 * MIB, hotplug_size=512 * MIB, hotplug_method=VIRTIO_MEM)
    assert check_memory_table([*boot, [4 * GIB, 512 * MIB]], virtio) == [(0, 256 * MIB), (4 * GIB, 512 * MIB)]
    with pytest.raises(SnapshotError):  # only ACPI resizes move the boot RAM away from the config's
        check_memory_table([[0, 128 * MIB], [4 * GIB, 512 * MIB]], virtio, 128 * MIB)
    with pytest.raises(SnapshotError):
        check_memory_table([*boot, [4 * GIB, 128 * MIB]], memory_config(size=256 * MIB))
