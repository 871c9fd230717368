"""A PCI function's configuration space: 4 KiB of registers with per-byte write masks.

Type 0 header layout: PCI Local Bus Specification 3.0 §6.1 (vendor/device at 0x00, command
0x04, status 0x06, revision/class 0x08, header type 0x0e, BARs 0x10-0x24, subsystem 0x2c,
capabilities pointer 0x34, interrupt line/pin 0x3c); extended space to 0x1000 per PCI Express
Base 4.0 §7.2. A read outside 0..0xfff or of a misaligned size returns all ones, as a master
abort does; writes only change the bits the function makes writable.
"""

from __future__ import annotations

import dataclasses

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

#: command register bits the guest may set: I/O space, memory space, bus master, INTx disable
COMMAND_WRITABLE = 0x0407


@dataclasses.dataclass
class PciConfigState:
    """The registers and which bits of them are writable."""

    data: bytes
    write_mask: bytes


class PciConfigSpace:
    """Registers of one function."""

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
        self.data[:] = state.data[:CONFIG_SIZE].ljust(CONFIG_SIZE, b"\0")
        self.write_mask[:] = state.write_mask[:CONFIG_SIZE].ljust(CONFIG_SIZE, b"\0")
