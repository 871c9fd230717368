"""pvpanic-pci: IDs, BAR sizing and moves, the event register, snapshot round trip."""

from __future__ import annotations

import struct

import pytest

from vmsh.devices.pci.config_space import (
    BAR0,
    COMMAND,
    DEVICE_ID,
    REVISION_ID,
    VENDOR_ID,
)
from vmsh.devices.pvpanic import (
    BAR_SIZE,
    PVPANIC_CRASH_LOADED,
    PVPANIC_PANICKED,
    PvPanicDevice,
    PvPanicState,
    event_name,
)
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceStateError


def cfg(dev: PvPanicDevice, offset: int, size: int) -> int:
    return int.from_bytes(dev.config.read(offset, size), "little")


def test_pvpanic_ids() -> None:
    dev = PvPanicDevice()
    assert cfg(dev, VENDOR_ID, 2) == 0x1B36
    assert cfg(dev, DEVICE_ID, 2) == 0x0011
    assert cfg(dev, REVISION_ID, 1) == 1
    assert cfg(dev, REVISION_ID, 4) >> 8 == 0x088000
    assert cfg(dev, COMMAND, 2) & 0x2


def test_pvpanic_bar_sizing_like_linux() -> None:
    dev = PvPanicDevice()
    moves: list[tuple[int, int]] = []
    dev.on_bar_change = lambda old, new: moves.append((old, new))
    dev.set_bar_address(0xE000_0010)
    assert dev.bar_address() == 0xE000_0010
    low = cfg(dev, BAR0, 4)
    assert low & 0xF == 0  # 32-bit, non-prefetchable memory
    dev.config.write(BAR0, b"\xff" * 4)
    mask = cfg(dev, BAR0, 4) & ~0xF
    dev.config.write(BAR0, struct.pack("<I", low))
    assert (~mask & 0xFFFF_FFFF) + 1 == BAR_SIZE
    assert moves == []
    dev.config.write(BAR0, struct.pack("<I", 0xD000_0000))
    assert moves == [(0xE000_0010, 0xD000_0000)] and dev.bar_address() == 0xD000_0000
    with pytest.raises(ValueError):
        dev.set_bar_address(0xE000_0008)
    with pytest.raises(ValueError):
        dev.set_bar_address(1 << 32)


def test_pvpanic_register() -> None:
    events: list[int] = []
    dev = PvPanicDevice(on_event=events.append)
    assert dev.bar_read(0, 1) == bytes([PVPANIC_PANICKED | PVPANIC_CRASH_LOADED])
    assert dev.bar_read(0, 4) == bytes([3, 0, 0, 0])
    assert dev.bar_read(4, 4) == b"\0" * 4
    assert dev.bar_read(0, 0) == b""
    dev.bar_write(0, bytes([PVPANIC_PANICKED]))
    dev.write(0, bytes([PVPANIC_CRASH_LOADED]))
    dev.bar_write(8, b"\x01")  # not the register
    dev.bar_write(0, b"")
    assert events == [1, 2]
    assert dev.counters() == {"events": 2}
    assert [event_name(e) for e in (1, 2, 4, 0)] == ["panic", "crash_loaded", "unknown_event", "unknown_event"]


def test_pvpanic_listener_errors_do_not_escape() -> None:
    def boom(_: int) -> None:
        raise RuntimeError("listener broke")

    dev = PvPanicDevice(on_event=boom)
    dev.bar_write(0, b"\x01")
    assert dev.counters() == {"events": 1}


def test_pvpanic_state_round_trip() -> None:
    dev = PvPanicDevice()
    dev.set_bar_address(0xC000_0100)
    dev.bar_write(0, b"\x01")
    plain = to_plain(dev.state())
    state = from_plain(PvPanicState, plain)
    other = PvPanicDevice()
    other.restore(state)
    assert other.bar_address() == 0xC000_0100
    assert other.state() == dev.state()
    assert other.bar_read(0, 1) == b"\x03"


def test_pvpanic_restore_hostile_state() -> None:
    dev = PvPanicDevice()
    good = dev.state()
    with pytest.raises(DeviceStateError):
        dev.restore(PvPanicState(config=good.config, events=0x1FF))
    # A BAR register claiming 64 bits with a misaligned address is re-declared as ours.
    data = bytearray(good.config.data)
    data[BAR0:BAR0 + 4] = struct.pack("<I", 0xC000_0124)
    bad = PvPanicState(config=type(good.config)(data=bytes(data), write_mask=b"\xff" * len(data)), events=3)
    dev.restore(bad)
    assert dev.bar_address() == 0xC000_0120
    assert not dev.config.is_64bit_bar(0)
