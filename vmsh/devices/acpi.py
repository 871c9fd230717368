"""The ACPI platform devices of a hardware-reduced machine.

* :class:`AcpiShutdown` at I/O 0x600: the FADT's sleep control and reset register. Writing
  SLP_TYP=5 with SLP_EN (0x34) powers off; writing the reset value 1 resets (ACPI 6.4 §4.8.3.7
  sleep control register, §4.8.3.6 reset register).
* :class:`AcpiPmTimer` at I/O 0x608: the 32-bit, 3.579545 MHz power-management timer that the
  FADT's X_PM_TMR_BLK names (ACPI 6.4 §4.8.3.3).
* :class:`Ged`: the one-byte event register behind the Generic Event Device (ACPI0013, ACPI
  6.4 §5.6.9): the VMM sets event bits and raises the GED interrupt; the guest's ``_EVT``
  method reads the register, which clears it, and handles each bit.
* :class:`PciHotplugController`: the registers behind ACPI PCI hotplug (slots up/down per
  segment, eject), the scheme of QEMU's and cloud-hypervisor's ``PHPR`` device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.base import Trigger
from vmsh.devices.state import check_length, check_range, expect_state
from vmsh.state_types import U8, U32

LOG = logging.getLogger(__name__)

SLEEP_TYPE_S5 = 5
SLEEP_ENABLE_BIT = 1 << 5
#: what Linux writes for S5 (poweroff): SLP_TYP in bits 2-4, SLP_EN
POWEROFF_VALUE = (SLEEP_TYPE_S5 << 2) | SLEEP_ENABLE_BIT
RESET_VALUE = 1

PM_TIMER_HZ = 3_579_545

#: GED event bits (the DSDT's _EVT method tests the same values)
GED_CPU_CHANGE = 0x1
GED_MEMORY_CHANGE = 0x2
GED_PCI_CHANGE = 0x4
GED_POWER_BUTTON = 0x8


class AcpiShutdown:
    """Sleep-control and reset register (one byte at offset 0).

    Stateless: a write acts at once and nothing is latched, so there is nothing to snapshot.
    """

    def __init__(self, poweroff: Trigger, reset: Trigger) -> None:
        self.poweroff = poweroff
        self.reset = reset

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 1:
            return
        if data[0] == RESET_VALUE:
            LOG.info("acpi: guest requested a reset")
            self.reset.trigger()
        elif data[0] == POWEROFF_VALUE:
            LOG.info("acpi: guest requested poweroff (S5)")
            self.poweroff.trigger()


class AcpiPmTimer:
    """A free-running 32-bit counter at 3.579545 MHz (reads only).

    Not snapshotted: the count is derived from the host clock and the guest cannot set it; a
    restored timer counts on from wherever it starts (a guest uses it only for intervals).
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._start = clock()

    def read(self, offset: int, size: int) -> bytes:
        ticks: int = (self._clock() - self._start) * PM_TIMER_HZ // 1_000_000_000
        value = (ticks & 0xFFFF_FFFF).to_bytes(4, "little")
        return value[offset : offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        pass


@dataclass(frozen=True, slots=True)
class GedState:
    """The GED's event bits not yet read by the guest (plain form ``{"pending": n}``)."""

    pending: U8 = 0


class Ged:
    """The GED's event register: :meth:`notify` sets bits and interrupts; a read clears."""

    state_type = GedState

    def __init__(self, irq: Trigger) -> None:
        self.irq = irq
        self._pending = 0
        self._lock = threading.Lock()

    def notify(self, bits: int) -> None:
        with self._lock:
            self._pending |= bits
        self.irq.trigger()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value, self._pending = self._pending, 0
        return bytes([value]) + bytes(size - 1) if offset == 0 else bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass

    @property
    def pending(self) -> int:
        return self._pending

    def state(self) -> GedState:
        with self._lock:
            return GedState(self._pending)

    def restore(self, state: GedState) -> None:
        """Load ``state`` (untrusted); events still pending interrupt the guest again.

        :raises DeviceStateError: for another state class or a value over 8 bits.
        """
        s = expect_state(state, GedState)
        with self._lock:
            self._pending = s.pending
        if s.pending:
            self.irq.trigger()


@dataclass(frozen=True, slots=True)
class PciHotplugState:
    """Slots that came up or are to go, per segment, the selected segment, and the slots the
    guest's ACPI tables declare hotpluggable (per segment; None, in snapshots older than
    declared slots: all of them)."""

    up: tuple[U32, ...]
    down: tuple[U32, ...]
    selected: int
    declared: tuple[tuple[int, ...], ...] | None = None


class PciHotplugController:
    """The ACPI PCI hotplug registers (``vmsh.engine.acpi.pci_hotplug`` has the AML side).

    For the segment selected in PSEG: PCIU (0x0) reads and clears the bitmap of slots that
    came up, PCID (0x4) that of slots the VMM wants removed; a write to B0EJ (0x8) ejects
    the slots whose bits are set (``on_eject(segment, slot)``); PSEG (0xc) selects the
    segment. Registers are 32 bits; other sizes and offsets read zero and are ignored.
    """

    thread_safe = True
    state_type = PciHotplugState

    def __init__(self, segments: int, on_eject: Callable[[int, int], None]) -> None:
        self.segments = segments
        self.on_eject = on_eject
        self.up = [0] * segments
        self.down = [0] * segments
        self.selected = 0
        #: per segment, the slots the guest's ACPI tables have slot devices for
        self.declared: list[list[int]] = [list(range(1, 32)) for _ in range(segments)]
        self._lock = threading.Lock()

    def plug(self, segment: int, slot: int) -> None:
        """A device appeared in ``slot``: the guest's next rescan finds it."""
        with self._lock:
            self.up[segment] |= 1 << slot

    def unplug(self, segment: int, slot: int) -> None:
        """Ask the guest to give ``slot`` up; it ejects it through B0EJ when it has."""
        with self._lock:
            self.down[segment] |= 1 << slot

    def read(self, offset: int, size: int) -> bytes:
        value = 0
        if size == 4:
            with self._lock:
                seg = self.selected
                if offset == 0x0:
                    value, self.up[seg] = self.up[seg], 0
                elif offset == 0x4:
                    value, self.down[seg] = self.down[seg], 0
                elif offset == 0xC:
                    value = seg
        return value.to_bytes(4, "little")[:size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 4:
            return
        value = int.from_bytes(data, "little")
        if offset == 0xC:
            with self._lock:
                if value < self.segments:
                    self.selected = value
        elif offset == 0x8:
            with self._lock:
                seg = self.selected
            for slot in range(32):
                if value >> slot & 1:
                    self.on_eject(seg, slot)

    def state(self) -> PciHotplugState:
        with self._lock:
            return PciHotplugState(tuple(self.up), tuple(self.down), self.selected,
                                   tuple(tuple(d) for d in self.declared))

    def restore(self, state: PciHotplugState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, another number of segments, a
            selected segment that does not exist or a declared slot outside 1..31.
        """
        s = expect_state(state, PciHotplugState)
        check_length("up", s.up, self.segments)
        check_length("down", s.down, self.segments)
        check_range("selected", s.selected, 0, self.segments - 1)
        declared = s.declared if s.declared is not None else self.declared
        check_length("declared", declared, self.segments)
        for i, seg in enumerate(declared):
            for j, slot in enumerate(seg):
                check_range(f"declared[{i}][{j}]", slot, 1, 31)
        with self._lock:
            self.declared = [sorted(set(seg)) for seg in declared]
            self.up = list(s.up)
            self.down = list(s.down)
            self.selected = s.selected
