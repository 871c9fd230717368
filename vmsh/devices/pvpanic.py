"""The pvpanic PCI device: the guest reports a kernel panic to the VMM.

QEMU's ``pvpanic-pci`` (docs/specs/pvpanic.rst, hw/misc/pvpanic-pci.c) as cloud-hypervisor
builds it (devices/src/pvpanic.rs): vendor 0x1b36 (Red Hat), device 0x0011, revision 1, class
0x088000 (base system peripheral, other), and one 32-bit memory BAR 0. Linux's
drivers/misc/pvpanic/pvpanic-pci.c maps BAR 0 and uses one byte register at offset 0:

- a read returns the events the device supports (PANICKED | CRASH_LOADED);
- a write reports an event: PANICKED when the kernel panics, CRASH_LOADED when a crash kernel
  is about to take over.

cloud-hypervisor's BAR is 2 bytes; PCI memory BARs are at least 16 bytes (PCI 3.0 §6.2.5.1)
and that is what the guest's sizing sees anyway, so this BAR is 16 bytes; everything but
offset 0 reads as zero and ignores writes.

Like ``VirtioPciDevice``, this is a register model: the engine maps ``bar_read``/``bar_write``
at ``bar_address()``, follows ``on_bar_change`` when the guest moves the BAR, and turns each
``on_event`` into the ``guest panic`` event (``event_name`` gives its ``event`` property).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.pci.config_space import BAR0, COMMAND, PciConfigSpace, PciConfigState
from vmsh.devices.state import check_bits, expect_state, within
from vmsh.state_types import U32, U64

LOG = logging.getLogger(__name__)

PVPANIC_VENDOR_ID = 0x1B36  # PCI_VENDOR_ID_REDHAT
PVPANIC_DEVICE_ID = 0x0011  # PCI_DEVICE_ID_REDHAT_PVPANIC
PVPANIC_REVISION = 1
#: base class 0x08 (system peripheral), subclass 0x80 (other), prog-if 0
PVPANIC_CLASS_CODE = 0x088000
#: BAR 0: the smallest memory BAR (the register is one byte at offset 0)
BAR_SIZE = 0x10

# Event bits (include/uapi/misc/pvpanic.h)
PVPANIC_PANICKED = 1 << 0  # the guest kernel panicked
PVPANIC_CRASH_LOADED = 1 << 1  # the guest is about to run its crash kernel
#: what a read of the register answers (cloud-hypervisor's set)
SUPPORTED_EVENTS = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
#: cloud-hypervisor sets I/O and memory decoding in COMMAND at creation
_INITIAL_COMMAND = 0x0003


def event_name(events: int) -> str:
    """The ``event`` property of the ``guest panic`` event for a written value (cloud-hypervisor's
    ``docs/api.md`` event monitor: ``panic`` or ``crash_loaded``).

    >>> event_name(1), event_name(2), event_name(3)
    ('panic', 'crash_loaded', 'unknown_event')
    """
    if events == PVPANIC_PANICKED:
        return "panic"
    if events == PVPANIC_CRASH_LOADED:
        return "crash_loaded"
    return "unknown_event"


@dataclass(frozen=True, slots=True)
class PvPanicState:
    """Plain-data state of a ``PvPanicDevice``."""

    config: PciConfigState
    events: int = SUPPORTED_EVENTS
    bar_address: U32 = 0
    reported: U64 = 0


class _PvPanicConfig(PciConfigSpace):
    """Configuration space that tells its owner when BAR 0 is reprogrammed."""

    def __init__(self, owner: PvPanicDevice) -> None:
        super().__init__(PVPANIC_VENDOR_ID, PVPANIC_DEVICE_ID, PVPANIC_CLASS_CODE, revision=PVPANIC_REVISION)
        self.owner = owner

    def write(self, offset: int, data: bytes) -> None:
        super().write(offset, data)
        size = len(data)
        if size in (1, 2, 4) and offset % size == 0 and offset < BAR0 + 4 and offset + size > BAR0:
            self.owner._bar_register_written(bytes(data))


class PvPanicDevice:
    """A pvpanic-pci function.

    :param on_event: called with the byte the guest wrote (``PVPANIC_PANICKED``...), on the
        vCPU thread that wrote it; exceptions from it are logged, never passed to the guest.

    Example::

        dev = PvPanicDevice(on_event=lambda ev: events.emit("guest", "panic", event=event_name(ev)))
        dev.set_bar_address(0xE000_1000)   # from the 32-bit window; map bar_read/bar_write there
        dev.on_bar_change = remap          # called with (old, new) when the guest moves BAR 0
    """

    BAR_SIZE = BAR_SIZE
    state_type = PvPanicState
    #: BAR 0 is a 32-bit memory BAR (cloud-hypervisor allocates it from the 32-bit window)
    bar64 = False

    def __init__(self, on_event: Callable[[int], object] | None = None) -> None:
        self.on_event = on_event
        #: the events a read of the register reports
        self.events = SUPPORTED_EVENTS
        #: how many events the guest reported
        self.reported = 0
        #: called with (old, new) when the guest moves BAR 0
        self.on_bar_change: Callable[[int, int], None] | None = None
        self._bar_address = 0
        self.config = _PvPanicConfig(self)
        self.config.add_memory_bar(0, BAR_SIZE, is_64bit=False)
        self.config.put(COMMAND, _INITIAL_COMMAND, 2)

    # -- BAR placement -----------------------------------------------------------------------

    def bar_address(self) -> int:
        """BAR 0's guest address as last programmed (0 if unassigned)."""
        return self._bar_address

    def set_bar_address(self, addr: int) -> None:
        """Place BAR 0 at ``addr`` (the engine's allocation; no callback).

        :raises ValueError: if ``addr`` is not a 16-byte aligned 32-bit address.
        """
        if addr % BAR_SIZE or not 0 <= addr < 1 << 32:
            raise ValueError(f"BAR address {addr:#x} does not fit a {BAR_SIZE:#x} 32-bit BAR")
        self.config.set_bar_address(0, addr)
        self._bar_address = addr

    def _bar_register_written(self, data: bytes) -> None:
        # Sizing writes all ones and then the old value back (§6.2.5.1): not a move.
        if data == b"\xff" * len(data):
            return
        new = self.config.bar_address(0)
        if new == self._bar_address:
            return
        old, self._bar_address = self._bar_address, new
        LOG.debug("pvpanic BAR 0 moved from %#x to %#x", old, new)
        if self.on_bar_change is not None:
            self.on_bar_change(old, new)

    # -- BAR 0 -------------------------------------------------------------------------------

    def bar_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` in BAR 0: the supported events at offset 0."""
        size = max(0, size)
        out = bytearray(size)
        if size and offset == 0:
            out[0] = self.events
        return bytes(out)

    def bar_write(self, offset: int, data: bytes) -> None:
        """A guest write: the first byte at offset 0 is an event report."""
        if offset != 0 or not data:
            return
        value = data[0]
        self.reported += 1
        LOG.info("pvpanic: guest reported event %#x (%s)", value, event_name(value))
        if self.on_event is not None:
            try:
                self.on_event(value)
            except Exception:  # a broken listener must not fault the vCPU thread
                LOG.exception("pvpanic: event listener failed")

    # -- the BusDevice face (relative to the BAR) --------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Same as ``bar_read`` (for an MMIO bus that maps the device at its BAR)."""
        return self.bar_read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        """Same as ``bar_write``."""
        self.bar_write(offset, data)

    # -- lifecycle, snapshot, counters -------------------------------------------------------

    def close(self) -> None:
        """Nothing to release."""

    def state(self) -> PvPanicState:
        return PvPanicState(config=self.config.state(), events=self.events, bar_address=self._bar_address,
                            reported=self.reported)

    def restore(self, state: PvPanicState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, events the device does not
            support, or a configuration space that is not this function's.
        """
        state = expect_state(state, PvPanicState)
        check_bits("events", state.events, SUPPORTED_EVENTS)
        with within("config"):
            self.config.restore(state.config)
        # The register file is the truth for the BAR, but its layout is ours: re-declare BAR 0
        # (flags and write mask) so a doctored snapshot cannot turn it into something else.
        addr = self.config.get(BAR0, 4) & ~(BAR_SIZE - 1)
        self.config.add_memory_bar(0, BAR_SIZE, is_64bit=False)
        self.config.set_bar_address(0, addr)
        self._bar_address = addr
        if state.bar_address != self._bar_address:
            LOG.debug("pvpanic state: BAR %#x in config, %#x saved", self._bar_address, state.bar_address)
        self.events = state.events
        self.reported = state.reported

    def counters(self) -> dict[str, int]:
        return {"events": self.reported}
