"""ACPI table bytes: checksums, headers, FADT offsets, MADT, MCFG, XSDT and the layout."""

from __future__ import annotations

import itertools
import struct

import pytest

from vmsh.engine.acpi import AcpiSpec, GedSpec, InterruptOverride, OemInfo, PciSegment, build_acpi, tables
from vmsh.engine.acpi.dsdt import processor_name

from .conftest import madt_entries, sdt_header, two_segment_spec

SDT_NAMES = ("DSDT", "FACP", "APIC", "MCFG", "XSDT")


def test_every_table_sums_to_zero(spec: AcpiSpec) -> None:
    built = build_acpi(spec)
    assert set(built.tables) == {"RSDP", *SDT_NAMES}
    for name in SDT_NAMES:
        table = built.table(name)
        assert sum(table) % 256 == 0, name
        assert sdt_header(table)["length"] == len(table)
    rsdp = built.table("RSDP")
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0


def test_headers(spec: AcpiSpec) -> None:
    built = build_acpi(spec)
    revisions = {"DSDT": 2, "FACP": 6, "APIC": 5, "MCFG": 1, "XSDT": 1}
    for name in SDT_NAMES:
        hdr = sdt_header(built.table(name))
        assert hdr["signature"] == name
        assert hdr["revision"] == revisions[name]
        assert hdr["oem_id"] == "CLOUDH"
        assert hdr["table_id"] == f"CH{name}  "
        assert hdr["oem_revision"] == 1
        assert hdr["creator_id"] == "VMSH"


def test_custom_oem() -> None:
    spec = two_segment_spec(oem=OemInfo(oem_id="VMSH", table_id_prefix="VM", oem_revision=7))
    built = build_acpi(spec)
    hdr = sdt_header(built.table("APIC"))
    assert hdr["oem_id"] == "VMSH  " and hdr["table_id"] == "VMAPIC  " and hdr["oem_revision"] == 7
    assert built.table("RSDP")[9:15] == b"VMSH  "


def test_rsdp(spec: AcpiSpec) -> None:
    built = build_acpi(spec)
    rsdp = built.table("RSDP")
    assert built.address("RSDP") == 0xA0000 == built.rsdp_address
    sig, _, oem, rev, rsdt, length, xsdt, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert sig == b"RSD PTR "
    assert oem == b"CLOUDH"
    assert rev == 2
    assert rsdt == 0
    assert length == 36
    assert xsdt == built.address("XSDT")


def test_fadt_fields(spec: AcpiSpec) -> None:
    built = build_acpi(spec)
    fadt = built.table("FACP")
    assert len(fadt) == 276
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags == (1 << 20) | (1 << 10) | (1 << 8)  # HW_REDUCED_ACPI, RESET_REG_SUP, TMR_VAL_EXT
    # GAS: SystemIO, 8 bits, offset 0, byte access, port 0x600
    shutdown = struct.pack("<BBBBQ", 1, 8, 0, 1, 0x600)
    assert fadt[116:128] == shutdown
    assert fadt[128] == 1  # reset value
    assert fadt[131] == 4  # FADT minor version (ACPI 6.4)
    assert struct.unpack_from("<Q", fadt, 140)[0] == built.address("DSDT")
    assert struct.unpack_from("<I", fadt, 40)[0] == 0  # 32-bit DSDT unused
    assert struct.unpack_from("<IQ", fadt, 36)[0] == 0 and struct.unpack_from("<Q", fadt, 132)[0] == 0  # no FACS
    assert fadt[208:220] == struct.pack("<BBBBQ", 1, 32, 0, 3, 0x608)  # X_PM_TMR_BLK
    assert fadt[91] == 4  # PM_TMR_LEN
    assert fadt[244:256] == shutdown  # SLEEP_CONTROL_REG
    assert fadt[256:268] == shutdown  # SLEEP_STATUS_REG
    assert fadt[268:276] == b"CLOUDHYP"


def test_fadt_custom_ports() -> None:
    spec = two_segment_spec(shutdown_port=0x700, pm_timer_port=0x708, hypervisor_vendor="VMSH", iapc_boot_arch=0x2)
    fadt = build_acpi(spec).table("FACP")
    assert struct.unpack_from("<Q", fadt, 120)[0] == 0x700
    assert struct.unpack_from("<Q", fadt, 212)[0] == 0x708
    assert struct.unpack_from("<Q", fadt, 248)[0] == 0x700
    assert struct.unpack_from("<H", fadt, 109)[0] == 0x2
    assert fadt[268:276] == b"VMSH    "


