"""The ACPI platform devices of a hardware-reduced machine.

* :class:`AcpiShutdown` at I/O 0x600: the FADT's sleep control and reset register. Writing
  SLP_TYP=5 with SLP_EN (0x34) powers off; writing the reset value 1 resets (ACPI 6.4 §4.8.3.7
  sleep control register, §4.8.3.6 reset register).
* :class:`AcpiPmTimer` at I/O 0x608: the 32-bit, 3.579545 MHz power-management timer that the
  FADT's X_PM_TMR_BLK names (ACPI 6.4 §4.8.3.3).
* :class:`Ged`: the one-byte event register behind the Generic Event Device (ACPI0013, ACPI
  6.4 §5.6.9): the VMM sets event bits and raises the GED interrupt; the guest's ``_EVT``
  method reads the register, which clears it, and handles each bit.
"""

from __future__ import annotations

import logging
import threading
import time

from vmsh.devices.base import Trigger

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
    """Sleep-control and reset register (one byte at offset 0)."""

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
    """A free-running 32-bit counter at 3.579545 MHz (reads only)."""

    def __init__(self, clock=time.monotonic_ns) -> None:
        self._clock = clock
        self._start = clock()

    def read(self, offset: int, size: int) -> bytes:
        ticks = (self._clock() - self._start) * PM_TIMER_HZ // 1_000_000_000
        value = (ticks & 0xFFFF_FFFF).to_bytes(4, "little")
        return value[offset : offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        pass


class Ged:
    """The GED's event register: :meth:`notify` sets bits and interrupts; a read clears."""

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
