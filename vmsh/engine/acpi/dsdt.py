"""The DSDT's AML: the device namespace of a vmsh VM.

What the guest finds under ``\\_SB_``:

- ``PCI0``, ``PC01``, ... one PCI Express root bridge per segment (PNP0A08, compatible with
  PNP0A03) with its bus range, I/O and MMIO windows (PCI Firmware Specification 3.2 §4.1);
- ``MBRD`` (PNP0C02, motherboard resources) reserving every segment's ECAM, which Linux wants
  to see before it trusts MCFG;
- ``COM1`` (PNP0501) at 0x3f8, IRQ 4, when the serial port is on;
- ``RTC_`` (PNP0B00), the CMOS real-time clock at 0x70, without an interrupt;
- ``PWRB`` (PNP0C0C), the control-method power button (ACPI 6.4 §4.8.2.2.1.2);
- ``GEC_``, the MMIO register of the Generic Event Device, and ``GED_`` (ACPI0013, §5.6.9)
  whose ``_EVT`` reads that read-to-clear register and dispatches on its bits;
- ``CPUS`` (ACPI0010, §8.4.2) with one processor device (ACPI0007, §8.4) per possible vCPU.

With a NUMA topology (``AcpiSpec.numa``) each processor and each host bridge also has ``_PXM``
(§6.2.14), its proximity domain, as cloud-hypervisor's (``vmm/src/cpu.rs``,
``vmm/src/pci_segment.rs``; 0 for what no node lists). cloud-hypervisor has them without
``--numa`` too, where they mean nothing to a guest without an SRAT; vmsh leaves them out then.

and ``\\_S5_``, the soft-off sleep type (§7.4.2), then any ``AcpiSpec.extra_aml``. Each device
is built by its own function, and the GED calls scan methods named in the spec, so that CPU,
memory and PCI hotplug can add their controllers and methods later.
"""

from __future__ import annotations

from vmsh.engine.acpi import aml, cpu_hotplug
from vmsh.engine.acpi.aml import EisaId, Package, String
from vmsh.engine.acpi.aml_named import (
    BYTE_ACC,
    SYSTEM_MEMORY,
    WRITE_AS_ZEROS,
    Device,
    Field,
    Method,
    Name,
    Named,
    OperationRegion,
    Scope,
)
from vmsh.engine.acpi.aml_ops import And, Call, If, Local, Notify, Return, Store
from vmsh.engine.acpi.aml_resources import (
    IO,
    MEM_CACHEABLE,
    MEM_NON_CACHEABLE,
    DWordMemory,
    Interrupt,
    IRQNoFlags,
    Memory32Fixed,
    QWordMemory,
    ResourceTemplate,
    WordBusNumber,
    WordIO,
)
from vmsh.engine.acpi.cpu_hotplug import processor_name
from vmsh.engine.acpi.spec import (
    GED_CPU_CHANGE,
    GED_MEMORY_CHANGE,
    GED_PCI_CHANGE,
    GED_POWER_BUTTON,
    PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_SIZE,
    AcpiSpec,
    PciSegment,
)

COM1_PORT = 0x3F8
COM1_IRQ = 4
CMOS_PORT = 0x70
#: SLP_TYP value for S5 that the guest writes to the sleep control register (FADT)
S5_SLEEP_TYPE = 5
#: Notify value for a power button press (ACPI 6.4 §5.6.6, Table 5.187 "Device Object Notification
#: Values": 0x80 on a power button device = S0 power button pressed)
NOTIFY_POWER_BUTTON = 0x80
#: _STA bits (§6.3.7): present, enabled, shown in UI, functioning
STA_PRESENT_ENABLED = 0x0F
STA_ABSENT = 0x00
#: PCI slots on a root bus and INTx pins per slot (for _PRT, §6.2.13)
PCI_SLOTS = 32
PCI_PINS = 4
GED_REGISTER_SIZE = 1
#: the I/O window above the configuration ports starts at the next 256-port boundary, 0xd00,
#: as on PC firmware
PCI_IO_HIGH_START = 0x0D00


def pci_root_name(segment_id: int) -> str:
    """``PCI0`` for segment 0, then ``PC01``, ``PC02``, ... (hex)."""
    return "PCI0" if segment_id == 0 else f"PC{segment_id:02X}"


def _mmio_descriptor(base: int, size: int, producer: bool, cacheable: int) -> bytes:
    # a DWord descriptor when the range ends below 4 GiB (what most firmware emits), else QWord
    end = base + size - 1
    if end <= 0xFFFF_FFFF:
        return DWordMemory(base, end, producer=producer, cacheable=cacheable)
    return QWordMemory(base, end, producer=producer, cacheable=cacheable)


def pxm(domain: int) -> bytes:
    """``_PXM`` (§6.2.14): proximity domain ``domain``. cloud-hypervisor makes it a method that
    returns the value; a named integer gives the guest the same value without a method for
    ACPICA to parse at table load (see ``pci_hotplug``)."""
    return Name("_PXM", domain)


