"""SMBIOS 3.2 tables: entry point, structure layout, strings, UUID byte order, OEM strings.

The tables are parsed back here with a small independent parser; when ``dmidecode`` is
installed the same bytes are also decoded by it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsh.engine.smbios import SmbiosSpec, build_smbios, build_structures, entry_point


@dataclass
class Structure:
    kind: int
    handle: int
    formatted: bytes  # including the 4-byte header
    strings: list[str]

    def string(self, offset: int) -> str | None:
        index = self.formatted[offset]
        return None if index == 0 else self.strings[index - 1]


def parse_entry_point(blob: bytes) -> dict[str, int]:
    anchor, _csum, length, major, minor, docrev, eprev, reserved, max_size, address = struct.unpack_from(
        "<5sBBBBBBBIQ", blob
    )
    assert anchor == b"_SM3_"
    return dict(length=length, major=major, minor=minor, docrev=docrev, revision=eprev, reserved=reserved,
                max_size=max_size, address=address)


def parse_structures(table: bytes) -> list[Structure]:
    out = []
    off = 0
    while off < len(table):
        kind, length, handle = struct.unpack_from("<BBH", table, off)
        formatted = table[off : off + length]
        pos = off + length
        end = table.index(b"\x00\x00", pos)
        raw = table[pos:end]
        strings = [s.decode("utf-8") for s in raw.split(b"\x00")] if raw else []
        # the string set ends with a double NUL; a structure without strings is followed by two NULs
        off = end + 2
        out.append(Structure(kind, handle, formatted, strings))
        if kind == 127:
            break
    assert off == len(table), "bytes after the end-of-table structure"
    return out


def parse(blob: bytes, base: int = 0xF0000) -> tuple[dict[str, int], list[Structure]]:
    ep = parse_entry_point(blob)
    off = ep["address"] - base
    return ep, parse_structures(blob[off : off + ep["max_size"]])


def test_entry_point() -> None:
    blob = build_smbios(SmbiosSpec())
    assert sum(blob[:0x18]) % 256 == 0
    ep, structs = parse(blob)
    assert ep == dict(length=0x18, major=3, minor=2, docrev=0, revision=1, reserved=0, max_size=len(blob) - 0x18,
                      address=0xF0018)
    assert [s.kind for s in structs] == [0, 1, 127]
    assert [s.handle for s in structs] == [0, 1, 2]


def test_entry_point_other_address() -> None:
    blob = build_smbios(SmbiosSpec(address=0x10_0000, limit=0x20_0000))
    assert parse_entry_point(blob)["address"] == 0x10_0018
    assert sum(blob[:0x18]) % 256 == 0


def test_bios_information() -> None:
    _, structs = parse(build_smbios(SmbiosSpec()))
    bios = structs[0]
    assert len(bios.formatted) == 0x1A
    assert bios.string(4) == "cloud-hypervisor"  # vendor
    assert bios.string(5) == "0"  # version
    assert bios.string(8) is None  # release date: none given
    chars = struct.unpack_from("<Q", bios.formatted, 0x0A)[0]
    assert chars & (1 << 7)  # PCI supported
    assert bios.formatted[0x13] & (1 << 4)  # extension byte 2: virtual machine
    assert bios.strings == ["cloud-hypervisor", "0"]


def test_system_information_defaults() -> None:
    _, structs = parse(build_smbios(SmbiosSpec()))
    system = structs[1]
    assert len(system.formatted) == 0x1B
    assert system.string(4) == "Cloud Hypervisor"
    assert system.string(5) == "cloud-hypervisor"
    assert system.string(6) is None  # version
    assert system.string(7) is None  # serial number
    assert system.formatted[8:24] == bytes(16)  # no UUID: zeros
    assert system.formatted[24] == 6  # wake-up: power switch
    assert system.strings == ["Cloud Hypervisor", "cloud-hypervisor"]


def test_system_information_platform_values() -> None:
    text = "4c4c4544-0042-3510-8052-b4c04f4e5a31"
    spec = SmbiosSpec(serial_number="ABC-123", uuid=text, manufacturer="ACME", product_name="box", family="fam")
    _, structs = parse(build_smbios(spec))
    system = structs[1]
    assert system.string(4) == "ACME"
    assert system.string(5) == "box"
    assert system.string(7) == "ABC-123"
    assert system.string(0x1A) == "fam"
    # §7.2.1: time_low, time_mid, time_hi_and_version little-endian; the rest as written
    assert system.formatted[8:24] == bytes.fromhex("4445 4c4c 4200 1035 8052 b4c04f4e5a31".replace(" ", ""))
    assert uuid.UUID(bytes_le=system.formatted[8:24]) == uuid.UUID(text)


def test_empty_strings_are_index_zero() -> None:
    spec = SmbiosSpec(serial_number="", manufacturer="", product_name="p", bios_version="")
    _, structs = parse(build_smbios(spec))
    system = structs[1]
    assert system.formatted[4] == 0 and system.formatted[7] == 0
    assert system.string(5) == "p"
    assert system.strings == ["p"]
    assert structs[0].formatted[5] == 0


def test_no_strings_at_all_ends_with_two_nuls() -> None:
    spec = SmbiosSpec(bios_vendor="", bios_version="", manufacturer="", product_name="")
    table = build_structures(spec)
    # type 0 formatted area, then the empty string set (two NULs)
    assert table[0x1A:0x1C] == b"\x00\x00" and table[0x1C] == 1
    _, structs = parse(build_smbios(spec))
    assert all(s.strings == [] for s in structs)


def test_oem_strings() -> None:
    spec = SmbiosSpec(oem_strings=("io.systemd.credential:x=y", "second", "ünïcode"))
    _, structs = parse(build_smbios(spec))
    assert [s.kind for s in structs] == [0, 1, 11, 127]
    assert [s.handle for s in structs] == [0, 1, 2, 3]
    oem = structs[2]
    assert len(oem.formatted) == 5
    assert oem.formatted[4] == 3
    assert oem.strings == ["io.systemd.credential:x=y", "second", "ünïcode"]


def test_end_of_table() -> None:
    blob = build_smbios(SmbiosSpec())
    assert blob.endswith(bytes([127, 4, 2, 0, 0, 0]))


def test_from_platform() -> None:
    @dataclass
    class Platform:
        serial_number: str | None = "S1"
        uuid: str | None = "12345678-1234-5678-1234-567812345678"
        oem_strings: list[str] | None = None

    spec = SmbiosSpec.from_platform(Platform(oem_strings=["a", "b"]))
    assert (spec.serial_number, spec.oem_strings) == ("S1", ("a", "b"))
    assert SmbiosSpec.from_platform(None) == SmbiosSpec()
    assert SmbiosSpec.from_platform(Platform(), product_name="x").product_name == "x"


def test_from_platform_config() -> None:
    from vmsh.config.model import PlatformConfig

    spec = SmbiosSpec.from_platform(PlatformConfig(serial_number="X", oem_strings=["k=v"]))
    assert spec.serial_number == "X" and spec.oem_strings == ("k=v",) and spec.uuid is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(serial_number="a\x00b"), "SMBIOS serial_number contains a NUL"),
        (dict(manufacturer="\x00"), "SMBIOS manufacturer contains a NUL"),
        (dict(oem_strings=("ok", "b\x00d")), r"SMBIOS oem_strings\[1\] contains a NUL"),
        (dict(oem_strings=("ok", "")), r"SMBIOS oem_strings\[1\] is empty"),
        (dict(oem_strings=("x",) * 256), "at most 255"),
        (dict(uuid="not-a-uuid"), "SMBIOS uuid 'not-a-uuid' is not a valid UUID"),
        (dict(uuid="12345678-1234-5678-1234-56781234567"), "is not a valid UUID"),
        (dict(address=0xF0008), "16-byte aligned"),
        (dict(serial_number=5), "must be a string"),
    ],
)
def test_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SmbiosSpec(**kwargs)


def test_too_big() -> None:
    with pytest.raises(ValueError, match="more than fit below"):
        build_smbios(SmbiosSpec(oem_strings=("x" * 1000,) * 70))


@pytest.mark.skipif(shutil.which("dmidecode") is None, reason="dmidecode not installed: SMBIOS not cross-checked")
def test_dmidecode_reads_it(tmp_path: Path) -> None:
    spec = SmbiosSpec(serial_number="SER-42", uuid="12345678-9abc-def0-1122-334455667788", oem_strings=("k=v", "two"))
    table = build_structures(spec)
    # dmidecode's dump format: the entry point at 0 pointing at the table at offset 32
    dump = tmp_path / "smbios.bin"
    dump.write_bytes(entry_point(32, len(table)).ljust(32, b"\x00") + table)
    out = subprocess.run(["dmidecode", "--from-dump", str(dump)], capture_output=True, text=True, timeout=30).stdout
    assert "SMBIOS 3.2.0 present." in out
    assert "Manufacturer: Cloud Hypervisor" in out
    assert "Product Name: cloud-hypervisor" in out
    assert "Serial Number: SER-42" in out
    assert "UUID: 12345678-9abc-def0-1122-334455667788" in out
    assert "String 1: k=v" in out and "String 2: two" in out
    assert "System is a virtual machine" in out
    assert "End Of Table" in out
    assert "Invalid" not in out and "Wrong" not in out
