"""MSI-X table, PBA and control bits."""

from __future__ import annotations

import struct

import pytest

from tests.unit.devices.virtio.driver import FakeRouter
from vmsh.devices.pci.msix import (
    MSIX_CONTROL_ENABLE_BIT,
    MSIX_CONTROL_FUNCTION_MASK_BIT,
    MsixEntry,
    MsixState,
    MsixTable,
)
from vmsh.errors import DeviceStateError


def program(msix: MsixTable, vector: int, masked: bool = False) -> None:
    msix.table_write(16 * vector, struct.pack("<IIII", 0xFEE0_0000, 0, 0x40 + vector, int(masked)))


def test_msix_entries_start_masked(router: FakeRouter) -> None:
    msix = MsixTable(3, router)
    assert msix.table_read(12, 4) == b"\1\0\0\0"
    assert msix.table_size == 48 and msix.pba_size == 8
    assert msix.capability_body(0, 0x8000, 0, 0x48000) == struct.pack("<HII", 2, 0x8000, 0x48000)


def test_msix_disabled_drops_signal(router: FakeRouter) -> None:
    msix = MsixTable(2, router)
    program(msix, 0)
    msix.signal(0)
    assert router.fired == [] and msix.pba_read(0, 8) == bytes(8)


def test_msix_signal_unmasked_fires(router: FakeRouter) -> None:
    msix = MsixTable(2, router)
    msix.control_write(MSIX_CONTROL_ENABLE_BIT)
    program(msix, 1)
    assert router.routes[1] == (0xFEE0_0000, 0x41, False)
    msix.signal(1)
    msix.signal(7)  # no such vector: ignored
    assert router.fired == [1]


def test_msix_masked_entry_sets_pending_then_fires_on_unmask(router: FakeRouter) -> None:
    msix = MsixTable(2, router)
    msix.control_write(MSIX_CONTROL_ENABLE_BIT)
    program(msix, 0, masked=True)
    msix.signal(0)
    assert router.fired == [] and msix.pba_read(0, 8)[0] == 1
    msix.table_write(12, b"\0\0\0\0")  # unmask
    assert router.fired == [0] and msix.pba_read(0, 8)[0] == 0
    assert router.routes[0][2] is False


def test_msix_function_mask(router: FakeRouter) -> None:
    msix = MsixTable(2, router)
    msix.control_write(MSIX_CONTROL_ENABLE_BIT | MSIX_CONTROL_FUNCTION_MASK_BIT)
    program(msix, 0)
    assert router.routes[0][2] is True  # function mask covers the entry
    msix.signal(0)
    assert router.fired == []
    msix.control_write(MSIX_CONTROL_ENABLE_BIT)
    assert router.fired == [0] and router.routes[0][2] is False
    msix.control_write(0)
    assert router.routes[0][2] is True


def test_msix_odd_accesses_ignored(router: FakeRouter) -> None:
    msix = MsixTable(1, router)
    msix.table_write(16, b"\0" * 4)  # past the table
    msix.table_write(-4, b"\0" * 4)
    assert msix.table_read(100, 4) == bytes(4) and msix.table_read(-1, 2) == bytes(2)
    assert msix.pba_read(64, 8) == bytes(8)
    msix.table_write(14, b"\0\0\0\0")  # straddles the end of entry 0: ignored as it leaves the table
    msix.table_write(8, struct.pack("<Q", 0x1234))  # a QWORD access over data + control
    assert msix.entry(0) == MsixEntry(0, 0x1234, False)


def test_msix_state_round_trip(router: FakeRouter) -> None:
    msix = MsixTable(3, router)
    msix.control_write(MSIX_CONTROL_ENABLE_BIT)
    program(msix, 1, masked=True)
    msix.signal(1)
    state = msix.state()
    other_router = FakeRouter()
    again = MsixTable(3, other_router)
    again.restore(state)
    assert again.state() == state
    assert other_router.routes[1] == (0xFEE0_0000, 0x41, True)
    again.table_write(16 + 12, b"\0\0\0\0")
    assert other_router.fired == [1]
    with pytest.raises(DeviceStateError):
        MsixTable(2, router).restore(state)
    with pytest.raises(DeviceStateError):
        again.restore(MsixState(entries=(MsixEntry(address=-1),) * 3, pending=(False,) * 3))
