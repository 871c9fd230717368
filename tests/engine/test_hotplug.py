"""PCI hotplug at the VMM level, on KVM with a tiny kernel (no guest driver involved): the
device is plugged and announced through the hotplug registers and the GED; a guest's eject
through B0EJ unplugs it, updates the config and emits ``device-removed``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.devices.acpi import GED_PCI_CHANGE
from vmsh.engine.acpi import pci_hotplug
from vmsh.engine.builder import build_for_boot
from vmsh.engine.events import EventMonitor
from vmsh.engine.platform_devices import GED_ADDRESS, PCI_HOTPLUG_ADDRESS
from vmsh.engine.pvm import is_pvm_host
from vmsh.errors import VmshError


class Events(EventMonitor):
    def __init__(self) -> None:
        super().__init__(None)
        self.seen: list[tuple[str, str, dict | None]] = []

    def emit(self, source, event, properties=None):
        self.seen.append((source, event, properties))


@pytest.fixture
def vm(tmp_path: Path):
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--serial", "null", "--console", "off"]))
    events = Events()
    machine = build_for_boot(cfg, events, lambda kind, detail: None, run_now)
    machine.test_events = events
    yield machine
    machine.shutdown()


def test_hotplugged_disk_is_announced_and_ejected(vm, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    disk = m.DiskConfig(path=str(image), id="hot0")
    info = vm.hotplug_device("disks", disk)
    slot = int(info["bdf"].split(":")[2].split(".")[0], 16)
    assert info["id"] == "hot0" and info["bdf"].startswith("0000:00:")
    # the guest's view: a virtio-blk function in that slot, its bit in PCIU, the GED event
    assert vm.devices.buses[0].config_read(0, slot, 0, 0, 4) == bytes.fromhex("f4 1a 42 10")
    assert vm.mmio.read(GED_ADDRESS, 1)[0] & GED_PCI_CHANGE
    assert int.from_bytes(vm.mmio.read(PCI_HOTPLUG_ADDRESS, 4), "little") == 1 << slot
    vm.config.disks = [disk]
    # removal: the bit in PCID, then the guest ejects through B0EJ
    assert vm.unplug_device("hot0")
    assert int.from_bytes(vm.mmio.read(PCI_HOTPLUG_ADDRESS + 4, 4), "little") == 1 << slot
    vm.mmio.write(PCI_HOTPLUG_ADDRESS + 8, (1 << slot).to_bytes(4, "little"))
    assert "hot0" not in vm.devices.devices
    assert vm.devices.buses[0].config_read(0, slot, 0, 0, 4) == b"\xff" * 4
    assert vm.config.disks is None
    assert ("vm", "device-removed", {"id": "hot0", "bdf": info["bdf"]}) in vm.test_events.seen


def test_unknown_device_cannot_be_unplugged(vm) -> None:
    assert not vm.unplug_device("nope")


def test_hotplug_uses_only_the_declared_spare_slots(vm, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    declared = vm.platform.hotplug.declared[0]
    occupied = {e.slot for e in vm.devices.devices.values()}
    spare = len([s for s in declared if s not in occupied])
    assert spare == (pci_hotplug.SPARE_SLOTS_PVM if is_pvm_host() else 31 - len(occupied))
    # the DSDT has a slot device for exactly those slots
    dsdt = vm.memory.read(0, 1 << 20)  # the tables are in low memory
    for slot in range(1, 32):
        assert (pci_hotplug.slot_name(slot).encode() + b"\x08_SUN" in dsdt) == (slot in declared), slot
    plugged = [vm.hotplug_device("disks", m.DiskConfig(path=str(image), id=f"hot{i}")) for i in range(spare)]
    assert sorted(int(p["bdf"].split(":")[2][:2], 16) for p in plugged) == [s for s in declared if s not in occupied]
    with pytest.raises(VmshError, match="No free hotplug slot on PCI segment 0"):
        vm.hotplug_device("disks", m.DiskConfig(path=str(image), id="one-too-many"))
    assert "one-too-many" not in vm.devices.devices


def test_declared_slots_are_the_occupied_ones_and_the_first_free_ones() -> None:
    assert pci_hotplug.declared_slots(set()) == list(range(1, 32))
    assert pci_hotplug.declared_slots(set(), 8) == list(range(1, 9))
    assert pci_hotplug.declared_slots({0, 2, 20}, 8) == sorted({2, 20} | {1, 3, 4, 5, 6, 7, 8, 9})
    assert pci_hotplug.declared_slots(set(range(1, 32)), 8) == list(range(1, 32))
