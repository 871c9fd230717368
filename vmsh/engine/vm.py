"""The composition root: one running VM built from a validated VmConfig.

:meth:`Vm.build` is the only place where KVM, guest memory, the boot loaders, the ACPI and
SMBIOS tables, the devices and the vCPUs are put together. The lifecycle methods (``boot``,
``pause``, ``resume``, ``shutdown``) move through :mod:`vmsh.engine.state`; what the guest
asks for (poweroff, reset) and fatal vCPU errors are reported through ``on_guest_event``,
never acted on from the vCPU threads themselves.

The machine (reference/cloud-hypervisor.md §6-8): RAM below 3 GiB and from 4 GiB, the
kernel through PVH or the bzImage 32-bit entry, ACPI at 0xa0000 (hardware-reduced FADT, MADT,
MCFG, DSDT), SMBIOS at 0xf0000, the in-kernel irqchip and PIT, a 16550A at 0x3f8/IRQ 4, the
i8042 reset port, CMOS/RTC, the POST port, the debug console, the ACPI sleep/reset port at
0x600 with the PM timer at 0x608, the GED for the power button, and PCI configuration
access (0xcf8 and ECAM) with the host bridge.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsh.config import canonical_json, normalize, vm_config_from_json
from vmsh.config import model as m
from vmsh.config.model import ConsoleOutputMode
from vmsh.devices.acpi import (
    GED_PCI_CHANGE,
    GED_POWER_BUTTON,
    AcpiPmTimer,
    AcpiShutdown,
    Ged,
    PciHotplugController,
    PciHotplugState,
)
from vmsh.devices.legacy.cmos import Cmos, CmosState
from vmsh.devices.legacy.debugcon import DebugConsole
from vmsh.devices.legacy.i8042 import I8042
from vmsh.devices.legacy.post import PostPort
from vmsh.devices.legacy.serial import Serial16550, SerialState
from vmsh.devices.pci.root import PciEcam
from vmsh.devices.pvpanic import event_name as pvpanic_event_name
from vmsh.engine import smbios
from vmsh.engine.acpi import pci_hotplug
from vmsh.engine.acpi.builder import build_acpi
from vmsh.engine.acpi.spec import AcpiSpec, GedSpec, PciSegment
from vmsh.engine.boot import layout
from vmsh.engine.boot.configure import configure_vcpu, write_boot_tables
from vmsh.engine.boot.loader import load_initramfs, load_kernel
from vmsh.engine.bus import Bus, BusError
from vmsh.engine.console import ConsoleBackend, open_backend
from vmsh.engine.cpuid import CpuTopology
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.engine.interrupts import EventTrigger, IrqFdTrigger
from vmsh.engine.kvm import Kvm, VcpuFd
from vmsh.engine.kvm_state import (
    VcpuState,
    VmKvmState,
    restore_vcpu,
    restore_vm,
    save_vcpu,
    save_vm,
    saveable_msrs,
)
from vmsh.engine.memory import GuestMemoryMmap, GuestRegion, MemoryOptions, ZoneSpec, ram_ranges
from vmsh.engine.persist import (
    FORMAT_VERSION,
    SnapshotError,
    from_plain,
    node,
    node_children,
    node_data,
    read_snapshot,
    to_plain,
    write_snapshot,
)
from vmsh.engine.profiler import RipSampler, Symbolizer
from vmsh.engine.pvm import internal_error_handler, is_pvm_host
from vmsh.engine.state import VmState, check_transition
from vmsh.engine.stats import KvmStats
from vmsh.engine.vcpu import Vcpu, VcpuStop, install_kick_handler
from vmsh.engine.virtio_devices import BALLOON_ID, PlatformHooks, add_config_devices
from vmsh.engine.virtio_devices import add_item as add_config_item
from vmsh.errors import (
    ConfigError,
    DeviceError,
    GuestMemoryError,
    KvmError,
    StateError,
    VmshError,
    error_chain,
)

LOG = logging.getLogger(__name__)

SERIAL_PORT, SERIAL_IRQ = 0x3F8, 4
I8042_PORT = 0x60
CMOS_PORT = 0x70
POST_PORT = 0x80
SHUTDOWN_PORT, PM_TIMER_PORT = 0x600, 0x608
#: the GED's event register: one byte in the free space below the IOAPIC
GED_ADDRESS, GED_IRQ = 0xFEB0_0000, 5
#: the ACPI PCI hotplug registers, in the same free space
PCI_HOTPLUG_ADDRESS = 0xFEB0_1000
#: PCI windows (reference §6.1): 640 MiB of 32-bit MMIO from 3 GiB, 64-bit MMIO after RAM
MMIO32_START, MMIO32_SIZE = 0xC000_0000, 640 << 20
RAM_64BIT_START = 1 << 32
#: the top of the physical address space is kept for platform devices (reference §6.1)
PLATFORM_AREA = (64 << 10) + (1 << 20)
VCPU_JOIN_TIMEOUT = 5.0

GuestEventSink = Callable[[str, str], None]
#: <linux/kvm.h>: KVM emulates Hyper-V's synthetic interrupt controller
KVM_CAP_HYPERV_SYNIC = 123
#: the device-manager snapshot nodes that are not PCI devices
LEGACY_DEVICE_IDS = frozenset({"__serial", "__cmos", "__ged", "__pci_hotplug"})


def _unsupported(cfg: m.VmConfig) -> list[str]:
    """Options that parse and validate but that this VMM cannot provide, each with why."""
    missing = []
    for name, present in (
        # These need host pieces vmsh does not have: a vhost-user backend, VFIO, vDPA, SGX.
        ("--disk vhost_user=on (needs a vhost-user backend)", any(d.vhost_user for d in cfg.disks or [])),
        ("--net vhost_user=on (needs a vhost-user backend)", any(n.vhost_user for n in cfg.net or [])),
        ("--fs (virtio-fs needs a vhost-user backend)", cfg.fs),
        ("--vdpa (needs /dev/vhost-vdpa-*)", cfg.vdpa),
        ("--device (VFIO passthrough needs /dev/vfio)", cfg.devices),
        ("--user-device (needs a vfio-user server)", cfg.user_devices),
        ("--sgx-epc (needs SGX on the host)", cfg.sgx_epc),
        # Not implemented yet.
        ("--tpm", cfg.tpm), ("--numa", cfg.numa),
        ("--memory hotplug_size", cfg.memory.hotplug_size),
        ("--platform iommu_segments", cfg.platform and cfg.platform.iommu_segments),
    ):
        if present:
            missing.append(name)
    if cfg.memory.size == 0 and not cfg.memory.zones:
        missing.append("--memory size=0 without --memory-zone")
    return missing


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


def _bdf(segment: int, slot: int) -> str:
    return f"{segment:04x}:00:{slot:02x}.0"


def host_memory() -> int | None:
    """RAM plus swap of this host in bytes (None when /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return (int(fields["MemTotal"].split()[0]) + int(fields["SwapTotal"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def _host_phys_bits(supported: list[Any]) -> int:
    for entry in supported:
        if entry.function == 0x8000_0008:
            return int(entry.eax & 0xFF)
    return 36


def _create_memory(mem: m.MemoryConfig) -> GuestMemoryMmap:
    """Guest RAM from ``--memory``, or from the ``--memory-zone`` s laid out one after another."""
    if not mem.zones:
        return GuestMemoryMmap.create(mem.size, MemoryOptions(
            shared=mem.shared, hugepages=mem.hugepages, hugepage_size=mem.hugepage_size,
            mergeable=mem.mergeable, thp=mem.thp, prefault=mem.prefault))
    if mem.size:
        raise VmshError("--memory size must be 0 when the RAM comes from --memory-zone")
    for zone in mem.zones:
        if zone.hotplug_size or zone.hotplugged_size:
            raise VmshError(f"--memory-zone {zone.id}: memory hotplug is not supported by vmsh")
    specs = [ZoneSpec(zone.size, MemoryOptions(
        shared=zone.shared, hugepages=zone.hugepages, hugepage_size=zone.hugepage_size,
        mergeable=mem.mergeable, thp=mem.thp, prefault=zone.prefault), file=zone.file,
        host_numa_node=zone.host_numa_node) for zone in mem.zones]
    try:
        return GuestMemoryMmap.create_zones(specs)
    except GuestMemoryError as err:
        raise VmshError("Cannot create the memory zones") from err


def _map_snapshot_memory(path: Path, prefault: bool) -> GuestMemoryMmap:
    """Guest RAM as a private (copy-on-write) mapping of a snapshot's memory file."""
    regions: list[GuestRegion] = []
    flags = mmap.MAP_PRIVATE | (getattr(mmap, "MAP_POPULATE", 0x8000) if prefault else 0)
    try:
        with open(path, "rb") as f:
            offset = 0
            for start, length in ram_ranges(os.fstat(f.fileno()).st_size):
                mm = mmap.mmap(f.fileno(), length, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                # the file stays known: a later snapshot copies the pages this VM never touched
                regions.append(GuestRegion(start, mm, backing=(os.dup(f.fileno()), offset)))
                offset += length
    except (OSError, ValueError) as err:
        for region in regions:
            region.close()
        raise SnapshotError(f"Cannot map the snapshot memory {path}") from err
    return GuestMemoryMmap(regions)


def pci_segments(cfg: m.VmConfig, ram_end: int, phys_bits: int) -> tuple[PciSegment, ...]:
    """Each segment's ECAM and its share of the 32-bit and 64-bit MMIO windows (by weight)."""
    count = cfg.num_pci_segments()
    weights = {s.pci_segment: s for s in cfg.pci_segments or []}
    w32 = [weights[i].mmio32_aperture_weight if i in weights else 1 for i in range(count)]
    w64 = [weights[i].mmio64_aperture_weight if i in weights else 1 for i in range(count)]
    start64 = max(ram_end, RAM_64BIT_START)
    size64 = max(0, (1 << phys_bits) - PLATFORM_AREA - start64)

    def split(base: int, size: int, parts: list[int], align: int) -> list[tuple[int, int]]:
        out, cursor, total = [], base, sum(parts)
        for i, weight in enumerate(parts):
            share = size - (cursor - base) if i == len(parts) - 1 else (size * weight // total) & ~(align - 1)
            out.append((cursor, share))
            cursor += share
        return out

    win32 = split(MMIO32_START, MMIO32_SIZE, w32, 1 << 20)
    win64 = split(start64, size64, w64, 1 << 30)
    return tuple(
        PciSegment(id=i, ecam_base=layout.PCI_MMCONFIG_START + i * PciEcam.SIZE, mmio32=win32[i], mmio64=win64[i])
        for i in range(count)
    )


class Vm:
    """One VM: KVM objects, memory, devices and vCPUs, built by :meth:`build`."""

    def __init__(self, config: m.VmConfig, events: EventMonitor, on_guest_event: GuestEventSink,
                 profile: m.ProfileConfig | None = None, tty: ConsoleBackend | None = None) -> None:
        self.config = config
        self.profile = profile
        #: the serial backend for ``--serial tty`` when this process's terminal is not the console
        self.tty = tty
        self.sampler: RipSampler | None = None
        self.events = events
        self.on_guest_event = on_guest_event
        self.state = VmState.CREATED
        self.kvm: Kvm | None = None
        self.vm_fd: Any = None
        self.memory: GuestMemoryMmap | None = None
        self.vcpus: list[Vcpu] = []
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.backends: list[ConsoleBackend] = []
        #: console input starts once the interrupt controller and vCPUs hold their final state
        self._input_starters: list[Callable[[], None]] = []
        self.ged: Ged | None = None
        self.devices: DeviceManager | None = None
        self.serial: Serial16550 | None = None
        self.pvm_handler: Any = None
        self.vm_stats: KvmStats | None = None
        self.vcpu_stats: list[KvmStats] = []
        self._triggers: list[Any] = []
        self._paused_clock: int | None = None
        self.cmos: Cmos
        self._closed = False
        self._lock = threading.Lock()

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, config: m.VmConfig, events: EventMonitor, on_guest_event: GuestEventSink,
              profile: m.ProfileConfig | None = None, tty: ConsoleBackend | None = None) -> Vm:
        """Create everything ``config`` asks for; nothing runs until :meth:`boot`.

        :raises VmshError: naming what could not be created; nothing is left behind.
        """
        missing = _unsupported(config)
        if missing:
            raise VmshError("Not supported by vmsh: " + ", ".join(missing))
        vm = cls(config, events, on_guest_event, profile, tty)
        try:
            vm._create()
        except BaseException:
            vm.shutdown()
            raise
        return vm

    @classmethod
    def restore(cls, directory: str, restore: m.RestoreConfig, events: EventMonitor, on_guest_event: GuestEventSink,
                profile: m.ProfileConfig | None = None, tty: ConsoleBackend | None = None) -> Vm:
        """Rebuild the VM saved in ``directory``; it comes back Paused.

        Guest RAM is the snapshot's memory file mapped copy-on-write (read in at once with
        ``prefault``), so restoring costs the same whatever the guest's size, and clones of
        one snapshot share its pages. The snapshot is untrusted input: a malformed or
        mismatched one is refused with an error and leaves nothing behind.

        :raises SnapshotError: naming what is wrong with the snapshot.
        """
        config_text, tree, memory_path = read_snapshot(directory)
        try:
            config = normalize(vm_config_from_json(config_text))
        except ConfigError as err:
            raise SnapshotError(f"{directory}/config.json is not a valid VmConfig") from err
        apply_restored_net_fds(config, restore.net_fds)
        missing = _unsupported(config)
        if missing:
            raise SnapshotError("The snapshot needs what vmsh does not support: " + ", ".join(missing))
        vm = cls(config, events, on_guest_event, profile, tty)
        try:
            vm._restore(tree, memory_path, restore.prefault)
        except BaseException:
            vm.shutdown()
            raise
        return vm

    def _restore(self, tree: dict[str, Any], memory_path: Path, prefault: bool) -> None:
        cfg = self.config
        root = node_data(tree, "")
        if not isinstance(root, dict) or root.get("version") != FORMAT_VERSION:
            raise SnapshotError(f"Unsupported snapshot format (vmsh writes version {FORMAT_VERSION})")
        kvm_state = from_plain(VmKvmState, root.get("kvm"), "vm.kvm")
        table = node_data(tree, "memory-manager")
        ranges = table.get("ranges") if isinstance(table, dict) else None
        expected = [list(r) for r in ram_ranges(cfg.memory.total_size())]
        if ranges != expected:
            raise SnapshotError(f"The snapshot's RAM ranges {ranges} do not match its config ({expected})")
        size = memory_path.stat().st_size
        if size != cfg.memory.total_size():
            raise SnapshotError(f"{memory_path} holds {size} bytes, the config says {cfg.memory.total_size()}")
        vcpu_ids = node_children(tree, "cpu-manager")
        if sorted(vcpu_ids, key=lambda x: (len(x), x)) != [str(i) for i in range(cfg.cpus.boot_vcpus)]:
            raise SnapshotError(f"The snapshot has vCPUs {vcpu_ids}, its config {cfg.cpus.boot_vcpus}")
        vcpu_states = [from_plain(VcpuState, node_data(tree, f"cpu-manager/{i}"), f"vcpu{i}")
                       for i in range(cfg.cpus.boot_vcpus)]
        devices = {name: node_data(tree, f"device-manager/{name}") for name in node_children(tree, "device-manager")}

        self._open_kvm()
        self.memory = _map_snapshot_memory(memory_path, prefault)
        self.memory.register(self.vm_fd)
        self._create_devices(devices)
        for state in vcpu_states:
            fd = self.vm_fd.create_vcpu(state.vcpu_id)
            self._enable_hyperv(fd)  # before its SynIC MSRs are restored
            self.vcpus.append(Vcpu(fd, self.pio, self.mmio))
        try:
            for vcpu, state in zip(self.vcpus, vcpu_states):
                restore_vcpu(vcpu.fd, state)
            restore_vm(self.vm_fd, kvm_state)
        except (KvmError, ValueError) as err:
            raise SnapshotError("KVM refused the snapshot's vCPU or irqchip state") from err
        ged = devices.get("__ged")
        pending = ged.get("pending") if isinstance(ged, dict) else None
        if isinstance(pending, int) and pending and self.ged is not None:
            self.ged.notify(pending & 0xFF)
        self._paused_clock = kvm_state.clock
        self._finish()
        self.state = VmState.PAUSED

    def snapshot(self, directory: str) -> None:
        """Write the paused VM into ``directory`` (config.json, state.json, memory-ranges)."""
        if self.state is not VmState.PAUSED:
            raise StateError("Trying to snapshot while VM is running")
        assert self.kvm is not None and self.memory is not None
        msrs = saveable_msrs(self.kvm, self.vcpus[0].fd)
        kvm_state = save_vm(self.vm_fd)
        if self._paused_clock is not None:
            # The clock as it was when the vCPUs stopped: a restore continues from there.
            kvm_state = dataclasses.replace(kvm_state, clock=self._paused_clock)
        devices: dict[str, dict[str, Any]] = {}
        if self.serial is not None:
            devices["__serial"] = node(to_plain(self.serial.state()))
        devices["__cmos"] = node(to_plain(self.cmos.state()))
        if self.ged is not None:
            devices["__ged"] = node({"pending": self.ged.pending})
        devices["__pci_hotplug"] = node(to_plain(self.hotplug.state()))
        assert self.devices is not None
        devices.update((dev_id, node(state)) for dev_id, state in self.devices.states().items())
        tree = node(
            {"version": FORMAT_VERSION, "kvm": to_plain(kvm_state)},
            {
                "cpu-manager": node(children={
                    str(v.index): node(to_plain(save_vcpu(v.fd, msrs))) for v in self.vcpus
                }),
                "memory-manager": node({"ranges": [list(r) for r in ram_ranges(self.memory.size)]}),
                "device-manager": node(children=devices),
            },
        )
        # regions in address order: their concatenation is the coalesced ranges' contents
        write_snapshot(directory, canonical_json(self.config), tree,
                       [(r.view, r.data_runs()) for r in self.memory.regions])

    def _open_kvm(self) -> None:
        """The KVM VM with its in-kernel irqchip and PIT, after checking what the host can give."""
        cfg = self.config
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()  # front-ends that build VMs from other threads install it at start
        usable = os.sched_getaffinity(0)
        for entry in cfg.cpus.affinity or []:
            wrong = sorted(set(entry.host_cpus) - usable)
            if wrong:
                raise VmshError(f"--cpus affinity: vCPU {entry.vcpu} asks for host CPU {wrong[0]}, "
                                f"but this process may only use CPUs {sorted(usable)}")
        available = host_memory()
        if available is not None and cfg.memory.total_size() > available:
            # RAM is mapped lazily, so the mapping would succeed and the guest die later.
            raise VmshError(f"Guest RAM ({_gib(cfg.memory.total_size())}) is more than this host has ({_gib(available)})")
        try:
            self.kvm = Kvm()
        except KvmError as err:
            raise VmshError("Cannot open /dev/kvm: is KVM available to this user?") from err
        self.vm_fd = self.kvm.create_vm()
        self.vm_fd.set_tss_addr(layout.KVM_TSS_START)
        self.vm_fd.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
        self.vm_fd.create_irqchip()
        self.vm_fd.create_pit2()
        self.pvm_handler = None

    def _finish(self) -> None:
        """What every VM gets once it is built or restored: the PVM handler, KVM's statistics,
        and console input. Input waits until now: an interrupt the UART raised for it before a
        restore loaded the irqchip would be lost, and with it all further input."""
        assert self.memory is not None
        for start in self._input_starters:
            start()
        self._input_starters.clear()
        self.pvm_handler = internal_error_handler(self.memory) if is_pvm_host() else None
        for vcpu in self.vcpus:
            vcpu.on_internal_error = self.pvm_handler
        try:
            self.vm_stats = KvmStats(self.vm_fd.stats_fd())
            self.vcpu_stats = [KvmStats(v.fd.stats_fd()) for v in self.vcpus]
        except VmshError as err:
            LOG.info("KVM statistics are not available: %s", err)

    def _create(self) -> None:
        cfg = self.config
        assert cfg.payload is not None
        self._open_kvm()
        assert self.kvm is not None
        self.memory = _create_memory(cfg.memory)
        self.memory.register(self.vm_fd)

        payload = cfg.payload
        image = payload.kernel or payload.firmware
        assert image is not None
        what = "kernel" if payload.kernel else "firmware"
        try:
            kernel = load_kernel(self.memory, image)
        except VmshError as err:
            raise VmshError(f"Cannot load the {what} {image}") from err
        try:
            initrd = load_initramfs(self.memory, payload.initramfs, kernel) if payload.initramfs else None
        except VmshError as err:
            raise VmshError(f"Cannot load the initramfs {payload.initramfs}") from err

        supported = self.kvm.supported_cpuid()
        phys_bits = self._phys_bits(supported)
        # the devices first: the ACPI tables declare their slots hotpluggable
        self._create_devices({})
        assert self.devices is not None
        spare = pci_hotplug.SPARE_SLOTS_PVM if is_pvm_host() else pci_hotplug.NUM_SLOTS
        self.hotplug.declared = [
            pci_hotplug.declared_slots({e.slot for e in self.devices.devices.values() if e.segment == seg}, spare)
            for seg in range(cfg.num_pci_segments())
        ]
        try:
            acpi = build_acpi(AcpiSpec(
                boot_vcpus=cfg.cpus.boot_vcpus,
                max_vcpus=cfg.cpus.max_vcpus,
                serial=cfg.serial.mode is not ConsoleOutputMode.OFF,
                pci_segments=self._pci_segments(),
                pci_rescan_method=pci_hotplug.RESCAN_METHOD,
                extra_aml=pci_hotplug.hotplug_aml(PCI_HOTPLUG_ADDRESS, self.hotplug.declared),
                ged=GedSpec(address=GED_ADDRESS, irq=GED_IRQ),
                shutdown_port=SHUTDOWN_PORT,
                pm_timer_port=PM_TIMER_PORT,
            ))
            tables = smbios.build_smbios(smbios.SmbiosSpec.from_platform(cfg.platform))
        except ValueError as err:
            raise VmshError("Cannot build the firmware tables") from err
        self.memory.write(acpi.rsdp_address, acpi.blob)
        self.memory.write(layout.SMBIOS_START, tables)
        write_boot_tables(self.memory, kernel, payload.cmdline or "", initrd, rsdp=acpi.rsdp_address)

        topo = cfg.cpus.topology
        topology = (
            CpuTopology(threads_per_core=topo.threads_per_core, cores_per_die=topo.cores_per_die,
                        dies_per_package=topo.dies_per_package, packages=topo.packages)
            if topo is not None else CpuTopology.flat(cfg.cpus.max_vcpus)
        )
        for index in range(cfg.cpus.boot_vcpus):
            fd = self.vm_fd.create_vcpu(index)
            self._enable_hyperv(fd)
            configure_vcpu(fd, self.memory, kernel, supported, topology, pvm=is_pvm_host(), phys_bits=phys_bits,
                           hyperv=cfg.cpus.kvm_hyperv)
            self.vcpus.append(Vcpu(fd, self.pio, self.mmio))
        self._finish()

    def _enable_hyperv(self, fd: VcpuFd) -> None:
        """``kvm_hyperv=on``: KVM's Hyper-V synthetic interrupt controller on this vCPU (the
        CPUID leaves announce it). Hosts whose KVM has no Hyper-V emulation (PVM) refuse."""
        if not self.config.cpus.kvm_hyperv:
            return
        assert self.kvm is not None
        if not self.kvm.check_extension(KVM_CAP_HYPERV_SYNIC):
            raise VmshError("--cpus kvm_hyperv=on: this host's KVM has no Hyper-V emulation (KVM_CAP_HYPERV_SYNIC)"
                            + (": PVM hosts have none" if is_pvm_host() else ""))
        try:
            fd.enable_cap(KVM_CAP_HYPERV_SYNIC)
        except KvmError as err:
            raise VmshError(f"--cpus kvm_hyperv=on: cannot enable the SynIC on vcpu{fd.vcpu_id}") from err

    def _phys_bits(self, supported: list[Any] | None = None) -> int:
        assert self.kvm is not None
        return min(_host_phys_bits(supported or self.kvm.supported_cpuid()), self.config.cpus.max_phys_bits)

    def _pci_segments(self) -> tuple[PciSegment, ...]:
        """The segments' ECAM and MMIO windows: the same for a boot and for its restores."""
        assert self.memory is not None
        return pci_segments(self.config, self.memory.last_addr + 1, self._phys_bits())

    def _irq(self, gsi: int) -> IrqFdTrigger:
        trigger = IrqFdTrigger(self.vm_fd, gsi)
        self._triggers.append(trigger)
        return trigger

    def _create_devices(self, saved: dict[str, Any]) -> None:
        """Every platform device; ``saved`` maps device ids to states from a snapshot."""
        cfg = self.config
        assert self.memory is not None
        reset = EventTrigger(lambda: self.on_guest_event(GuestEvent.RESET, "guest reset"))
        poweroff = EventTrigger(lambda: self.on_guest_event(GuestEvent.POWEROFF, "guest poweroff"))

        if cfg.serial.mode is ConsoleOutputMode.TTY and self.tty is not None:
            serial_backend: ConsoleBackend | None = self.tty
        else:
            serial_backend = open_backend(cfg.serial.mode, cfg.serial.file, cfg.serial.socket)
            if serial_backend is not None:
                self.backends.append(serial_backend)
        if serial_backend is not None:
            if serial_backend.path and cfg.serial.mode is ConsoleOutputMode.PTY:
                cfg.serial.file = serial_backend.path
            if "__serial" in saved:
                try:
                    self.serial = Serial16550.from_state(from_plain(SerialState, saved["__serial"], "__serial"),
                                                         trigger=self._irq(SERIAL_IRQ), out=serial_backend.write)
                except ValueError as err:
                    raise SnapshotError(f"Invalid serial state: {err}") from None
            else:
                self.serial = Serial16550(self._irq(SERIAL_IRQ), serial_backend.write)
            entry = self.pio.insert(self.serial, SERIAL_PORT, 8, name="__serial")
            serial = self.serial

            def feed(data: bytes) -> int:
                lock = entry.lock
                if lock is None:
                    return serial.enqueue_raw_bytes(data)
                with lock:
                    return serial.enqueue_raw_bytes(data)

            self._input_starters.append(lambda: serial_backend.start_input(feed))

        dbg = cfg.debug_console
        if dbg.mode not in (ConsoleOutputMode.OFF, ConsoleOutputMode.NULL):
            backend = open_backend(dbg.mode, dbg.file, None, with_input=False)
            assert backend is not None
            self.backends.append(backend)
            port = dbg.iobase if dbg.iobase is not None else m.DEFAULT_DEBUG_CONSOLE_IOBASE
            try:
                self.pio.insert(DebugConsole(backend.write), port, 1, name="__debug_console")
            except BusError as err:
                raise DeviceError(f"The debug console port {port:#x} collides with another device") from err
        hooks = PlatformHooks(on_panic=self._guest_panic, reset=reset)
        if cfg.console.mode is not ConsoleOutputMode.OFF:
            if cfg.console.mode is ConsoleOutputMode.TTY and self.tty is not None:
                hooks.console = self.tty
            else:
                hooks.console = open_backend(cfg.console.mode, cfg.console.file, None)
                if hooks.console is not None:
                    self.backends.append(hooks.console)
                    if hooks.console.path and cfg.console.mode is ConsoleOutputMode.PTY:
                        cfg.console.file = hooks.console.path

        # RAM fills 0..3 GiB first, the rest goes above 4 GiB (reference §6.1).
        below_4g = min(self.memory.size, MMIO32_START)
        above_4g = self.memory.size - below_4g
        self.pio.insert(I8042(reset), I8042_PORT, 5, name="i8042")
        if "__cmos" in saved:
            self.cmos = Cmos.from_state(from_plain(CmosState, saved["__cmos"], "__cmos"), reset=reset)
        else:
            self.cmos = Cmos(below_4g, above_4g, reset)
        self.pio.insert(self.cmos, CMOS_PORT, 2, name="cmos")
        self.pio.insert(PostPort(), POST_PORT, 1, name="post")
        self.pio.insert(AcpiShutdown(poweroff, reset), SHUTDOWN_PORT, 8, name="acpi-shutdown")
        self.pio.insert(AcpiPmTimer(), PM_TIMER_PORT, 4, name="acpi-pm-timer")
        self.ged = Ged(self._irq(GED_IRQ))
        self.mmio.insert(self.ged, GED_ADDRESS, 1, name="ged")
        self.hotplug = PciHotplugController(cfg.num_pci_segments(), self._ejected)
        if "__pci_hotplug" in saved:
            try:
                self.hotplug.restore(from_plain(PciHotplugState, saved["__pci_hotplug"], "__pci_hotplug"))
            except ValueError as err:
                raise SnapshotError(str(err)) from None
        self.mmio.insert(self.hotplug, PCI_HOTPLUG_ADDRESS, pci_hotplug.REGISTER_SIZE, name="pci-hotplug")
        self.devices = DeviceManager(self.vm_fd, self.memory, self.pio, self.mmio, self._pci_segments())
        add_config_devices(self.devices, cfg, hooks)
        if saved:
            self.devices.restore({k: v for k, v in saved.items() if k not in LEGACY_DEVICE_IDS})
        if hooks.console is not None and hooks.console_device is not None:
            console, device = hooks.console, hooks.console_device
            self._input_starters.append(lambda: console.start_input(device.enqueue_input))

    # --- hotplug ---------------------------------------------------------------------------------

    def hotplug_device(self, kind: str, item: Any) -> dict[str, str]:
        """Plug a device of the running VM's config in (``kind`` is the config list it is in)
        and tell the guest through ACPI; returns cloud-hypervisor's PciDeviceInfo."""
        assert self.devices is not None and self.ged is not None
        segment = item.pci_segment
        if not 0 <= segment < len(self.hotplug.declared):
            raise VmshError(f"PCI segment {segment} does not exist")
        free = [s for s in self.hotplug.declared[segment] if self.devices.find_slot(segment, s) is None]
        if not free:
            raise VmshError(f"No free hotplug slot on PCI segment {segment}"
                            + (f" (on PVM hosts vmsh declares {pci_hotplug.SPARE_SLOTS_PVM} spare slots per segment"
                               " at boot)" if len(self.hotplug.declared[segment]) < pci_hotplug.NUM_SLOTS - 1 else ""))
        entry = add_config_item(self.devices, kind, item, hotplug=True, slot=free[0])
        self.hotplug.plug(entry.segment, entry.slot)
        self.ged.notify(GED_PCI_CHANGE)
        return {"id": entry.id, "bdf": _bdf(entry.segment, entry.slot)}

    def unplug_device(self, dev_id: str) -> bool:
        """Ask the guest to eject ``dev_id``; False if there is no such PCI device."""
        assert self.devices is not None and self.ged is not None
        entry = self.devices.devices.get(dev_id)
        if entry is None:
            return False
        self.hotplug.unplug(entry.segment, entry.slot)
        self.ged.notify(GED_PCI_CHANGE)
        return True

    def _ejected(self, segment: int, slot: int) -> None:
        """The guest ejected ``slot`` (a vCPU thread, from its write to B0EJ)."""
        assert self.devices is not None
        entry = self.devices.find_slot(segment, slot)
        if entry is None:
            return
        self.devices.remove(entry.id)
        for attr in ("disks", "net", "pmem"):
            items = getattr(self.config, attr)
            if items and any(i.id == entry.id for i in items):
                setattr(self.config, attr, [i for i in items if i.id != entry.id] or None)
        if self.config.vsock is not None and self.config.vsock.id == entry.id:
            self.config.vsock = None
        self.events.emit("vm", "device-removed", {"id": entry.id, "bdf": _bdf(segment, slot)})

    def resize_balloon(self, size: int) -> None:
        """Ask the guest to give ``size`` bytes back through the balloon."""
        entry = self.devices.devices.get(BALLOON_ID) if self.devices is not None else None
        if entry is None or self.config.balloon is None:
            raise VmshError("resize: the VM has no balloon device (--balloon)")
        if size > self.config.memory.total_size():
            raise VmshError(f"resize: a balloon of {size} bytes is larger than the guest's RAM")
        with entry.window.lock:
            entry.transport.device.resize(size)  # type: ignore[attr-defined]
        self.config.balloon.size = size

    def _guest_panic(self, events: int) -> None:
        """pvpanic: the guest reported a panic (cloud-hypervisor's ``guest panic`` event)."""
        self.events.emit("guest", "panic", {"event": pvpanic_event_name(events)})

    # --- lifecycle --------------------------------------------------------------------------------

    def _on_vcpu_stop(self, vcpu: Vcpu) -> None:
        """Runs in the vCPU thread when its loop ends: report what the guest did."""
        if vcpu.error is not None:
            detail = f"vcpu{vcpu.index}: " + ": ".join(error_chain(vcpu.error))
            LOG.error("%s", detail)
            self.on_guest_event(GuestEvent.FATAL, detail)
            return
        reason = vcpu.stop_reason
        if reason in (VcpuStop.SHUTDOWN, VcpuStop.RESET):
            self.on_guest_event(GuestEvent.RESET, f"vcpu{vcpu.index}: {reason.value}")
        elif reason is VcpuStop.POWEROFF:
            self.on_guest_event(GuestEvent.POWEROFF, f"vcpu{vcpu.index}: system event")
        elif reason is VcpuStop.CRASH:
            self.on_guest_event(GuestEvent.FATAL, f"vcpu{vcpu.index}: guest crash")

    def _start_vcpus(self) -> None:
        affinity = {a.vcpu: set(a.host_cpus) for a in self.config.cpus.affinity or []}
        for vcpu in self.vcpus:
            vcpu.start(on_stop=self._on_vcpu_stop, affinity=affinity.get(vcpu.index))

    def _stop_vcpus(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()
        for vcpu in self.vcpus:
            if not vcpu.join(VCPU_JOIN_TIMEOUT):
                LOG.error("vcpu%d did not stop within %.0fs", vcpu.index, VCPU_JOIN_TIMEOUT)

    def boot(self) -> None:
        check_transition(self.state, VmState.RUNNING)
        assert self.devices is not None
        self.devices.start()
        self._start_vcpus()
        self.state = VmState.RUNNING
        if self.profile is not None:
            self.start_profiler(self.profile.hz)

    # --- profiling ----------------------------------------------------------------------------------

    def start_profiler(self, hz: int) -> None:
        """Start sampling every vCPU's instruction pointer ``hz`` times a second."""
        if self.sampler is not None:
            raise VmshError("The profiler is already running")
        self.sampler = RipSampler(self.vcpus, hz, memory=self.memory)
        self.sampler.start()

    def stop_profiler(self, system_map: str | None = None, top: int = 40) -> str:
        """Stop sampling; returns the report, by symbol when ``system_map`` is given."""
        if self.sampler is None:
            raise VmshError("The profiler is not running")
        sampler, self.sampler = self.sampler, None
        sampler.stop()
        symbolizer = None
        if system_map is not None:
            try:
                symbolizer = Symbolizer.from_system_map(system_map)
            except (OSError, ValueError) as err:
                LOG.warning("cannot read the symbol map %s: %s", system_map, err)
        return sampler.report(symbolizer, top=top)

    def _finish_profile(self) -> None:
        assert self.profile is not None
        sampler = self.sampler
        text = self.stop_profiler(self.profile.system_map)
        if self.profile.path is None:
            LOG.warning("%s", text)
            return
        outputs = [(self.profile.path, text + "\n")]
        if sampler is not None and sampler.stacks and self.profile.system_map is not None:
            try:
                symbolizer = Symbolizer.from_system_map(self.profile.system_map)
            except (OSError, ValueError):
                symbolizer = None  # stop_profiler has said why
            if symbolizer is not None:
                # flame graph input beside the report (flamegraph.pl, speedscope, ...)
                outputs.append((self.profile.path + ".folded", sampler.folded_stacks(symbolizer)))
        for path, content in outputs:
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
            except OSError as err:
                LOG.error("cannot write the profile to %s: %s", path, err)

    def pause(self) -> None:
        check_transition(self.state, VmState.PAUSED)
        self._stop_vcpus()
        assert self.devices is not None
        self.devices.pause()
        # The guest must not see the paused time: kvmclock is put back on resume.
        self._paused_clock = self.vm_fd.get_clock()[0]
        self.state = VmState.PAUSED

    def resume(self) -> None:
        check_transition(self.state, VmState.RUNNING)
        if self._paused_clock is not None:
            self.vm_fd.set_clock(self._paused_clock)
            self._paused_clock = None
        assert self.devices is not None
        self.devices.start()
        self._start_vcpus()
        self.state = VmState.RUNNING
        if self.profile is not None and self.sampler is None:
            self.start_profiler(self.profile.hz)  # a restored VM is profiled from its first resume

    def shutdown(self) -> None:
        """Stop the vCPUs and release everything (safe to call twice, or on a half-built VM)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.sampler is not None and self.profile is not None:
            self._finish_profile()
        elif self.sampler is not None:
            self.sampler.stop()
        self._stop_vcpus()
        if LOG.isEnabledFor(logging.INFO) and self.vm_stats is not None:
            self._log_counters()
        if self.devices is not None:
            self.devices.close()
        for backend in self.backends:
            backend.close()
        for stats in [self.vm_stats, *self.vcpu_stats]:
            if stats is not None:
                stats.close()
        for vcpu in self.vcpus:
            vcpu.fd.close()
        for trigger in self._triggers:
            trigger.close()
        if self.vm_fd is not None:
            self.vm_fd.close()
        if self.memory is not None:
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()
        self.state = VmState.SHUTDOWN

    def power_button(self) -> None:
        if self.state is not VmState.RUNNING:
            raise VmshError(f"The power button needs a running VM (it is {self.state.value})")
        assert self.ged is not None
        self.ged.notify(GED_POWER_BUTTON)

    def nmi(self) -> None:
        """Queue an NMI on every vCPU (from its own thread while it runs)."""
        for vcpu in self.vcpus:
            if self.state is VmState.RUNNING:
                vcpu.run_on_vcpu(lambda v: v.fd.nmi())
            else:
                vcpu.fd.nmi()

    # --- inspection ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        """Device counters plus KVM's own statistics (``__vm``, ``__vcpuN``) and PVM handler counts."""
        result: dict[str, dict[str, int]] = dict(self.devices.counters()) if self.devices is not None else {}
        if self.vm_stats is not None:
            result["__vm"] = self.vm_stats.read_counters()
        for vcpu, stats in zip(self.vcpus, self.vcpu_stats):
            result[f"__vcpu{vcpu.index}"] = stats.read_counters()
        if self.pvm_handler is not None:
            result["__pvm"] = dict(self.pvm_handler.counts)
        return result

    def info(self) -> dict[str, Any]:
        return {}

    #: the KVM statistics worth a line at exit with ``-v``
    SUMMARY_STATS = ("exits", "io_exits", "mmio_exits", "halt_exits", "insn_emulation", "insn_emulation_fail",
                     "mmu_pte_write", "pf_taken")

    def _log_counters(self) -> None:
        try:
            counters = self.counters()
        except VmshError as err:
            LOG.info("KVM statistics could not be read: %s", err)
            return
        for name, values in counters.items():
            shown = {k: v for k, v in values.items() if k in self.SUMMARY_STATS or name == "__pvm"}
            if shown:
                LOG.info("%s: %s", name, " ".join(f"{k}={v}" for k, v in sorted(shown.items())))
