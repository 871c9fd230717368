"""A PCI function's configuration space: 4 KiB of registers with per-byte write masks.

Type 0 header layout: PCI Local Bus Specification 3.0 §6.1 (vendor/device at 0x00, command
0x04, status 0x06, revision/class 0x08, header type 0x0e, BARs 0x10-0x24, subsystem 0x2c,
capabilities pointer 0x34, interrupt line/pin 0x3c); extended space to 0x1000 per PCI Express
Base 4.0 §7.2. A read outside 0..0xfff or of a misaligned size returns all ones, as a master
abort does; writes only change the bits the function makes writable.
"""

from __future__ import annotations

import dataclasses

from vmsh.devices.state import check_length, expect_state
from vmsh.errors import DeviceStateError

CONFIG_SIZE = 0x1000

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # prog-if at 0x09, subclass 0x0a, class 0x0b
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
#: first byte after the type 0 header: capabilities live in 0x40..0xff (§6.7)
CAPABILITIES_START = 0x40
NUM_BARS = 6

# STATUS register bits (§6.2.3)
STATUS_CAPABILITIES_LIST_BIT = 0x0010  # the capabilities pointer at 0x34 is valid
# COMMAND register bits (§6.2.2)
COMMAND_MEMORY_SPACE_BIT = 0x0002  # the function decodes its memory BARs

# Memory BAR low bits (§6.2.5.1): bit 0 = 0 for memory, bits 2:1 type, bit 3 prefetchable
BAR_MEM_TYPE_64_BIT = 0x4  # 64-bit BAR: the next BAR register holds the upper 32 bits
BAR_MEM_PREFETCHABLE_BIT = 0x8
BAR_MEM_ADDRESS_MASK = 0xFFFF_FFF0

#: command register bits the guest may set: I/O space, memory space, bus master, INTx disable
COMMAND_WRITABLE = 0x0407


@dataclasses.dataclass(frozen=True, slots=True)
class PciConfigState:
    """The registers and which bits of them are writable."""

    data: bytes
    write_mask: bytes


