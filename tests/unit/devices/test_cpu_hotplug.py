"""The CPU hotplug registers (``vmsh.devices.cpu_hotplug``) as the guest's AML drives them."""

from __future__ import annotations

import struct

import pytest

from vmsh.devices.cpu_hotplug import (
    EJECT,
    ENABLED,
    INSERTING,
    REMOVING,
    CpuHotplugController,
    CpuHotplugState,
)
from vmsh.errors import DeviceStateError


def make(max_vcpus: int = 4, present: int = 2) -> tuple[CpuHotplugController, list[int]]:
    ejected: list[int] = []
    return CpuHotplugController(max_vcpus, present, ejected.append), ejected


def select(c: CpuHotplugController, index: int) -> None:
    c.write(0, struct.pack("<I", index))


def status(c: CpuHotplugController, index: int) -> int:
    select(c, index)
    return c.read(4, 1)[0]


def test_boot_vcpus_are_enabled_the_rest_absent() -> None:
    c, _ = make()
    assert [status(c, i) for i in range(4)] == [ENABLED, ENABLED, 0, 0]
    assert c.read(0, 4) == struct.pack("<I", 3)  # the selection reads back
    assert c.enabled() == 2


def test_insert_is_seen_until_acknowledged() -> None:
    c, _ = make()
    c.insert(2)
    assert status(c, 2) == ENABLED | INSERTING
    c.write(4, bytes([INSERTING]))  # CINS = 1: the guest has handled it
    assert status(c, 2) == ENABLED


def test_removal_then_eject() -> None:
    c, ejected = make()
    c.request_removal(1)
    assert status(c, 1) == ENABLED | REMOVING
    c.write(4, bytes([REMOVING]))
    assert status(c, 1) == ENABLED and ejected == []
    c.write(4, bytes([EJECT]))
    assert ejected == [1]
    assert status(c, 1) == 0
    c.write(4, bytes([EJECT]))  # ejecting an absent vCPU does nothing
    assert ejected == [1]


@pytest.mark.parametrize("index", [0, 1])
def test_only_a_vcpu_asked_to_go_can_be_ejected(index: int) -> None:
    c, ejected = make()
    select(c, index)
    c.write(4, bytes([EJECT]))
    assert ejected == [] and status(c, index) == ENABLED
    assert c.pending_removals() == []


def test_pending_removal_outlives_the_guests_acknowledgement() -> None:
    c, ejected = make(present=3)
    c.request_removal(2)
    select(c, 2)
    c.write(4, bytes([REMOVING]))  # CSCN acknowledges before the guest has offlined it
    assert c.pending_removals() == [2]
    assert status(c, 2) == ENABLED  # the bookkeeping bit is not the guest's to see
    c.write(4, bytes([EJECT]))
    assert ejected == [2] and c.pending_removals() == []


def test_writes_of_zero_change_nothing_and_selection_out_of_range_is_ignored() -> None:
    c, ejected = make()
    c.insert(3)
    select(c, 3)
    c.write(4, b"\0")
    assert status(c, 3) == ENABLED | INSERTING
    select(c, 9)  # beyond max_vcpus: the selection stays
    assert c.read(0, 4) == struct.pack("<I", 3)
    c.write(8, struct.pack("<I", 1))  # CDAT: not a register here
    assert ejected == [] and c.read(8, 4) == b"\0" * 4


def test_state_round_trip_and_refusals() -> None:
    c, _ = make()
    c.insert(2)
    select(c, 2)
    state = c.state()
    assert state == CpuHotplugState((ENABLED, ENABLED, ENABLED | INSERTING, 0), 2)
    other, _ = make()
    other.restore(state)
    assert other.state() == state
    with pytest.raises(DeviceStateError):
        other.restore(CpuHotplugState((ENABLED,) * 3, 0))
    with pytest.raises(DeviceStateError):
        other.restore(CpuHotplugState((ENABLED | EJECT, 0, 0, 0), 0))
