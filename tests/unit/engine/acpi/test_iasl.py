"""The generated tables through ACPICA's own tools (Debian ``acpica-tools``).

- ``iasl -d`` disassembles every table: no error, no warning, no checksum complaint, and the
  expected devices, names and resources appear in the disassembly;
- the DSDT's disassembly compiles back with ``iasl`` with 0 errors and 0 warnings (the
  compiler checks what the disassembler does not: _HID/_ADR rules, resource fields, ...);
- ``acpiexec`` loads the DSDT into ACPICA's interpreter (the one Linux runs) and evaluates the
  objects: ``_STA`` of each processor, ``_S5_``, ``_CRS`` buffers, and the GED's ``_EVT`` with
  the GDAT register reading 0x8 (it must notify the power button with 0x80) or 0.

CI must install ``acpica-tools``; without it these tests are skipped with a loud reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from vmsh.engine.acpi import AcpiSpec, build_acpi
from vmsh.harness.requirements import unavailable

from .conftest import GED_ADDRESS, GED_IRQ, two_segment_spec

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")
_MISSING = "iasl not found: ACPI tables NOT checked by ACPICA; install Debian's acpica-tools (CI must)"

if IASL is None:
    warnings.warn(_MISSING, stacklevel=1)

pytestmark = pytest.mark.needs(IASL is not None, _MISSING)

#: anything ACPICA says about a broken table contains one of these words
_COMPLAINT = re.compile(r"error|warning|incorrect|invalid|unknown|\*\*\*\*", re.IGNORECASE)


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{out}"
    return out


def disassemble(table: bytes, name: str, tmp_path: Path) -> str:
    """``iasl -d`` ``table``; fail on any complaint; return the .dsl text."""
    src = tmp_path / f"{name.lower()}.dat"
    src.write_bytes(table)
    out = _run([IASL, "-d", src.name], tmp_path)  # type: ignore[list-item]  # IASL is None only when the test is skipped
    dsl = (tmp_path / f"{name.lower()}.dsl").read_text()
    # the header comment block of a DSDT disassembly holds the checksum verdict, so check it too
    for text in (out, dsl):
        bad = [line for line in text.splitlines() if _COMPLAINT.search(line)]
        # field names like "Error Status" do not occur in our tables; anything here is a finding
        assert not bad, f"iasl complained about {name}:\n" + "\n".join(bad)
    return dsl


def _squash(dsl: str) -> str:
    """The disassembly with comments removed and whitespace collapsed, for substring checks."""
    dsl = re.sub(r"[ \t]*/\*.*?\*/", "", dsl, flags=re.S)
    dsl = re.sub(r"[ \t]*//[^\n]*", "", dsl)
    return re.sub(r"\s+", " ", dsl)


def test_every_table_disassembles(tmp_path: Path) -> None:
    built = build_acpi(two_segment_spec())
    for name in ("DSDT", "FACP", "APIC", "MCFG", "XSDT"):
        dsl = disassemble(built.table(name), name, tmp_path)
        assert f'"{name}"' in dsl or f"Signature : \"{name}\"" in dsl


def test_dsdt_content(tmp_path: Path) -> None:
    dsl = _squash(disassemble(build_acpi(two_segment_spec()).table("DSDT"), "DSDT", tmp_path))
    assert 'DefinitionBlock ("", "DSDT", 2, "CLOUDH", "CHDSDT ", 0x00000001)' in dsl
    expected = [
        # the segment 0 host bridge with the legacy config ports and both I/O windows
        'Device (PCI0) { Name (_HID, EisaId ("PNP0A08")) Name (_CID, EisaId ("PNP0A03")) '
        "Name (_SEG, Zero) Name (_UID, Zero) Name (_BBN, Zero) Name (_CRS, ResourceTemplate () { "
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x0000, 0x0000, 0x0001, ,, ) "
        "IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, ) "
        "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,",
        "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, "
        "0x00000000, 0xC0000000, 0xD3FFFFFF, 0x00000000, 0x14000000,",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite, "
        "0x0000000000000000, 0x0000000200000000, 0x00000002FFFFFFFF, 0x0000000000000000, 0x0000000100000000,",
        # segment 1: no I/O
        'Device (PC01) { Name (_HID, EisaId ("PNP0A08")) Name (_CID, EisaId ("PNP0A03")) '
        "Name (_SEG, One) Name (_UID, One) Name (_BBN, Zero) Name (_CRS, ResourceTemplate () { "
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x0000, 0x0000, 0x0001, ,, ) "
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, "
        "0x00000000, 0xD4000000, 0xE7FFFFFF,",
        'Device (MBRD) { Name (_HID, EisaId ("PNP0C02")) Name (_UID, Zero) Name (_CRS, ResourceTemplate () { '
        "Memory32Fixed (ReadWrite, 0xE8000000, 0x00100000, ) Memory32Fixed (ReadWrite, 0xE8100000, 0x00100000, ) })",
        'Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One) Name (_CRS, ResourceTemplate () { '
        "IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, ) IRQNoFlags () {4} }) }",
        'Device (RTC) { Name (_HID, EisaId ("PNP0B00")) Name (_CRS, ResourceTemplate () { '
        "IO (Decode16, 0x0070, 0x0070, 0x01, 0x02, ) }) }",
        'Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }',
        f"OperationRegion (GDST, SystemMemory, 0x{GED_ADDRESS:016X}, One) "
        "Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }",
        'Device (GED) { Name (_HID, "ACPI0013") Name (_UID, Zero) Name (_CRS, ResourceTemplate () { '
        f"Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{GED_IRQ:08X}, }} }}) "
        "Method (_EVT, 1, Serialized) { Local0 = \\_SB.GEC.GDAT If ((Local0 & 0x08)) { Notify (\\_SB.PWRB, 0x80) } } }",
        'Device (CPUS) { Name (_HID, "ACPI0010") Device (C000) { Name (_HID, "ACPI0007") Name (_UID, Zero) '
        "Method (_STA, 0, Serialized) { Return (0x0F) } }",
        'Device (C003) { Name (_HID, "ACPI0007") Name (_UID, 0x03) Method (_STA, 0, Serialized) { Return (Zero) } }',
        "Name (\\_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })",
    ]
    for piece in expected:
        assert piece in dsl, f"not in the DSDT disassembly: {piece}\n---\n{dsl}"
    assert dsl.startswith(" DefinitionBlock") or "Scope (\\_SB) {" in dsl


def test_dsdt_recompiles_cleanly(tmp_path: Path) -> None:
    spec = two_segment_spec(pci_segments=two_segment_spec().pci_segments)
    disassemble(build_acpi(spec).table("DSDT"), "DSDT", tmp_path)
    out = _run([IASL, "-p", "recompiled", "dsdt.dsl"], tmp_path)  # type: ignore[list-item]  # IASL is None only when the test is skipped
    assert re.search(r"Compilation successful\. 0 Errors, 0 Warnings, 0 Remarks", out), out


def test_fadt_disassembly(tmp_path: Path) -> None:
    built = build_acpi(two_segment_spec())
    dsl = _squash(disassemble(built.table("FACP"), "FACP", tmp_path))
    assert "Revision : 06" in dsl
    assert "Table Length : 00000114" in dsl
    assert "Hardware Reduced (V5) : 1" in dsl
    assert "Reset Register Supported (V2) : 1" in dsl
    assert "32-bit PM Timer (V1) : 1" in dsl
    assert f"DSDT Address : {built.address('DSDT'):016X}" in dsl
    assert "Reset Register : [Generic Address Structure] [074h 0116 1] Space ID : 01 [SystemIO]" in dsl
    assert "Address : 0000000000000600 [080h 0128 1] Value to cause reset : 01" in dsl
    assert "Sleep Control Register : [Generic Address Structure] [0F4h 0244 1] Space ID : 01 [SystemIO]" in dsl
    assert ("PM Timer Block : [Generic Address Structure] [0D0h 0208 1] Space ID : 01 [SystemIO] "
            "[0D1h 0209 1] Bit Width : 20") in dsl
    assert "Address : 0000000000000608" in dsl
    assert "Hypervisor ID : 50594844554F4C43" in dsl  # "CLOUDHYP" read as a little-endian u64


def test_madt_disassembly(tmp_path: Path) -> None:
    dsl = _squash(disassemble(build_acpi(two_segment_spec()).table("APIC"), "APIC", tmp_path))
    assert "Local Apic Address : FEE00000" in dsl
    assert dsl.count("Subtable Type : 00 [Processor Local APIC]") == 4
    assert dsl.count("Processor Enabled : 1 Runtime Online Capable : 0") == 2
    assert dsl.count("Processor Enabled : 0 Runtime Online Capable : 1") == 2
    assert "Subtable Type : 01 [I/O APIC]" in dsl and "Address : FEC00000" in dsl
    assert (
        "Subtable Type : 02 [Interrupt Source Override] [059h 0089 1] Length : 0A [05Ah 0090 1] Bus : 00 "
        "[05Bh 0091 1] Source : 04 [05Ch 0092 4] Interrupt : 00000004"
    ) in dsl


def test_madt_x2apic_disassembly(tmp_path: Path) -> None:
    dsl = _squash(disassemble(build_acpi(AcpiSpec(boot_vcpus=2, max_vcpus=260)).table("APIC"), "APIC", tmp_path))
    assert dsl.count("[Processor Local APIC]") == 255
    assert dsl.count("[Processor Local x2APIC]") == 5
    assert "Processor x2Apic ID : 00000103" in dsl  # 259


def test_mcfg_and_xsdt_disassembly(tmp_path: Path) -> None:
    built = build_acpi(two_segment_spec())
    dsl = _squash(disassemble(built.table("MCFG"), "MCFG", tmp_path))
    assert "Base Address : 00000000E8000000 [034h 0052 2] Segment Group Number : 0000" in dsl
    assert "Base Address : 00000000E8100000 [044h 0068 2] Segment Group Number : 0001" in dsl
    dsl = _squash(disassemble(built.table("XSDT"), "XSDT", tmp_path))
    for name in ("FACP", "APIC", "MCFG"):
        assert f": {built.address(name):016X}" in dsl


def test_big_machine_disassembles(tmp_path: Path) -> None:
    """300 processor devices: multi-byte PkgLengths for CPUS and _SB_, QWord-sized _CRS, _PRT."""
    from vmsh.engine.acpi import PciSegment

    segs = tuple(
        PciSegment(i, 0xE8000000 + (i << 20), mmio32=(0xC0000000 + (i << 24), 1 << 24),
                   mmio64=((i + 4) << 32, 1 << 32), intx_irqs=(5, 6, 7, 8))
        for i in range(16)
    )
    spec = two_segment_spec(boot_vcpus=8, max_vcpus=300, pci_segments=segs)
    dsdt = build_acpi(spec).table("DSDT")
    assert len(dsdt) > 0x1000  # the \\_SB_ scope needs a 3-byte PkgLength
    dsl = _squash(disassemble(dsdt, "DSDT", tmp_path))
    assert "Device (C12B)" in dsl and "Device (PC0F)" in dsl
    assert "Name (_PRT, Package (0x80)" in dsl
    out = _run([IASL, "-p", "recompiled", "dsdt.dsl"], tmp_path)  # type: ignore[list-item]  # IASL is None only when the test is skipped
    assert "0 Errors, 0 Warnings" in out, out


def test_minimal_machine_disassembles(tmp_path: Path) -> None:
    built = build_acpi(AcpiSpec(boot_vcpus=1, serial=False, power_button=False))
    dsl = _squash(disassemble(built.table("DSDT"), "DSDT", tmp_path))
    assert "COM1" not in dsl and "PWRB" not in dsl and "GED" not in dsl
    assert "Device (C000)" in dsl
    for name in ("FACP", "APIC", "XSDT"):
        disassemble(built.table(name), name, tmp_path)


# --- acpiexec: ACPICA's interpreter evaluating the DSDT --------------------------------------------


def acpiexec(dsdt: bytes, commands: list[str], tmp_path: Path, fill: int = 0) -> str:
    if ACPIEXEC is None:
        unavailable("acpiexec not found (part of acpica-tools): AML not executed")
    (tmp_path / "dsdt.aml").write_bytes(dsdt)
    # -fv: the value unwritten operation regions read as (here: the GDAT register)
    out = _run([ACPIEXEC, "-fv", str(fill), "-b", "; ".join(commands), "dsdt.aml"], tmp_path)
    assert "failed with status" not in out, out
    assert "Exception" not in out and "Error" not in out, out
    return out


def _integer_result(out: str, path: str) -> int:
    m = re.search(rf"Evaluation of {re.escape(path)} returned object .*?\n\s*\[Integer\] = ([0-9A-F]+)", out, re.S)
    assert m, f"no integer from {path}:\n{out}"
    return int(m.group(1), 16)


def test_acpiexec_power_button_event(tmp_path: Path) -> None:
    dsdt = build_acpi(two_segment_spec()).table("DSDT")
    out = acpiexec(dsdt, ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=0x08)
    assert re.search(r"Received a (Device|System) Notify on \[PWRB\] .* Value 0x80", out), out
    out = acpiexec(dsdt, ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=0x00)
    assert "Notify" not in out, out
    # a PCI change alone does not press the power button
    out = acpiexec(dsdt, ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=0x04)
    assert "Notify" not in out, out


def test_acpiexec_hotplug_scans_called(tmp_path: Path) -> None:
    """Each GDAT bit calls its scan method; the methods come from ``extra_aml`` (stand-ins here
    that notify a device with a distinct value, so the output shows which ran)."""
    from vmsh.engine.acpi import aml_named, aml_ops

    stubs = aml_named.Scope(
        "\\_SB_",
        [
            aml_named.Method("CSCN", 0, [aml_ops.Notify("\\_SB_.CPUS", 0x01)]),
            aml_named.Method("MSCN", 0, [aml_ops.Notify("\\_SB_.MBRD", 0x02)]),
            aml_named.Method("PSCN", 0, [aml_ops.Notify("\\_SB_.PCI0", 0x03)]),
        ],
    )
    spec = two_segment_spec(
        cpu_scan_method="\\_SB_.CSCN",
        memory_scan_method="\\_SB_.MSCN",
        pci_rescan_method="\\_SB_.PSCN",
        extra_aml=(stubs,),
    )
    dsdt = build_acpi(spec).table("DSDT")
    disassemble(dsdt, "DSDT", tmp_path)
    out = acpiexec(dsdt, ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=0x0F)
    for device, value in (("CPUS", "0x01"), ("MBRD", "0x02"), ("PCI0", "0x03"), ("PWRB", "0x80")):
        assert re.search(rf"Notify on \[{device}\] .* Value {value}", out), (device, out)
    out = acpiexec(dsdt, ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=0x04)
    assert re.findall(r"Notify on \[(\w+)\]", out) == ["PCI0"], out


def test_acpiexec_objects(tmp_path: Path) -> None:
    dsdt = build_acpi(two_segment_spec()).table("DSDT")
    paths = [f"\\_SB.CPUS.C00{i}._STA" for i in range(4)] + [
        "\\_SB.CPUS.C003._UID",
        "\\_SB.PCI0._SEG",
        "\\_SB.PC01._SEG",
        "\\_SB.PCI0._HID",
        "\\_SB.COM1._UID",
    ]
    out = acpiexec(dsdt, [f"evaluate {p}" for p in [*paths, "\\_S5_", "\\_SB.PCI0._CRS", "\\_SB.GED._CRS"]], tmp_path)
    assert [_integer_result(out, p) for p in paths[:4]] == [0xF, 0xF, 0, 0]
    assert _integer_result(out, "\\_SB.CPUS.C003._UID") == 3
    assert _integer_result(out, "\\_SB.PC01._SEG") == 1
    assert _integer_result(out, "\\_SB.PCI0._HID") == 0x080AD041
    m = re.search(r"Evaluation of \\_S5_ returned.*?\[Package\] Contains 4 Elements:(.*?)Evaluat", out, re.S)
    assert m and re.findall(r"\[Integer\] = ([0-9A-F]+)", m.group(1)) == ["0000000000000005", "0000000000000005",
                                                                          "0000000000000000", "0000000000000000"]
    assert "Evaluation of \\_SB.PCI0._CRS returned" in out


def test_acpiexec_namespace(tmp_path: Path) -> None:
    """The namespace as ACPICA loads it: every device at the expected depth under \\_SB_."""
    dsdt = build_acpi(two_segment_spec()).table("DSDT")
    out = acpiexec(dsdt, ["namespace"], tmp_path)
    rows = re.findall(r"^\s*(\d+)\s+(\S{4}) (\w+)", out, re.M)
    devices = {(int(depth), name) for depth, name, kind in rows if kind == "Device"}
    for expected in [(1, "PCI0"), (1, "PC01"), (1, "MBRD"), (1, "COM1"), (1, "PWRB"), (1, "GEC_"), (1, "GED_"),
                     (1, "CPUS")]:
        assert expected in devices, (expected, sorted(devices))
    assert {(2, f"C00{i}") for i in range(4)} <= devices
    assert ("0", "_S5_", "Package") in set(rows)
    assert ("2", "GDST", "Region") in set(rows)
