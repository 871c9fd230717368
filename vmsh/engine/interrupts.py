"""Interrupt triggers the engine hands to devices (``vmsh.devices.base.Trigger``).

``IrqFdTrigger`` raises a GSI on the in-kernel irqchip by writing an eventfd registered with
``KVM_IRQFD``: the interrupt goes in without an ioctl from the device's thread and without a
vCPU exit (README.md, "PCI and virtio"). An irqfd injects an edge (assert then deassert),
which is what ISA devices such as the 16550 on IRQ 4 use.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from vmsh.engine.kvm import VmFd

LOG = logging.getLogger(__name__)


class IrqFdTrigger:
    """Raise ``gsi`` on ``vm`` (a ``VmFd``) through an irqfd."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.irqfd(self.fd, gsi)
        self._vm = vm

    def trigger(self) -> None:
        """Pulse the line."""
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # counter saturated: an interrupt is pending already

    def close(self) -> None:
        """Deassign the irqfd and close the eventfd."""
        if self.fd >= 0:
            try:
                self._vm.irqfd(self.fd, self.gsi, deassign=True)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


class EventTrigger:
    """A trigger that sets a ``threading.Event`` and calls an optional callback (resets, power)."""

    def __init__(self, callback: Callable[[], None] | None = None) -> None:
        self.event = threading.Event()
        self.callback = callback

    def trigger(self) -> None:
        """Set the event, then run the callback."""
        self.event.set()
        if self.callback is not None:
            self.callback()