def test_madt_boot_and_max_vcpus(spec: AcpiSpec) -> None:
    madt = build_acpi(spec).table("APIC")
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000
    assert flags == 0  # no 8259 PICs
    entries = madt_entries(madt)
    cpus = [e for k, e in entries if k == 0]
    assert len(cpus) == 4
    for index, entry in enumerate(cpus):
        _kind, length, uid, apic_id, cpu_flags = struct.unpack("<BBBBI", entry)
        assert (length, uid, apic_id) == (8, index, index)
        assert cpu_flags == (1 if index < 2 else 2)  # ENABLED for boot vCPUs, else ONLINE_CAPABLE
    ioapics = [e for k, e in entries if k == 1]
    assert ioapics == [struct.pack("<BBBBII", 1, 12, 0, 0, 0xFEC00000, 0)]
    isos = [e for k, e in entries if k == 2]
    assert isos == [struct.pack("<BBBBIH", 2, 10, 0, 4, 4, 0)]
    assert not [k for k, _ in entries if k not in (0, 1, 2)]


def test_madt_overrides_and_pcat() -> None:
    spec = two_segment_spec(
        interrupt_overrides=(InterruptOverride(0, 2), InterruptOverride(9, 9, flags=0xD)), pcat_compat=True
    )
    madt = build_acpi(spec).table("APIC")
    assert struct.unpack_from("<I", madt, 40)[0] == 1
    isos = [e for k, e in madt_entries(madt) if k == 2]
    assert isos == [struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0), struct.pack("<BBBBIH", 2, 10, 0, 9, 9, 0xD)]


def test_madt_x2apic_for_large_ids() -> None:
    spec = AcpiSpec(boot_vcpus=256, max_vcpus=300)
    entries = madt_entries(build_acpi(spec).table("APIC"))
    lapics = [e for k, e in entries if k == 0]
    x2apics = [e for k, e in entries if k == 9]
    assert len(lapics) == 255 and len(x2apics) == 45
    assert struct.unpack("<BBBBI", lapics[-1])[2:] == (254, 254, 1)
    for n, entry in enumerate(x2apics):
        _kind, length, _, apic_id, flags, uid = struct.unpack("<BBHIII", entry)
        index = 255 + n
        assert (length, apic_id, uid) == (16, index, index)
        assert flags == (1 if index < 256 else 2)


def test_madt_explicit_apic_ids() -> None:
    spec = AcpiSpec(boot_vcpus=2, apic_ids=(0, 300))
    entries = madt_entries(build_acpi(spec).table("APIC"))
    assert [k for k, _ in entries] == [0, 9, 1]
    assert struct.unpack("<BBHIII", entries[1][1])[3:] == (300, 1, 1)


def test_mcfg(spec: AcpiSpec) -> None:
    mcfg = build_acpi(spec).table("MCFG")
    assert len(mcfg) == 44 + 2 * 16
    assert mcfg[36:44] == bytes(8)
    entries = [struct.unpack_from("<QHBBI", mcfg, 44 + 16 * i) for i in range(2)]
    assert entries == [(0xE8000000, 0, 0, 0, 0), (0xE8100000, 1, 0, 0, 0)]


