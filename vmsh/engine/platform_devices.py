"""The legacy and ACPI platform devices of the machine, created from a config.

cloud-hypervisor's x86_64 machine (its ``docs/device_model.md``): a 16550A at 0x3f8 on IRQ 4
(``--serial``), the debug console port (``--debug-console``), the i8042 reset port at 0x60, the
CMOS/RTC at 0x70, the POST port at 0x80, the ACPI sleep/reset register at 0x600 with the PM timer
at 0x608, the Generic Event Device (power button, hotplug notifications) and the ACPI PCI, CPU and memory
hotplug registers in the free MMIO space below the IOAPIC, and with ``--tpm`` a CRB TPM backed by swtpm
at 0xfed40000 (cloud-hypervisor's ``TPM_START``). The stateful ones are registered with the
``DeviceManager`` under their snapshot ids (``__serial``, ``__cmos``, ``__ged``,
``__pci_hotplug``, ``__cpu_hotplug``, ``__memory_hotplug``), so one walk of its device tree saves and restores them with
the PCI devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from vmsh.config import model as m
from vmsh.config.model import ConsoleOutputMode
from vmsh.devices import cpu_hotplug as cpu_hotplug_regs
from vmsh.devices import memory_hotplug as memory_hotplug_regs
from vmsh.devices.acpi import AcpiPmTimer, AcpiShutdown, Ged, PciHotplugController
from vmsh.devices.backends.swtpm import Swtpm
from vmsh.devices.base import Trigger
from vmsh.devices.cpu_hotplug import CpuHotplugController
from vmsh.devices.legacy.cmos import Cmos
from vmsh.devices.legacy.debugcon import DebugConsole
from vmsh.devices.legacy.i8042 import I8042
from vmsh.devices.legacy.post import PostPort
from vmsh.devices.legacy.serial import Serial16550
from vmsh.devices.memory_hotplug import MemoryHotplugController
from vmsh.devices.tpm import TPM_SIZE, CrbTpm
from vmsh.engine.acpi import pci_hotplug
from vmsh.engine.bus import BusError
from vmsh.engine.console import ConsoleBackend, open_backend
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.memory_manager import hotplug_areas
from vmsh.engine.pci_windows import MMIO32_START
from vmsh.errors import DeviceError

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
#: the ACPI CPU hotplug registers, in the same free space
CPU_HOTPLUG_ADDRESS = 0xFEB0_2000
#: the ACPI memory hotplug registers, in the same free space
MEMORY_HOTPLUG_ADDRESS = 0xFEB0_3000
#: the CRB TPM's register page (cloud-hypervisor's TPM_START and TPM_SIZE)
TPM_ADDRESS = 0xFED4_0000
#: the in-kernel IOAPIC's id in vm.info's device tree (cloud-hypervisor's name for its IOAPIC)
IOAPIC_ID = "__ioapic"


@dataclass
class PlatformDevices:
    """The platform devices a VM holds on to after building them."""

    ged: Ged
    hotplug: PciHotplugController
    cmos: Cmos
    #: the CPU hotplug registers, for a VM with more than one possible vCPU
    cpu_hotplug: CpuHotplugController | None = None
    #: the memory hotplug registers, for a VM with an ACPI memory hotplug area
    memory_hotplug: MemoryHotplugController | None = None
    serial: Serial16550 | None = None
    tpm: CrbTpm | None = None
    #: the TPM's connection to swtpm (closed with the VM)
    swtpm: Swtpm | None = None
    #: console backends this VM opened (closed with it)
    backends: list[ConsoleBackend] = field(default_factory=list)
    #: console input starts once the interrupt controller and vCPUs hold their final state
    input_starters: list[Callable[[], None]] = field(default_factory=list)


def create_platform_devices(cfg: m.VmConfig, devices: DeviceManager, irq: Callable[[int], Trigger],
                            reset: Trigger, poweroff: Trigger, tty: ConsoleBackend | None,
                            on_eject: Callable[[int, int], None],
                            on_cpu_eject: Callable[[int], None] | None = None, *,
                            serial: ConsoleBackend | None = None) -> PlatformDevices:
    """Create the platform devices of ``cfg`` and put them on ``devices``' buses.

    ``irq(gsi)`` makes an interrupt trigger; ``tty`` is the serial backend for ``--serial tty``
    when this process's terminal is not the console; ``serial``, a serial backend a live migration
    brought (its console socket), which the platform then owns; ``on_eject(segment, slot)`` is called when
    the guest ejects a PCI slot, ``on_cpu_eject(index)`` when it ejects a vCPU.

    The CPU hotplug registers exist whenever ``max_vcpus`` is over 1 (not only while it is over
    ``boot_vcpus``, which a resize changes), so that the ACPI tables and a snapshot's devices
    do not depend on the vCPU count of the moment.

    :raises DeviceError: when a backend cannot be opened or a port collides.
    """
    pio, mmio = devices.pio, devices.mmio
    # the CMOS tells the firmware the boot RAM (hotplugged RAM comes through ACPI or virtio-mem)
    boot_ram = devices.memory.boot_size
    below_4g = min(boot_ram, MMIO32_START)
    platform = PlatformDevices(
        ged=Ged(irq(GED_IRQ)),
        hotplug=PciHotplugController(cfg.num_pci_segments(), on_eject),
        # RAM fills 0..3 GiB first, the rest goes above 4 GiB.
        cmos=Cmos(below_4g, boot_ram - below_4g, reset),
    )
    if cfg.cpus.max_vcpus > 1:
        platform.cpu_hotplug = CpuHotplugController(cfg.cpus.max_vcpus, cfg.cpus.boot_vcpus,
                                                    on_cpu_eject or (lambda _index: None))
    if any(a.method is m.HotplugMethod.ACPI for a in hotplug_areas(cfg.memory)):
        platform.memory_hotplug = MemoryHotplugController()
    # the IOAPIC is KVM's (the builder creates the in-kernel irqchip); it has its node first,
    # as cloud-hypervisor's interrupt controller has
    devices.add_node(IOAPIC_ID)
    try:
        _create_serial(cfg, devices, irq, tty, platform, serial)
        _create_debug_console(cfg, devices, platform)
        pio.insert(I8042(reset), I8042_PORT, 5, name="i8042")
        devices.add_legacy("__cmos", platform.cmos, pio, CMOS_PORT, 2, name="cmos")
        devices.add_legacy("__post", PostPort(), pio, POST_PORT, 1, name="post")
        pio.insert(AcpiShutdown(poweroff, reset), SHUTDOWN_PORT, 8, name="acpi-shutdown")
        pio.insert(AcpiPmTimer(), PM_TIMER_PORT, 4, name="acpi-pm-timer")
        devices.add_legacy("__ged", platform.ged, mmio, GED_ADDRESS, 1, name="ged")
        if platform.cpu_hotplug is not None:
            devices.add_legacy("__cpu_hotplug", platform.cpu_hotplug, mmio, CPU_HOTPLUG_ADDRESS,
                               cpu_hotplug_regs.REGISTER_SIZE, name="cpu-hotplug")
        if platform.memory_hotplug is not None:
            devices.add_legacy("__memory_hotplug", platform.memory_hotplug, mmio, MEMORY_HOTPLUG_ADDRESS,
                               memory_hotplug_regs.REGISTER_SIZE, name="memory-hotplug")
        devices.add_legacy("__pci_hotplug", platform.hotplug, mmio, PCI_HOTPLUG_ADDRESS,
                           pci_hotplug.REGISTER_SIZE, name="pci-hotplug")
        if cfg.tpm is not None:
            _create_tpm(cfg.tpm, devices, platform)
    except BaseException:
        for backend in platform.backends:
            backend.close()
        if platform.swtpm is not None:
            platform.swtpm.close()
        raise
    return platform


def _create_tpm(tpm: m.TpmConfig, devices: DeviceManager, platform: PlatformDevices) -> None:
    """The CRB TPM on the MMIO bus, connected to swtpm's control socket ``tpm.socket``."""
    platform.swtpm = Swtpm(tpm.socket)
    platform.tpm = CrbTpm(platform.swtpm, TPM_ADDRESS)
    devices.mmio.insert(platform.tpm, TPM_ADDRESS, TPM_SIZE, name="tpm")


