"""ACPI tables for vmsh guests, generated in Python.

- :mod:`.aml` — a small AML encoder (names, data, control flow, fields, resource templates);
- :mod:`.spec` — :class:`AcpiSpec`, the plain-data input the engine fills from a VmConfig;
- :mod:`.tables` — RSDP, XSDT, FADT, MADT, MCFG and the SDT header;
- :mod:`.dsdt` — the DSDT's device namespace;
- :mod:`.builder` — :func:`build_acpi`, which places all of them in guest memory.
"""

from vmsh.engine.acpi.builder import AcpiTables, build_acpi
from vmsh.engine.acpi.spec import AcpiSpec, GedSpec, InterruptOverride, OemInfo, PciSegment

__all__ = ["AcpiSpec", "AcpiTables", "GedSpec", "InterruptOverride", "OemInfo", "PciSegment", "build_acpi"]
