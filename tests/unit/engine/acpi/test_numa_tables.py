"""SRAT and SLIT bytes (ACPI 6.4 §5.2.16, §5.2.17), their place in the table layout, and the
``_PXM`` objects of processors and host bridges; none of it without a NUMA topology."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmsh.engine.acpi import AcpiSpec, MemoryAffinity, NumaNode, NumaSpec, build_acpi, tables
from vmsh.engine.acpi.dsdt import dsdt_aml

from .conftest import sdt_header, two_segment_spec
from .test_iasl import IASL, _squash, disassemble

GIB = 1 << 30


def two_nodes(**changes: object) -> NumaSpec:
    values: dict[str, object] = dict(
        # given out of order: the tables list nodes by id
        nodes=(NumaNode(1, cpus=(1, 3), distances=((0, 25),), pci_segments=(1,)),
               NumaNode(0, cpus=(0, 2), pci_segments=(0,))),
        memory=(MemoryAffinity(0x1_0000_0000, GIB, 1),
                # a hotplug range given before boot RAM of the same node still comes after it
                MemoryAffinity(0x2_0000_0000, 2 * GIB, 1, hotpluggable=True),
                MemoryAffinity(0, 3 * GIB, 0),
                MemoryAffinity(0x1_4000_0000, GIB, 1)),
    )
    values.update(changes)
    return NumaSpec(**values)  # type: ignore[arg-type]  # keyword overrides of mixed types, checked by NumaSpec


def entries(srat: bytes) -> list[bytes]:
    """The SRAT's affinity structures, after the header and its 12 reserved bytes."""
    out, off = [], tables.SDT_HEADER_SIZE + 12
    while off < len(srat):
        length = srat[off + 1]
        assert length >= 2
        out.append(srat[off:off + length])
        off += length
    assert off == len(srat)
    return out


def memory_entry(entry: bytes) -> tuple[int, int, int, int]:
    """(proximity domain, base, length, flags) of a Memory Affinity structure."""
    kind, length, domain, _, base_lo, base_hi, len_lo, len_hi, _, flags, _ = struct.unpack("<BBIHIIIIIIQ", entry)
    assert (kind, length) == (1, 40)
    return domain, base_lo | base_hi << 32, len_lo | len_hi << 32, flags


def cpu_entry(entry: bytes) -> tuple[int, int, int, int]:
    """(proximity domain, x2APIC id, flags, clock domain) of a Processor Local x2APIC Affinity."""
    kind, length, _, domain, apic_id, flags, clock, reserved = struct.unpack("<BBHIIIII", entry)
    assert (kind, length, reserved) == (2, 24, 0)
    return domain, apic_id, flags, clock


def test_srat_lists_each_node_memory_then_hotplug_then_cpus() -> None:
    built = build_acpi(two_segment_spec(apic_ids=(0, 1, 4, 5), numa=two_nodes()))
    srat = built.table("SRAT")
    assert sum(srat) % 256 == 0
    hdr = sdt_header(srat)
    assert (hdr["signature"], hdr["revision"], hdr["length"]) == ("SRAT", 3, len(srat))
    assert hdr["table_id"] == "CHSRAT  " and hdr["oem_id"] == "CLOUDH"
    assert srat[36:48] == bytes(12)
    got = entries(srat)
    assert [memory_entry(e) for e in got[:1]] == [(0, 0, 3 * GIB, 1)]
    # vCPU 2's APIC id is 4: the topology's, not its index
    assert [cpu_entry(e) for e in got[1:3]] == [(0, 0, 1, 0), (0, 4, 1, 0)]
    assert [memory_entry(e) for e in got[3:6]] == [(1, 0x1_0000_0000, GIB, 1), (1, 0x1_4000_0000, GIB, 1),
                                                   (1, 0x2_0000_0000, 2 * GIB, 3)]
    assert [cpu_entry(e) for e in got[6:]] == [(1, 1, 1, 0), (1, 5, 1, 0)]


def test_slit_is_the_distance_matrix_in_node_order() -> None:
    numa = two_nodes(nodes=(NumaNode(0, distances=((2, 30),)), NumaNode(2, distances=((0, 31), (5, 40))),
                            NumaNode(5)), memory=())
    slit = build_acpi(AcpiSpec(boot_vcpus=1, numa=numa)).table("SLIT")
    assert sum(slit) % 256 == 0
    hdr = sdt_header(slit)
    assert (hdr["signature"], hdr["revision"], hdr["length"]) == ("SLIT", 1, 36 + 8 + 9)
    assert hdr["table_id"] == "CHSLIT  "
    assert struct.unpack_from("<Q", slit, 36)[0] == 3
    # 10 on the diagonal, the given distance, else 20 (not made symmetric: node 5 gave none)
    assert list(slit[44:]) == [10, 30, 20,
                               31, 10, 40,
                               20, 20, 10]


