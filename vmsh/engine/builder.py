"""The composition root: the one place where a VM is put together, for a boot or from a snapshot.

Two entry points share one device-creation path (Firecracker's ``builder.rs`` is the model):

* :func:`build_for_boot` opens KVM, makes guest RAM (``memory_manager``), creates the devices
  the config asks for, loads the kernel and initramfs, writes the ACPI and SMBIOS tables and
  the boot parameters, and creates and configures the vCPUs;
* :func:`build_from_snapshot` checks the snapshot against its config (``snapshot``), maps its
  memory file copy-on-write, creates the same devices, and loads every saved state into them:
  the vCPUs and the in-kernel irqchip first, then the device manager's device tree.

Either returns a :class:`~vmsh.engine.vm.Vm` with nothing running, or raises and leaves nothing
behind. The machine is cloud-hypervisor's x86_64 one (its ``docs/device_model.md`` and
``arch/src/x86_64/layout.rs``): RAM below 3 GiB and from 4 GiB, the kernel through PVH or the
bzImage 32-bit entry, ACPI at 0xa0000 (hardware-reduced FADT, MADT, MCFG, DSDT; SRAT and SLIT
with ``--numa``), SMBIOS at
0xf0000, the in-kernel irqchip and PIT, the platform devices (``platform_devices``) and PCI.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from vmsh.config import model as m
from vmsh.config.model import ConsoleOutputMode
from vmsh.devices.pvpanic import event_name as pvpanic_event_name
from vmsh.engine import smbios
from vmsh.engine.acpi import cpu_hotplug, memory_hotplug, pci_hotplug
from vmsh.engine.acpi.builder import build_acpi
from vmsh.engine.acpi.spec import AcpiSpec, GedSpec, PciSegment, ViotSpec
from vmsh.engine.boot import layout
from vmsh.engine.boot.configure import configure_vcpu, write_boot_tables
from vmsh.engine.boot.loader import KernelImage, load_initramfs, load_kernel
from vmsh.engine.console import ConsoleBackend, open_backend
from vmsh.engine.control_requests import ControlRequests, Post
from vmsh.engine.cpuid import CpuTopology
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.engine.hotplug import PciHotplug, declare_slots
from vmsh.engine.interrupts import EventTrigger, IrqFdTrigger
from vmsh.engine.kvm import Kvm
from vmsh.engine.kvm_state import restore_vcpu, restore_vm
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.memory_hotplug import MemoryHotplug
from vmsh.engine.memory_manager import (
    check_host_memory,
    create_memory,
    hotplug_areas,
    hotplug_end,
    map_snapshot_memory,
)
from vmsh.engine.numa import numa_errors, numa_spec
from vmsh.engine.pci_windows import pci_segments
from vmsh.engine.persist import SnapshotError
from vmsh.engine.platform_devices import (
    CPU_HOTPLUG_ADDRESS,
    GED_ADDRESS,
    GED_IRQ,
    MEMORY_HOTPLUG_ADDRESS,
    PCI_HOTPLUG_ADDRESS,
    PM_TIMER_PORT,
    SHUTDOWN_PORT,
    TPM_ADDRESS,
    create_platform_devices,
)
from vmsh.engine.pvm import internal_error_handler, is_pvm_host
from vmsh.engine.snapshot import SavedVm, read_saved_vm
from vmsh.engine.state import VmState
from vmsh.engine.stats import KvmStats
from vmsh.engine.vcpu import Vcpu, install_kick_handler
from vmsh.engine.virtio_devices import PlatformHooks, add_config_devices, unsupported_item
from vmsh.engine.vm import GuestEventSink, Vm
from vmsh.errors import KvmError, VmshError

LOG = logging.getLogger(__name__)

#: <linux/kvm.h>: KVM emulates Hyper-V's synthetic interrupt controller
KVM_CAP_HYPERV_SYNIC = 123


def _virtio_mem_ranges(mem: m.MemoryConfig, boot_ram: int | None) -> dict[str, list[tuple[int, int]]]:
    """Each memory zone's virtio-mem region, as (guest address, length) ranges."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for area in hotplug_areas(mem, boot_ram):
        if area.method is m.HotplugMethod.VIRTIO_MEM:
            ranges.setdefault(area.zone, []).append((area.base, area.size))
    return ranges


