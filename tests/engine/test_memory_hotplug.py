"""Memory hotplug at the VMM level, on KVM with a tiny kernel (no guest ACPI or virtio-mem driver
involved): an ACPI resize maps a new region as a KVM slot, fills the controller's next slot and
raises the GED's memory event; a virtio-mem VM maps its region at boot and keeps it out of the
e820 map; the 64-bit PCI window starts after the hotplug area; a snapshot of a resized VM
restores the same RAM, contents, controller state and windows; a resize that the builder does not
allow is refused."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.devices.acpi import GED_MEMORY_CHANGE
from vmsh.devices.memory_hotplug import ENABLED, INSERTING
from vmsh.engine.boot.bootparams import e820_map
from vmsh.engine.builder import build_for_boot, build_from_snapshot
from vmsh.engine.events import EventMonitor
from vmsh.engine.platform_devices import GED_ADDRESS, MEMORY_HOTPLUG_ADDRESS
from vmsh.errors import VmshError

MIB, GIB = 1 << 20, 1 << 30


def _build(tmp_path: Path, memory: str):
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(tiny_kernel.kernel(tiny_kernel.SPIN))
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--memory", memory, "--serial", "null",
                                         "--console", "off"]))
    return build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)


def slot(vm, index: int) -> tuple[int, int, int]:
    """Slot ``index`` as the guest's MCRS/MSTA read it."""
    vm.mmio.write(MEMORY_HOTPLUG_ADDRESS, struct.pack("<I", index))
    words = [struct.unpack("<I", vm.mmio.read(MEMORY_HOTPLUG_ADDRESS + off, 4))[0] for off in (0, 4, 8, 0xC)]
    return words[0] | words[1] << 32, words[2] | words[3] << 32, vm.mmio.read(MEMORY_HOTPLUG_ADDRESS + 0x14, 1)[0]


def test_acpi_resize_snapshot_and_restore(tmp_path: Path) -> None:
    vm = _build(tmp_path, "size=256M,hotplug_size=1G")
    try:
        window = vm.devices.segments[0].mmio64
        assert window[0] >= 4 * GIB + GIB  # the 64-bit PCI window starts after the hotplug area
        vm.boot()
        assert slot(vm, 0) == (0, 0, 0)
        vm.resize_memory(512 * MIB)
        assert slot(vm, 0) == (4 * GIB, 256 * MIB, ENABLED | INSERTING)
        assert vm.mmio.read(GED_ADDRESS, 1)[0] & GED_MEMORY_CHANGE
        assert vm.config.memory.size == 512 * MIB and vm.info()["memory_actual_size"] == 512 * MIB
        vm.memory.write(4 * GIB + 256 * MIB - 5, b"tail!")
        # the guest's MSCN acknowledges the insertion
        vm.mmio.write(MEMORY_HOTPLUG_ADDRESS + 0x14, bytes([INSERTING]))
        # the e820 map stays boot RAM only: hot-added RAM comes through the memory device
        assert all(addr + size <= 256 * MIB for addr, size, kind in e820_map(vm.memory, reserve_ecam=False))
        with pytest.raises(VmshError, match="not a valid size"):
            vm.resize_memory(600 * MIB)
        vm.pause()
        snap = tmp_path / "snap"
        snap.mkdir()
        vm.snapshot(str(snap))
    finally:
        vm.shutdown()
    assert (snap / "memory-ranges").stat().st_size == 512 * MIB
    restored = build_from_snapshot(str(snap), m.RestoreConfig(source_url=f"file://{snap}"), EventMonitor(None),
                                   lambda kind, detail: None, run_now)
    try:
        assert [(r.start, r.size, r.hotplug) for r in restored.memory.regions] == [
            (0, 256 * MIB, False), (4 * GIB, 256 * MIB, True)]
        assert restored.memory.read(4 * GIB + 256 * MIB - 5, 5) == b"tail!"
        assert restored.devices.segments[0].mmio64 == window
        assert slot(restored, 0) == (4 * GIB, 256 * MIB, ENABLED)
        restored.resume()
        restored.resize_memory(640 * MIB)  # it grows on after the first range
        assert slot(restored, 1) == (4 * GIB + 256 * MIB, 128 * MIB, ENABLED | INSERTING)
    finally:
        restored.shutdown()


def test_virtio_mem_region_is_mapped_but_not_boot_ram(tmp_path: Path) -> None:
    vm = _build(tmp_path, "size=256M,hotplug_method=virtio-mem,hotplug_size=512M,hotplugged_size=64M")
    try:
        assert [(r.start, r.size, r.hotplug) for r in vm.memory.regions] == [
            (0, 256 * MIB, False), (4 * GIB, 512 * MIB, True)]
        assert all(addr + size <= 256 * MIB for addr, size, kind in e820_map(vm.memory, reserve_ecam=False))
        device = vm.devices.devices["mem0"].transport.device
        assert (device.addr, device.region_size, device.requested_size) == (4 * GIB, 512 * MIB, 64 * MIB)
        # nothing plugged yet: the guest has what it booted with
        assert vm.info()["memory_actual_size"] == 256 * MIB
        vm.resize_memory(384 * MIB)
        assert device.requested_size == 128 * MIB and vm.config.memory.hotplugged_size == 128 * MIB
        with pytest.raises(VmshError, match="Failed to virtio-mem resize"):
            vm.resize_memory(384 * MIB)  # the size already asked for (cloud-hypervisor's error)
    finally:
        vm.shutdown()


def test_no_memory_hotplug_without_hotplug_size(tmp_path: Path) -> None:
    vm = _build(tmp_path, "size=256M")
    try:
        assert vm.platform.memory_hotplug is None
        with pytest.raises(VmshError, match="no memory hotplug area"):
            vm.resize_memory(512 * MIB)
        assert vm.config.memory.size == 256 * MIB
    finally:
        vm.shutdown()
