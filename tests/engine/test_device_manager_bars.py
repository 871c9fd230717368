"""BAR placement in ``DeviceManager`` as a guest drives it through configuration space: a BAR moved
onto another device's is left unmapped, and decodes at its address once that device has moved
away or been ejected (found by the register fuzzer, ci/fuzz/fuzz_registers.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from vmsh.devices.virtio.balloon import VirtioBalloon
from vmsh.devices.virtio.pci import BAR_SIZE, COMMON_NUM_QUEUES
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.engine.acpi.spec import PciSegment
from vmsh.engine.bus import Bus
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.kvm import Kvm
from vmsh.engine.memory import GuestMemoryMmap

WINDOW64 = (1 << 32, 1 << 30)


@pytest.fixture
def manager(kvm: Kvm) -> Iterator[DeviceManager]:
    vm = kvm.create_vm()
    vm.create_irqchip()  # irqfds (the MSI-X vectors) need it
    mem = GuestMemoryMmap.create(1 << 20)
    mem.register(vm)
    segment = PciSegment(id=0, ecam_base=0xE800_0000, mmio32=(0xC000_0000, 1 << 24), mmio64=WINDOW64)
    dm = DeviceManager(vm, mem, Bus("pio"), Bus("mmio"), (segment,), handoff=lambda work: work())
    yield dm
    dm.close()
    vm.close()
    mem.close()


def move_bar(dm: DeviceManager, slot: int, address: int) -> None:
    """What a guest does: BAR 0 low dword, then high (the move is reported with the high half)."""
    dm.buses[0].config_write(0, slot, 0, 0x10, struct.pack("<I", address & 0xFFFF_FFFF))
    dm.buses[0].config_write(0, slot, 0, 0x14, struct.pack("<I", address >> 32))


def num_queues_at(dm: DeviceManager, address: int) -> int:
    """What a driver reads at ``address + num_queues``: 0xffff where nothing decodes."""
    return int.from_bytes(dm.mmio.read(address + COMMON_NUM_QUEUES, 2), "little")


def test_a_bar_moved_onto_another_decodes_once_that_one_has_moved_away(manager: DeviceManager) -> None:
    rng = manager.add_virtio("rng", VirtioRng())  # 1 queue
    balloon = manager.add_virtio("balloon", VirtioBalloon())  # 2 queues
    home = balloon.transport.bar_address()
    assert num_queues_at(manager, home) == 2

    move_bar(manager, rng.slot, home)  # onto the balloon: refused, the rng is unmapped
    assert rng.mapped is None and num_queues_at(manager, home) == 2

    move_bar(manager, balloon.slot, home + 16 * BAR_SIZE)  # the balloon leaves
    assert num_queues_at(manager, home + 16 * BAR_SIZE) == 2
    assert rng.mapped is not None and rng.mapped.base == home
    assert num_queues_at(manager, home) == 1  # was 0xffff: the rng's BAR was never mapped again
    assert len(rng.notify_fds) == 1  # and its queue notification is back


def test_a_bar_moved_onto_an_ejected_device_decodes(manager: DeviceManager) -> None:
    rng = manager.add_virtio("rng", VirtioRng())
    balloon = manager.add_virtio("balloon", VirtioBalloon())
    home = balloon.transport.bar_address()
    move_bar(manager, rng.slot, home)
    assert rng.mapped is None

    manager.remove("balloon")
    assert rng.mapped is not None and num_queues_at(manager, home) == 1


def test_a_bar_outside_the_window_stays_unmapped(manager: DeviceManager) -> None:
    rng = manager.add_virtio("rng", VirtioRng())
    manager.add_virtio("balloon", VirtioBalloon())
    move_bar(manager, rng.slot, WINDOW64[0] + WINDOW64[1])  # just past the window
    assert rng.mapped is None
    manager.remove("balloon")
    assert rng.mapped is None
