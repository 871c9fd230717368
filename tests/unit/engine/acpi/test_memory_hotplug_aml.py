"""The memory hotplug AML (``vmsh.engine.acpi.memory_hotplug``) through ACPICA: ``iasl -d``
disassembles it cleanly and it compiles back; ``acpiexec`` runs ``_STA``, ``_CRS`` and the GED's
scan with the controller's registers reading a chosen value (its ``-fv`` fill of unwritten
regions)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmsh.engine.acpi import build_acpi, memory_hotplug

from .conftest import two_segment_spec
from .test_iasl import _MISSING, IASL, _run, _squash, acpiexec, disassemble

pytestmark = pytest.mark.needs(IASL is not None, _MISSING)

ADDRESS = 0xFEB0_3000


def dsdt() -> bytes:
    spec = two_segment_spec(extra_aml=(memory_hotplug.hotplug_aml(ADDRESS),),
                            memory_scan_method=memory_hotplug.SCAN_METHOD)
    return build_acpi(spec).table("DSDT")


def test_disassembles_and_recompiles(tmp_path: Path) -> None:
    dsl = _squash(disassemble(dsdt(), "DSDT", tmp_path))
    for piece in [
        'Device (MHPC) { Name (_HID, EisaId ("PNP0A06")) Name (_UID, "Memory Hotplug Controller") '
        f"Name (_STA, 0x0B) Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, 0x{ADDRESS:08X}, "
        "0x00000018, ) }) Mutex (MLCK, 0x00)",
        f"OperationRegion (MHPR, SystemMemory, 0x{ADDRESS:08X}, 0x18)",
        "Field (MHPR, DWordAcc, NoLock, Preserve) { MHBL, 32, MHBH, 32, MHLL, 32, MHLH, 32 }",
        "Field (MHPR, ByteAcc, NoLock, WriteAsZeros) { Offset (0x14), MEN, 1, MINS, 1, MRMV, 1, MEJ0, 1, "
        "Offset (0x15) }",
        "Field (MHPR, DWordAcc, NoLock, Preserve) { MSEL, 32 }",
        "If ((Local0 & 0x02)) { \\_SB.MHPC.MSCN () }",
        'Device (M007) { Name (_HID, EisaId ("PNP0C80")) Name (_UID, 0x07) Method (_STA, 0, Serialized) '
        "{ Return (\\_SB.MHPC.MSTA (0x07)) } Method (_CRS, 0, Serialized) { Return (\\_SB.MHPC.MCRS (0x07)) } }",
    ]:
        assert piece in dsl, f"not in the DSDT disassembly: {piece}\n---\n{dsl}"
    assert "_EJ0" not in dsl.split("Device (M000)")[1]  # ACPI memory is never ejected
    out = _run([IASL, "-p", "recompiled", "dsdt.dsl"], tmp_path)  # type: ignore[list-item]  # IASL is None only when skipped
    assert re.search(r"Compilation successful\. 0 Errors, 0 Warnings", out), out


@pytest.mark.parametrize(("status", "sta"), [(0x01, 0xF), (0x00, 0x0), (0x06, 0x0)])
def test_sta_follows_the_enabled_bit(tmp_path: Path, status: int, sta: int) -> None:
    out = acpiexec(dsdt(), ["evaluate \\_SB.M003._STA"], tmp_path, fill=status)
    m = re.search(r"\[Integer\] = ([0-9A-F]+)", out)
    assert m and int(m.group(1), 16) == sta, out


def test_crs_is_the_slot_range(tmp_path: Path) -> None:
    # every register reads 0x01010101 but MSEL/MHBL, which acpiexec's emulated region gives back as
    # written: the slot. The high words are shifted in and the maximum is computed with the carry.
    out = acpiexec(dsdt(), ["evaluate \\_SB.M001._CRS"], tmp_path, fill=0x01)
    m = re.search(r"\[Buffer\] Length ([0-9A-F]+) = \s*((?:[0-9A-F]{4}: (?:[0-9A-F]{2} )+.*\n\s*)+)", out)
    assert m, out
    raw = bytes.fromhex("".join(re.findall(r"[0-9A-F]{4}: ((?:[0-9A-F]{2} )+)", m.group(2))).replace(" ", ""))
    assert raw[0] == 0x8A and len(raw) == 46 + 2  # a QWord address descriptor and the end tag
    minimum, maximum, length = (int.from_bytes(raw[o:o + 8], "little") for o in (14, 22, 38))
    assert minimum == 0x0101_0101_0000_0001 and length == 0x0101_0101_0101_0101
    assert maximum == minimum + length - 1


def test_scan_notifies_each_inserting_slot(tmp_path: Path) -> None:
    """Inserting: Notify 1 (device check), through the GED's memory-change bit."""
    out = acpiexec(dsdt(), ["evaluate \\_SB.GED._EVT 5"], tmp_path, fill=0x03)
    # (the fill is GDAT too: bit 1, the memory-change event, is set by it)
    notified = sorted(re.findall(r"Notify on \[(M00\d)\] .* Value 0x01", out))
    assert notified == [f"M00{i}" for i in range(8)], out


def test_no_controller_without_acpi_hotplug() -> None:
    table = build_acpi(two_segment_spec()).table("DSDT")
    assert b"MHPC" not in table and b"PNP0C80" not in table
