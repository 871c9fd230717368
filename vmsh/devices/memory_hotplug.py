"""The registers behind ACPI memory hotplug, the scheme of cloud-hypervisor's ``MemoryManager``
(vmm/src/memory_manager.rs, after QEMU's ``memory-hotplug`` block).

A 0x18-byte MMIO block with ``SLOTS`` (8) memory slots, each a hot-added RAM range. A write of
the selection register (offset 0) selects a slot; then offsets 0x0/0x4 read its base (low/high
32 bits), 0x8/0xC its length, and the byte at 0x14 its status: ``ENABLED`` (the slot holds RAM),
``INSERTING`` (the VMM added it and the guest has not handled that yet) and ``REMOVING``.
Writing ``INSERTING`` or ``REMOVING`` to the status clears that flag (the guest acknowledges
the event); ``EJECT`` is ignored, as in cloud-hypervisor: ACPI memory never shrinks.
``vmsh.engine.acpi.memory_hotplug`` has the AML side (the guest's ``acpi_memhotplug`` driver
reads ``_STA`` and ``_CRS`` of each ``PNP0C80`` device through it). No KVM knowledge here:
the engine maps the RAM and registers the slot, this keeps the table.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from vmsh.devices.state import check_bits, check_length, check_range, expect_state
from vmsh.errors import DeviceError
from vmsh.state_types import U8, U64

LOG = logging.getLogger(__name__)

#: register offsets (cloud-hypervisor's BASE_OFFSET_LOW ... STATUS_OFFSET)
SELECTION_OFFSET = 0x0
BASE_LOW, BASE_HIGH, LENGTH_LOW, LENGTH_HIGH = 0x0, 0x4, 0x8, 0xC
STATUS_OFFSET = 0x14
REGISTER_SIZE = 0x18
#: cloud-hypervisor's HOTPLUG_COUNT
SLOTS = 8
#: status bits
ENABLED, INSERTING, REMOVING, EJECT = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_STATUS_BITS = ENABLED | INSERTING | REMOVING


@dataclass(frozen=True, slots=True)
class MemorySlotState:
    """One slot: its RAM range and status bits."""

    base: U64
    length: U64
    status: U8


@dataclass(frozen=True, slots=True)
class MemoryHotplugState:
    """Every slot and the selected one."""

    slots: tuple[MemorySlotState, ...]
    selected: U8


class MemoryHotplugController:
    """The memory hotplug registers: ``SLOTS`` slots, filled in order by ``insert``."""

    thread_safe = True
    state_type = MemoryHotplugState

    def __init__(self) -> None:
        self._slots = [MemorySlotState(0, 0, 0) for _ in range(SLOTS)]
        self.selected = 0
        self._lock = threading.Lock()

    # -- the VMM's side --------------------------------------------------------------------

    def used(self) -> int:
        """How many slots hold RAM."""
        with self._lock:
            return sum(1 for s in self._slots if s.status & ENABLED)

    def insert(self, base: int, length: int, *, notify: bool = True) -> int:
        """Put the RAM ``[base, base+length)`` in the next free slot; with ``notify`` it is
        marked inserting, so the guest's next scan adds it (RAM hot-added at boot is not:
        the guest finds it enabled when it first looks). Returns the slot.

        :raises DeviceError: when every slot is used (cloud-hypervisor's "No ACPI slot available").
        """
        with self._lock:
            for index, slot in enumerate(self._slots):
                if not slot.status & ENABLED:
                    self._slots[index] = MemorySlotState(base, length, ENABLED | (INSERTING if notify else 0))
                    return index
        raise DeviceError("No ACPI slot available")

    def ranges(self) -> list[tuple[int, int]]:
        """``(base, length)`` of every slot that holds RAM, in slot order."""
        with self._lock:
            return [(s.base, s.length) for s in self._slots if s.status & ENABLED]

    # -- the guest's side ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            slot = self._slots[self.selected]
            if offset in (BASE_LOW, BASE_HIGH) and size == 4:
                value = slot.base >> (32 if offset == BASE_HIGH else 0)
            elif offset in (LENGTH_LOW, LENGTH_HIGH) and size == 4:
                value = slot.length >> (32 if offset == LENGTH_HIGH else 0)
            elif offset == STATUS_OFFSET and size == 1:
                value = slot.status & _STATUS_BITS
            else:
                LOG.debug("memory hotplug: %d-byte read at %#x", size, offset)
                value = 0
        return (value & 0xFFFF_FFFF).to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        with self._lock:
            if offset == SELECTION_OFFSET and len(data) == 4:
                if value < SLOTS:
                    self.selected = value
                else:
                    LOG.debug("memory hotplug: guest selected slot %d of %d", value, SLOTS)
            elif offset == STATUS_OFFSET and len(data) == 1:
                slot = self._slots[self.selected]
                # write-one-to-clear acknowledgements; an eject is not supported (cloud-hypervisor's)
                status = slot.status & ~(value & (INSERTING | REMOVING))
                self._slots[self.selected] = MemorySlotState(slot.base, slot.length, status)
                if value & EJECT:
                    LOG.info("memory hotplug: the guest ejected slot %d; removing ACPI memory is not supported",
                             self.selected)
            else:
                LOG.debug("memory hotplug: %d-byte write at %#x", len(data), offset)

    # -- snapshots -------------------------------------------------------------------------

    def state(self) -> MemoryHotplugState:
        with self._lock:
            return MemoryHotplugState(tuple(self._slots), self.selected)

    def restore(self, state: MemoryHotplugState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, another number of slots, unknown
            status bits, a range that wraps or a selected slot that does not exist.
        """
        s = expect_state(state, MemoryHotplugState)
        check_length("slots", s.slots, SLOTS)
        for i, slot in enumerate(s.slots):
            check_bits(f"slots[{i}].status", slot.status, _STATUS_BITS)
            check_range(f"slots[{i}].base + length", slot.base + slot.length, 0, 1 << 64)
        check_range("selected", s.selected, 0, SLOTS - 1)
        with self._lock:
            self._slots = list(s.slots)
            self.selected = s.selected