def config_errors(cfg: m.VmConfig) -> list[str]:
    """Configs that validate but that cloud-hypervisor refuses when it builds the VM, in its words
    (``vmm/src/memory_manager.rs``, ``vmm/src/device_manager.rs`` and, for ``--numa``,
    ``vmm/src/vm.rs``)."""
    errors = []
    if cfg.memory.hotplugged_size is not None and cfg.memory.hotplug_size is None:
        errors.append("Invalid to define 'hotplugged_size' when there is no 'hotplug_size'")
    for zone in cfg.memory.zones or []:
        if zone.hotplugged_size is not None and zone.hotplug_size is None:
            errors.append(f"Invalid to define 'hotplugged_size' when there is no 'hotplug_size' "
                          f"for memory zone {zone.id}")
    if cfg.console.mode is ConsoleOutputMode.SOCKET:
        errors.append("No socket option support for console device")
    errors.extend(numa_errors(cfg))
    return errors


@functools.cache
def host_has_amx() -> bool:
    """Whether this host's CPUs have AMX tiles (the ``amx_tile`` flag of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def unsupported_options(cfg: m.VmConfig) -> list[str]:
    """Options that parse and validate but that this VMM cannot provide, each with why.

    Nothing is accepted and then ignored: an option vmsh does not act on is refused here (and a
    hot-added device's by :func:`~vmsh.engine.virtio_devices.unsupported_item`).
    """
    missing = []
    for name, present in (
        # These need host pieces vmsh does not have: VFIO, vDPA, SGX.
        ("--vdpa (needs /dev/vhost-vdpa-*)", cfg.vdpa),
        ("--device (VFIO passthrough needs /dev/vfio)", cfg.devices),
        ("--user-device (needs a vfio-user server)", cfg.user_devices),
        ("--sgx-epc (needs SGX on the host)", cfg.sgx_epc),
        # Not implemented yet.
        # cloud-hypervisor ignores it: the serial port is a legacy device, not on PCI
        ("--serial iommu=on (the serial port is not a PCI device: it cannot be behind the IOMMU)",
         cfg.serial.iommu),
        ("--cpus features=[amx] (not implemented in vmsh"
         + (", though this host has AMX)" if host_has_amx() else "; this host has no AMX either)"),
         cfg.cpus.features.amx),
    ):
        if present:
            missing.append(name)
    for kind in ("disks", "net", "fs", "pmem"):
        for item in getattr(cfg, kind) or []:
            missing.extend(n for n in unsupported_item(kind, item) if n not in missing)
    if cfg.vsock is not None:
        missing.extend(unsupported_item("vsock", cfg.vsock))
    if cfg.memory.size == 0 and not cfg.memory.zones:
        missing.append("--memory size=0 without --memory-zone")
    return missing


def refuse_unbuildable(cfg: m.VmConfig) -> None:
    """Raise for a config this VMM must not build: cloud-hypervisor's errors first, then what
    vmsh does not support.

    :raises VmshError: naming every option at fault and why.
    """
    errors = config_errors(cfg)
    if errors:
        raise VmshError("; ".join(errors))
    missing = unsupported_options(cfg)
    if missing:
        raise VmshError("Not supported by vmsh: " + ", ".join(missing))


def apply_restored_net_fds(config: m.VmConfig, net_fds: list[m.RestoredNetConfig] | None) -> None:
    """Give the snapshot's fd-backed net devices the tap fds of ``--restore net_fds=`` (the fd
    numbers in its config.json belonged to the process that took it).

    :raises SnapshotError: for an entry that names no fd-backed net of the snapshot or brings a
        different number of fds, and for an fd-backed net left without new fds.
    """
    nets = {n.id: n for n in config.net or []}
    given = set()
    for entry in net_fds or []:
        net = nets.get(entry.id)
        if net is None or net.fds is None:
            raise SnapshotError(f"net_fds: the snapshot has no net device {entry.id} created from fds")
        if entry.fds is None or len(entry.fds) != len(net.fds):
            raise SnapshotError(f"net_fds: {entry.id} needs {len(net.fds)} fds, got {len(entry.fds or [])}")
        net.fds = list(entry.fds)
        given.add(entry.id)
    for net in nets.values():
        if net.fds is not None and net.id not in given:
            raise SnapshotError(f"Net device {net.id} was created from fds: restore it with "
                                f"net_fds=[{net.id}@[...]] giving new ones")


def build_for_boot(config: m.VmConfig, events: EventMonitor, on_guest_event: GuestEventSink, post: Post, *,
                   profile: m.ProfileConfig | None = None, tty: ConsoleBackend | None = None) -> Vm:
    """Create everything ``config`` asks for; nothing runs until ``Vm.boot``.

    ``post`` queues work for the VMM's control loop (``Vmm.post``); ``tty`` is the serial
    backend for ``--serial tty`` when this process's terminal is not the console.

    :raises VmshError: naming what could not be created; nothing is left behind.
    """
    refuse_unbuildable(config)
    vm = Vm(config, events, on_guest_event, ControlRequests(post), profile)
    try:
        _open_kvm(vm)
        assert vm.kvm is not None
        vm.memory = create_memory(config.memory)
        vm.memory.register(vm.vm_fd)
        payload = config.payload
        assert payload is not None, "normalize() refuses a config without a payload"
        image = payload.kernel or payload.firmware
        assert image is not None, "normalize() refuses a payload without a kernel or firmware"
        what = "kernel" if payload.kernel else "firmware"
        try:
            kernel = load_kernel(vm.memory, image)
        except VmshError as err:
            raise VmshError(f"Cannot load the {what} {image}") from err
        try:
            initrd = load_initramfs(vm.memory, payload.initramfs, kernel) if payload.initramfs else None
        except VmshError as err:
            raise VmshError(f"Cannot load the initramfs {payload.initramfs}") from err
        supported = vm.kvm.supported_cpuid()
        phys_bits = _phys_bits(vm, supported)
        # the devices first: the ACPI tables declare their slots hotpluggable
        segments = _create_devices(vm, tty, phys_bits)
        assert vm.devices is not None and vm.platform is not None
        spare = pci_hotplug.SPARE_SLOTS_PVM if is_pvm_host() else pci_hotplug.NUM_SLOTS
        declare_slots(vm.platform.hotplug, vm.devices, config.num_pci_segments(), spare)
        rsdp = _write_firmware_tables(vm, segments)
        write_boot_tables(vm.memory, kernel, payload.cmdline or "", initrd, rsdp=rsdp)
        topology = cpu_topology(config)
        for index in range(config.cpus.boot_vcpus):
            fd = _create_vcpu(vm, index, topology.apic_id(index))
            configure_vcpu(fd, vm.memory, kernel, supported, topology, pvm=is_pvm_host(), phys_bits=phys_bits,
                           hyperv=config.cpus.kvm_hyperv)
        vm.new_vcpu = functools.partial(_hotplug_vcpu, vm, kernel, supported, phys_bits)
        _finish(vm)
    except BaseException:
        vm.shutdown()
        raise
    return vm


def build_from_snapshot(directory: str, restore: m.RestoreConfig, events: EventMonitor,
                        on_guest_event: GuestEventSink, post: Post, *, profile: m.ProfileConfig | None = None,
                        tty: ConsoleBackend | None = None) -> Vm:
    """Rebuild the VM saved in ``directory``; it comes back Paused.

    Guest RAM is the snapshot's memory file mapped copy-on-write (read in at once with
    ``prefault``), so restoring costs the same whatever the guest's size, and clones of one
    snapshot share its pages. The snapshot is untrusted input: a malformed or mismatched one
    is refused with an error and leaves nothing behind.

    :raises SnapshotError: naming what is wrong with the snapshot.
    """
    saved = read_saved_vm(directory)
    apply_restored_net_fds(saved.config, restore.net_fds)
    check_restorable(saved.config)
    return build_restored(
        saved, lambda: map_snapshot_memory(saved.memory_path, restore.prefault, saved.ranges, saved.boot_ram),
        events, on_guest_event, post, profile=profile, tty=tty)


def check_restorable(config: m.VmConfig) -> None:
    """Refuse a saved (or migrating) VM's config that vmsh cannot build.

    :raises SnapshotError: naming what is refused.
    """
    errors = config_errors(config)
    if errors:
        raise SnapshotError("The snapshot's config is refused: " + "; ".join(errors))
    missing = unsupported_options(config)
    if missing:
        raise SnapshotError("The snapshot needs what vmsh does not support: " + ", ".join(missing))


def build_restored(saved: SavedVm, make_memory: Callable[[], GuestMemoryMmap], events: EventMonitor,
                   on_guest_event: GuestEventSink, post: Post, *, profile: m.ProfileConfig | None = None,
                   tty: ConsoleBackend | None = None, serial: ConsoleBackend | None = None) -> Vm:
    """Rebuild the VM ``saved`` describes (its config checked with :func:`check_restorable`) on
    the guest RAM ``make_memory`` gives (a snapshot's file, or what a live migration received;
    the VM owns it from then on); it comes back Paused. ``serial`` is the serial port's backend
    when a migration brought it (a console socket); the VM owns it too.

    :raises SnapshotError: naming what does not fit; nothing is left behind.
    """
    config = saved.config
    vm = Vm(config, events, on_guest_event, ControlRequests(post), profile)
    try:
        _open_kvm(vm)
        assert vm.kvm is not None, "opened above"
        # asked once (KVM_GET_SUPPORTED_CPUID costs about half a millisecond here)
        supported = vm.kvm.supported_cpuid()
        phys_bits = _phys_bits(vm, supported)
        vm.boot_ram = saved.boot_ram
        vm.memory = make_memory()
        vm.memory.register(vm.vm_fd)
        _create_devices(vm, tty, phys_bits, serial)
        topology = cpu_topology(config)
        for index, state in enumerate(saved.vcpus):
            if state.vcpu_id != topology.apic_id(index):
                raise SnapshotError(f"The snapshot's vcpu{index} has KVM id {state.vcpu_id}, its topology gives "
                                    f"{topology.apic_id(index)}")
            _create_vcpu(vm, index, state.vcpu_id)
        try:
            for vcpu, state in zip(vm.vcpus, saved.vcpus, strict=True):
                restore_vcpu(vcpu.fd, state)
            restore_vm(vm.vm_fd, saved.kvm)
        except (KvmError, ValueError, OverflowError, TypeError) as err:
            # cffi raises OverflowError/TypeError for a value its C field cannot hold; the
            # decoder's width checks should have caught it, this keeps it a snapshot error
            raise SnapshotError("KVM refused the snapshot's vCPU or irqchip state") from err
        assert vm.devices is not None
        # after the irqchip: a device whose state raises an interrupt (the GED) must not lose it
        vm.devices.restore(saved.devices)
        vm.paused_clock = saved.kvm.clock
        # a vCPU added later starts in wait-for-SIPI (KVM's state for every vCPU but the
        # BSP), so the kernel entry its registers get is never used: none is known here
        no_kernel = KernelImage(kind="bzimage", entry=0, load_start=0, load_end=0)
        vm.new_vcpu = functools.partial(_hotplug_vcpu, vm, no_kernel, supported, phys_bits)
        _finish(vm)
        vm.state = VmState.PAUSED
    except BaseException:
        vm.shutdown()
        raise
    return vm


def _open_kvm(vm: Vm) -> None:
    """The KVM VM with its in-kernel irqchip and PIT, after checking what the host can give."""
    cfg = vm.config
    if threading.current_thread() is threading.main_thread():
        install_kick_handler()  # front-ends that build VMs from other threads install it at start
    usable = os.sched_getaffinity(0)
    for entry in cfg.cpus.affinity or []:
        wrong = sorted(set(entry.host_cpus) - usable)
        if wrong:
            raise VmshError(f"--cpus affinity: vCPU {entry.vcpu} asks for host CPU {wrong[0]}, "
                            f"but this process may only use CPUs {sorted(usable)}")
    check_host_memory(cfg.memory.total_size())
    try:
        vm.kvm = Kvm()
    except KvmError as err:
        raise VmshError("Cannot open /dev/kvm: is KVM available to this user?") from err
    vm.vm_fd = vm.kvm.create_vm()
    vm.vm_fd.set_tss_addr(layout.KVM_TSS_START)
    vm.vm_fd.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
    vm.vm_fd.create_irqchip()
    vm.vm_fd.create_pit2()


def _host_phys_bits(supported: list[Any]) -> int:
    for entry in supported:
        if entry.function == 0x8000_0008:
            return int(entry.eax & 0xFF)
    return 36


def _phys_bits(vm: Vm, supported: list[Any] | None = None) -> int:
    assert vm.kvm is not None
    return min(_host_phys_bits(supported or vm.kvm.supported_cpuid()), vm.config.cpus.max_phys_bits)


def _create_devices(vm: Vm, tty: ConsoleBackend | None, phys_bits: int,
                    serial: ConsoleBackend | None = None) -> tuple[PciSegment, ...]:
    """Every device of the config, fresh: the one path for a boot and for a restore (which then
    loads the saved states into them). Returns the PCI segments."""
    cfg = vm.config
    assert vm.memory is not None
    # the 64-bit PCI window starts after RAM and the hotplug areas (cloud-hypervisor's device area)
    segments = pci_segments(cfg, hotplug_end(cfg.memory, vm.memory.last_addr + 1, vm.boot_ram), phys_bits)

    def irq(gsi: int) -> IrqFdTrigger:
        trigger = IrqFdTrigger(vm.vm_fd, gsi)
        vm.closeables.append(trigger)
        return trigger

    def on_cpu_eject(index: int) -> None:
        # a vCPU thread's write to the CPU hotplug controller: the vCPU is parked on the control loop
        vm.requests.run(functools.partial(vm.vcpu_ejected, index))

    def on_eject(segment: int, slot: int) -> None:
        # a vCPU thread's write to B0EJ: the removal runs on the control loop
        assert vm.hotplug is not None, "made below, before any vCPU runs"
        vm.requests.run(functools.partial(vm.hotplug.ejected, segment, slot))

    reset = EventTrigger(lambda: vm.on_guest_event(GuestEvent.RESET, "guest reset"))
    poweroff = EventTrigger(lambda: vm.on_guest_event(GuestEvent.POWEROFF, "guest poweroff"))
    vm.devices = DeviceManager(vm.vm_fd, vm.memory, vm.pio, vm.mmio, segments, handoff=vm.requests.run,
                               on_device_event=lambda dev_id, event: vm.events.emit("virtio-device", event,
                                                                                    {"id": dev_id}))
    vm.platform = create_platform_devices(cfg, vm.devices, irq, reset, poweroff, tty, on_eject, on_cpu_eject,
                                          serial=serial)
    vm.cpu_hotplug = vm.platform.cpu_hotplug
    platform = vm.platform
    vm.memory_hotplug = MemoryHotplug(cfg, vm.memory, vm.vm_fd, lambda flags: platform.ged.notify(flags),
                                      vm.platform.memory_hotplug, vm.boot_ram)
    vm.backends.extend(vm.platform.backends)
    if vm.platform.swtpm is not None:
        vm.closeables.append(vm.platform.swtpm)
    hooks = PlatformHooks(on_panic=lambda events: vm.events.emit("guest", "panic",
                                                                 {"event": pvpanic_event_name(events)}),
                          reset=reset)
    if cfg.console.mode is not ConsoleOutputMode.OFF:
        if cfg.console.mode is ConsoleOutputMode.TTY and tty is not None:
            hooks.console = tty
        else:
            # cloud-hypervisor reads the virtio console's host side on the device's thread, named by its id
            hooks.console = open_backend(cfg.console.mode, cfg.console.file, None, input_thread="__console")
            if hooks.console is not None:
                vm.backends.append(hooks.console)
                if hooks.console.path and cfg.console.mode is ConsoleOutputMode.PTY:
                    cfg.console.file = hooks.console.path
    add_config_devices(vm.devices, cfg, hooks)
    for area in hotplug_areas(cfg.memory):
        if area.method is m.HotplugMethod.VIRTIO_MEM:
            entry = vm.devices.devices[area.zone]
            vm.memory_hotplug.virtio_mem[area.zone] = (entry.transport.device, entry.lock)  # type: ignore[attr-defined]  # a virtio transport
    if hooks.console is not None and hooks.console_device is not None:
        console, device = hooks.console, hooks.console_device
        vm.platform.input_starters.append(lambda: console.start_input(device.enqueue_input))
    vm.hotplug = PciHotplug(cfg, vm.devices, vm.platform.hotplug, vm.platform.ged, vm.events)
    return segments


def _write_firmware_tables(vm: Vm, segments: tuple[PciSegment, ...]) -> int:
    """The ACPI tables and SMBIOS in guest RAM; returns the RSDP's address."""
    cfg = vm.config
    assert vm.memory is not None and vm.platform is not None
    try:
        topology = cpu_topology(cfg)
        acpi = build_acpi(AcpiSpec(
            boot_vcpus=cfg.cpus.boot_vcpus,
            max_vcpus=cfg.cpus.max_vcpus,
            apic_ids=tuple(topology.apic_id(i) for i in range(cfg.cpus.max_vcpus)),
            serial=cfg.serial.mode is not ConsoleOutputMode.OFF,
            pci_segments=segments,
            pci_rescan_method=pci_hotplug.RESCAN_METHOD,
            extra_aml=pci_hotplug.hotplug_aml(PCI_HOTPLUG_ADDRESS, vm.platform.hotplug.declared)
            + ((memory_hotplug.hotplug_aml(MEMORY_HOTPLUG_ADDRESS),) if vm.platform.memory_hotplug else ()),
            memory_scan_method=memory_hotplug.SCAN_METHOD if vm.platform.memory_hotplug is not None else None,
            ged=GedSpec(address=GED_ADDRESS, irq=GED_IRQ),
            cpu_hotplug_address=CPU_HOTPLUG_ADDRESS if vm.platform.cpu_hotplug is not None else None,
            cpu_scan_method=cpu_hotplug.SCAN_METHOD if vm.platform.cpu_hotplug is not None else None,
            shutdown_port=SHUTDOWN_PORT,
            pm_timer_port=PM_TIMER_PORT,
            tpm_address=TPM_ADDRESS if vm.platform.tpm is not None else None,
            # cloud-hypervisor lists the virtio-mem regions as hot-pluggable, not the ACPI area
            numa=numa_spec(cfg, hotplug_ranges=_virtio_mem_ranges(cfg.memory, vm.boot_ram)),
            viot=viot_spec(vm.devices),
        ))
        tables = smbios.build_smbios(smbios.SmbiosSpec.from_platform(cfg.platform))
    except ValueError as err:
        raise VmshError("Cannot build the firmware tables") from err
    vm.memory.write(acpi.rsdp_address, acpi.blob)
    vm.memory.write(layout.SMBIOS_START, tables)
    return acpi.rsdp_address


