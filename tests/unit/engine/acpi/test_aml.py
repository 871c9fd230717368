"""AML encoder: each builder against bytes computed by hand from ACPI 6.4 chapter 20."""

from __future__ import annotations

import pytest

from vmsh.engine.acpi import aml
from vmsh.engine.acpi.aml import Buffer, EisaId, Integer, NameSeg, Package, Path, String, pkg_length
from vmsh.engine.acpi.aml_named import (
    BYTE_ACC,
    DWORD_ACC,
    LOCK,
    SYSTEM_IO,
    SYSTEM_MEMORY,
    WRITE_AS_ZEROS,
    CreateDWordField,
    Device,
    Field,
    Method,
    Name,
    Named,
    OperationRegion,
    Reserved,
    Scope,
)
from vmsh.engine.acpi.aml_ops import (
    Add,
    And,
    Arg,
    Call,
    Else,
    If,
    Increment,
    LEqual,
    LLess,
    LNot,
    Local,
    Notify,
    Or,
    Return,
    ShiftLeft,
    Store,
    Subtract,
    While,
)
from vmsh.engine.acpi.aml_resources import (
    IO,
    MEM_CACHEABLE,
    MEM_PREFETCHABLE,
    DWordIO,
    DWordMemory,
    Interrupt,
    IRQNoFlags,
    Memory32Fixed,
    QWordMemory,
    ResourceTemplate,
    WordBusNumber,
    WordIO,
)

# --- PkgLength (§20.2.4) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, encoded",
    [
        (0, "01"),
        (1, "02"),
        (62, "3f"),  # 62 + 1 = 63: the largest one-byte form
        (63, "4104"),  # 63 + 2 = 65 = 0x041: two bytes, low nibble 1, then 0x04
        (64, "4204"),
        (4093, "4fff"),  # 4093 + 2 = 0xfff: the largest two-byte form
        (4094, "810001"),  # 4094 + 3 = 0x1001: three bytes
        (4095, "820001"),
        (4096, "830001"),
        (0xFFFFC, "8fffff"),  # + 3 = 0xfffff: the largest three-byte form
        (0xFFFFD, "c1000001"),  # + 4 = 0x100001: four bytes
        ((1 << 28) - 5, "cfffffff"),  # + 4 = 2^28 - 1: the largest PkgLength
    ],
)
def test_pkg_length(content: int, encoded: str) -> None:
    assert pkg_length(content).hex() == encoded


def test_pkg_length_too_long() -> None:
    with pytest.raises(ValueError, match="too long"):
        pkg_length((1 << 28) - 4)


@pytest.mark.parametrize("size", [61, 62, 63, 64, 4092, 4093, 4094, 4095, 4096, 70000])
def test_package_lengths_cover_themselves(size: int) -> None:
    """A Scope whose body is ``size`` bytes: the decoded PkgLength spans exactly to the end."""
    body = bytes([aml.NOOP_OP]) * (size - 2)  # the name "\" plus NullName takes 2 bytes
    enc = Scope("\\", [body])
    assert enc[0] == aml.SCOPE_OP
    lead = enc[1]
    nfollow = lead >> 6
    if nfollow == 0:
        value = lead & 0x3F
    else:
        value = lead & 0x0F
        for i in range(nfollow):
            value |= enc[2 + i] << (4 + 8 * i)
    assert value == len(enc) - 1
    assert enc[2 + nfollow : 4 + nfollow] == b"\\\x00"


def test_field_widths_use_plain_length_encoding() -> None:
    # in a FieldList the PkgLength is the bit width and does not count itself (§20.2.5.2)
    assert Named("GDAT", 8).encoded == b"GDAT\x08"
    assert Named("GDAT", 63).encoded == b"GDAT\x3f"
    assert Named("GDAT", 64).encoded == b"GDAT\x40\x04"
    assert Named("GDAT", 4095).encoded == b"GDAT\x4f\xff"
    assert Named("GDAT", 4096).encoded == b"GDAT\x80\x00\x01"
    assert Reserved(32).encoded == b"\x00\x20"


# --- integers (§20.2.3) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "00"),
        (1, "01"),
        (2, "0a02"),
        (0xFF, "0aff"),
        (0x100, "0b0001"),
        (0xFFFF, "0bffff"),
        (0x10000, "0c00000100"),
        (0xFFFF_FFFF, "0cffffffff"),
        (0x1_0000_0000, "0e0000000001000000"),
        ((1 << 64) - 1, "0effffffffffffffff"),
    ],
)
def test_integer(value: int, encoded: str) -> None:
    assert Integer(value).hex() == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Integer(value)


# --- names (§20.2.2) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, encoded",
    [
        ("PCI0", b"PCI0"),
        ("PCI", b"PCI_"),
        ("_S5", b"_S5_"),
        ("\\_SB_", b"\\_SB_"),
        ("\\_SB_.PCI0", b"\\\x2e_SB_PCI0"),
        ("_SB_.PCI0", b"\x2e_SB_PCI0"),
        ("\\_SB_.PCI0.S00_", b"\\\x2f\x03_SB_PCI0S00_"),
        ("\\_SB_.PCI0.S00_.S01_", b"\\\x2f\x04_SB_PCI0S00_S01_"),
        ("^PCI0", b"^PCI0"),
        ("^^PCI0", b"^^PCI0"),
        ("^_SB_.COM1", b"^\x2e_SB_COM1"),
        ("\\", b"\\\x00"),
        ("", b"\x00"),
    ],
)
def test_name_path(path: str, encoded: bytes) -> None:
    assert Path(path) == encoded


