"""The VM's devices: the platform devices, the PCI segments and slots, BAR windows, MSI-X
routing and virtqueue kicks, and the one device tree that snapshots walk.

The device models (``vmsh.devices``) know nothing of KVM; this is where they are plugged in:

- the platform devices (serial, CMOS, GED, hotplug registers) are put on the port or MMIO bus
  with ``add_legacy``; the stateful ones are kept by their snapshot ids;
- each PCI segment gets its bus, its ECAM window on the MMIO bus (and segment 0 the 0xcf8
  configuration ports);
- each virtio device gets a ``VirtioPciDevice`` transport in the slot it asks for (or the next
  free one), its BAR 0 allocated from the segment's 32-bit or 64-bit window and mapped on the
  MMIO bus, one ``KvmMsiRouter`` for its MSI-X vectors, and one ioeventfd per queue on its
  notify address, served by the ``IoLoop`` thread (a vhost-user device brings its own
  eventfds, which its backend reads instead); when the guest moves the BAR, the window and the
  ioeventfds move with it;
- a plain PCI device with one memory BAR (pvpanic) is placed and mapped the same way;
- a device region (a pmem file) becomes a KVM memory slot in the 64-bit window;
- hotplugged devices go through the same path; an ejected one is unmapped and its slot
  freed (BAR space is not reused: the windows are far larger than any device set);
- on pause the I/O thread is quiesced, so a snapshot sees no request half done.

Threads (``docs/threading.md``): the device set, the bus maps and the ioeventfd registrations
change only on the VMM's control loop. A BAR move the guest makes on a vCPU thread is handed to
it through ``handoff`` (the vCPU waits until it is done, as a BAR write takes effect at once on
real hardware); every register path of a device takes the device's one lock (``pci_device``).

Slot order follows cloud-hypervisor's device manager: console, disks, nets, rng, pmem,
vsock, balloon.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import mmap
import os
from collections.abc import Callable
from typing import Any

from vmsh._native import ffi
from vmsh.devices.dma import IommuMappings, TranslatedMemory, endpoint_id
from vmsh.devices.pci.root import PciBus, PciConfigIo, PciEcam
from vmsh.devices.virtio.device import VIRTIO_F_ACCESS_PLATFORM, VirtioDevice
from vmsh.devices.virtio.iommu import VirtioIommu
from vmsh.devices.virtio.pci import VirtioPciDevice, VirtioPciState
from vmsh.engine.acpi.spec import PciSegment
from vmsh.engine.bus import Bus, BusError, BusRange
from vmsh.engine.io_loop import IoLoop
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.msi import GsiRoutes, KvmMsiRouter
from vmsh.engine.pci_device import BarAllocator, LockedPciFunction, PciDevice, PciFunctionModel
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceError, DeviceStateError, KvmError, SnapshotError
from vmsh.guest_memory import GuestMemory

LOG = logging.getLogger(__name__)

PCI_CONFIG_PORT = 0xCF8
#: memory slots of device regions (pmem) start here, well above the RAM regions' slots
_FIRST_REGION_SLOT = 32
_REGION_ALIGN = 2 << 20
#: the guest writes a queue's 16-bit index to its notify address (virtio 1.2 §4.1.5.2)
NOTIFY_WIDTH = 2


#: platform devices whose state snapshots of format 1 did not have: restored fresh when missing
_NEWER_THAN_FORMAT_1 = frozenset({"__pci_config_io", "__post", "__cpu_hotplug"})
#: runs a piece of work on the VMM's control loop and returns when it is done
Handoff = Callable[[Callable[[], None]], None]
#: told ``(device id, event)`` when a virtio device is activated or reset by its driver
DeviceEventSink = Callable[[str, str], None]


class DeviceManager:
    """The platform devices, the PCI segments and the devices on them."""

    def __init__(self, vm_fd: Any, memory: GuestMemoryMmap, pio: Bus, mmio: Bus,
                 segments: tuple[PciSegment, ...], handoff: Handoff,
                 on_device_event: DeviceEventSink | None = None) -> None:
        self.vm_fd = vm_fd
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.segments = segments
        #: runs a BAR move on the control loop (from the vCPU thread that wrote the BAR)
        self.handoff = handoff
        #: the virtio devices' lifecycle events (from vCPU threads, the device's lock held)
        self.on_device_event = on_device_event
        self.buses = [PciBus(seg.id) for seg in segments]
        self.routes = GsiRoutes(vm_fd)
        self.loop = IoLoop()
        self.devices: dict[str, PciDevice] = {}
        #: stateful platform devices by snapshot id (``__serial``, ``__cmos``, ...)
        self.legacy: dict[str, Any] = {}
        #: the platform devices ``vm.info``'s device tree shows, in the order they were created
        #: (cloud-hypervisor's ``__ioapic``, ``__serial``, ``__debug_console``)
        self.platform_nodes: list[str] = []
        self._kick_after_restore = False
        #: host mappings in guest physical memory, by device id: (KVM slot, guest address, mapping)
        self._regions: dict[str, tuple[int, int, mmap.mmap]] = {}
        #: the virtio-iommu's table, when the VM has one (:meth:`enable_iommu`)
        self.iommu: IommuMappings | None = None
        #: the virtio-iommu's id, once plugged (:meth:`add_iommu`)
        self.iommu_id: str | None = None
        #: segments whose every slot is behind the IOMMU (``--platform iommu_segments``)
        self.iommu_segments: tuple[int, ...] = ()
        #: ids of the devices placed behind the IOMMU, in the order they were plugged
        self.iommu_devices: list[str] = []
        self._iommu_fault_fd = -1
        self._alloc32 = {seg.id: BarAllocator(*seg.mmio32) for seg in segments}
        self._alloc64 = {seg.id: BarAllocator(*seg.mmio64) for seg in segments}
        for seg, bus in zip(segments, self.buses, strict=True):
            if seg.id == 0:
                self.add_legacy("__pci_config_io", PciConfigIo(bus), self.pio, PCI_CONFIG_PORT, 8, name="pci-config-io")
            self.mmio.insert(PciEcam(bus), seg.ecam_base, PciEcam.SIZE, name=f"pci-ecam{seg.id}")

    # --- plugging -------------------------------------------------------------------------------

    def add_legacy(self, dev_id: str, device: Any, bus: Bus, base: int, length: int, *, name: str) -> BusRange:
        """Put a platform device on ``bus``; a stateful one is saved and restored as ``dev_id``."""
        entry = bus.insert(device, base, length, name=name)
        if getattr(device, "state_type", None) is not None:
            self.legacy[dev_id] = device
        return entry

    def add_node(self, dev_id: str) -> None:
        """Show a platform device in ``vm.info``'s device tree, as cloud-hypervisor's device
        manager does for the ones it names (the IOAPIC, the serial port, the debug console:
        nodes without resources)."""
        if dev_id not in self.platform_nodes:
            self.platform_nodes.append(dev_id)

    def add_virtio(self, dev_id: str, device: VirtioDevice, *, segment: int = 0, slot: int | None = None,
                   bar64: bool = True, iommu: bool = False) -> PciDevice:
        """Plug ``device`` in behind a virtio-pci transport with its MSI-X vectors.

        With ``iommu`` the device is behind the virtio-iommu: it offers VIRTIO_F_ACCESS_PLATFORM
        and reaches guest RAM through a ``TranslatedMemory`` of its endpoint (the others keep
        the plain ``GuestMemory``, untouched).

        :raises DeviceError: when the segment, the slot or the BAR space is not available, or
            ``iommu`` is asked of a VM without a virtio-iommu.
        """
        self._check_segment(dev_id, segment)
        memory: GuestMemory = self.memory
        if iommu:
            if self.iommu is None:
                raise DeviceError(f"{dev_id}: the VM has no virtio-iommu to place the device behind")
            memory = TranslatedMemory(self.memory, self.iommu)
            device.avail_features = device.avail_features | 1 << VIRTIO_F_ACCESS_PLATFORM
        router = KvmMsiRouter(self.vm_fd, self.routes, len(device.queue_max_sizes) + 1)
        try:
            transport = VirtioPciDevice(device, memory, router, bar64=bar64)
            if self.on_device_event is not None:
                transport.on_lifecycle = functools.partial(self.on_device_event, dev_id)
            entry = self._plug(dev_id, transport, segment, slot, bar64, router, len(device.queue_max_sizes))
        except BaseException:
            router.close()
            raise
        if iommu:
            self.iommu_devices.append(dev_id)
            self._refresh_endpoints()
        return entry

    # --- the virtio-iommu -------------------------------------------------------------------------

    def enable_iommu(self, segments: tuple[int, ...]) -> IommuMappings:
        """Give the VM an IOMMU table before its devices are plugged; every slot of
        ``segments`` is behind it (cloud-hypervisor's ``iommu_segments``)."""
        self.iommu_segments = segments
        self.iommu = IommuMappings(endpoint_id(seg, slot) for seg in segments for slot in range(32))
        return self.iommu

    def add_iommu(self, dev_id: str, device: VirtioIommu) -> PciDevice:
        """Plug the virtio-iommu (segment 0, the next free slot) and deliver its faults: an
        endpoint's translation fault wakes the I/O loop, which writes the waiting faults into
        the event queue under the virtio-iommu's lock (never the endpoint's)."""
        entry = self.add_virtio(dev_id, device)
        self.iommu_id = dev_id
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._iommu_fault_fd = fd

        def deliver() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            if self.devices.get(dev_id) is entry:
                with entry.lock:
                    device.deliver_faults()

        self.loop.add(fd, deliver)
        device.table.on_fault = functools.partial(os.eventfd_write, fd, 1)
        return entry

    def _refresh_endpoints(self) -> None:
        """Tell each device behind the IOMMU its endpoint id (it got its slot, or moved) and
        make the table's endpoint set the IOMMU segments' slots and those devices."""
        if self.iommu is None:
            return
        endpoints = {endpoint_id(seg, slot) for seg in self.iommu_segments for slot in range(32)}
        for dev_id in self.iommu_devices:
            entry = self.devices.get(dev_id)
            memory = getattr(entry.transport, "memory", None) if entry is not None else None
            if entry is not None and isinstance(memory, TranslatedMemory):
                memory.endpoint = endpoint_id(entry.segment, entry.slot)
                endpoints.add(memory.endpoint)
        self.iommu.set_endpoints(endpoints)

    def iommu_endpoints(self) -> list[tuple[int, int]]:
        """``(segment, slot)`` of each endpoint the VIOT table lists: the devices placed behind
        the IOMMU, then every slot of the IOMMU segments not already listed (cloud-hypervisor's
        order)."""
        out = [(self.devices[d].segment, self.devices[d].slot) for d in self.iommu_devices if d in self.devices]
        for seg in self.iommu_segments:
            out.extend((seg, slot) for slot in range(32) if (seg, slot) not in out)
        return out

    def add_pci(self, dev_id: str, function: PciFunctionModel, *, segment: int = 0, slot: int | None = None,
                bar64: bool = False) -> PciDevice:
        """Plug a PCI device model that has one memory BAR and no queues (pvpanic)."""
        self._check_segment(dev_id, segment)
        return self._plug(dev_id, function, segment, slot, bar64, None, 0)

    def _check_segment(self, dev_id: str, segment: int) -> None:
        if not 0 <= segment < len(self.buses):
            raise DeviceError(f"{dev_id}: PCI segment {segment} does not exist")

    def _plug(self, dev_id: str, function: PciFunctionModel, segment: int, slot: int | None, bar64: bool,
              router: KvmMsiRouter | None, queues: int) -> PciDevice:
        entry = PciDevice(dev_id, segment, -1, function, router, queues=queues, bar64=bar64)
        try:
            entry.slot = self.buses[segment].add(LockedPciFunction(entry, self._bar_written), slot)
        except ValueError as err:
            raise DeviceError(f"{dev_id}: {err}") from None
        try:
            allocator = self._alloc64[segment] if bar64 else self._alloc32[segment]
            address = allocator.allocate(max(function.BAR_SIZE, 4096))
            function.set_bar_address(address)
            with entry.lock:
                self._map(entry, address)
        except BaseException:
            self.buses[segment].slots[entry.slot] = None
            raise
        function.on_bar_change = functools.partial(self._bar_moved, entry)
        self.devices[dev_id] = entry
        LOG.debug("%s: %04x:00:%02x.0 BAR0 %#x", dev_id, segment, entry.slot, function.bar_address())
        return entry

    def remove(self, dev_id: str) -> PciDevice:
        """Unplug ``dev_id`` (the guest has ejected it): unmap it and free its slot."""
        entry = self.devices.pop(dev_id)
        with entry.lock:
            self._unmap(entry)
        if dev_id in self.iommu_devices:
            self.iommu_devices.remove(dev_id)
            self._refresh_endpoints()
        self.buses[entry.segment].slots[entry.slot] = None
        self._release(entry)
        self._map_waiting(entry.segment)
        return entry

    def _release(self, entry: PciDevice) -> None:
        """Close what a device holds: its interrupts, its model's host resources, its region."""
        try:
            entry.transport.close()
        except Exception:  # the device is gone from the guest either way; go on with the rest
            LOG.exception("%s: close failed", entry.id)
        # after the model: its threads (a disk queue's server) write the irqfds until it is closed
        if entry.router is not None:
            entry.router.close()
        region = self._regions.pop(entry.id, None)
        if region is not None:
            slot, address, mapping = region
            try:
                self.vm_fd.set_user_memory_region(slot, address, 0, 0)  # size 0 deletes the slot
            except KvmError:
                pass  # the VM is going away
            try:
                mapping.close()
            except BufferError:
                pass  # still exported somewhere; unmapped with the process

    def find_slot(self, segment: int, slot: int) -> PciDevice | None:
        """The device in ``slot`` of ``segment``."""
        return next((e for e in self.devices.values() if e.segment == segment and e.slot == slot), None)

    def map_region(self, dev_id: str, mapping: mmap.mmap, size: int) -> int:
        """Put a host mapping (a pmem file) into guest physical memory as its own KVM memory
        slot, at a 2 MiB-aligned address of segment 0's 64-bit window; returns the address."""
        address = self._alloc64[0].allocate(max(_REGION_ALIGN, (size + _REGION_ALIGN - 1) & ~(_REGION_ALIGN - 1)))
        used = {slot for slot, _, _ in self._regions.values()}
        slot = next(s for s in range(_FIRST_REGION_SLOT, _FIRST_REGION_SLOT + 1024) if s not in used)
        host = int(ffi.cast("uintptr_t", ffi.from_buffer(mapping)))
        try:
            self.vm_fd.set_user_memory_region(slot, address, size, host)
        except KvmError as err:
            raise DeviceError(f"{dev_id}: KVM refused the memory region at {address:#x}") from err
        self._regions[dev_id] = (slot, address, mapping)
        return address

    def _in_window(self, segment: int, address: int, size: int) -> bool:
        seg = self.segments[segment]
        return any(base <= address and address + size <= base + length
                   for base, length in (seg.mmio32, seg.mmio64))

    def _map(self, entry: PciDevice, address: int) -> None:
        """Map the BAR window at ``address`` and put ioeventfds on its notify addresses
        (``entry.lock`` held)."""
        try:
            entry.mapped = self.mmio.insert(entry.window, address, entry.transport.BAR_SIZE,
                                            name=f"_virtio-pci-{entry.id}" if entry.queues else entry.id)
        except BusError as err:
            raise DeviceError(f"{entry.id}: BAR at {address:#x} overlaps another device") from err
        transport = entry.transport
        external = _external_kicks(entry)
        for queue in range(entry.queues):
            fd = external[queue] if external else os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            guest = address + transport.notify_offset(queue)  # type: ignore[attr-defined]  # virtio transports only
            try:
                self.vm_fd.ioeventfd(fd, guest, NOTIFY_WIDTH)
            except KvmError as err:
                if not external:
                    os.close(fd)
                self._unmap(entry)
                raise DeviceError(f"{entry.id}: cannot register the queue notifications") from err
            entry.notify_fds.append((fd, guest))
            if not external:
                entry.window.notify[fd] = queue
                self.loop.add(fd, functools.partial(entry.window.kick, fd, queue))

    def _unmap(self, entry: PciDevice) -> None:
        """Unmap the BAR window and drop its ioeventfds (``entry.lock`` held, so no kick is
        running; one the I/O thread has already picked up finds its fd gone from
        ``window.notify`` and does nothing)."""
        external = _external_kicks(entry)
        for fd, guest in entry.notify_fds:
            entry.window.notify.pop(fd, None)
            self.loop.remove(fd)
            try:
                self.vm_fd.ioeventfd(fd, guest, NOTIFY_WIDTH, deassign=True)
            except KvmError:
                pass
            if not external:
                os.close(fd)
        entry.notify_fds = []
        if entry.mapped is not None:
            self.mmio.remove(entry.mapped.base)
            entry.mapped = None

    def _bar_moved(self, entry: PciDevice, old: int, new: int) -> None:
        """The model's ``on_bar_change`` (inside a configuration write, ``entry.lock`` held):
        only note where the BAR went."""
        entry.pending_move = new

    def _bar_written(self, entry: PciDevice) -> None:
        """A configuration write moved BAR 0 (a vCPU thread, lock released): follow it on the
        control loop before the vCPU goes on."""
        self.handoff(functools.partial(self.follow_bar, entry))

    def follow_bar(self, entry: PciDevice) -> None:
        """Map the BAR where the guest put it (the control loop)."""
        if self.devices.get(entry.id) is not entry:
            return  # ejected meanwhile
        with entry.lock:
            address, entry.pending_move = entry.pending_move, None
            if address is not None:
                self._moved(entry, address)
        self._map_waiting(entry.segment)

    def _map_waiting(self, segment: int) -> None:
        """Map the BARs of ``segment`` that point into its window but are not mapped (the
        control loop, no device lock held): a BAR the guest moved onto another device's is
        left unmapped, and decodes at its address once that device has moved away or gone,
        as a PCI function decodes wherever its BAR is programmed."""
        for entry in list(self.devices.values()):
            if entry.segment != segment:
                continue
            with entry.lock:
                address = entry.transport.bar_address()
                if (entry.mapped is None and entry.pending_move is None and address
                        and self._in_window(segment, address, entry.transport.BAR_SIZE)):
                    try:
                        self._map(entry, address)
                    except DeviceError:
                        pass  # still on another device's BAR: it waits

    def _moved(self, entry: PciDevice, address: int) -> None:
        """Follow BAR 0 to ``address`` if the new place is usable (``entry.lock`` held).

        While the guest sizes the BAR (all ones written, then the address back) the value
        points outside every window; the BAR is simply unmapped until it is back in one.
        """
        if entry.mapped is not None and entry.mapped.base == address:
            return
        self._unmap(entry)
        if address and self._in_window(entry.segment, address, entry.transport.BAR_SIZE):
            try:
                self._map(entry, address)
            except DeviceError as err:
                LOG.warning("%s", err)

    # --- snapshot -------------------------------------------------------------------------------

    def states(self) -> dict[str, Any]:
        """The device tree as plain data: each platform device's state, and each PCI device's
        transport state (with its device state inside) and slot."""
        tree: dict[str, Any] = {dev_id: to_plain(device.state()) for dev_id, device in self.legacy.items()}
        tree.update((dev_id, {**to_plain(entry.transport.state()), "pci_slot": entry.slot})
                    for dev_id, entry in self.devices.items())
        return tree

    def restore(self, saved: dict[str, Any]) -> None:
        """Load every device's state from a snapshot (untrusted) and re-plug the BARs.

        Every device of the config must have a state and no state may be left over: a
        snapshot of another machine is refused rather than half applied.

        :raises SnapshotError: naming the device and the field that does not fit.
        """
        ids = set(self.legacy) | set(self.devices)
        extra = sorted(set(saved) - ids)
        missing = sorted(ids - set(saved) - _NEWER_THAN_FORMAT_1)
        if missing or extra:
            raise SnapshotError(f"The snapshot's devices do not match its config "
                                f"(missing {missing or 'none'}, unknown {extra or 'none'})")
        for dev_id, device in self.legacy.items():
            if dev_id in saved:
                _restore_state(dev_id, device, from_plain(device.state_type, saved[dev_id], dev_id))
        for dev_id, entry in self.devices.items():
            raw = saved[dev_id]
            if not isinstance(raw, dict):
                raise SnapshotError(f"{dev_id}: expected an object")
            self._move_slot(entry, raw.pop("pci_slot", entry.slot))
        # every device in its slot (its endpoint id follows) before the virtio-iommu's table,
        # which names the endpoints, is loaded
        self._refresh_endpoints()
        # the virtio-iommu's mappings first: a device behind it re-activates in its restore, and
        # its rings are I/O virtual addresses
        order = sorted(self.devices.items(), key=lambda item: item[0] != self.iommu_id)
        for dev_id, entry in order:
            raw = saved[dev_id]
            with entry.lock:
                _restore_state(dev_id, entry.transport, self._decode_state(entry, raw))
                self._moved(entry, entry.transport.bar_address())
        self._kick_after_restore = True

    def _move_slot(self, entry: PciDevice, slot: Any) -> None:
        """Put a restored device back in the slot it had (hotplug can leave gaps)."""
        if slot == entry.slot:
            return
        bus = self.buses[entry.segment]
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 < slot < len(bus.slots):
            raise SnapshotError(f"{entry.id}.pci_slot: invalid PCI slot {slot!r}")
        other = bus.slots[slot]
        bus.slots[slot], bus.slots[entry.slot] = bus.slots[entry.slot], other
        if other is not None:
            moved = next(e for e in self.devices.values() if e is getattr(other, "device_entry", None))
            moved.slot = entry.slot
        entry.slot = slot

    @staticmethod
    def _decode_state(entry: PciDevice, raw: dict[str, Any]) -> Any:
        transport = entry.transport
        if not isinstance(transport, VirtioPciDevice):
            return from_plain(transport.state_type, raw, entry.id)
        # the transport's state holds its device's, whose class only the device knows
        state = from_plain(VirtioPciState, {**raw, "device": None}, entry.id)
        device = from_plain(transport.device.state_type, raw.get("device"), f"{entry.id}.device")
        return dataclasses.replace(state, device=device)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or, after :meth:`pause`, resume) serving notifications.

        After a restore every queue is looked at once: requests the guest queued before the
        snapshot have no kick pending any more.
        """
        if self.loop.started:
            self.loop.resume()
        else:
            self.loop.start()
        if self._kick_after_restore:
            self._kick_after_restore = False
            for entry in self.devices.values():
                for queue in range(entry.queues):
                    with entry.lock:
                        entry.transport.notify(queue)  # type: ignore[attr-defined]  # virtio transports only
        for device in self._pausable():
            device.resume()

    def _pausable(self) -> list[Any]:
        """Device models with their own clock (the watchdog): paused with the VM."""
        return [d for d in (getattr(e.transport, "device", None) for e in self.devices.values())
                if callable(getattr(d, "pause", None)) and callable(getattr(d, "resume", None))]

    def pause(self) -> None:
        """Quiesce: no device work runs until :meth:`start`."""
        self.loop.pause()
        for device in self._pausable():
            device.pause()

    def close(self) -> None:
        """Stop the I/O thread, unplug everything and close the devices' host resources."""
        self.loop.stop()
        if self._iommu_fault_fd >= 0:
            os.close(self._iommu_fault_fd)
            self._iommu_fault_fd = -1
        for entry in self.devices.values():
            if not _external_kicks(entry):
                for fd, _ in entry.notify_fds:
                    os.close(fd)
            entry.notify_fds = []
            self._release(entry)
        self.devices = {}

    # --- inspection -------------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        return {dev_id: dict(entry.transport.counters()) for dev_id, entry in self.devices.items()}

    def device_tree(self) -> dict[str, dict[str, Any]]:
        """cloud-hypervisor's ``device_tree`` of ``vm.info`` (its ``vmm/src/device_tree.rs``
        ``DeviceNode``: id, resources, parent, children, pci_bdf), built as its device manager
        builds it on x86_64:

        - the platform devices it names (:meth:`add_node`), without resources;
        - each virtio device, the child of its ``_virtio-pci-<id>`` transport node, which has the
          PCI address and BAR 0 (a ``PciBar`` resource, as its ``vm-device`` crate serializes
          one); a pmem device has its region as an ``MmioAddressRange``;
        - a plain PCI device (pvpanic): one node with its BAR and PCI address, no parent.
        """
        tree: dict[str, dict[str, Any]] = {dev_id: _node(dev_id, []) for dev_id in self.platform_nodes}
        for dev_id, entry in self.devices.items():
            transport = entry.transport
            bar = {"index": 0, "base": transport.bar_address(), "size": transport.BAR_SIZE,
                   "type_": "Mmio64" if entry.bar64 else "Mmio32", "prefetchable": False}
            bdf = f"{entry.segment:04x}:00:{entry.slot:02x}.0"
            if not isinstance(transport, VirtioPciDevice):
                tree[dev_id] = _node(dev_id, [{"PciBar": bar}], pci_bdf=bdf)
                continue
            region = self._regions.get(dev_id)
            resources = [] if region is None else [{"MmioAddressRange": {"base": region[1], "size": len(region[2])}}]
            tree[dev_id] = _node(dev_id, resources, parent=f"_virtio-pci-{dev_id}")
            tree[f"_virtio-pci-{dev_id}"] = _node(f"_virtio-pci-{dev_id}", [{"PciBar": bar}], children=[dev_id],
                                                  pci_bdf=bdf)
        return tree


def _external_kicks(entry: PciDevice) -> list[int]:
    """The notification eventfds a device model owns (a vhost-user device, whose backend reads
    them): they become the queues' ioeventfds, follow BAR moves, and are never read or closed
    here. Empty for the devices whose kicks the I/O loop serves."""
    fds: list[int] = getattr(getattr(entry.transport, "device", None), "kick_fds", None) or []
    return fds if len(fds) == entry.queues else []


def _node(dev_id: str, resources: list[dict[str, Any]], *, parent: str | None = None,
          children: list[str] | None = None, pci_bdf: str | None = None) -> dict[str, Any]:
    return {"id": dev_id, "resources": resources, "parent": parent, "children": children or [], "pci_bdf": pci_bdf}


def _restore_state(dev_id: str, device: Any, state: Any) -> None:
    """``device.restore(state)``, its complaint turned into a snapshot error naming the device
    and the field."""
    try:
        device.restore(state)
    except DeviceStateError as err:
        where = f"{dev_id}.{err.field}" if err.field else dev_id
        raise SnapshotError(f"{where}: {err.message}") from err
    except ValueError as err:  # a check the device's model makes below its restore
        raise SnapshotError(f"{dev_id}: the saved state does not fit the device: {err}") from err
