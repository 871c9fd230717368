"""What a device may do with guest RAM: the ``GuestMemory`` protocol.

Devices (``vmsh.devices``) reach guest RAM only through this protocol: bounds-checked reads and
writes at guest physical addresses that may cross from one RAM region into the next, zero-copy
``memoryview`` slices for I/O, and page discards for the balloon. An address or length outside RAM
raises ``GuestMemoryError``. The engine's mmap-backed implementation (``GuestMemoryMmap`` in
``vmsh.engine.memory``) and the unit tests' fakes both provide it; this module sits in the bottom
layer so that devices never import the engine (the split rust-vmm's ``vm-memory`` crate makes
between its ``GuestMemory`` trait and ``GuestMemoryMmap``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NewType, Protocol

GuestAddress = NewType("GuestAddress", int)


class MemoryRegion(Protocol):
    """One contiguous piece of guest RAM and its writable view."""

    start: int
    end: int
    size: int
    view: memoryview


class GuestMemory(Protocol):
    """Checked access to guest physical memory (every method raises ``GuestMemoryError`` for an
    address or length outside RAM, and then reads or writes nothing)."""

    def find_region(self, addr: int) -> MemoryRegion:
        """The region holding ``addr``."""
        ...

    def checked_offset(self, addr: int, offset: int) -> GuestAddress:
        """``addr + offset`` if that is still RAM."""
        ...

    def is_valid_range(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr+length)`` is entirely RAM (possibly across regions)."""
        ...

    def slice(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of a range that lies in one region."""
        ...

    def slices(self, addr: int, length: int) -> list[memoryview]:
        """Zero-copy views covering a range, one per region crossed."""
        ...

    def slices_of(self, addrs: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        """``slices`` of many ranges at once, in order, none for an empty one."""
        ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...

    def discard(self, addr: int, length: int) -> None:
        """Give page-aligned RAM back to the host; the guest reads zeros there next."""
        ...

    def fill(self, addr: int, length: int, value: int = 0) -> None: ...

    def read_u8(self, addr: int) -> int: ...

    def read_u16(self, addr: int) -> int: ...

    def read_u32(self, addr: int) -> int: ...

    def read_u64(self, addr: int) -> int: ...

    def write_u8(self, addr: int, value: int) -> None: ...

    def write_u16(self, addr: int, value: int) -> None: ...

    def write_u32(self, addr: int, value: int) -> None: ...

    def write_u64(self, addr: int, value: int) -> None: ...


_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))


class FixedWidthAccess:
    """Little-endian u8/u16/u32/u64 reads and writes on top of a class's own ``read`` and
    ``write`` (the guest RAM implementations share these: ``GuestMemoryMmap``, the IOMMU's
    ``TranslatedMemory``)."""

    def read(self, addr: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def read_u8(self, addr: int) -> int:
        """Read a byte."""
        return int(_U8.unpack(self.read(addr, 1))[0])

    def read_u16(self, addr: int) -> int:
        """Read a little-endian u16."""
        return int(_U16.unpack(self.read(addr, 2))[0])

    def read_u32(self, addr: int) -> int:
        """Read a little-endian u32."""
        return int(_U32.unpack(self.read(addr, 4))[0])

    def read_u64(self, addr: int) -> int:
        """Read a little-endian u64."""
        return int(_U64.unpack(self.read(addr, 8))[0])

    def write_u8(self, addr: int, value: int) -> None:
        """Write a byte."""
        self.write(addr, _U8.pack(value))

    def write_u16(self, addr: int, value: int) -> None:
        """Write a little-endian u16."""
        self.write(addr, _U16.pack(value))

    def write_u32(self, addr: int, value: int) -> None:
        """Write a little-endian u32."""
        self.write(addr, _U32.pack(value))

    def write_u64(self, addr: int, value: int) -> None:
        """Write a little-endian u64."""
        self.write(addr, _U64.pack(value))
