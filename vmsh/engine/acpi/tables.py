"""Binary ACPI tables: RSDP, the SDT header, XSDT, FADT, MADT, MCFG, SRAT and SLIT (ACPI 6.4 §5.2).

Each function returns the complete table bytes with its checksum set. Tables that point at
other tables take the guest physical addresses as arguments; laying them out in memory is the
job of :mod:`vmsh.engine.acpi.builder`. The DSDT body is produced by
:mod:`vmsh.engine.acpi.dsdt` and wrapped here by :func:`dsdt`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence

from vmsh.engine.acpi.spec import IOAPIC_ADDRESS, LAPIC_ADDRESS, AcpiSpec, NumaSpec, OemInfo, PciSegment, ViotSpec

SDT_HEADER_SIZE = 36
#: offset of the checksum byte in the SDT header (§5.2.6, Table 5.4)
SDT_CHECKSUM_OFFSET = 9

# --- RSDP (§5.2.5.3, Table 5.3) -------------------------------------------------------------------
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_SIZE = 36
#: the ACPI 1.0 checksum covers the first 20 bytes
RSDP_V1_SIZE = 20

# --- table revisions ------------------------------------------------------------------------------
XSDT_REVISION = 1
#: FADT revision 6 with minor version 4 is the ACPI 6.4 layout (§5.2.9, Table 5.9)
FADT_REVISION = 6
FADT_MINOR_VERSION = 4
FADT_SIZE = 276
#: MADT revision 5 (ACPI 6.3+) defines the ONLINE_CAPABLE flag (§5.2.12)
MADT_REVISION = 5
MCFG_REVISION = 1
#: DSDT revision 2 or more makes AML integers 64 bits wide (§5.2.11.1)
DSDT_REVISION = 2
#: SRAT revision 3 (ACPI 6.4 §5.2.16, Table 5.73) and SLIT revision 1 (§5.2.17, Table 5.86)
SRAT_REVISION = 3
SLIT_REVISION = 1
#: TPM2 table revision 3 has the platform class field (TCG ACPI Specification 1.3 §8.3)
TPM2_REVISION = 3

# --- FADT fixed feature flags (§5.2.9, Table 5.10) -------------------------------------------------
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20

# FADT field offsets (§5.2.9, Table 5.9)
FADT_OFF_FIRMWARE_CTRL = 36
FADT_OFF_DSDT = 40
FADT_OFF_PM_TMR_LEN = 91
FADT_OFF_IAPC_BOOT_ARCH = 109
FADT_OFF_FLAGS = 112
FADT_OFF_RESET_REG = 116
FADT_OFF_RESET_VALUE = 128
FADT_OFF_MINOR_VERSION = 131
FADT_OFF_X_FIRMWARE_CTRL = 132
FADT_OFF_X_DSDT = 140
FADT_OFF_X_PM_TMR_BLK = 208
FADT_OFF_SLEEP_CONTROL_REG = 244
FADT_OFF_SLEEP_STATUS_REG = 256
FADT_OFF_HYPERVISOR_VENDOR = 268

#: the value the guest writes to the reset register to reset the machine
RESET_VALUE = 1

# --- Generic Address Structure (§5.2.3.2, Table 5.1) ----------------------------------------------
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3
GAS_ACCESS_QWORD = 4

# --- MADT (§5.2.12) -------------------------------------------------------------------------------
MADT_PCAT_COMPAT = 1 << 0
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_OVERRIDE = 2
MADT_TYPE_LOCAL_X2APIC = 9
#: Local (x2)APIC flags (§5.2.12.2, Table 5.23)
MADT_ENABLED = 1 << 0
MADT_ONLINE_CAPABLE = 1 << 1
#: an xAPIC id is 8 bits and 0xff is the broadcast id, so ids >= 255 need x2APIC entries
#: (§5.2.12.12: "x2APIC ID ... values greater than 254")
X2APIC_MIN_ID = 255


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero modulo 256 (§5.2.6 "Checksum")."""
    return (-sum(data)) & 0xFF


def _fixed_ascii(value: str, size: int) -> bytes:
    return value.encode("ascii").ljust(size, b" ")[:size]


