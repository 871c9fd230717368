"""The TPM's ACPI description: the TPM2 table (TCG ACPI Specification 1.3 §8.3) and the DSDT's
``TPM2`` device, in bytes and through ACPICA's disassembler when it is installed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmsh.engine.acpi import AcpiSpec, build_acpi
from vmsh.engine.acpi.tables import SDT_HEADER_SIZE

from .test_iasl import IASL, _squash, disassemble

TPM = 0xFED4_0000


def test_tpm2_table_bytes_and_xsdt_entry() -> None:
    built = build_acpi(AcpiSpec(boot_vcpus=1, tpm_address=TPM))
    table = built.table("TPM2")
    signature, length, revision = struct.unpack_from("<4sIB", table)
    assert (signature, length, revision) == (b"TPM2", 52, 3) and len(table) == 52
    assert sum(table) % 256 == 0
    assert table[10:16] == b"CLOUDH" and table[16:24] == b"CHTPM2  "
    platform_class, reserved, control, start = struct.unpack_from("<HHQI", table, SDT_HEADER_SIZE)
    assert (platform_class, reserved, control, start) == (0, 0, TPM + 0x40, 7)
    xsdt = built.table("XSDT")
    entries = struct.unpack_from(f"<{(len(xsdt) - SDT_HEADER_SIZE) // 8}Q", xsdt, SDT_HEADER_SIZE)
    assert built.address("TPM2") in entries


def test_no_tpm_no_table_no_device() -> None:
    built = build_acpi(AcpiSpec(boot_vcpus=1))
    assert "TPM2" not in built.tables
    assert b"MSFT0101" not in built.table("DSDT")


@pytest.mark.needs(IASL is not None, "iasl not found (Debian acpica-tools)")
def test_tpm_through_iasl(tmp_path: Path) -> None:
    built = build_acpi(AcpiSpec(boot_vcpus=1, tpm_address=TPM))
    dsl = _squash(disassemble(built.table("TPM2"), "TPM2", tmp_path))
    assert "Control Address : 00000000FED40040" in dsl and "Start Method : 00000007" in dsl
    dsdt = _squash(disassemble(built.table("DSDT"), "DSDT", tmp_path))
    assert ('Device (TPM2) { Name (_HID, "MSFT0101") Name (_STA, 0x0F) Name (_CRS, ResourceTemplate () '
            '{ Memory32Fixed (ReadWrite, 0xFED40000, 0x00001000, ) }) }') in dsdt
