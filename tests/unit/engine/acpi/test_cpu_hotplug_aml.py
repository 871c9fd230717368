"""The CPU hotplug AML (``vmsh.engine.acpi.cpu_hotplug``) through ACPICA: ``iasl -d`` disassembles
it cleanly and it compiles back; ``acpiexec`` runs ``_STA``, ``CSCN`` and ``_MAT`` with the
controller's registers reading a chosen value (its ``-fv`` fill of unwritten regions)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from vmsh.engine.acpi import build_acpi, cpu_hotplug
from vmsh.engine.acpi.spec import AcpiSpec

from .conftest import two_segment_spec
from .test_iasl import _MISSING, IASL, _run, _squash, acpiexec, disassemble

pytestmark = pytest.mark.needs(IASL is not None, _MISSING)

ADDRESS = 0xFEB0_2000


def hotplug_spec(**changes: object) -> AcpiSpec:
    return two_segment_spec(cpu_hotplug_address=ADDRESS, cpu_scan_method=cpu_hotplug.SCAN_METHOD, **changes)


def test_disassembles_and_recompiles(tmp_path: Path) -> None:
    dsl = _squash(disassemble(build_acpi(hotplug_spec()).table("DSDT"), "DSDT", tmp_path))
    for piece in [
        'Device (PRES) { Name (_HID, EisaId ("PNP0A06")) Name (_UID, "CPU Hotplug Controller") Name (_STA, 0x0B) '
        f"Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, 0x{ADDRESS:08X}, 0x0000000C, ) }}) "
        "Mutex (CPLK, 0x00)",
        f"OperationRegion (PRST, SystemMemory, 0x{ADDRESS:08X}, 0x0C)",
        "Field (PRST, ByteAcc, NoLock, WriteAsZeros) "
        "{ Offset (0x04), CPEN, 1, CINS, 1, CRMV, 1, CEJ0, 1, Offset (0x05) }",
        "Field (PRST, DWordAcc, NoLock, Preserve) { CSEL, 32 }",
        "Method (CSCN, 0, Serialized) { Acquire (\\_SB.PRES.CPLK, 0xFFFF) Local0 = Zero While ((Local0 < 0x04)) "
        "{ \\_SB.PRES.CSEL = Local0 If ((\\_SB.PRES.CINS == One)) { CTFY (Local0, One) \\_SB.PRES.CINS = One } "
        "If ((\\_SB.PRES.CRMV == One)) { CTFY (Local0, 0x03) \\_SB.PRES.CRMV = One } Local0++ } "
        "Release (\\_SB.PRES.CPLK) }",
        "Method (CTFY, 2, Serialized)",
        "If ((Local0 & One)) { \\_SB.CPUS.CSCN () }",
        'Device (C003) { Name (_HID, "ACPI0007") Name (_UID, 0x03) Method (_STA, 0, Serialized) '
        "{ Return (CSTA (0x03)) }",
        "Method (_EJ0, 1, Serialized) { CEJ0 (0x03) }",
    ]:
        assert piece in dsl, f"not in the DSDT disassembly: {piece}\n---\n{dsl}"
    # vCPU 0 cannot be ejected
    assert ('Device (C000) { Name (_HID, "ACPI0007") Name (_UID, Zero) Method (_STA, 0, Serialized) '
            "{ Return (CSTA (Zero)) } Name (_MAT, Buffer (0x08) { 0x00, 0x08, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00 }) }"
            in dsl), dsl
    assert "CEJ0 (Zero)" not in dsl
    out = _run([IASL, "-p", "recompiled", "dsdt.dsl"], tmp_path)  # type: ignore[list-item]  # IASL is None only when skipped
    assert re.search(r"Compilation successful\. 0 Errors, 0 Warnings", out), out


@pytest.mark.parametrize(("status", "sta"), [(0x01, 0xF), (0x00, 0x0), (0x06, 0x0)])
def test_sta_follows_the_enabled_bit(tmp_path: Path, status: int, sta: int) -> None:
    out = acpiexec(build_acpi(hotplug_spec()).table("DSDT"), ["evaluate \\_SB.CPUS.C002._STA"], tmp_path,
                   fill=status)
    m = re.search(r"\[Integer\] = ([0-9A-F]+)", out)
    assert m and int(m.group(1), 16) == sta, out


@pytest.mark.parametrize(("status", "value"), [(0x02, "0x01"), (0x04, "0x03")])
def test_scan_notifies_each_flagged_vcpu(tmp_path: Path, status: int, value: str) -> None:
    """Inserting: Notify 1 (device check); removing: Notify 3 (eject request); through the GED."""
    dsdt = build_acpi(hotplug_spec()).table("DSDT")
    out = acpiexec(dsdt, ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=status | 0x01)
    # (the fill is GDAT too: bit 0, the CPU-change event, is set by it)
    # (ACPICA delivers notifications from a queue: their order is not the scan's)
    notified = sorted(re.findall(rf"Notify on \[(C00\d)\] .* Value {value}", out))
    assert notified == ["C000", "C001", "C002", "C003"], out


def test_scan_without_flags_notifies_nothing(tmp_path: Path) -> None:
    out = acpiexec(build_acpi(hotplug_spec()).table("DSDT"), ["evaluate \\_SB.CPUS.CSCN"], tmp_path, fill=0x01)
    assert "Notify" not in out, out


def test_mat_is_the_enabled_madt_entry(tmp_path: Path) -> None:
    spec = hotplug_spec(apic_ids=(0, 1, 4, 5))
    out = acpiexec(build_acpi(spec).table("DSDT"), ["evaluate \\_SB.CPUS.C002._MAT"], tmp_path)
    m = re.search(r"\[Buffer\] Length 08 = \s*0000: ((?:[0-9A-F]{2} ){8})", out)
    assert m, out
    assert bytes.fromhex(m.group(1)) == struct.pack("<BBBBI", 0, 8, 2, 4, 1)


def test_madt_entry_forms() -> None:
    assert cpu_hotplug.madt_entry(3, 7) == struct.pack("<BBBBI", 0, 8, 3, 7, 1)
    # an APIC id over 254 needs the x2APIC form: type 9, reserved, x2APIC id, flags, UID
    assert cpu_hotplug.madt_entry(300, 300) == struct.pack("<BBHIII", 9, 16, 0, 300, 1, 300)


def test_static_processors_without_a_controller() -> None:
    dsdt = build_acpi(two_segment_spec()).table("DSDT")
    assert b"CSCN" not in dsdt and b"PRST" not in dsdt