def pci_root_bridge(seg: PciSegment, proximity_domain: int | None = None) -> bytes:
    """One host bridge (PCI Firmware Specification 3.2 §4.1.3; ACPI 6.4 §6.1.5 _HID, §6.5.5 _BBN,
    §6.5.6 _SEG). ``_CRS`` lists what the bridge decodes for its children, as producer ranges;
    ``_PXM`` is there when a proximity domain is given."""
    crs = [WordBusNumber(seg.bus_start, seg.bus_end)]
    if seg.legacy_io:
        # the configuration mechanism #1 ports are consumed by the bridge itself;
        # the rest of the 64 KiB I/O space is forwarded
        crs.append(IO(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT, 1, PCI_CONFIG_IO_SIZE))
        crs.append(WordIO(0x0000, PCI_CONFIG_IO_PORT - 1))
        crs.append(WordIO(PCI_IO_HIGH_START, 0xFFFF))
    base, size = seg.mmio32
    if size:
        crs.append(_mmio_descriptor(base, size, True, MEM_NON_CACHEABLE))
    base, size = seg.mmio64
    if size:
        crs.append(QWordMemory(base, base + size - 1, cacheable=MEM_CACHEABLE))
    body = [
        Name("_HID", EisaId("PNP0A08")),
        Name("_CID", EisaId("PNP0A03")),
        Name("_SEG", seg.id),
        Name("_UID", seg.id),
        Name("_BBN", seg.bus_start),
        Name("_CRS", ResourceTemplate(crs)),
    ]
    if seg.intx_irqs:
        body.append(Name("_PRT", _prt(seg.intx_irqs)))
    if proximity_domain is not None:
        body.append(pxm(proximity_domain))
    return Device(pci_root_name(seg.id), body)


def _prt(irqs: tuple[int, ...]) -> bytes:
    """``_PRT`` (§6.2.13): {address = slot<<16 | 0xFFFF (any function), pin, source 0 (a GSI),
    GSI}, the pins of each slot rotated over the available IRQs."""
    entries = []
    for slot in range(PCI_SLOTS):
        for pin in range(PCI_PINS):
            irq = irqs[(slot + pin) % len(irqs)]
            entries.append(Package([(slot << 16) | 0xFFFF, pin, 0, irq]))
    return Package(entries)


def motherboard_resources(segments: tuple[PciSegment, ...]) -> bytes:
    """``MBRD`` (PNP0C02): reserves every segment's ECAM (PCI Firmware Spec 3.2 §4.1.2 requires
    the MCFG ranges to be reserved by a motherboard resource device)."""
    crs = [Memory32Fixed(seg.ecam_base, seg.ecam_size) for seg in segments]
    return Device(
        "MBRD",
        [
            Name("_HID", EisaId("PNP0C02")),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate(crs)),
        ],
    )


def com1() -> bytes:
    """``COM1``: a 16550-compatible UART (PNP0501), 8 ports at 0x3f8, ISA IRQ 4."""
    return Device(
        "COM1",
        [
            Name("_HID", EisaId("PNP0501")),
            Name("_UID", 1),
            Name(
                "_CRS",
                ResourceTemplate([IO(COM1_PORT, COM1_PORT, 1, 8), IRQNoFlags([COM1_IRQ])]),
            ),
        ],
    )


def cmos_rtc() -> bytes:
    """``RTC_``: the CMOS RTC (PNP0B00), ports 0x70-0x71.

    Without it Linux registers a platform RTC device with ISA IRQ 8, which a hardware-reduced
    ACPI machine has not set up, and rtc_cmos fails to probe. Listed without an interrupt (vmsh's
    CMOS raises no alarms), Linux drives it without one.
    """
    return Device(
        "RTC_",
        [
            Name("_HID", EisaId("PNP0B00")),
            Name("_CRS", ResourceTemplate([IO(CMOS_PORT, CMOS_PORT, 1, 2)])),
        ],
    )


def power_button() -> bytes:
    """``PWRB``: the control-method power button; the GED notifies it with 0x80."""
    return Device("PWRB", [Name("_HID", EisaId("PNP0C0C")), Name("_UID", 0)])


def ged_register(spec: AcpiSpec) -> bytes:
    """``GEC_``: the GED's 1-byte read-to-clear event register GDAT, in system memory."""
    assert spec.ged is not None
    addr = spec.ged.address
    return Device(
        "GEC_",
        [
            # a generic container (PNP0A06) that claims its MMIO byte so nothing else is put there
            Name("_HID", EisaId("PNP0A06")),
            Name("_UID", String("GED register")),
            Name("_CRS", ResourceTemplate([_mmio_descriptor(addr, GED_REGISTER_SIZE, False, MEM_NON_CACHEABLE)])),
            OperationRegion("GDST", SYSTEM_MEMORY, addr, GED_REGISTER_SIZE),
            Field("GDST", [Named("GDAT", 8)], access=BYTE_ACC, update=WRITE_AS_ZEROS),
        ],
    )


