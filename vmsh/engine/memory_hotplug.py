"""Growing and shrinking a running guest's RAM: ``vm.resize desired_ram`` and ``vm.resize-zone``,
cloud-hypervisor's ``MemoryManager::resize`` / ``resize_zone`` and ``Vm::resize`` rules.

- ``hotplug_method=acpi``: each growth maps a new region at the next 128 MiB boundary after the
  last RAM in the hotplug area, registers it as a KVM memory slot, records it in the next slot of
  the ACPI memory hotplug controller (marked inserting) and raises the GED's memory-change event;
  the guest's ``acpi_memhotplug`` driver adds it. ACPI RAM never shrinks.
- ``hotplug_method=virtio-mem``: the area is one virtio-mem device's region, mapped at boot; a
  resize sets the device's ``requested_size`` (a configuration-change interrupt) and the guest's
  driver plugs or unplugs blocks.

Runs in actions (holding ``Vmm.lock``), which own the memory map (``docs/threading.md``). The
config follows as in cloud-hypervisor v40: an ACPI resize makes ``size`` the new total, a
virtio-mem resize makes ``hotplugged_size`` what was asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from vmsh.config import model as m
from vmsh.devices.acpi import GED_MEMORY_CHANGE
from vmsh.devices.memory_hotplug import SLOTS, MemoryHotplugController
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.memory_manager import (
    DEFAULT_ZONE,
    HOTPLUG_ALIGN,
    HotplugArea,
    boot_ram_size,
    hotplug_areas,
    hotplug_region,
    hotplug_start,
    memory_options,
)
from vmsh.errors import DeviceError, GuestMemoryError, VmshError

LOG = logging.getLogger(__name__)


class VirtioMemHandle(Protocol):
    """What the resize needs of a virtio-mem device (``vmsh.devices.virtio.mem.VirtioMem``)."""

    def resize(self, size: int) -> None: ...

    @property
    def plugged_size(self) -> int: ...


class MemoryHotplug:
    """The hotplug side of one VM's memory: its areas, the ACPI controller, the virtio-mem devices."""

    def __init__(self, config: m.VmConfig, memory: GuestMemoryMmap, vm_fd: Any,
                 notify: Callable[[int], None], controller: MemoryHotplugController | None,
                 boot_ram: int | None = None) -> None:
        self.config = config
        self.memory = memory
        self.vm_fd = vm_fd
        #: raises a GED event (``Ged.notify``)
        self.notify = notify
        self.controller = controller
        #: the RAM the VM booted with (a snapshot's, after ACPI resizes changed the config's size)
        self.boot_ram = boot_ram_size(config.memory) if boot_ram is None else boot_ram
        self.areas = {a.zone: a for a in hotplug_areas(config.memory, self.boot_ram)}
        #: zone id -> its virtio-mem device (with the device's lock to take around it)
        self.virtio_mem: dict[str, tuple[VirtioMemHandle, Any]] = {}

    # --- what is there ---------------------------------------------------------------------------

    def acpi_ram(self) -> int:
        """Bytes hot-added through ACPI so far."""
        area = self.areas.get(DEFAULT_ZONE)
        if area is None or area.method is not m.HotplugMethod.ACPI:
            return 0
        return sum(r.size for r in self.memory.regions if r.hotplug and area.base <= r.start < area.end)

    def virtio_mem_plugged(self) -> int:
        """Bytes the guest has plugged through virtio-mem, every zone together."""
        total = 0
        for device, lock in self.virtio_mem.values():
            with lock:
                total += device.plugged_size
        return total

    # --- resize ----------------------------------------------------------------------------------

    def resize(self, desired: int) -> None:
        """``vm.resize desired_ram``: the whole RAM of a VM without memory zones.

        :raises VmshError: with cloud-hypervisor's reason when the request cannot be met.
        """
        mem = self.config.memory
        if mem.zones:
            raise VmshError("Impossible to resize guest memory if it is backed by user defined memory regions")
        area = self.areas.get(DEFAULT_ZONE)
        if area is None:
            raise VmshError("resize: this VM has no memory hotplug area (--memory hotplug_size)")
        if area.method is m.HotplugMethod.VIRTIO_MEM:
            if desired < mem.size:
                raise VmshError(f"resize: desired_ram {desired} is less than the boot RAM ({mem.size})")
            self._virtio_mem_resize(DEFAULT_ZONE, desired - mem.size)
            mem.hotplugged_size = desired - mem.size if desired > mem.size else None
            return
        current = self.boot_ram + self.acpi_ram()
        if desired < current:
            raise VmshError(f"resize: desired_ram {desired} is less than the current RAM ({current}): "
                            "RAM added through ACPI cannot be removed (use hotplug_method=virtio-mem)")
        if desired > current:
            self._acpi_add(area, desired - current)
        # cloud-hypervisor v40's Vm::resize: with ACPI the new total becomes the configured size,
        # so that a reboot starts with all of it
        mem.size = desired

    def resize_zone(self, zone_id: str, desired: int) -> None:
        """``vm.resize-zone``: zone ``zone_id`` to ``desired`` bytes (its size plus virtio-mem).

        :raises VmshError: with cloud-hypervisor's reason.
        """
        zones = self.config.memory.zones or []
        if not zones:
            raise VmshError("Resizing the memory zone failed: no memory zone is defined")
        zone = next((z for z in zones if z.id == zone_id), None)
        if zone is None:
            raise VmshError(f"Resizing the memory zone failed: unknown memory zone {zone_id}")
        if desired < zone.size:
            raise VmshError(f"Resizing the memory zone failed: invalid to ask less ({desired}) than boot RAM "
                            f"({zone.size}) for this memory zone")
        self._virtio_mem_resize(zone_id, desired - zone.size)
        zone.hotplugged_size = desired - zone.size

    def _virtio_mem_resize(self, zone_id: str, size: int) -> None:
        handle = self.virtio_mem.get(zone_id)
        if handle is None:
            raise VmshError(f"No virtio-mem resizing handler found for memory zone {zone_id} "
                            "(it needs hotplug_size and hotplug_method=virtio-mem)")
        device, lock = handle
        try:
            with lock:
                device.resize(size)
        except DeviceError as err:
            raise VmshError("Failed to virtio-mem resize") from err

    def _acpi_add(self, area: HotplugArea, size: int) -> None:
        """cloud-hypervisor's ``hotplug_ram_region``: a new region and slot, the guest told."""
        assert self.controller is not None, "an ACPI hotplug area has its controller"
        if self.controller.used() >= SLOTS:
            raise VmshError("No ACPI slot available")
        if size % HOTPLUG_ALIGN:
            raise VmshError(f"The requested hotplug memory addition is not a valid size: {size} bytes is not a "
                            "multiple of 128 MiB")
        start = max(area.base, hotplug_start(self.memory.last_addr + 1))
        if start + size > area.end:
            raise VmshError(f"Not enough space in the hotplug RAM region: {size} bytes do not fit in the "
                            f"{area.end - start} left of hotplug_size")
        try:
            region = hotplug_region(area, start, size, memory_options(self.config.memory))
        except GuestMemoryError as err:
            raise VmshError("Cannot map the hotplugged RAM") from err
        try:
            self.memory.add_region(region, self.vm_fd)
        except (GuestMemoryError, VmshError) as err:
            region.close()
            raise VmshError("Cannot add the hotplugged RAM") from err
        slot = self.controller.insert(start, size)
        LOG.info("RAM %#x+%#x hot-added through ACPI slot %d", start, size, slot)
        self.notify(GED_MEMORY_CHANGE)

