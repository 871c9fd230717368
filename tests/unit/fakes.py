"""Fakes shared by the unit tests: a trigger, a bytearray guest memory, a clock, an fd watcher."""

from __future__ import annotations

import struct
import threading

from vmsh.devices.ratelimit import NS_PER_MS


class FakeTrigger:
    """A ``Trigger`` that counts how often it fired; ``fired`` is set from the first time on."""

    def __init__(self) -> None:
        self.count = 0
        self.fired = threading.Event()

    def trigger(self) -> None:
        self.count += 1
        self.fired.set()


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


class FakeClock:
    """Monotonic nanoseconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1_000 * NS_PER_MS

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)


class FakeWatcher:
    """The engine's I/O loop as a dict: the test calls the callbacks itself."""

    def __init__(self) -> None:
        self.fds: dict[int, object] = {}

    def add(self, fd: int, callback: object) -> None:
        self.fds[fd] = callback

    def remove(self, fd: int) -> None:
        self.fds.pop(fd, None)
