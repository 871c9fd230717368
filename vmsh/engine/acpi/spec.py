"""The plain-data description of the platform that the ACPI tables describe.

The engine fills an :class:`AcpiSpec` from a ``VmConfig`` and the memory layout; the table
generators read nothing else. Every value is checked when the spec is built, so a bad value
fails with a ``ValueError`` naming the field before any table is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmsh.engine.acpi import aml

#: the ECAM (PCI Express enhanced configuration space) of bus N is 1 MiB: 32 devices, 8
#: functions, 4 KiB each (PCI Firmware Specification 3.2 §4.1.2)
ECAM_BUS_SIZE = 1 << 20
#: the x86 legacy PCI configuration mechanism #1 ports (0xcf8 address, 0xcfc data)
PCI_CONFIG_IO_PORT = 0xCF8
PCI_CONFIG_IO_SIZE = 8

DEFAULT_RSDP_ADDRESS = 0xA0000
#: the ACPI area ends where SMBIOS starts (cloud-hypervisor's ``arch/src/x86_64/layout.rs``)
DEFAULT_ACPI_LIMIT = 0xF0000
DEFAULT_SHUTDOWN_PORT = 0x600
DEFAULT_PM_TIMER_PORT = 0x608
LAPIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000


def _check_ascii(name: str, value: str, max_len: int) -> None:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} {value!r} is not ASCII") from err
    if len(raw) > max_len:
        raise ValueError(f"{name} {value!r} is longer than {max_len} characters")
    if b"\x00" in raw:
        raise ValueError(f"{name} {value!r} contains NUL")


def _check_range(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} {value!r} out of range ({lo:#x}..{hi:#x})")


@dataclass(frozen=True)
class OemInfo:
    """The identification fields of every table header (ACPI 6.4 §5.2.6, Table 5.4).

    The defaults match the reference VMM so that guests which look at them see the same values.
    The OEM table id of a table is ``table_id_prefix + signature``, padded to 8 characters.
    """

    oem_id: str = "CLOUDH"
    table_id_prefix: str = "CH"
    oem_revision: int = 1
    creator_id: str = "VMSH"
    creator_revision: int = 1

    def __post_init__(self) -> None:
        _check_ascii("OEM id", self.oem_id, 6)
        _check_ascii("OEM table id prefix", self.table_id_prefix, 4)
        _check_ascii("creator id", self.creator_id, 4)
        _check_range("OEM revision", self.oem_revision, 0, 0xFFFF_FFFF)
        _check_range("creator revision", self.creator_revision, 0, 0xFFFF_FFFF)

    def table_id(self, signature: str) -> str:
        return (self.table_id_prefix + signature)[:8]


@dataclass(frozen=True)
class PciSegment:
    """One PCI segment (host bridge): its ECAM and the windows it forwards.

    ``mmio32``/``mmio64`` are ``(base, size)``; a size of 0 leaves that window out. The bus
    range is ``bus_start..bus_end`` (0..0 for the flat root bus vmsh emulates). ``legacy_io``
    (default: on for segment 0) adds the 0xcf8 configuration ports and the I/O port windows
    0x0000-0x0cf7 and 0x0d00-0xffff. ``intx_irqs``, when given, produces a ``_PRT`` that routes
    INTx of slot S pin P to ``intx_irqs[(S + P) % len]`` (a GSI).
    """

    id: int
    ecam_base: int
    mmio32: tuple[int, int] = (0, 0)
    mmio64: tuple[int, int] = (0, 0)
    bus_start: int = 0
    bus_end: int = 0
    legacy_io: bool | None = None
    intx_irqs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_range("PCI segment id", self.id, 0, 0xFFFF)
        _check_range(f"PCI segment {self.id} bus_start", self.bus_start, 0, 255)
        _check_range(f"PCI segment {self.id} bus_end", self.bus_end, self.bus_start, 255)
        _check_range(f"PCI segment {self.id} ECAM base", self.ecam_base, 0, (1 << 64) - 1)
        if self.ecam_base % ECAM_BUS_SIZE:
            raise ValueError(f"PCI segment {self.id} ECAM base {self.ecam_base:#x} is not 1 MiB aligned")
        if self.ecam_base + self.ecam_size > 1 << 32:
            # the MBRD reservation uses Memory32Fixed, and Linux wants it reserved to trust MCFG
            raise ValueError(f"PCI segment {self.id} ECAM {self.ecam_base:#x} is not below 4 GiB")
        base, size = self.mmio32
        if size and (base < 0 or base + size > 1 << 32):
            raise ValueError(f"PCI segment {self.id} mmio32 window {base:#x}+{size:#x} is not below 4 GiB")
        base, size = self.mmio64
        if size and (base < 0 or base + size > 1 << 64):
            raise ValueError(f"PCI segment {self.id} mmio64 window {base:#x}+{size:#x} out of range")
        for irq in self.intx_irqs:
            _check_range(f"PCI segment {self.id} INTx IRQ", irq, 0, 0xFFFF_FFFF)
        if self.legacy_io is None:
            object.__setattr__(self, "legacy_io", self.id == 0)

    @property
    def ecam_size(self) -> int:
        return (self.bus_end - self.bus_start + 1) * ECAM_BUS_SIZE


@dataclass(frozen=True)
class GedSpec:
    """The Generic Event Device: its 1-byte read-to-clear GDAT register and its interrupt.

    GDAT bits (the device model sets them, the guest's ``_EVT`` reads and acts on them):
    0x1 CPU change, 0x2 memory change, 0x4 PCI change, 0x8 power button.
    """

    address: int
    irq: int

    def __post_init__(self) -> None:
        _check_range("GED address", self.address, 0, (1 << 64) - 1)
        _check_range("GED IRQ", self.irq, 0, 0xFFFF_FFFF)


#: GDAT event bits (see GedSpec)
GED_CPU_CHANGE = 0x1
GED_MEMORY_CHANGE = 0x2
GED_PCI_CHANGE = 0x4
GED_POWER_BUTTON = 0x8


@dataclass(frozen=True)
class InterruptOverride:
    """A MADT Interrupt Source Override (ACPI 6.4 §5.2.12.5): ISA ``source`` is GSI ``gsi``.

    ``flags`` are MPS INTI flags: bits 0-1 polarity, bits 2-3 trigger mode (0 = bus default).
    """

    source: int
    gsi: int
    flags: int = 0
    bus: int = 0

    def __post_init__(self) -> None:
        _check_range("interrupt override source", self.source, 0, 255)
        _check_range("interrupt override GSI", self.gsi, 0, 0xFFFF_FFFF)
        _check_range("interrupt override flags", self.flags, 0, 0xFFFF)
        _check_range("interrupt override bus", self.bus, 0, 0)


@dataclass(frozen=True)
class MemoryAffinity:
    """One SRAT Memory Affinity structure (ACPI 6.4 §5.2.16.2): guest RAM at ``base``, ``size``
    bytes, in proximity domain ``proximity_domain``; ``hotpluggable`` marks a range that RAM may
    be added to (or removed from) at run time rather than RAM present at boot."""

    base: int
    size: int
    proximity_domain: int
    hotpluggable: bool = False

    def __post_init__(self) -> None:
        _check_range("memory affinity base", self.base, 0, (1 << 64) - 1)
        _check_range("memory affinity size", self.size, 1, (1 << 64) - self.base)
        _check_range("memory affinity proximity domain", self.proximity_domain, 0, 0xFFFF_FFFF)


@dataclass(frozen=True)
class NumaNode:
    """One guest NUMA node: its proximity domain ``id``, the vCPUs (indexes) in it, its distances
    to other nodes as ``(destination id, distance)`` and the PCI segments whose host bridge it
    holds (``_PXM``)."""

    id: int
    cpus: tuple[int, ...] = ()
    distances: tuple[tuple[int, int], ...] = ()
    pci_segments: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_range("NUMA node id", self.id, 0, 0xFFFF_FFFF)
        for name in ("cpus", "distances", "pci_segments"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for dest, dist in self.distances:
            _check_range(f"NUMA node {self.id} distance destination", dest, 0, 0xFFFF_FFFF)
            _check_range(f"NUMA node {self.id} distance to {dest}", dist, 0, 0xFF)


#: SLIT distances (ACPI 6.4 §5.2.17): a node to itself, and to a node none was given for
#: (cloud-hypervisor's ``vmm/src/acpi.rs`` default; "remote" in the spec's sense)
LOCAL_DISTANCE = 10
DEFAULT_REMOTE_DISTANCE = 20


@dataclass(frozen=True)
class NumaSpec:
    """The guest NUMA topology: the SRAT, the SLIT and the ``_PXM`` objects come from it.

    ``nodes`` are sorted by id. ``memory`` is every RAM range with its node, in any order:
    the engine lists each memory zone's guest-physical pieces, and memory hotplug adds its
    hotpluggable ranges (``MemoryAffinity(..., hotpluggable=True)``) to the same tuple.
    """

    nodes: tuple[NumaNode, ...]
    memory: tuple[MemoryAffinity, ...] = ()

    def __post_init__(self) -> None:
        nodes = tuple(sorted(self.nodes, key=lambda n: n.id))
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "memory", tuple(self.memory))
        ids = [n.id for n in nodes]
        if not ids:
            raise ValueError("a NUMA topology needs at least one node")
        if len(set(ids)) != len(ids):
            raise ValueError(f"NUMA nodes have duplicate ids: {ids}")
        for kind, values in (("vCPU", [c for n in nodes for c in n.cpus]),
                             ("PCI segment", [s for n in nodes for s in n.pci_segments])):
            if len(set(values)) != len(values):
                raise ValueError(f"a {kind} is in more than one NUMA node: {values}")
        for node in nodes:
            dests = [d for d, _ in node.distances]
            if len(set(dests)) != len(dests) or not set(dests) <= set(ids):
                raise ValueError(f"NUMA node {node.id} has distances {node.distances} to nodes {ids}")
        for mem in self.memory:
            if mem.proximity_domain not in ids:
                raise ValueError(f"memory at {mem.base:#x} is in NUMA node {mem.proximity_domain}, "
                                 f"which is not one of {ids}")

    def cpu_domain(self, index: int) -> int:
        """vCPU ``index``'s proximity domain: its node, or 0 when no node lists it (as
        cloud-hypervisor's ``_PXM``)."""
        return next((n.id for n in self.nodes if index in n.cpus), 0)

    def segment_domain(self, segment: int) -> int:
        """PCI segment ``segment``'s proximity domain: the node listing it, else 0."""
        return next((n.id for n in self.nodes if segment in n.pci_segments), 0)

    def distance_matrix(self) -> list[list[int]]:
        """The SLIT's N x N distances, rows and columns in node id order: 10 from a node to
        itself, else the configured distance or 20."""
        matrix = []
        for node in self.nodes:
            given = dict(node.distances)
            matrix.append([LOCAL_DISTANCE if other.id == node.id else given.get(other.id, DEFAULT_REMOTE_DISTANCE)
                           for other in self.nodes])
        return matrix


@dataclass(frozen=True)
class ViotSpec:
    """What the VIOT table says: the virtio-iommu's PCI function (segment and bus/device/function
    number) and the PCI functions behind it, as ``(segment, bdf)`` pairs."""

    iommu_segment: int
    iommu_bdf: int
    endpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(tuple(e) for e in self.endpoints))
        _check_range("VIOT iommu segment", self.iommu_segment, 0, 0xFFFF)
        _check_range("VIOT iommu bdf", self.iommu_bdf, 0, 0xFFFF)
        # node_count is 16 bits and counts the IOMMU node too
        _check_range("VIOT endpoints", len(self.endpoints), 0, 0xFFFE)
        for segment, bdf in self.endpoints:
            _check_range("VIOT endpoint segment", segment, 0, 0xFFFF)
            _check_range("VIOT endpoint bdf", bdf, 0, 0xFFFF)


