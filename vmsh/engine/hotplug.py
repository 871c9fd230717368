"""PCI hotplug of a running VM: plug a device in, ask the guest to eject one, and remove it when
the guest has.

The scheme is ACPI PCI hotplug as cloud-hypervisor and QEMU do it (cloud-hypervisor's
``docs/hotplug.md``): the VMM marks the slot in the hotplug controller's up or down bitmap and
raises the GED's PCI-change event; the guest's ``_EVT`` rescans (``PSCN``), and for a removal
calls the slot's ``_EJ0``, which writes B0EJ. That write arrives on a vCPU thread; the removal
itself runs on the control loop (``ControlRequests``), which owns the device set and the config.
"""

from __future__ import annotations

import logging
from typing import Any

from vmsh.config import model as m
from vmsh.devices.acpi import GED_PCI_CHANGE, Ged, PciHotplugController
from vmsh.engine.acpi import pci_hotplug
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.events import EventMonitor
from vmsh.engine.virtio_devices import add_item as add_config_item
from vmsh.errors import VmshError

LOG = logging.getLogger(__name__)

#: VmConfig lists whose devices can be ejected, and the single-device attribute
_EJECTABLE_LISTS = ("disks", "net", "fs", "pmem")


def bdf(segment: int, slot: int) -> str:
    """The PCI address ``vm.add-*`` returns and ``device-removed`` events name."""
    return f"{segment:04x}:00:{slot:02x}.0"


def declare_slots(controller: PciHotplugController, devices: DeviceManager, segments: int, spare: int) -> None:
    """The slots the boot's ACPI tables declare hotpluggable: the occupied ones and ``spare``
    free ones per segment (``pci_hotplug.declared_slots``)."""
    controller.declared = [
        pci_hotplug.declared_slots({e.slot for e in devices.devices.values() if e.segment == seg}, spare)
        for seg in range(segments)
    ]


class PciHotplug:
    """Hot-add and eject of PCI devices (every method runs on the control loop)."""

    def __init__(self, config: m.VmConfig, devices: DeviceManager, controller: PciHotplugController, ged: Ged,
                 events: EventMonitor) -> None:
        self.config = config
        self.devices = devices
        self.controller = controller
        self.ged = ged
        self.events = events

    def add(self, kind: str, item: Any) -> dict[str, str]:
        """Plug a device of the running VM's config in (``kind`` is the config list it is in)
        and tell the guest through ACPI; returns cloud-hypervisor's PciDeviceInfo."""
        segment = item.pci_segment
        declared = self.controller.declared
        if not 0 <= segment < len(declared):
            raise VmshError(f"PCI segment {segment} does not exist")
        free = [s for s in declared[segment] if self.devices.find_slot(segment, s) is None]
        if not free:
            raise VmshError(f"No free hotplug slot on PCI segment {segment}"
                            + (f" (on PVM hosts vmsh declares {pci_hotplug.SPARE_SLOTS_PVM} spare slots per segment"
                               " at boot)" if len(declared[segment]) < pci_hotplug.NUM_SLOTS - 1 else ""))
        entry = add_config_item(self.devices, kind, item, hotplug=True, slot=free[0])
        self.controller.plug(entry.segment, entry.slot)
        self.ged.notify(GED_PCI_CHANGE)
        return {"id": entry.id, "bdf": bdf(entry.segment, entry.slot)}

    def unplug(self, dev_id: str) -> bool:
        """Ask the guest to eject ``dev_id``; False if there is no such PCI device."""
        entry = self.devices.devices.get(dev_id)
        if entry is None:
            return False
        self.controller.unplug(entry.segment, entry.slot)
        self.ged.notify(GED_PCI_CHANGE)
        return True

    def ejected(self, segment: int, slot: int) -> None:
        """The guest ejected ``slot``: remove its device and drop it from the config."""
        entry = self.devices.find_slot(segment, slot)
        if entry is None:
            return
        self.devices.remove(entry.id)
        for attr in _EJECTABLE_LISTS:
            items = getattr(self.config, attr)
            if items and any(i.id == entry.id for i in items):
                setattr(self.config, attr, [i for i in items if i.id != entry.id] or None)
        if self.config.vsock is not None and self.config.vsock.id == entry.id:
            self.config.vsock = None
        self.events.emit("vm", "device-removed", {"id": entry.id, "bdf": bdf(segment, slot)})