@pytest.mark.parametrize("seg", ["pci0", "0ABC", "ABCDE", "A-B", "", "A.B"])
def test_bad_name_seg(seg: str) -> None:
    with pytest.raises(ValueError, match="invalid AML name segment"):
        NameSeg(seg)


def test_bad_path_segment() -> None:
    with pytest.raises(ValueError):
        Path("\\_SB_.pci0")


# --- data objects ---------------------------------------------------------------------------------


def test_string() -> None:
    assert String("ACPI0013") == b"\x0dACPI0013\x00"
    assert String("") == b"\x0d\x00"
    with pytest.raises(ValueError, match="NUL"):
        String("a\x00b")
    with pytest.raises(ValueError, match="ASCII"):
        String("é")


@pytest.mark.parametrize(
    "eisa, encoded",
    [
        ("PNP0A03", "0c41d00a03"),
        ("PNP0A08", "0c41d00a08"),
        ("PNP0C0C", "0c41d00c0c"),
        ("PNP0501", "0c41d00501"),
        ("PNP0C02", "0c41d00c02"),
    ],
)
def test_eisa_id(eisa: str, encoded: str) -> None:
    assert EisaId(eisa).hex() == encoded


@pytest.mark.parametrize("bad", ["PNP0A0", "pnp0a03", "PN10A03", "PNP0A0G"])
def test_bad_eisa_id(bad: str) -> None:
    with pytest.raises(ValueError, match="EISA"):
        EisaId(bad)


def test_buffer_and_package() -> None:
    assert Buffer(b"\x01\x02").hex() == "11050a020102"
    assert Package([5, 5, 0, 0]).hex() == "1208040a050a050000"
    assert Package([]).hex() == "120200"
    with pytest.raises(ValueError, match="255"):
        Package([0] * 256)


def test_name() -> None:
    assert Name("_S5_", Package([5, 5, 0, 0])) == b"\x08_S5_" + bytes.fromhex("1208040a050a050000")
    assert Name("_UID", 1) == b"\x08_UID\x01"
    assert Name("_HID", EisaId("PNP0C0C")) == b"\x08_HID" + bytes.fromhex("0c41d00c0c")


# --- named objects and statements -----------------------------------------------------------------


def test_scope_device_method() -> None:
    assert Scope("\\_SB_", []) == bytes.fromhex("1006") + b"\\_SB_"
    assert Device("COM1", [Name("_UID", 1)]) == bytes.fromhex("5b820b") + b"COM1\x08_UID\x01"
    assert Method("_STA", 0, [Return(0x0F)]) == bytes.fromhex("1409") + b"_STA\x00" + bytes.fromhex("a40a0f")
    # flags: 1 argument, serialized (bit 3)
    assert Method("_EVT", 1, [], serialized=True) == b"\x14\x06_EVT\x09"
    # 2 arguments, serialized, sync level 3 in bits 4-7
    assert Method("MTHD", 2, [], serialized=True, sync_level=3)[-1] == 0x3A
    with pytest.raises(ValueError):
        Method("MTHD", 8, [])


def test_locals_args() -> None:
    assert Local(0) == b"\x60" and Local(7) == b"\x67"
    assert Arg(0) == b"\x68" and Arg(6) == b"\x6e"
    with pytest.raises(ValueError):
        Local(8)
    with pytest.raises(ValueError):
        Arg(7)


def test_store_and_arithmetic() -> None:
    assert Store(Path("\\_SB_.GEC_.GDAT"), Local(0)) == b"\x70\\\x2f\x03_SB_GEC_GDAT\x60"
    assert Store(5, "\\_SB_.PCI0.PCIU") == b"\x70\x0a\x05\\\x2f\x03_SB_PCI0PCIU"
    assert Add(Local(0), 1, Local(1)) == bytes.fromhex("72600161")
    # no target: NullName
    assert Subtract(Arg(0), 2) == bytes.fromhex("74680a0200")
    assert ShiftLeft(1, Arg(1), Local(2)) == bytes.fromhex("79016962")
    assert And(Local(0), 8) == bytes.fromhex("7b600a0800")
    assert Or(Local(0), 0x10, Local(0)) == bytes.fromhex("7d600a1060")
    assert Increment(Local(0)) == bytes.fromhex("7560")


def test_logical() -> None:
    assert LEqual(Arg(0), 5) == bytes.fromhex("93680a05")
    assert LLess(Local(0), 0x100) == bytes.fromhex("95600b0001")
    assert LNot(LEqual(Local(0), 0)) == bytes.fromhex("92936000")