@dataclass(frozen=True)
class AcpiSpec:
    """Everything the ACPI tables say about the VM.

    - ``boot_vcpus`` processors are present and enabled at boot; ``max_vcpus`` (default: the
      same) are described, the rest as hot-pluggable (MADT ONLINE_CAPABLE, ``_STA`` 0).
      ``apic_ids[i]`` is the APIC id of vCPU i (default: i).
    - ``cpu_hotplug_address``: the MMIO address of the CPU hotplug registers; when given the
      processors' status is dynamic and they can be added and ejected (``acpi.cpu_hotplug``;
      set ``cpu_scan_method`` to its ``SCAN_METHOD`` for the GED).
    - ``serial``: COM1 at 0x3f8, IRQ 4.
    - ``pci_segments``: one host bridge per entry, in MCFG and the DSDT.
    - ``ged``: the Generic Event Device; ``power_button`` the PNP0C0C device it notifies.
    - ``cpu_scan_method``, ``memory_scan_method``, ``pci_rescan_method``: full paths of the
      methods the GED's ``_EVT`` calls on a CPU, memory or PCI change event (left out when
      ``None``); the hotplug controllers that define them add their AML through ``extra_aml``.
    - ``extra_aml``: AML terms (built with the AML encoder, :mod:`vmsh.engine.acpi.aml` and its
      ``aml_*`` siblings) appended to the DSDT after the generated namespace, e.g.
      ``Scope("\\_SB_", [Device("PHPR", [...])])``.
    - ``shutdown_port``: FADT reset and sleep control/status register (I/O, 1 byte);
      ``pm_timer_port``: the 32-bit ACPI PM timer.
    - ``interrupt_overrides``: MADT Interrupt Source Overrides.
    - ``pcat_compat``: MADT flag saying dual 8259 PICs are present.
    - ``iapc_boot_arch``: FADT IA-PC boot architecture flags (ACPI 6.4 §5.2.9.3).
    - ``tpm_address``: a CRB TPM's register page (4 KiB) there: a TPM2 table and a ``TPM2``
      device in the DSDT (``None``: no TPM).
    - ``numa``: the guest NUMA topology: an SRAT, a SLIT and ``_PXM`` on the processors and the
      PCI host bridges (``None``: none of them, the guest is one node).
    - ``viot``: a virtio-iommu and the devices behind it: a VIOT table (``None``: no IOMMU).
    """

    boot_vcpus: int
    max_vcpus: int | None = None
    apic_ids: tuple[int, ...] | None = None
    cpu_hotplug_address: int | None = None
    serial: bool = True
    pci_segments: tuple[PciSegment, ...] = ()
    ged: GedSpec | None = None
    power_button: bool = True
    cpu_scan_method: str | None = None
    memory_scan_method: str | None = None
    pci_rescan_method: str | None = None
    extra_aml: tuple[bytes, ...] = ()
    shutdown_port: int = DEFAULT_SHUTDOWN_PORT
    pm_timer_port: int = DEFAULT_PM_TIMER_PORT
    interrupt_overrides: tuple[InterruptOverride, ...] = ()
    pcat_compat: bool = False
    iapc_boot_arch: int = 0
    tpm_address: int | None = None
    numa: NumaSpec | None = None
    viot: ViotSpec | None = None
    oem: OemInfo = field(default_factory=OemInfo)
    hypervisor_vendor: str = "CLOUDHYP"
    rsdp_address: int = DEFAULT_RSDP_ADDRESS
    limit: int = DEFAULT_ACPI_LIMIT

    def __post_init__(self) -> None:
        _check_range("boot_vcpus", self.boot_vcpus, 1, 0xFFFF_FFFF)
        max_vcpus = self.boot_vcpus if self.max_vcpus is None else self.max_vcpus
        object.__setattr__(self, "max_vcpus", max_vcpus)
        _check_range("max_vcpus", max_vcpus, self.boot_vcpus, MAX_VCPUS)
        if self.apic_ids is None:
            object.__setattr__(self, "apic_ids", tuple(range(max_vcpus)))
        else:
            object.__setattr__(self, "apic_ids", tuple(self.apic_ids))
            if len(self.apic_ids) != self.max_vcpus:
                raise ValueError(f"apic_ids has {len(self.apic_ids)} entries, max_vcpus is {self.max_vcpus}")
            if len(set(self.apic_ids)) != len(self.apic_ids):
                raise ValueError("apic_ids has duplicates")
            for apic_id in self.apic_ids:
                _check_range("APIC id", apic_id, 0, 0xFFFF_FFFE)
        object.__setattr__(self, "pci_segments", tuple(self.pci_segments))
        ids = [s.id for s in self.pci_segments]
        if len(set(ids)) != len(ids):
            raise ValueError(f"pci_segments has duplicate ids: {ids}")
        object.__setattr__(self, "interrupt_overrides", tuple(self.interrupt_overrides))
        _check_range("shutdown_port", self.shutdown_port, 0, 0xFFFF)
        _check_range("pm_timer_port", self.pm_timer_port, 0, 0xFFFF)
        _check_range("iapc_boot_arch", self.iapc_boot_arch, 0, 0xFFFF)
        if self.tpm_address is not None:
            _check_range("tpm_address", self.tpm_address, 0, 0xFFFF_F000)
        if self.numa is not None:
            for node in self.numa.nodes:
                for cpu in node.cpus:
                    if cpu >= max_vcpus:
                        raise ValueError(f"NUMA node {node.id} lists vCPU {cpu}, max_vcpus is {max_vcpus}")
        _check_ascii("hypervisor_vendor", self.hypervisor_vendor, 8)
        _check_range("rsdp_address", self.rsdp_address, 0, 0xFFFF_FFFF)
        if self.rsdp_address % 16:
            # ACPI 6.4 §5.2.5.1: the RSDP is found on a 16-byte boundary
            raise ValueError(f"rsdp_address {self.rsdp_address:#x} is not 16-byte aligned")
        _check_range("limit", self.limit, self.rsdp_address, 1 << 64)
        for name in ("cpu_scan_method", "memory_scan_method", "pci_rescan_method"):
            path = getattr(self, name)
            if path is not None:
                try:
                    aml.Path(path)
                except ValueError as err:
                    raise ValueError(f"{name} {path!r}: {err}") from err
        object.__setattr__(self, "extra_aml", tuple(bytes(t) for t in self.extra_aml))


#: processor device names are a letter and three hex digits (C000..CFFF, D000..), see dsdt.py
MAX_VCPUS = 0x1000 * 20
