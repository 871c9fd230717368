"""PciConfigSpace helpers: memory BARs with size masks, and the capability list."""

from __future__ import annotations

import struct

import pytest

from vmsh.devices.pci.config_space import (
    BAR0,
    CAPABILITIES_POINTER,
    STATUS,
    PciConfigSpace,
)


def test_config_space_32bit_bar_sizing() -> None:
    space = PciConfigSpace(1, 2, 3)
    space.add_memory_bar(0, 0x1000, is_64bit=False, prefetchable=True)
    space.write(BAR0, b"\xff" * 4)
    assert struct.unpack("<I", space.read(BAR0, 4))[0] == 0xFFFF_F008
    space.write(BAR0, struct.pack("<I", 0xFEBF_1234))
    assert space.bar_address(0) == 0xFEBF_1000 and not space.is_64bit_bar(0)


def test_config_space_64bit_bar() -> None:
    space = PciConfigSpace(1, 2, 3)
    space.add_memory_bar(2, 0x80000, is_64bit=True)
    assert space.is_64bit_bar(2)
    space.set_bar_address(2, 0x2_0008_0000)
    assert space.read(BAR0 + 8, 4) == struct.pack("<I", 0x0008_0004)
    assert space.read(BAR0 + 12, 4) == struct.pack("<I", 2)
    assert space.bar_address(2) == 0x2_0008_0000
    with pytest.raises(ValueError):
        space.add_memory_bar(5, 0x1000, is_64bit=True)
    with pytest.raises(ValueError):
        space.add_memory_bar(0, 0x1001, is_64bit=False)


def test_config_space_capability_list() -> None:
    space = PciConfigSpace(1, 2, 3)
    first = space.add_capability(0x09, b"\x10" + bytes(13), writable_mask=b"\0\xff")
    second = space.add_capability(0x11, bytes(10))
    assert first == 0x40 and second == 0x50  # 16 bytes, then DWORD aligned
    assert space.get(CAPABILITIES_POINTER, 1) == 0x40 and space.get(STATUS, 2) & 0x10
    assert space.capabilities() == [(0x09, 0x40), (0x11, 0x50)]
    space.write(0x42, b"\x77\x77")
    assert space.read(0x42, 2) == b"\x10\x77"  # only the masked byte changed
    with pytest.raises(ValueError):
        for _ in range(20):
            space.add_capability(0x09, bytes(30))