def viot_spec(devices: DeviceManager | None) -> ViotSpec | None:
    """The VIOT table's contents: the virtio-iommu and its endpoints (cloud-hypervisor writes
    the table only when some device is behind the IOMMU)."""
    if devices is None or devices.iommu_id is None:
        return None
    endpoints = devices.iommu_endpoints()
    if not endpoints:
        return None
    iommu = devices.devices[devices.iommu_id]
    return ViotSpec(iommu.segment, iommu.slot << 3, tuple((seg, slot << 3) for seg, slot in endpoints))


def cpu_topology(config: m.VmConfig) -> CpuTopology:
    """``--cpus topology``, or one package of ``max`` single-threaded cores."""
    topo = config.cpus.topology
    if topo is None:
        return CpuTopology.flat(config.cpus.max_vcpus)
    return CpuTopology(threads_per_core=topo.threads_per_core, cores_per_die=topo.cores_per_die,
                       dies_per_package=topo.dies_per_package, packages=topo.packages)


def _create_vcpu(vm: Vm, index: int, apic_id: int) -> VcpuFd:
    vcpu = _new_vcpu(vm, index, apic_id)
    vm.vcpus.append(vcpu)
    return vcpu.fd


def _new_vcpu(vm: Vm, index: int, apic_id: int) -> Vcpu:
    # KVM gives a vCPU its id as initial APIC id: the id is the x2APIC id the topology packs
    # (the MADT and CPUID say the same), as cloud-hypervisor creates its vCPUs
    fd: VcpuFd = vm.vm_fd.create_vcpu(apic_id)
    try:
        _enable_hyperv(vm, fd)  # before a restore loads its SynIC MSRs
    except BaseException:
        fd.close()  # not one of the VM's vCPUs yet: its shutdown would not close it
        raise
    return Vcpu(fd, vm.pio, vm.mmio, index=index)


