"""Lay out the ACPI tables of a VM in guest physical memory.

:func:`build_acpi` turns an :class:`~vmsh.engine.acpi.spec.AcpiSpec` into one contiguous blob
that the engine copies to guest RAM at ``rsdp_address`` (0xa0000 by default, the EBDA, where
the PVH start info and the zero page point the kernel):

    RSDP, DSDT, FACP, APIC, [MCFG], [TPM2], [SRAT, SLIT], [VIOT], XSDT

each table 8-byte aligned after the one before (SRAT and SLIT only with a NUMA topology, VIOT
only with a virtio-iommu, as in cloud-hypervisor). The XSDT lists every table but the DSDT, which
is reached through the FADT's X_DSDT (ACPI 6.4 §5.2.8, §5.2.9).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmsh.engine.acpi import tables
from vmsh.engine.acpi.dsdt import dsdt_aml
from vmsh.engine.acpi.spec import AcpiSpec

log = logging.getLogger(__name__)

#: alignment of each table after the RSDP (the RSDP itself needs 16, checked by AcpiSpec)
TABLE_ALIGN = 8


@dataclass(frozen=True)
class AcpiTables:
    """The generated tables: ``blob`` goes to guest memory at ``rsdp_address``;
    ``tables`` maps each signature (``RSDP``, ``DSDT``, ``FACP``, ...) to (address, bytes)."""

    blob: bytes
    rsdp_address: int
    tables: dict[str, tuple[int, bytes]]

    def address(self, name: str) -> int:
        return self.tables[name][0]

    def table(self, name: str) -> bytes:
        return self.tables[name][1]


def _align(value: int, align: int = TABLE_ALIGN) -> int:
    return (value + align - 1) & ~(align - 1)


def build_acpi(spec: AcpiSpec) -> AcpiTables:
    """Generate and place every table; raise ValueError if they do not fit below ``spec.limit``."""
    dsdt = tables.dsdt(dsdt_aml(spec), spec.oem)
    madt = tables.madt(spec)
    mcfg = tables.mcfg(spec.pci_segments, spec.oem) if spec.pci_segments else None
    tpm2 = tables.tpm2(spec.tpm_address, spec.oem) if spec.tpm_address is not None else None
    numa: dict[str, bytes] = {}
    if spec.numa is not None:
        assert spec.apic_ids is not None
        numa = {"SRAT": tables.srat(spec.numa, spec.apic_ids, spec.oem), "SLIT": tables.slit(spec.numa, spec.oem)}
    viot = tables.viot(spec.viot, spec.oem) if spec.viot is not None else None

    addr = spec.rsdp_address
    placed: dict[str, int] = {"RSDP": addr}
    addr = _align(addr + tables.RSDP_SIZE)
    placed["DSDT"] = addr
    addr = _align(addr + len(dsdt))
    placed["FACP"] = addr
    addr = _align(addr + tables.FADT_SIZE)
    placed["APIC"] = addr
    addr = _align(addr + len(madt))
    if mcfg is not None:
        placed["MCFG"] = addr
        addr = _align(addr + len(mcfg))
    if tpm2 is not None:
        placed["TPM2"] = addr
        addr = _align(addr + len(tpm2))
    for name, data in numa.items():
        placed[name] = addr
        addr = _align(addr + len(data))
    if viot is not None:
        placed["VIOT"] = addr
        addr = _align(addr + len(viot))
    placed["XSDT"] = addr

    fadt = tables.fadt(spec, placed["DSDT"])
    xsdt_entries = [placed[name] for name in ("FACP", "APIC", "MCFG", "TPM2", "SRAT", "SLIT", "VIOT")
                    if name in placed]
    xsdt = tables.xsdt(xsdt_entries, spec.oem)
    rsdp = tables.rsdp(placed["XSDT"], spec.oem)

    content = {"RSDP": rsdp, "DSDT": dsdt, "FACP": fadt, "APIC": madt, "XSDT": xsdt}
    if mcfg is not None:
        content["MCFG"] = mcfg
    if tpm2 is not None:
        content["TPM2"] = tpm2
    content.update(numa)
    if viot is not None:
        content["VIOT"] = viot
    end = placed["XSDT"] + len(xsdt)
    if end > spec.limit:
        raise ValueError(
            f"ACPI tables need {end - spec.rsdp_address} bytes from {spec.rsdp_address:#x}, "
            f"more than fit below {spec.limit:#x}"
        )

    blob = bytearray(end - spec.rsdp_address)
    result: dict[str, tuple[int, bytes]] = {}
    for name, table_addr in placed.items():
        data = content[name]
        off = table_addr - spec.rsdp_address
        blob[off : off + len(data)] = data
        result[name] = (table_addr, data)
    log.debug(
        "ACPI tables at %#x: %s",
        spec.rsdp_address,
        ", ".join(f"{n}@{a:#x}+{len(content[n])}" for n, a in placed.items()),
    )
    return AcpiTables(blob=bytes(blob), rsdp_address=spec.rsdp_address, tables=result)
