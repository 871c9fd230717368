"""The interfaces every device model is written against: ``BusDevice`` and ``Trigger``.

A device is a register model addressed relative to its own base; the bus that routes an access
to it, and whatever a ``Trigger`` really does (raise an IRQ line, write an eventfd, reset the
VM), are decided by the engine. That keeps each device testable with a fake trigger and a
buffer (rust-vmm's ``vm-device`` ``BusDevice`` is the same shape).
"""

from __future__ import annotations

from typing import Protocol


class BusDevice(Protocol):
    """A device reachable from a PIO or MMIO bus."""

    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read at ``offset`` from the device's base."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Handle a write of ``data`` at ``offset`` from the device's base."""
        ...


class Trigger(Protocol):
    """Something a device can raise without knowing what it is: an interrupt, a reset..."""

    def trigger(self) -> None:
        """Raise the event."""
        ...