def sdt(signature: str, revision: int, body: bytes, oem: OemInfo) -> bytes:
    """A System Description Table: the 36-byte header (§5.2.6, Table 5.4) then ``body``.

    The OEM id and table id are padded with spaces, as firmware conventionally does.
    """
    if len(signature) != 4:
        raise ValueError(f"ACPI table signature {signature!r} is not 4 characters")
    length = SDT_HEADER_SIZE + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature.encode("ascii"),
        length,
        revision,
        0,  # checksum, filled below
        _fixed_ascii(oem.oem_id, 6),
        _fixed_ascii(oem.table_id(signature), 8),
        oem.oem_revision,
        _fixed_ascii(oem.creator_id, 4),
        oem.creator_revision,
    )
    table = bytearray(header + body)
    table[SDT_CHECKSUM_OFFSET] = checksum(bytes(table))
    return bytes(table)


def rsdp(xsdt_address: int, oem: OemInfo) -> bytes:
    """RSDP revision 2 (§5.2.5.3): no RSDT, the XSDT address, both checksums."""
    data = bytearray(
        struct.pack(
            "<8sB6sBIIQB3x",
            RSDP_SIGNATURE,
            0,
            _fixed_ascii(oem.oem_id, 6),
            RSDP_REVISION,
            0,  # RsdtAddress: none, 64-bit OSes use the XSDT
            RSDP_SIZE,
            xsdt_address,
            0,
        )
    )
    data[8] = checksum(bytes(data[:RSDP_V1_SIZE]))
    data[32] = checksum(bytes(data))
    return bytes(data)


# --- TPM2 (TCG ACPI Specification 1.3 §8.3, Table 7) ---------------------------------------------
TPM2_SIZE = 52
TPM2_PLATFORM_CLIENT = 0
#: the offset of the CRB control area (CTRL_REQ) in the TPM's register page
TPM2_CONTROL_AREA_OFFSET = 0x40
#: start method 7: the Command Response Buffer interface
TPM2_START_METHOD_CRB = 7


def tpm2(tpm_address: int, oem: OemInfo) -> bytes:
    """TPM2: a client-platform TPM whose CRB control area is at ``tpm_address + 0x40``, started
    through the CRB (no start-method parameters, no event log), as cloud-hypervisor's."""
    body = struct.pack("<HHQI", TPM2_PLATFORM_CLIENT, 0, tpm_address + TPM2_CONTROL_AREA_OFFSET,
                       TPM2_START_METHOD_CRB)
    return sdt("TPM2", TPM2_REVISION, body, oem)