class PciConfigSpace:
    """Registers of one function."""

    state_type = PciConfigState

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, header_type: int = 0) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.write_mask = bytearray(CONFIG_SIZE)
        self.put(VENDOR_ID, vendor, 2)
        self.put(DEVICE_ID, device, 2)
        self.put(REVISION_ID, revision, 1)
        self.put(CLASS_CODE, class_code, 3)
        self.put(HEADER_TYPE, header_type, 1)
        self.put(SUBSYSTEM_VENDOR_ID, subsystem_vendor, 2)
        self.put(SUBSYSTEM_ID, subsystem, 2)
        self.writable(COMMAND, COMMAND_WRITABLE, 2)
        self.writable(INTERRUPT_LINE, 0xFF, 1)
        #: length of each capability added by ``add_capability``, by offset
        self.cap_lengths: dict[int, int] = {}

    # -- device-side helpers -------------------------------------------------------------------

    def add_memory_bar(self, index: int, size: int, *, is_64bit: bool, prefetchable: bool = False) -> None:
        """Declare BAR ``index`` as a memory BAR of ``size`` bytes (a power of two >= 16).

        The write mask keeps the low ``log2(size)`` bits at zero, so the guest's sizing
        (write all ones, read back ``~(size - 1)``; §6.2.5.1) works; a 64-bit BAR also uses
        register ``index + 1`` for the upper half.
        """
        if size < 16 or size & (size - 1) or not 0 <= index < NUM_BARS - (1 if is_64bit else 0):
            raise ValueError(f"invalid BAR {index} of size {size:#x}")
        flags = (BAR_MEM_TYPE_64_BIT if is_64bit else 0) | (BAR_MEM_PREFETCHABLE_BIT if prefetchable else 0)
        mask = ~(size - 1) & ((1 << 64) - 1 if is_64bit else 0xFFFF_FFFF)
        offset = BAR0 + 4 * index
        self.put(offset, flags, 4)
        self.writable(offset, mask & BAR_MEM_ADDRESS_MASK, 4)
        if is_64bit:
            self.put(offset + 4, 0, 4)
            self.writable(offset + 4, mask >> 32, 4)

    def is_64bit_bar(self, index: int) -> bool:
        """True if BAR ``index`` is a 64-bit memory BAR."""
        low = self.get(BAR0 + 4 * index, 4)
        return not low & 1 and low & 0x6 == BAR_MEM_TYPE_64_BIT

    def bar_address(self, index: int) -> int:
        """The address currently programmed in memory BAR ``index`` (both halves of a 64-bit BAR)."""
        addr = self.get(BAR0 + 4 * index, 4) & BAR_MEM_ADDRESS_MASK
        if self.is_64bit_bar(index):
            addr |= self.get(BAR0 + 4 * index + 4, 4) << 32
        return addr

    def set_bar_address(self, index: int, addr: int) -> None:
        """Program memory BAR ``index`` (device side, e.g. the VMM's initial allocation)."""
        offset = BAR0 + 4 * index
        flags = self.get(offset, 4) & ~BAR_MEM_ADDRESS_MASK
        mask = self.get_mask(offset, 4)
        self.put(offset, (addr & mask) | flags, 4)
        if self.is_64bit_bar(index):
            self.put(offset + 4, (addr >> 32) & self.get_mask(offset + 4, 4), 4)

    def add_capability(self, cap_id: int, body: bytes, writable_mask: bytes = b"") -> int:
        """Append a capability to the list (§6.7) and return its offset in config space.

        ``body`` is everything after the two header bytes (ID, next pointer); ``writable_mask``
        (aligned with ``body``) marks the bits the guest may change.
        """
        last = 0
        offset = self.get(CAPABILITIES_POINTER, 1)
        while offset:
            last = offset
            offset = self.get(offset + 1, 1)
        start = CAPABILITIES_START if not last else last + self.cap_lengths[last]
        start = (start + 3) & ~3  # capabilities are DWORD aligned (§6.7)
        length = 2 + len(body)
        if start + length > 0x100:
            raise ValueError("no room for another PCI capability")
        self.data[start] = cap_id
        self.data[start + 1] = 0
        self.data[start + 2 : start + length] = body
        self.write_mask[start + 2 : start + 2 + len(writable_mask)] = writable_mask
        self.cap_lengths[start] = length
        if last:
            self.data[last + 1] = start
        else:
            self.put(CAPABILITIES_POINTER, start, 1)
            self.put(STATUS, self.get(STATUS, 2) | STATUS_CAPABILITIES_LIST_BIT, 2)
        return start

    def capabilities(self) -> list[tuple[int, int]]:
        """``(cap_id, offset)`` of every capability, in list order (bounded: at most 48)."""
        caps: list[tuple[int, int]] = []
        offset = self.get(CAPABILITIES_POINTER, 1)
        while offset and len(caps) < 48:
            caps.append((self.data[offset], offset))
            offset = self.data[offset + 1]
        return caps

    def get_mask(self, offset: int, size: int) -> int:
        """The guest-writable bits of a register."""
        return int.from_bytes(self.write_mask[offset : offset + size], "little")

    def put(self, offset: int, value: int, size: int) -> None:
        """Set a register (device side; ignores write masks)."""
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def writable(self, offset: int, mask: int, size: int) -> None:
        """Let the guest change the ``mask`` bits of a register."""
        self.write_mask[offset : offset + size] = mask.to_bytes(size, "little")

    def read(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE or offset % size:
            return b"\xff" * max(size, 0)
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE or offset % size:
            return
        for i, byte in enumerate(data):
            mask = self.write_mask[offset + i]
            self.data[offset + i] = (self.data[offset + i] & ~mask) | (byte & mask)

    def state(self) -> PciConfigState:
        return PciConfigState(data=bytes(self.data), write_mask=bytes(self.write_mask))

    def restore(self, state: PciConfigState) -> None:
        """Load ``state`` (untrusted): it must be a full space of the same function.

        :raises DeviceStateError: for another state class, a space that is not 4 KiB, or
            another vendor, device or class than this function's (a snapshot of another device).
        """
        s = expect_state(state, PciConfigState)
        check_length("data", s.data, CONFIG_SIZE)
        check_length("write_mask", s.write_mask, CONFIG_SIZE)
        for name, offset, size in (("vendor_id", VENDOR_ID, 2), ("device_id", DEVICE_ID, 2),
                                   ("class_code", CLASS_CODE, 3)):
            saved, own = int.from_bytes(s.data[offset:offset + size], "little"), self.get(offset, size)
            if saved != own:
                raise DeviceStateError(f"data.{name}", f"{saved:#x} is not this function's {own:#x}")
        self.data[:] = s.data
        self.write_mask[:] = s.write_mask