def test_layout(spec: AcpiSpec) -> None:
    built = build_acpi(spec)
    order = ["RSDP", "DSDT", "FACP", "APIC", "MCFG", "XSDT"]
    addrs = [built.address(n) for n in order]
    assert addrs == sorted(addrs)
    assert built.address("RSDP") == 0xA0000
    for prev, cur in itertools.pairwise(order):
        end = built.address(prev) + len(built.table(prev))
        assert built.address(cur) >= end
        assert built.address(cur) - end < 8
        assert built.address(cur) % 8 == 0
    for name in order:
        off = built.address(name) - built.rsdp_address
        assert built.blob[off : off + len(built.table(name))] == built.table(name)
    assert len(built.blob) == built.address("XSDT") + len(built.table("XSDT")) - 0xA0000
    xsdt = built.table("XSDT")
    listed = [struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0] for i in range((len(xsdt) - 36) // 8)]
    assert listed == [built.address("FACP"), built.address("APIC"), built.address("MCFG")]


def test_layout_other_base_and_no_pci() -> None:
    built = build_acpi(AcpiSpec(boot_vcpus=1, rsdp_address=0x10_0000, limit=0x20_0000))
    assert built.address("RSDP") == 0x100000
    assert "MCFG" not in built.tables
    xsdt = built.table("XSDT")
    assert len(xsdt) == 36 + 16
    assert b"PCI0" not in built.table("DSDT") and b"MBRD" not in built.table("DSDT")


def test_tables_too_big() -> None:
    with pytest.raises(ValueError, match="more than fit below 0xa0100"):
        build_acpi(two_segment_spec(limit=0xA0100))


def test_dsdt_pieces_follow_spec() -> None:
    full = build_acpi(two_segment_spec()).table("DSDT")
    for name in (b"PCI0", b"PC01", b"MBRD", b"COM1", b"RTC_", b"PWRB", b"GEC_", b"GED_", b"CPUS", b"_S5_"):
        assert name in full
    bare = build_acpi(two_segment_spec(serial=False, power_button=False, ged=None)).table("DSDT")
    for name in (b"COM1", b"PWRB", b"GEC_", b"GED_"):
        assert name not in bare
    no_button = build_acpi(two_segment_spec(power_button=False)).table("DSDT")
    assert b"PWRB" not in no_button and b"GED_" in no_button
    rescan = build_acpi(two_segment_spec(pci_rescan_method="\\_SB_.PHPR.PSCN")).table("DSDT")
    assert b"\\\x2f\x03_SB_PHPRPSCN" in rescan


def test_processor_names() -> None:
    assert processor_name(0) == "C000"
    assert processor_name(0xFFF) == "CFFF"
    assert processor_name(0x1000) == "D000"
    dsdt = build_acpi(AcpiSpec(boot_vcpus=1, max_vcpus=20)).table("DSDT")
    for i in range(20):
        assert processor_name(i).encode() in dsdt


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(boot_vcpus=0), "boot_vcpus"),
        (dict(boot_vcpus=4, max_vcpus=2), "max_vcpus"),
        (dict(boot_vcpus=2, apic_ids=(0,)), "apic_ids has 1 entries"),
        (dict(boot_vcpus=2, apic_ids=(3, 3)), "duplicates"),
        (dict(boot_vcpus=1, rsdp_address=0xA0008), "16-byte aligned"),
        (dict(boot_vcpus=1, hypervisor_vendor="TOOLONGVENDOR"), "hypervisor_vendor"),
        (dict(boot_vcpus=1, shutdown_port=0x10000), "shutdown_port"),
        (dict(boot_vcpus=1, pci_rescan_method="\\_SB_.bad"), "pci_rescan_method .*name segment"),
        (dict(boot_vcpus=1, cpu_scan_method="CPUS.x"), "cpu_scan_method"),
        (
            dict(boot_vcpus=1, pci_segments=(PciSegment(0, 0xE8000000), PciSegment(0, 0xE8100000))),
            "duplicate ids",
        ),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AcpiSpec(**kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PciSegment(0, 0xE8000800), "not 1 MiB aligned"),
        (lambda: PciSegment(0, 0x1_0000_0000), "not below 4 GiB"),
        (lambda: PciSegment(0, 0xE8000000, mmio32=(0xF000_0000, 0x2000_0000)), "mmio32"),
        (lambda: PciSegment(0, 0xE8000000, bus_start=2, bus_end=1), "bus_end"),
        (lambda: GedSpec(-1, 5), "GED address"),
        (lambda: InterruptOverride(256, 4), "source"),
        (lambda: OemInfo(oem_id="SEVENCH"), "OEM id"),
        (lambda: OemInfo(creator_id="né"), "not ASCII"),
    ],
)
def test_part_validation(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_segment_defaults() -> None:
    assert PciSegment(0, 0xE8000000).legacy_io is True
    assert PciSegment(1, 0xE8100000).legacy_io is False
    assert PciSegment(2, 0xE8200000, bus_end=3).ecam_size == 4 << 20
    assert AcpiSpec(boot_vcpus=3).max_vcpus == 3
    assert AcpiSpec(boot_vcpus=3).apic_ids == (0, 1, 2)


def test_checksum_helper() -> None:
    data = b"\x01\x02\xfd"
    assert tables.checksum(data) == 0
    assert (sum(b"abc") + tables.checksum(b"abc")) % 256 == 0