def test_tables_follow_tpm2_and_are_in_the_xsdt() -> None:
    built = build_acpi(two_segment_spec(tpm_address=0xFED4_0000, numa=two_nodes()))
    order = sorted(built.tables, key=built.address)
    assert order == ["RSDP", "DSDT", "FACP", "APIC", "MCFG", "TPM2", "SRAT", "SLIT", "XSDT"]
    xsdt = built.table("XSDT")
    listed = [struct.unpack_from("<Q", xsdt, off)[0] for off in range(36, len(xsdt), 8)]
    assert listed == [built.address(n) for n in ("FACP", "APIC", "MCFG", "TPM2", "SRAT", "SLIT")]
    for name in ("SRAT", "SLIT", "XSDT"):
        addr, data = built.tables[name]
        assert built.blob[addr - built.rsdp_address:][:len(data)] == data


def test_no_numa_no_srat_slit_or_pxm() -> None:
    spec = two_segment_spec()
    built = build_acpi(spec)
    assert "SRAT" not in built.tables and "SLIT" not in built.tables
    assert b"_PXM" not in dsdt_aml(spec)
    assert b"_PXM" not in dsdt_aml(two_segment_spec(cpu_hotplug_address=0xFEB0_0000))


@pytest.mark.parametrize("hotplug", [False, True])
def test_pxm_of_processors_and_host_bridges(hotplug: bool) -> None:
    spec = two_segment_spec(numa=two_nodes(), cpu_hotplug_address=0xFEB0_0000 if hotplug else None)
    aml = dsdt_aml(spec)
    # Name(_PXM, One) encodes as NameOp "_PXM" OneOp; Zero likewise
    zero, one = b"\x08_PXM\x00", b"\x08_PXM\x01"
    # processors 0 and 2 and segment 0 in node 0; processors 1 and 3 and segment 1 in node 1
    assert aml.count(zero) == 3 and aml.count(one) == 3
    # each processor device has its own (the last mention of a name is its device: CTFY's
    # Notify calls come before)
    for name, domain in ((b"C000", 0), (b"C001", 1), (b"C002", 0)):
        device = aml[aml.rindex(name):]
        assert device[device.index(b"_PXM"):][:5] == b"_PXM" + bytes([domain])


def test_a_node_without_cpus_or_memory_and_unlisted_parts_are_domain_0() -> None:
    numa = NumaSpec(nodes=(NumaNode(3),))
    assert numa.cpu_domain(0) == 0 and numa.segment_domain(1) == 0
    srat = build_acpi(AcpiSpec(boot_vcpus=2, numa=numa)).table("SRAT")
    assert entries(srat) == []


@pytest.mark.parametrize("numa, message", [
    (dict(nodes=()), "at least one node"),
    (dict(nodes=(NumaNode(0), NumaNode(0))), "duplicate ids"),
    (dict(nodes=(NumaNode(0, cpus=(1,)), NumaNode(1, cpus=(1,)))), "vCPU is in more than one NUMA node"),
    (dict(nodes=(NumaNode(0, pci_segments=(1,)), NumaNode(1, pci_segments=(1,)))), "PCI segment is in more"),
    (dict(nodes=(NumaNode(0, distances=((1, 20),)),)), "has distances"),
    (dict(nodes=(NumaNode(0, distances=((0, 10), (0, 20))),)), "has distances"),
    (dict(nodes=(NumaNode(0),), memory=(MemoryAffinity(0, GIB, 1),)), "not one of"),
])
def test_bad_topologies(numa: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NumaSpec(**numa)  # type: ignore[arg-type]  # mixed keyword values under test


def test_bad_values() -> None:
    with pytest.raises(ValueError, match="distance to 1"):
        NumaNode(0, distances=((1, 256),))
    with pytest.raises(ValueError, match="memory affinity size"):
        MemoryAffinity(0, 0, 0)
    with pytest.raises(ValueError, match="lists vCPU 4, max_vcpus is 4"):
        two_segment_spec(numa=NumaSpec(nodes=(NumaNode(0, cpus=(4,)),)))


@pytest.mark.needs(IASL is not None, "iasl not found: SRAT/SLIT NOT checked by ACPICA; install acpica-tools")
def test_srat_and_slit_disassemble(tmp_path: Path) -> None:
    built = build_acpi(two_segment_spec(numa=two_nodes()))
    srat = _squash(disassemble(built.table("SRAT"), "SRAT", tmp_path))
    assert srat.count("Subtable Type : 01 [Memory Affinity]") == 4
    assert srat.count("Subtable Type : 02 [Processor Local x2APIC Affinity]") == 4
    assert srat.count("Hot Pluggable : 1") == 1
    assert "Base Address : 0000000200000000 [0" in srat
    slit = _squash(disassemble(built.table("SLIT"), "SLIT", tmp_path))
    assert "Localities : 0000000000000002" in slit
    assert "Locality 0 : 0A 14" in slit and "Locality 1 : 19 0A" in slit
    dsdt = _squash(disassemble(built.table("DSDT"), "DSDT", tmp_path))
    assert dsdt.count("Name (_PXM, Zero)") == 3 and dsdt.count("Name (_PXM, One)") == 3