def test_control_flow() -> None:
    assert If(Arg(0), [Return(1)]) + Else([Return(0)]) == bytes.fromhex("a00468a401a103a400")
    assert While(LLess(Local(0), 4), [Increment(Local(0))]) == bytes.fromhex("a207 95600a04 7560".replace(" ", ""))
    notify = If(And(Local(0), 8), [Notify("\\_SB_.PWRB", 0x80)])
    assert notify == bytes.fromhex("a013 7b600a0800 86".replace(" ", "")) + b"\\\x2e_SB_PWRB" + b"\x0a\x80"


def test_calls_and_fields() -> None:
    assert Call("\\_SB_.PHPR.PSCN") == b"\\\x2f\x03_SB_PHPRPSCN"
    assert Call("MTHD", 1, Local(0)) == b"MTHD\x01\x60"
    assert CreateDWordField(Arg(0), 4, "CDW2") == b"\x8a\x68\x0a\x04CDW2"
    assert OperationRegion("GDST", SYSTEM_MEMORY, 0xFFF00000, 1) == b"\x5b\x80GDST\x00\x0c\x00\x00\xf0\xff\x01"
    assert OperationRegion("PRST", SYSTEM_IO, 0x600, 8) == b"\x5b\x80PRST\x01\x0b\x00\x06\x0a\x08"
    # ByteAcc (1) | WriteAsZeros (2 << 5) = 0x41
    assert (
        Field("GDST", [Named("GDAT", 8)], access=BYTE_ACC, update=WRITE_AS_ZEROS)
        == b"\x5b\x81\x0bGDST\x41GDAT\x08"
    )
    # DWordAcc (3) | Lock (1 << 4) = 0x13
    assert (
        Field("PRST", [Reserved(32), Named("CPEN", 1)], access=DWORD_ACC, lock=LOCK)
        == b"\x5b\x81\x0dPRST\x13\x00\x20CPEN\x01"
    )


def test_term_type_checked() -> None:
    with pytest.raises(TypeError):
        Return("PCI0")  # type: ignore[arg-type]  # the wrong type on purpose


# --- resource descriptors (§6.4) ------------------------------------------------------------------


def test_small_descriptors() -> None:
    assert IO(0x3F8, 0x3F8, 1, 8).hex() == "4701f803f8030108"
    assert IRQNoFlags([4]).hex() == "221000"
    assert IRQNoFlags([1, 12]).hex() == "220210"
    with pytest.raises(ValueError):
        IRQNoFlags([16])


def test_memory32_fixed() -> None:
    assert Memory32Fixed(0xE8000000, 0x100000).hex() == "860900" + "01" + "000000e8" + "00001000"


def test_extended_interrupt() -> None:
    # consumer (bit 0) | edge (bit 1)
    assert Interrupt([9]).hex() == "890600" + "03" + "01" + "09000000"
    # consumer, level, active low (bit 2), shared (bit 3)
    interrupt = Interrupt([5, 6], edge=False, active_low=True, shared=True)
    assert interrupt.hex() == "890a00" + "0d" + "02" + "05000000" + "06000000"


def test_address_space_descriptors() -> None:
    # general flags 0x0c: MaxFixed | MinFixed, producer, positive decode
    assert WordBusNumber(0, 0).hex() == "880d00" + "02" + "0c" + "00" + "0000" + "0000" + "0000" + "0000" + "0100"
    assert WordIO(0, 0xCF7).hex() == "880d00" + "01" + "0c" + "03" + "0000" + "0000" + "f70c" + "0000" + "f80c"
    assert DWordIO(0xD00, 0xFFFF).hex() == ("871700" + "01" + "0c" + "03" + "00000000" + "000d0000" + "ffff0000"
                                            + "00000000" + "00f30000")
    assert DWordMemory(0xC0000000, 0xE7FFFFFF).hex() == (
        "871700" + "00" + "0c" + "01" + "00000000" + "000000c0" + "ffffffe7" + "00000000" + "00000028"
    )
    # consumer (bit 0 of general flags), cacheable (_MEM = 1 in bits 2-1) and read-write
    assert DWordMemory(0x1000, 0x1FFF, producer=False, cacheable=MEM_CACHEABLE)[3:6].hex() == "000d03"
    q = QWordMemory(0x2_0000_0000, 0x2_FFFF_FFFF, cacheable=MEM_PREFETCHABLE)
    assert q[:6].hex() == "8a2b00000c07"
    assert q[6:].hex() == "00" * 8 + "0000000002000000" + "ffffffff02000000" + "00" * 8 + "0000000001000000"
    with pytest.raises(ValueError, match="below min"):
        DWordMemory(0x2000, 0x1000)


def test_resource_template_end_tag_checksum() -> None:
    rt = ResourceTemplate([IRQNoFlags([4])])
    # Buffer, PkgLength 8, size 5, descriptor, end tag 0x79 and the byte making the sum zero
    assert rt.hex() == "11080a0522100079" + "55"
    assert sum(rt[4:]) % 256 == 0
    assert ResourceTemplate([IRQNoFlags([4])], checksum=False).hex() == "11080a052210007900"
    assert ResourceTemplate([]).hex() == "11050a027987"
