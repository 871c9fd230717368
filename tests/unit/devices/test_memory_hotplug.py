"""The ACPI memory hotplug registers (``vmsh.devices.memory_hotplug``) as the guest's AML drives them."""

from __future__ import annotations

import struct

import pytest

from vmsh.devices.memory_hotplug import (
    EJECT,
    ENABLED,
    INSERTING,
    REMOVING,
    SLOTS,
    MemoryHotplugController,
    MemoryHotplugState,
    MemorySlotState,
)
from vmsh.errors import DeviceError, DeviceStateError


def select(c: MemoryHotplugController, slot: int) -> None:
    c.write(0, struct.pack("<I", slot))


def slot_regs(c: MemoryHotplugController, slot: int) -> tuple[int, int, int]:
    """``(base, length, status)`` of ``slot`` read as MCRS and MSTA read them."""
    select(c, slot)
    base = struct.unpack("<I", c.read(0, 4))[0] | struct.unpack("<I", c.read(4, 4))[0] << 32
    length = struct.unpack("<I", c.read(8, 4))[0] | struct.unpack("<I", c.read(0xC, 4))[0] << 32
    return base, length, c.read(0x14, 1)[0]


def test_slots_fill_in_order_and_read_back() -> None:
    c = MemoryHotplugController()
    assert [slot_regs(c, i) for i in range(SLOTS)] == [(0, 0, 0)] * SLOTS
    assert c.insert(0x1_0000_0000, 128 << 20, notify=False) == 0
    assert c.insert(0x1_0800_0000, 0x1_0000_0000) == 1
    assert slot_regs(c, 0) == (0x1_0000_0000, 128 << 20, ENABLED)
    assert slot_regs(c, 1) == (0x1_0800_0000, 0x1_0000_0000, ENABLED | INSERTING)
    assert c.used() == 2 and c.ranges() == [(0x1_0000_0000, 128 << 20), (0x1_0800_0000, 0x1_0000_0000)]


def test_acknowledge_and_eject() -> None:
    c = MemoryHotplugController()
    c.insert(1 << 32, 128 << 20)
    select(c, 0)
    c.write(0x14, bytes([INSERTING]))  # MSCN's acknowledgement
    assert slot_regs(c, 0)[2] == ENABLED
    c.write(0x14, bytes([EJECT]))  # ACPI memory is never removed: ignored
    assert slot_regs(c, 0) == (1 << 32, 128 << 20, ENABLED)
    c.write(0x14, bytes([ENABLED | REMOVING]))  # the enabled bit is not the guest's to clear
    assert slot_regs(c, 0)[2] == ENABLED


def test_bad_accesses_change_nothing() -> None:
    c = MemoryHotplugController()
    c.insert(1 << 32, 128 << 20)
    select(c, 0)
    select(c, SLOTS)  # no such slot: the selection stays
    assert c.selected == 0
    assert c.read(0x10, 4) == b"\0" * 4 and c.read(0, 2) == b"\0\0" and c.read(0x14, 4) == b"\0" * 4
    c.write(0x14, b"\x02\x00")  # wrong width
    c.write(0x8, struct.pack("<I", 5))  # read-only length
    assert slot_regs(c, 0) == (1 << 32, 128 << 20, ENABLED | INSERTING)


def test_full() -> None:
    c = MemoryHotplugController()
    for i in range(SLOTS):
        c.insert((1 << 32) + i * (128 << 20), 128 << 20)
    with pytest.raises(DeviceError, match="No ACPI slot available"):
        c.insert(1 << 40, 128 << 20)


def test_state_round_trip_and_bad_states() -> None:
    c = MemoryHotplugController()
    c.insert(1 << 32, 128 << 20)
    select(c, 0)
    again = MemoryHotplugController()
    again.restore(c.state())
    assert slot_regs(again, 0) == (1 << 32, 128 << 20, ENABLED | INSERTING)
    empty = MemorySlotState(0, 0, 0)
    for bad in (MemoryHotplugState((empty,) * (SLOTS - 1), 0),
                MemoryHotplugState((MemorySlotState(0, 0, 0x10),) + (empty,) * (SLOTS - 1), 0),
                MemoryHotplugState((MemorySlotState((1 << 64) - 1, 2, 1),) + (empty,) * (SLOTS - 1), 0),
                MemoryHotplugState((empty,) * SLOTS, SLOTS)):
        with pytest.raises(DeviceStateError):
            MemoryHotplugController().restore(bad)