def _hotplug_vcpu(vm: Vm, kernel: KernelImage, supported: list[Any], phys_bits: int, index: int) -> Vcpu:
    """vCPU ``index`` for a resize up: its APIC id, CPUID and MSRs exactly as a boot vCPU's.

    :raises VmshError: when KVM refuses to create or configure it.
    """
    assert vm.memory is not None
    topology = cpu_topology(vm.config)
    try:
        vcpu = _new_vcpu(vm, index, topology.apic_id(index))
    except KvmError as err:
        raise VmshError(f"resize: cannot create vcpu{index}") from err
    try:
        configure_vcpu(vcpu.fd, vm.memory, kernel, supported, topology, pvm=is_pvm_host(), phys_bits=phys_bits,
                       hyperv=vm.config.cpus.kvm_hyperv)
    except KvmError as err:
        vcpu.fd.close()
        raise VmshError(f"resize: cannot configure vcpu{index}") from err
    vcpu.on_internal_error = vm.pvm_handler
    if vm.vm_stats is not None:
        try:
            vm.vcpu_stats.append(KvmStats(vcpu.fd.stats_fd()))
        except VmshError as err:
            LOG.info("vcpu%d: KVM statistics are not available: %s", index, err)
    return vcpu


def _enable_hyperv(vm: Vm, fd: VcpuFd) -> None:
    """``kvm_hyperv=on``: KVM's Hyper-V synthetic interrupt controller on this vCPU (the CPUID
    leaves announce it). Hosts whose KVM has no Hyper-V emulation (PVM) refuse."""
    if not vm.config.cpus.kvm_hyperv:
        return
    assert vm.kvm is not None
    if not vm.kvm.check_extension(KVM_CAP_HYPERV_SYNIC):
        raise VmshError("--cpus kvm_hyperv=on: this host's KVM has no Hyper-V emulation (KVM_CAP_HYPERV_SYNIC)"
                        + (": PVM hosts have none" if is_pvm_host() else ""))
    try:
        fd.enable_cap(KVM_CAP_HYPERV_SYNIC)
    except KvmError as err:
        raise VmshError(f"--cpus kvm_hyperv=on: cannot enable the SynIC on vcpu{fd.vcpu_id}") from err


def _finish(vm: Vm) -> None:
    """What every VM gets once it is built or restored: the PVM handler, KVM's statistics, and
    console input. Input waits until now: an interrupt the UART raised for it before a restore
    loaded the irqchip would be lost, and with it all further input."""
    assert vm.memory is not None and vm.platform is not None
    for start in vm.platform.input_starters:
        start()
    vm.platform.input_starters.clear()
    vm.pvm_handler = internal_error_handler(vm.memory) if is_pvm_host() else None
    for vcpu in vm.vcpus:
        vcpu.on_internal_error = vm.pvm_handler
    try:
        vm.vm_stats = KvmStats(vm.vm_fd.stats_fd())
        vm.vcpu_stats = [KvmStats(v.fd.stats_fd()) for v in vm.vcpus]
    except VmshError as err:
        LOG.info("KVM statistics are not available: %s", err)
