"""Fakes shared by the unit tests (style-anchors §15): a trigger, a bytearray guest memory."""

from __future__ import annotations

import struct


class FakeTrigger:
    """A ``Trigger`` that counts how often it fired."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class FakePhysMemory:
    """Guest physical memory as a bytearray (for the page walker and emulator tests)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def read(self, addr: int, length: int) -> bytes:
        if addr < 0 or addr + length > len(self.buf):
            from vmsh.errors import GuestMemoryError

            raise GuestMemoryError(f"{addr:#x} outside fake memory")
        return bytes(self.buf[addr:addr + length])

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > len(self.buf):
            from vmsh.errors import GuestMemoryError

            raise GuestMemoryError(f"{addr:#x} outside fake memory")
        self.buf[addr:addr + len(data)] = data

    def read_u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value))
