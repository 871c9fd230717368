"""ACPI tables for vmsh guests, generated in Python.

- :mod:`.aml` — a small AML encoder (names, data, control flow, fields, resource templates);
- :mod:`.spec` — :class:`AcpiSpec`, the plain-data input the engine fills from a VmConfig;
- :mod:`.tables` — RSDP, XSDT, FADT, MADT, MCFG, TPM2, SRAT, SLIT and the SDT header;
- :mod:`.dsdt` — the DSDT's device namespace;
- :mod:`.builder` — :func:`build_acpi`, which places all of them in guest memory.

Usage (the engine fills the spec from the VmConfig and the memory layout)::

    spec = AcpiSpec(
        boot_vcpus=2,
        max_vcpus=4,
        serial=True,
        pci_segments=(PciSegment(0, 0xE800_0000, mmio32=(0xC000_0000, 640 << 20),
                                 mmio64=(device_area_start, device_area_size)),),
        ged=GedSpec(address=ged_mmio_address, irq=ged_irq),
        interrupt_overrides=(InterruptOverride(source=4, gsi=4),),
    )
    acpi = build_acpi(spec)
    guest_memory.write(acpi.rsdp_address, acpi.blob)   # RSDP at 0xa0000, tables after it
"""

from vmsh.engine.acpi.builder import AcpiTables, build_acpi
from vmsh.engine.acpi.spec import (
    AcpiSpec,
    GedSpec,
    InterruptOverride,
    MemoryAffinity,
    NumaNode,
    NumaSpec,
    OemInfo,
    PciSegment,
)

__all__ = ["AcpiSpec", "AcpiTables", "GedSpec", "InterruptOverride", "MemoryAffinity", "NumaNode", "NumaSpec",
           "OemInfo", "PciSegment", "build_acpi"]