def xsdt(entries: Sequence[int], oem: OemInfo) -> bytes:
    """XSDT (§5.2.8): the 64-bit addresses of every table but the DSDT and FACS."""
    return sdt("XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries), oem)


def gas(space: int, bit_width: int, address: int, access_size: int, bit_offset: int = 0) -> bytes:
    """A Generic Address Structure (§5.2.3.2): space, width, offset, access size, address."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


def fadt(spec: AcpiSpec, dsdt_address: int) -> bytes:
    """FADT, signature ``FACP`` (§5.2.9), revision 6, 276 bytes, hardware-reduced.

    A hardware-reduced platform (§4.1) has no fixed PM1/GPE blocks, no SCI and no FACS; what
    remains is the reset register, the sleep control and status registers (all the shutdown
    port, one byte: the guest writes RESET_VALUE to reset and SLP_TYP|SLP_EN to power off) and
    the 32-bit PM timer.
    """
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)

    def put(offset: int, data: bytes) -> None:
        rel = offset - SDT_HEADER_SIZE
        body[rel : rel + len(data)] = data

    # FIRMWARE_CTRL and X_FIRMWARE_CTRL stay 0: no FACS on a hardware-reduced platform.
    # DSDT (32-bit) stays 0 too: OSPM uses X_DSDT when it is non-zero.
    put(FADT_OFF_PM_TMR_LEN, bytes([4]))
    put(FADT_OFF_IAPC_BOOT_ARCH, struct.pack("<H", spec.iapc_boot_arch))
    put(FADT_OFF_FLAGS, struct.pack("<I", FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_TMR_VAL_EXT))
    put(FADT_OFF_RESET_REG, gas(GAS_SYSTEM_IO, 8, spec.shutdown_port, GAS_ACCESS_BYTE))
    put(FADT_OFF_RESET_VALUE, bytes([RESET_VALUE]))
    put(FADT_OFF_MINOR_VERSION, bytes([FADT_MINOR_VERSION]))
    put(FADT_OFF_X_DSDT, struct.pack("<Q", dsdt_address))
    put(FADT_OFF_X_PM_TMR_BLK, gas(GAS_SYSTEM_IO, 32, spec.pm_timer_port, GAS_ACCESS_DWORD))
    put(FADT_OFF_SLEEP_CONTROL_REG, gas(GAS_SYSTEM_IO, 8, spec.shutdown_port, GAS_ACCESS_BYTE))
    put(FADT_OFF_SLEEP_STATUS_REG, gas(GAS_SYSTEM_IO, 8, spec.shutdown_port, GAS_ACCESS_BYTE))
    put(FADT_OFF_HYPERVISOR_VENDOR, _fixed_ascii(spec.hypervisor_vendor, 8))
    return sdt("FACP", FADT_REVISION, bytes(body), spec.oem)


def madt(spec: AcpiSpec) -> bytes:
    """MADT, signature ``APIC`` (§5.2.12), revision 5.

    One processor entry per possible vCPU: Processor Local APIC (type 0, §5.2.12.2) while the
    APIC id fits in 8 bits, Local x2APIC (type 9, §5.2.12.12) from id 255 on. Boot vCPUs are
    ENABLED; the others ONLINE_CAPABLE (the spec reserves that bit when ENABLED is set). The
    ACPI processor UID is the vCPU index, matching the ``_UID`` of the processor devices in the
    DSDT. Then the I/O APIC (§5.2.12.3) and the interrupt source overrides (§5.2.12.5).
    """
    assert spec.max_vcpus is not None and spec.apic_ids is not None
    body = bytearray(struct.pack("<II", LAPIC_ADDRESS, MADT_PCAT_COMPAT if spec.pcat_compat else 0))
    for index in range(spec.max_vcpus):
        apic_id = spec.apic_ids[index]
        flags = MADT_ENABLED if index < spec.boot_vcpus else MADT_ONLINE_CAPABLE
        if apic_id < X2APIC_MIN_ID and index <= 0xFF:
            body += struct.pack("<BBBBI", MADT_TYPE_LOCAL_APIC, 8, index, apic_id, flags)
        else:
            body += struct.pack("<BBHIII", MADT_TYPE_LOCAL_X2APIC, 16, 0, apic_id, flags, index)
    body += struct.pack("<BBBBII", MADT_TYPE_IO_APIC, 12, 0, 0, IOAPIC_ADDRESS, 0)
    for iso in spec.interrupt_overrides:
        body += struct.pack("<BBBBIH", MADT_TYPE_INTERRUPT_OVERRIDE, 10, iso.bus, iso.source, iso.gsi, iso.flags)
    return sdt("APIC", MADT_REVISION, bytes(body), spec.oem)


def mcfg(segments: Sequence[PciSegment], oem: OemInfo) -> bytes:
    """MCFG (PCI Firmware Specification 3.2 §4.1.2): 8 reserved bytes, then per segment the
    ECAM base, segment number, start and end bus and 4 reserved bytes."""
    body = bytearray(8)
    for seg in segments:
        body += struct.pack("<QHBBI", seg.ecam_base, seg.id, seg.bus_start, seg.bus_end, 0)
    return sdt("MCFG", MCFG_REVISION, bytes(body), oem)


def dsdt(aml_body: bytes, oem: OemInfo) -> bytes:
    """DSDT (§5.2.11.1): the header then the AML definition blocks."""
    return sdt("DSDT", DSDT_REVISION, aml_body, oem)


# --- SRAT (§5.2.16) and SLIT (§5.2.17) ------------------------------------------------------------
SRAT_TYPE_MEMORY_AFFINITY = 1
SRAT_TYPE_X2APIC_AFFINITY = 2
SRAT_MEMORY_AFFINITY_SIZE = 40
SRAT_X2APIC_AFFINITY_SIZE = 24
#: Memory Affinity flags (§5.2.16.2, Table 5.77); x2APIC affinity flags (§5.2.16.3, Table 5.79)
SRAT_MEMORY_ENABLED = 1 << 0
SRAT_MEMORY_HOT_PLUGGABLE = 1 << 1
SRAT_CPU_ENABLED = 1 << 0
#: the 12 bytes after the header: the spec's "Reserved, must be 1" dword and 8 reserved bytes;
#: cloud-hypervisor writes them all 0 (Linux reads neither), and so does vmsh
SRAT_RESERVED_SIZE = 12


def srat_memory_affinity(base: int, size: int, proximity_domain: int, hotpluggable: bool) -> bytes:
    """A Memory Affinity structure (§5.2.16.2, Table 5.76): enabled, and hot-pluggable for a
    hotplug range."""
    flags = SRAT_MEMORY_ENABLED | (SRAT_MEMORY_HOT_PLUGGABLE if hotpluggable else 0)
    return struct.pack("<BBIHIIIIIIQ", SRAT_TYPE_MEMORY_AFFINITY, SRAT_MEMORY_AFFINITY_SIZE, proximity_domain, 0,
                       base & 0xFFFF_FFFF, base >> 32, size & 0xFFFF_FFFF, size >> 32, 0, flags, 0)


def srat_x2apic_affinity(x2apic_id: int, proximity_domain: int) -> bytes:
    """A Processor Local x2APIC Affinity structure (§5.2.16.3, Table 5.78): enabled, clock
    domain 0."""
    return struct.pack("<BBHIIIII", SRAT_TYPE_X2APIC_AFFINITY, SRAT_X2APIC_AFFINITY_SIZE, 0, proximity_domain,
                       x2apic_id, SRAT_CPU_ENABLED, 0, 0)


def srat(numa: NumaSpec, apic_ids: Sequence[int], oem: OemInfo) -> bytes:
    """SRAT, the System Resource Affinity Table (§5.2.16), laid out as cloud-hypervisor's
    (``vmm/src/acpi.rs``): for each node in id order, its boot RAM ranges, then its hotpluggable
    ranges, then one x2APIC affinity per vCPU it lists (``apic_ids[index]``: the vCPU's APIC id,
    the topology's, as in the MADT). x2APIC entries for every APIC id, small or not, as
    cloud-hypervisor; Linux reads both kinds."""
    body = bytearray(SRAT_RESERVED_SIZE)
    for node in numa.nodes:
        ranges = [r for r in numa.memory if r.proximity_domain == node.id]
        for r in sorted(ranges, key=lambda r: r.hotpluggable):  # stable: boot RAM first, in order
            body += srat_memory_affinity(r.base, r.size, node.id, r.hotpluggable)
        for cpu in node.cpus:
            body += srat_x2apic_affinity(apic_ids[cpu], node.id)
    return sdt("SRAT", SRAT_REVISION, bytes(body), oem)


def slit(numa: NumaSpec, oem: OemInfo) -> bytes:
    """SLIT, the System Locality Distance Information Table (§5.2.17): the number of localities
    (u64), then the N x N distance bytes, row i holding the distances from the i-th node.

    As in cloud-hypervisor, rows and columns follow the nodes in id order: locality i is the
    i-th node, which is proximity domain i when the node ids are 0..N-1 (Linux indexes the
    matrix by proximity domain)."""
    matrix = numa.distance_matrix()
    body = struct.pack("<Q", len(matrix)) + bytes(d for row in matrix for d in row)
    return sdt("SLIT", SLIT_REVISION, body, oem)
# --- VIOT (ACPI 6.5 §5.2.32, Virtual I/O Translation table) --------------------------------------
VIOT_REVISION = 0
#: the table's own fields after the header: node count, node offset, 8 reserved bytes
VIOT_HEADER_END = SDT_HEADER_SIZE + 12
VIOT_NODE_PCI_RANGE = 1
VIOT_NODE_VIRTIO_IOMMU_PCI = 3
VIOT_PCI_RANGE_SIZE = 24
VIOT_VIRTIO_IOMMU_PCI_SIZE = 16


def viot(spec: ViotSpec, oem: OemInfo) -> bytes:
    """VIOT as cloud-hypervisor lays it out (``vmm/src/acpi.rs``): the virtio-iommu-pci node
    first, then one single-function PCI range node per endpoint, each pointing at it; an
    endpoint's id is its segment and BDF (``segment << 16 | bdf``), as the virtio-iommu numbers
    endpoints (Linux: drivers/acpi/viot.c)."""
    iommu_node = VIOT_HEADER_END
    nodes = [struct.pack("<BxHHH8x", VIOT_NODE_VIRTIO_IOMMU_PCI, VIOT_VIRTIO_IOMMU_PCI_SIZE,
                         spec.iommu_segment, spec.iommu_bdf)]
    nodes += [struct.pack("<BxHIHHHHH6x", VIOT_NODE_PCI_RANGE, VIOT_PCI_RANGE_SIZE, segment << 16 | bdf,
                          segment, segment, bdf, bdf, iommu_node)
              for segment, bdf in spec.endpoints]
    body = struct.pack("<HH8x", len(nodes), iommu_node) + b"".join(nodes)
    # cloud-hypervisor gives this table OEM revision 0 (its others have 1)
    return sdt("VIOT", VIOT_REVISION, body, dataclasses.replace(oem, oem_revision=0))
