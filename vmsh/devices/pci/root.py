"""One PCI segment's bus 0: the host bridge and its slots, reached through configuration
mechanism #1 (CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc; PCI Local Bus Specification 3.0
§3.2.2.3.2) and through ECAM (PCI Express Base 4.0 §7.2.2: offset = bus<<20 | device<<15 |
function<<12 | register).

Only bus 0 exists. An access to an empty slot, another bus or a function other than 0 reads
all ones (a master abort), which is how the guest learns that nothing is there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from vmsh.devices.pci.config_space import PciConfigSpace
from vmsh.devices.state import check_bits, expect_state
from vmsh.state_types import U32

NUM_SLOTS = 32
#: the host bridge cloud-hypervisor presents at 00:00.0
HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x0D57
HOST_BRIDGE_CLASS = 0x060000  # bridge, host bridge

CONFIG_ADDRESS_ENABLE = 0x8000_0000
#: the CONFIG_ADDRESS bits that hold something: enable, bus, device, function, dword register
CONFIG_ADDRESS_MASK = 0x80FF_FFFC


class ConfigRegisters(Protocol):
    """A configuration space as the bus reaches it (``PciConfigSpace``, or the engine's view of
    one that takes its device's lock)."""

    def read(self, register: int, size: int) -> bytes: ...

    def write(self, register: int, data: bytes) -> None: ...


class PciFunction(Protocol):
    """What the bus needs of a device: access to its configuration space."""

    @property
    def config(self) -> ConfigRegisters: ...


class HostBridge:
    """The segment's host bridge: a configuration space and nothing else."""

    def __init__(self) -> None:
        self.config = PciConfigSpace(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, HOST_BRIDGE_CLASS)


class PciBus:
    """Bus 0 of one segment."""

    def __init__(self, segment: int = 0) -> None:
        self.segment = segment
        self.slots: list[PciFunction | None] = [None] * NUM_SLOTS
        self.slots[0] = HostBridge()
        self._lock = threading.Lock()

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Place ``function`` in ``slot`` or the first free one; returns the slot.

        :raises ValueError: when the slot is taken or none is free.
        """
        with self._lock:
            if slot is None:
                free = [i for i in range(1, NUM_SLOTS) if self.slots[i] is None]
                if not free:
                    raise ValueError(f"No free slot on PCI segment {self.segment}")
                slot = free[0]
            elif not 0 < slot < NUM_SLOTS or self.slots[slot] is not None:
                raise ValueError(f"PCI slot {slot} on segment {self.segment} is not free")
            self.slots[slot] = function
            return slot

    def config_read(self, bus: int, device: int, function: int, register: int, size: int) -> bytes:
        target = self.slots[device] if bus == 0 and function == 0 and device < NUM_SLOTS else None
        if target is None:
            return b"\xff" * size
        return target.config.read(register, size)

    def config_write(self, bus: int, device: int, function: int, register: int, data: bytes) -> None:
        target = self.slots[device] if bus == 0 and function == 0 and device < NUM_SLOTS else None
        if target is not None:
            target.config.write(register, data)


@dataclass(frozen=True, slots=True)
class PciConfigIoState:
    """The CONFIG_ADDRESS latch (a guest may be snapshotted between 0xcf8 and 0xcfc)."""

    address: U32 = 0


class PciConfigIo:
    """Configuration mechanism #1 on I/O ports 0xcf8-0xcff (mapped with length 8).

    The functions' configuration spaces belong to their devices' states; this holds only
    the CONFIG_ADDRESS latch. The ECAM window (:class:`PciEcam`) and the bus are stateless.
    """

    state_type = PciConfigIoState

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.address = 0

    def _target(self) -> tuple[int, int, int, int] | None:
        if not self.address & CONFIG_ADDRESS_ENABLE:
            return None
        return (self.address >> 16) & 0xFF, (self.address >> 11) & 0x1F, (self.address >> 8) & 0x7, self.address & 0xFC

    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address.to_bytes(4, "little")
            return b"\xff" * size
        target = self._target()
        if target is None:
            return b"\xff" * size
        bus, device, function, register = target
        return self.bus.config_read(bus, device, function, register + offset - 4, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 4:
            if offset == 0 and len(data) == 4:
                self.address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK
            return
        target = self._target()
        if target is not None:
            bus, device, function, register = target
            self.bus.config_write(bus, device, function, register + offset - 4, data)

    def state(self) -> PciConfigIoState:
        return PciConfigIoState(self.address)

    def restore(self, state: PciConfigIoState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class or address bits the latch does not hold.
        """
        s = expect_state(state, PciConfigIoState)
        check_bits("address", s.address, CONFIG_ADDRESS_MASK)
        self.address = s.address


class PciEcam:
    """The ECAM window of one segment (1 MiB: bus 0 only)."""

    SIZE = 1 << 20

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def read(self, offset: int, size: int) -> bytes:
        return self.bus.config_read(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF, size)

    def write(self, offset: int, data: bytes) -> None:
        self.bus.config_write(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF, data)
