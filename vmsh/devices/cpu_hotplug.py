"""The registers behind ACPI CPU hotplug, the scheme of cloud-hypervisor's ``CpuManager``
(vmm/src/cpu.rs) and QEMU's ``cpu-hotplug`` block.

A 12-byte MMIO block: a 32-bit write to ``CSEL`` (offset 0) selects a vCPU; the byte at offset 4
is that vCPU's status. Reading it gives ``ENABLED`` (the vCPU exists and runs), ``INSERTING`` (the
VMM added it and the guest has not yet been told) and ``REMOVING`` (the VMM wants it gone);
writing ``INSERTING`` or ``REMOVING`` clears that bit (the guest has handled the event) and
writing ``EJECT`` ejects the vCPU (``on_eject(index)``) once the guest has taken it offline; only
a vCPU whose removal the VMM asked for can be ejected (a guest cannot take away vCPUs on its
own, nor leave a hole in the vCPU numbers).
``vmsh.engine.acpi.cpu_hotplug`` has the AML side. No KVM knowledge here: the engine creates and
parks the vCPUs, this only keeps the flags.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.state import check_length, check_range, expect_state
from vmsh.state_types import U8, U32

LOG = logging.getLogger(__name__)

#: register offsets: the selection (32 bits) and the selected vCPU's status byte
SELECTION_OFFSET, STATUS_OFFSET = 0x0, 0x4
REGISTER_SIZE = 0xC
#: status bits
ENABLED, INSERTING, REMOVING, EJECT = 1 << 0, 1 << 1, 1 << 2, 1 << 3
#: kept with the status but never shown to the guest: the VMM asked for the vCPU's removal and
#: it has not been ejected yet (REMOVING is cleared by the guest's acknowledgement before that)
PENDING_REMOVAL = 1 << 7
_GUEST_VISIBLE = ENABLED | INSERTING | REMOVING


@dataclass(frozen=True, slots=True)
class CpuHotplugState:
    """Per vCPU its status bits (ENABLED, INSERTING, REMOVING, PENDING_REMOVAL) and the selected vCPU."""

    status: tuple[U8, ...]
    selected: U32


class CpuHotplugController:
    """The CPU hotplug registers for ``max_vcpus`` possible vCPUs, ``present`` of them enabled."""

    thread_safe = True
    state_type = CpuHotplugState

    def __init__(self, max_vcpus: int, present: int, on_eject: Callable[[int], None]) -> None:
        self.max_vcpus = max_vcpus
        self.on_eject = on_eject
        self._status = [ENABLED if i < present else 0 for i in range(max_vcpus)]
        self.selected = 0
        self._lock = threading.Lock()

    # -- the VMM's side --------------------------------------------------------------------

    def insert(self, index: int) -> None:
        """vCPU ``index`` was created or woken: the guest's next scan brings it up."""
        with self._lock:
            self._status[index] = ENABLED | INSERTING

    def request_removal(self, index: int) -> None:
        """Ask the guest to offline vCPU ``index`` and eject it."""
        with self._lock:
            self._status[index] |= REMOVING | PENDING_REMOVAL

    def status(self, index: int) -> int:
        """vCPU ``index``'s status as the guest reads it."""
        with self._lock:
            return self._status[index] & _GUEST_VISIBLE

    def pending_removals(self) -> list[int]:
        """The vCPUs asked to go that the guest has not ejected yet."""
        with self._lock:
            return [i for i, s in enumerate(self._status) if s & PENDING_REMOVAL]

    def enabled(self) -> int:
        """How many vCPUs are enabled."""
        with self._lock:
            return sum(1 for s in self._status if s & ENABLED)

    # -- the guest's side ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        value = 0
        with self._lock:
            if offset == SELECTION_OFFSET and size == 4:
                value = self.selected
            elif offset == STATUS_OFFSET and size == 1:
                value = self._status[self.selected] & _GUEST_VISIBLE
        return value.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == SELECTION_OFFSET and len(data) == 4:
            with self._lock:
                if value < self.max_vcpus:
                    self.selected = value
                else:
                    LOG.debug("cpu hotplug: guest selected vCPU %d of %d", value, self.max_vcpus)
            return
        if offset != STATUS_OFFSET or len(data) != 1:
            return
        with self._lock:
            index = self.selected
            # writing a flag acknowledges it (cloud-hypervisor's and QEMU's write-one-to-clear)
            self._status[index] &= ~(value & (INSERTING | REMOVING))
            eject = bool(value & EJECT) and bool(self._status[index] & PENDING_REMOVAL)
            if value & EJECT and not eject:
                LOG.debug("cpu hotplug: the guest ejected vCPU %d, whose removal nobody asked for", index)
            if eject:
                self._status[index] = 0
        if eject:
            self.on_eject(index)

    # -- snapshots -------------------------------------------------------------------------

    def state(self) -> CpuHotplugState:
        with self._lock:
            return CpuHotplugState(tuple(self._status), self.selected)

    def restore(self, state: CpuHotplugState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, another number of vCPUs, unknown
            status bits or a selected vCPU that does not exist.
        """
        s = expect_state(state, CpuHotplugState)
        check_length("status", s.status, self.max_vcpus)
        for i, bits in enumerate(s.status):
            if bits & ~(_GUEST_VISIBLE | PENDING_REMOVAL):
                check_range(f"status[{i}]", bits, 0, _GUEST_VISIBLE)
        check_range("selected", s.selected, 0, self.max_vcpus - 1)
        with self._lock:
            self._status = list(s.status)
            self.selected = s.selected
