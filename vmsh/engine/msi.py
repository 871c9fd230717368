"""MSI-X delivery through KVM: one GSI and one irqfd per vector, routed as an MSI message.

``GsiRoutes`` owns the VM's whole GSI routing table. KVM_SET_GSI_ROUTING replaces the table
as a whole, so it always carries the in-kernel irqchip's default routes (GSIs 0-15 to the
PIC and the IOAPIC, 16-23 to the IOAPIC: linux arch/x86/kvm/irq_comm.c, default_routing)
plus every MSI route programmed so far. ``KvmMsiRouter`` is what a PCI device's MSI-X table
(``vmsh.devices.pci.msix.MsiRouter``) talks to: it keeps its vectors' GSIs routed to the
address and data the guest wrote, and fires a vector by writing its irqfd, so an interrupt
costs no ioctl and no vCPU exit.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from vmsh.errors import DeviceError, KvmError

LOG = logging.getLogger(__name__)

#: IOAPIC pins of the in-kernel irqchip; MSI GSIs are allocated above them
IOAPIC_PINS = 24
PIC_PINS = 16
#: KVM_IRQCHIP_PIC_MASTER, _SLAVE, _IOAPIC (linux/kvm.h)
CHIP_PIC_MASTER, CHIP_PIC_SLAVE, CHIP_IOAPIC = 0, 1, 2
#: KVM's default table size limit (KVM_MAX_IRQ_ROUTES is 4096 on x86)
MAX_GSI = 4096


def default_irqchip_routes() -> list[tuple[int, int, int]]:
    """The routes KVM sets up itself with an in-kernel irqchip, as (gsi, chip, pin)."""
    routes = [(gsi, CHIP_IOAPIC, gsi) for gsi in range(IOAPIC_PINS)]
    routes += [(gsi, CHIP_PIC_MASTER if gsi < 8 else CHIP_PIC_SLAVE, gsi % 8) for gsi in range(PIC_PINS)]
    return routes


class GsiRoutes:
    """The VM's GSI table: allocation of MSI GSIs and their (address, data) routes."""

    def __init__(self, vm_fd: Any) -> None:
        self._vm = vm_fd
        self._next = IOAPIC_PINS
        self._msi: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def allocate(self) -> int:
        """A fresh GSI for one MSI vector."""
        with self._lock:
            if self._next >= MAX_GSI:
                raise DeviceError("No GSI left for another MSI vector")
            gsi = self._next
            self._next += 1
            return gsi

    def set(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI message (``address``, ``data``) and commit the table."""
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._commit()

    def _commit(self) -> None:
        msi = [(gsi, addr, data) for gsi, (addr, data) in sorted(self._msi.items())]
        try:
            self._vm.set_gsi_routing(default_irqchip_routes(), msi)
        except KvmError as err:
            raise DeviceError("KVM refused the MSI routing table") from err


class KvmMsiRouter:
    """MSI-X vectors of one device: a GSI and an irqfd per vector."""

    def __init__(self, vm_fd: Any, routes: GsiRoutes, vectors: int) -> None:
        self._vm = vm_fd
        self._routes = routes
        self.gsis: list[int] = []
        self.fds: list[int] = []
        try:
            for _ in range(vectors):
                gsi = routes.allocate()
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.gsis.append(gsi)
                self.fds.append(fd)
                vm_fd.irqfd(fd, gsi)
        except (KvmError, OSError) as err:
            self.close()
            raise DeviceError("Cannot set up the MSI-X interrupts") from err

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        """The guest changed an entry; a masked vector keeps its route (the table holds it back)."""
        if 0 <= vector < len(self.gsis) and not masked:
            try:
                self._routes.set(self.gsis[vector], address, data)
            except DeviceError as err:
                # A bad message from the guest must not take the VMM down; the vector stays silent.
                LOG.warning("MSI-X vector %d (address %#x data %#x): %s", vector, address, data, err)

    def trigger(self, vector: int) -> None:
        """Fire ``vector``."""
        if 0 <= vector < len(self.fds):
            try:
                os.eventfd_write(self.fds[vector], 1)
            except BlockingIOError:
                pass  # counter saturated: the interrupt is pending already

    def eventfd(self, vector: int) -> int | None:
        """``vector``'s irqfd: writing it fires the vector (a vhost-user backend's call fd)."""
        return self.fds[vector] if 0 <= vector < len(self.fds) else None

    def close(self) -> None:
        """Deassign the irqfds and close them."""
        for fd, gsi in zip(self.fds, self.gsis, strict=True):
            try:
                self._vm.irqfd(fd, gsi, deassign=True)
            except (KvmError, OSError):
                pass
            os.close(fd)
        self.fds, self.gsis = [], []