def _create_serial(cfg: m.VmConfig, devices: DeviceManager, irq: Callable[[int], Trigger],
                   tty: ConsoleBackend | None, platform: PlatformDevices, migrated: ConsoleBackend | None) -> None:
    """The serial port on the backend a migration brought, the terminal's, or one of its mode."""
    backend: ConsoleBackend | None
    if migrated is not None:
        backend = migrated
        platform.backends.append(migrated)
    elif cfg.serial.mode is ConsoleOutputMode.TTY and tty is not None:
        backend = tty
    else:
        # cloud-hypervisor's serial-manager thread reads the serial port's host side
        backend = open_backend(cfg.serial.mode, cfg.serial.file, cfg.serial.socket, input_thread="serial-manager")
        if backend is not None:
            platform.backends.append(backend)
    if backend is None:
        return
    if backend.path and cfg.serial.mode is ConsoleOutputMode.PTY:
        cfg.serial.file = backend.path
    serial = platform.serial = Serial16550(irq(SERIAL_IRQ), backend.write)
    entry = devices.add_legacy("__serial", serial, devices.pio, SERIAL_PORT, 8, name="__serial")
    devices.add_node("__serial")

    def feed(data: bytes) -> int:
        # host input takes the serial port's bus lock, as the vCPUs' register accesses do
        lock = entry.lock
        if lock is None:
            return serial.enqueue_raw_bytes(data)
        with lock:
            return serial.enqueue_raw_bytes(data)

    platform.input_starters.append(lambda: backend.start_input(feed))


def _create_debug_console(cfg: m.VmConfig, devices: DeviceManager, platform: PlatformDevices) -> None:
    dbg = cfg.debug_console
    if dbg.mode in (ConsoleOutputMode.OFF, ConsoleOutputMode.NULL):
        return
    backend = open_backend(dbg.mode, dbg.file, None, with_input=False)
    assert backend is not None, "open_backend gives a backend for every mode but off"
    platform.backends.append(backend)
    port = dbg.iobase if dbg.iobase is not None else m.DEFAULT_DEBUG_CONSOLE_IOBASE
    try:
        devices.pio.insert(DebugConsole(backend.write), port, 1, name="__debug_console")
    except BusError as err:
        raise DeviceError(f"The debug console port {port:#x} collides with another device") from err
    devices.add_node("__debug_console")
