"""CMOS, the ACPI shutdown/reset port, PM timer, GED, and PCI configuration access."""

from __future__ import annotations

import calendar
import struct

from vmsh.devices.acpi import POWEROFF_VALUE, AcpiPmTimer, AcpiShutdown, Ged
from vmsh.devices.legacy.cmos import Cmos
from vmsh.devices.pci.config_space import PciConfigSpace
from vmsh.devices.pci.root import PciBus, PciConfigIo, PciEcam


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


NOW = calendar.timegm((2026, 11, 27, 13, 45, 30))


def cmos_read(dev: Cmos, index: int) -> int:
    dev.write(0, bytes([index]))
    return dev.read(1, 1)[0]


def test_cmos_time_in_bcd() -> None:
    dev = Cmos(512 << 20, 0, clock=lambda: NOW)
    assert [cmos_read(dev, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [0x30, 0x45, 0x13, 0x27, 0x11, 0x26, 0x20]
    assert cmos_read(dev, 0x0D) & 0x80


def test_cmos_binary_mode_and_time_set() -> None:
    dev = Cmos(512 << 20, 0, clock=lambda: NOW)
    dev.write(0, b"\x0b")
    dev.write(1, bytes([0x06]))  # binary, 24h
    assert cmos_read(dev, 4) == 13
    dev.write(0, b"\x04")
    dev.write(1, bytes([15]))  # hours = 15: two hours ahead
    assert dev.offset_seconds == 7200
    assert cmos_read(dev, 4) == 15


def test_cmos_memory_bytes() -> None:
    dev = Cmos(3 << 30, 1 << 30)
    above_16m = ((3 << 30) - (16 << 20)) >> 16
    assert cmos_read(dev, 0x34) | cmos_read(dev, 0x35) << 8 == above_16m
    assert cmos_read(dev, 0x5B) | cmos_read(dev, 0x5C) << 8 | cmos_read(dev, 0x5D) << 16 == (1 << 30) >> 16


def test_cmos_state_round_trip() -> None:
    dev = Cmos(512 << 20, 0)
    dev.write(0, b"\x40")
    dev.write(1, b"\x99")
    again = Cmos(512 << 20, 0)
    again.restore(dev.state())
    assert cmos_read(again, 0x40) == 0x99


def test_acpi_shutdown_port() -> None:
    off, reset = Counter(), Counter()
    dev = AcpiShutdown(off, reset)
    dev.write(0, bytes([POWEROFF_VALUE]))
    dev.write(0, b"\x01")
    dev.write(0, b"\x22")  # another sleep state: ignored
    assert (off.count, reset.count) == (1, 1)


def test_pm_timer_counts_at_its_frequency() -> None:
    now = [0]
    timer = AcpiPmTimer(clock=lambda: now[0])
    now[0] = 1_000_000_000
    assert struct.unpack("<I", timer.read(0, 4))[0] == 3_579_545


def test_ged_read_clears() -> None:
    irq = Counter()
    ged = Ged(irq)
    ged.notify(0x8)
    assert irq.count == 1
    assert ged.read(0, 1) == b"\x08"
    assert ged.read(0, 1) == b"\x00"


def config_address(device: int, register: int, bus: int = 0, function: int = 0) -> bytes:
    return (0x8000_0000 | bus << 16 | device << 11 | function << 8 | register).to_bytes(4, "little")


def test_host_bridge_through_cf8_and_ecam() -> None:
    bus = PciBus()
    io, ecam = PciConfigIo(bus), PciEcam(bus)
    io.write(0, config_address(0, 0))
    assert io.read(4, 4) == struct.pack("<HH", 0x8086, 0x0D57)
    assert ecam.read(0x08, 4) == bytes([0, 0, 0, 6])  # revision 0, class 06/00/00
    io.write(0, config_address(3, 0))
    assert io.read(4, 2) == b"\xff\xff"  # empty slot
    assert ecam.read((1 << 20) | 0, 4) == b"\xff" * 4  # another bus


def test_config_space_write_mask_and_bad_accesses() -> None:
    space = PciConfigSpace(0x1AF4, 0x1042, 0x018000)
    space.write(0x00, b"\x00\x00")  # vendor id is read-only
    assert space.read(0, 2) == b"\xf4\x1a"
    space.write(0x04, struct.pack("<H", 0xFFFF))
    assert struct.unpack("<H", space.read(0x04, 2))[0] == 0x0407
    assert space.read(0x1001, 1) == b"\xff" and space.read(0x02, 4) == b"\xff" * 4


def test_pci_bus_slots() -> None:
    bus = PciBus()
    fn = type("F", (), {"config": PciConfigSpace(1, 2, 3)})()
    assert bus.add(fn) == 1
    try:
        bus.add(fn, slot=1)
    except ValueError as err:
        assert "not free" in str(err)
    else:
        raise AssertionError("slot 1 was taken")


def test_cmos_reset_only_through_index_0x8f() -> None:
    reset = Counter()
    dev = Cmos(512 << 20, 0, reset)
    dev.write(0, b"\x0f")
    dev.write(1, b"\x0a")  # SMP bring-up: warm reset vector...
    dev.write(1, b"\x00")  # ...and its clearing: no reset
    assert reset.count == 0
    dev.write(0, b"\x8f")
    dev.write(1, b"\x00")  # real-mode restart
    assert reset.count == 1