def ged(spec: AcpiSpec) -> bytes:
    """``GED_`` (ACPI0013, ACPI 6.4 §5.6.9): its interrupt and ``_EVT``.

    Linux calls ``_EVT(gsi)`` when the interrupt fires (it looks for ``_Exx`` first, which we do
    not define). ``_EVT`` reads GDAT once, since reading clears it, and handles each set bit.
    """
    assert spec.ged is not None
    local0 = Local(0)
    handlers: list[bytes] = []
    # the hotplug scans are methods that their controllers' AML (AcpiSpec.extra_aml) provides
    for bit, method in (
        (GED_CPU_CHANGE, spec.cpu_scan_method),
        (GED_MEMORY_CHANGE, spec.memory_scan_method),
        (GED_PCI_CHANGE, spec.pci_rescan_method),
    ):
        if method is not None:
            handlers.append(If(And(local0, bit), [Call(method)]))
    if spec.power_button:
        handlers.append(If(And(local0, GED_POWER_BUTTON), [Notify("\\_SB_.PWRB", NOTIFY_POWER_BUTTON)]))
    evt = Method("_EVT", 1, [Store(aml.Path("\\_SB_.GEC_.GDAT"), local0), *handlers], serialized=True)
    return Device(
        "GED_",
        [
            Name("_HID", String("ACPI0013")),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate([Interrupt([spec.ged.irq], edge=True)])),
            evt,
        ],
    )


def processor(index: int, present: bool, proximity_domain: int | None = None) -> bytes:
    """A processor device (ACPI0007, §8.4): ``_UID`` is the vCPU index, which is also the ACPI
    processor UID of its MADT entry; ``_STA`` is a method so that hotplug can make it dynamic
    (Serialized, which spares ACPICA a parse of it at table load; see ``pci_hotplug``); ``_PXM``
    when a proximity domain is given."""
    body = [
        Name("_HID", String("ACPI0007")),
        Name("_UID", index),
        Method("_STA", 0, [Return(STA_PRESENT_ENABLED if present else STA_ABSENT)], serialized=True),
    ]
    if proximity_domain is not None:
        body.append(pxm(proximity_domain))
    return Device(processor_name(index), body)


def processors(spec: AcpiSpec) -> bytes:
    """``CPUS``: the processor container (ACPI0010, §8.4.2) holding every possible vCPU; with a CPU
    hotplug controller their status comes from it (``cpu_hotplug``), else it is fixed."""
    assert spec.max_vcpus is not None and spec.apic_ids is not None
    domains = [spec.numa.cpu_domain(i) if spec.numa is not None else None for i in range(spec.max_vcpus)]
    if spec.cpu_hotplug_address is not None:
        return cpu_hotplug.processors(spec.cpu_hotplug_address, spec.apic_ids, domains)
    cpus = [processor(i, i < spec.boot_vcpus, domains[i]) for i in range(spec.max_vcpus)]
    return Device("CPUS", [Name("_HID", String("ACPI0010")), *cpus])


#: the TPM's register page (the CRB interface, TCG PTP §6.4.2)
TPM_REGISTER_SIZE = 0x1000


def tpm(address: int) -> bytes:
    """``TPM2``: a TPM 2.0 (MSFT0101, the id Linux's tpm_crb binds to) with its register page."""
    return Device(
        "TPM2",
        [
            Name("_HID", String("MSFT0101")),
            Name("_STA", 0xF),
            Name("_CRS", ResourceTemplate([Memory32Fixed(address, TPM_REGISTER_SIZE)])),
        ],
    )


def sleep_states() -> bytes:
    """``\\_S5_``: {SLP_TYPa, SLP_TYPb, reserved, reserved} for soft-off (§7.4.2)."""
    return Name("\\_S5_", Package([S5_SLEEP_TYPE, S5_SLEEP_TYPE, 0, 0]))


def dsdt_aml(spec: AcpiSpec) -> bytes:
    """The DSDT's definition block: everything above, in a ``\\_SB_`` scope plus ``\\_S5_``."""
    numa = spec.numa
    sb: list[bytes] = [pci_root_bridge(seg, numa.segment_domain(seg.id) if numa is not None else None)
                       for seg in spec.pci_segments]
    if spec.pci_segments:
        sb.append(motherboard_resources(spec.pci_segments))
    if spec.serial:
        sb.append(com1())
    sb.append(cmos_rtc())
    if spec.power_button:
        sb.append(power_button())
    if spec.ged is not None:
        sb.append(ged_register(spec))
        sb.append(ged(spec))
    if spec.tpm_address is not None:
        sb.append(tpm(spec.tpm_address))
    sb.append(processors(spec))
    return Scope("\\_SB_", sb) + sleep_states() + b"".join(spec.extra_aml)
