"""CPUID patching: APIC ids, topology leaves, hypervisor bit, CX16 on PVM."""

from __future__ import annotations

import pytest

from vmsh.engine.cpuid import (
    CPUID_1_ECX_CX16,
    CPUID_1_ECX_HYPERVISOR,
    CPUID_1_EDX_HTT,
    CPUID_80000001_ECX_CMP_LEGACY,
    CPUID_80000001_ECX_TOPOEXT,
    CpuTopology,
    build_cpuid,
)
from vmsh.engine.kvm_types import CpuidEntry

AMD = dict(ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65)  # "AuthenticAMD"
INTEL = dict(ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69)  # "GenuineIntel"

#: what KVM_GET_SUPPORTED_CPUID returns on this project's PVM host (an AMD EPYC), topology leaves
#: included: 0xB at level 0 only, all zeros; no 0x1F; an empty 0x8000_001E
PVM_AMD_HOST = [
    CpuidEntry(0, eax=0x1C, **AMD),
    CpuidEntry(1, eax=0xB00F21, ebx=0x1020800, ecx=0x81202000, edx=0x78BFBFF),
    CpuidEntry(4, flags=1),
    CpuidEntry(0xB, 0, flags=1, edx=1),
    CpuidEntry(0x8000_0000, eax=0x8000_0021, **AMD),
    CpuidEntry(0x8000_0001, eax=0xB00F21, ebx=0x4000_0000, ecx=0x400393, edx=0x23D3FBFF),
    CpuidEntry(0x8000_0008, eax=0x3030, ebx=0x50020005, ecx=0x7001),
    CpuidEntry(0x8000_001E),
]

#: an Intel host with no 0x1F: leaf 4 (two cache levels) and 0xB with the host's own topology
INTEL_HOST = [
    CpuidEntry(0, eax=0x16, **INTEL),
    CpuidEntry(1, eax=0x906EA, ebx=0x100800, ecx=0x7FFAFBFF, edx=0xBFEBFBFF),
    CpuidEntry(4, 0, flags=1, eax=0x1C004121), CpuidEntry(4, 1, flags=1, eax=0x1C004143),
    CpuidEntry(0xB, 0, flags=1, eax=1, ebx=2, ecx=0x100, edx=3), CpuidEntry(0xB, 1, flags=1, eax=4, ebx=12, ecx=0x201),
    CpuidEntry(0x8000_0000, eax=0x8000_0008),
    CpuidEntry(0x8000_0008, eax=0x3027),
]

SUPPORTED = [
    CpuidEntry(0, eax=0x10, **AMD),
    CpuidEntry(1, eax=0x800F12, ebx=0x00000800, ecx=CPUID_1_ECX_CX16 | 1, edx=0),
    CpuidEntry(0xB, 0, flags=1), CpuidEntry(0xB, 1, flags=1), CpuidEntry(0xB, 2, flags=1),
    CpuidEntry(0x8000_0008, eax=0x3030),
    CpuidEntry(0x8000_001E),
]


def leaf(entries: list[CpuidEntry], fn: int, idx: int = 0) -> CpuidEntry:
    return next(e for e in entries if e.function == fn and e.index == idx)


def test_cpuid_leaf1_apic_id_and_hypervisor_bit() -> None:
    out = build_cpuid(SUPPORTED, 3, CpuTopology.flat(4))
    e = leaf(out, 1)
    assert e.ebx >> 24 == 3 and (e.ebx >> 16) & 0xFF == 4
    assert e.ecx & CPUID_1_ECX_HYPERVISOR
    assert e.ecx & CPUID_1_ECX_CX16  # kept off PVM


def test_cpuid_pvm_clears_cx16() -> None:
    assert not leaf(build_cpuid(SUPPORTED, 0, CpuTopology.flat(1), pvm=True), 1).ecx & CPUID_1_ECX_CX16


def test_cpuid_topology_leaf_b() -> None:
    out = build_cpuid(SUPPORTED, 5, CpuTopology(2, 4, 1, 1))
    smt, core, end = leaf(out, 0xB, 0), leaf(out, 0xB, 1), leaf(out, 0xB, 2)
    assert (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx) == (1, 2, 1, 5)
    assert (core.eax, core.ebx, core.ecx >> 8, core.edx) == (3, 8, 2, 5)
    assert (end.eax, end.ebx, end.ecx >> 8) == (0, 0, 0)


def linux_view(entries: list[CpuidEntry]) -> tuple[int, int, int, int, int, int]:
    """What Linux (arch/x86/kernel/cpu/topology.c, ``detect_extended_topology``) derives from a
    vCPU's CPUID: (package id, die id, core id, threads per core, cores per die, dies per
    package). 0x1F when leaf 0 reaches it and its first level is valid, else 0xB."""
    table = {(e.function, e.index): e for e in entries}
    fn = 0x1F if table[(0, 0)].eax >= 0x1F and (0x1F, 0) in table and table[(0x1F, 0)].ebx else 0xB
    first = table[(fn, 0)]
    assert (first.ecx >> 8) & 0xFF == 1 and first.ebx, "the first level must be SMT"
    apic = first.edx
    ht_width = core_width = die_width = pkg_width = first.eax & 0x1F
    smt = core_siblings = die_siblings = first.ebx & 0xFFFF
    index = 1
    while (level := table.get((fn, index))) is not None and (level.ecx >> 8) & 0xFF:
        assert level.ecx & 0xFF == index and level.edx == apic
        kind = (level.ecx >> 8) & 0xFF
        if kind == 2:
            core_siblings = die_siblings = level.ebx & 0xFFFF
            core_width = die_width = level.eax & 0x1F
        elif kind == 5:
            die_siblings = level.ebx & 0xFFFF
            die_width = level.eax & 0x1F
        pkg_width = level.eax & 0x1F
        index += 1
    assert (fn, index) in table, "the list of levels ends with an invalid one"
    core_id = (apic >> ht_width) & ((1 << (pkg_width - ht_width)) - 1)
    die_id = (apic >> core_width) & ((1 << (die_width - core_width)) - 1)
    return apic >> pkg_width, die_id, core_id, smt, core_siblings // smt, die_siblings // core_siblings


TOPOLOGIES = [(1, 1, 1, 1), (2, 2, 1, 1), (1, 4, 1, 2), (2, 2, 2, 2), (4, 2, 1, 1), (1, 8, 1, 1), (2, 1, 1, 4),
              (1, 2, 4, 1), (3, 1, 1, 2), (1, 3, 1, 2), (2, 3, 3, 1), (1, 5, 1, 1)]


@pytest.mark.parametrize("topology, ids", [
    (CpuTopology.flat(6), [0, 1, 2, 3, 4, 5]),
    (CpuTopology(2, 2, 1, 2), [0, 1, 2, 3, 4, 5, 6, 7]),
    (CpuTopology(3, 1, 1, 2), [0, 1, 2, 4, 5, 6]),
    (CpuTopology(1, 3, 1, 2), [0, 1, 2, 4, 5, 6]),
    (CpuTopology(1, 3, 2, 1), [0, 1, 2, 4, 5, 6]),
    (CpuTopology(2, 3, 1, 1), [0, 1, 2, 3, 4, 5]),
    (CpuTopology(3, 2, 1, 1), [0, 1, 2, 4, 5, 6]),
])
def test_apic_ids_pack_thread_core_die_and_package(topology: CpuTopology, ids: list[int]) -> None:
    count = topology.per_package * topology.packages
    assert [topology.apic_id(i) for i in range(count)] == ids


@pytest.mark.parametrize("host", [PVM_AMD_HOST, INTEL_HOST], ids=["pvm-amd", "intel"])
@pytest.mark.parametrize("threads, cores, dies, packages", TOPOLOGIES, ids=lambda t: str(t))
def test_every_vcpu_sees_the_configured_topology(host: list[CpuidEntry], threads: int, cores: int, dies: int,
                                                 packages: int) -> None:
    topology = CpuTopology(threads, cores, dies, packages)
    for index in range(threads * cores * dies * packages):
        apic_id = topology.apic_id(index)
        out = build_cpuid(host, apic_id, topology)
        core = index // threads % cores
        die, package = index // (threads * cores) % dies, index // (threads * cores * dies)
        core_bits = (cores - 1).bit_length()
        assert linux_view(out) == (package, die, core | die << core_bits, threads, cores, dies), index
        one = leaf(out, 1)
        assert one.ebx >> 24 == apic_id and (one.ebx >> 16) & 0xFF == threads * cores * dies
        assert bool(one.edx & CPUID_1_EDX_HTT) == (threads * cores * dies > 1)
        assert leaf(out, 0).eax >= 0x1F  # the guest reads 0x1F, which has the die level


@pytest.mark.parametrize("threads, cores, dies, packages", TOPOLOGIES, ids=lambda t: str(t))
def test_amd_topology_leaves(threads: int, cores: int, dies: int, packages: int) -> None:
    topology = CpuTopology(threads, cores, dies, packages)
    per_package = threads * cores * dies
    package_bits = sum((n - 1).bit_length() for n in (threads, cores, dies))
    die_bits = (dies - 1).bit_length()
    for index in range(per_package * packages):
        apic_id = topology.apic_id(index)
        out = build_cpuid(PVM_AMD_HOST, apic_id, topology)
        ext = leaf(out, 0x8000_0001)
        assert ext.ecx & CPUID_80000001_ECX_TOPOEXT
        assert bool(ext.ecx & CPUID_80000001_ECX_CMP_LEGACY) == (per_package > 1)
        assert ext.ecx & ~(CPUID_80000001_ECX_CMP_LEGACY) == 0x400393 & ~CPUID_80000001_ECX_CMP_LEGACY
        sizes = leaf(out, 0x8000_0008)
        assert (sizes.ecx & 0xFF, (sizes.ecx >> 12) & 0xF) == (per_package - 1, package_bits)
        assert sizes.eax == 0x3030
        topo = leaf(out, 0x8000_001E)
        assert topo.eax == apic_id
        assert (topo.ebx >> 8) & 0xFF == threads - 1
        core, die, package = index // threads % cores, index // (threads * cores) % dies, index // per_package
        assert topo.ebx & 0xFF == core | die << (cores - 1).bit_length()  # the core in its package
        assert topo.ecx & 0xFF == die | package << die_bits  # the node (die) in the system
        assert (topo.ecx >> 8) & 0x7 == dies - 1
    assert len([e for e in out if e.function == 0x8000_001E]) == 1


def test_intel_keeps_amd_leaves_alone_and_patches_leaf_4() -> None:
    out = build_cpuid(INTEL_HOST, 3, CpuTopology(2, 4, 1, 2))
    assert leaf(out, 0x8000_0008).ecx == 0
    assert all(e.function != 0x8000_001E for e in out)
    assert [leaf(out, 4, i).eax >> 26 for i in (0, 1)] == [3, 3]  # four cores per package
    assert [leaf(out, 4, i).eax & 0x3FFFFFF for i in (0, 1)] == [0x0004121, 0x0004143]
    assert leaf(out, 0).eax == 0x1F


def test_the_host_topology_leaves_never_leak() -> None:
    """Whatever KVM reports at 0xB (here the host's 2-thread cores), the guest gets the config's."""
    out = build_cpuid(INTEL_HOST, 0, CpuTopology.flat(4))
    assert [(e.index, e.eax, e.ebx) for e in out if e.function == 0xB] == [(0, 0, 1), (1, 2, 4), (2, 0, 0)]


def test_cpuid_phys_bits_capped() -> None:
    out = build_cpuid(SUPPORTED, 0, CpuTopology.flat(2), phys_bits=40)
    assert leaf(out, 0x8000_0008).eax & 0xFF == 40
    assert leaf(out, 0x8000_0008).ecx & 0xFF == 1  # AMD: two logical processors in the package


def test_cpuid_input_is_not_modified() -> None:
    build_cpuid(SUPPORTED, 7, CpuTopology.flat(8), pvm=True)
    assert leaf(SUPPORTED, 1).ebx == 0x800


def test_pvm_hides_the_pv_ipi_feature() -> None:
    from vmsh.engine.cpuid import KVM_CPUID_FEATURES, KVM_FEATURE_PV_SEND_IPI, CpuTopology, build_cpuid
    from vmsh.engine.kvm_types import CpuidEntry

    leaf = CpuidEntry(function=KVM_CPUID_FEATURES, eax=0xFFFF)
    on_pvm = build_cpuid([leaf], 0, CpuTopology.flat(2), pvm=True)[0]
    on_kvm = build_cpuid([leaf], 0, CpuTopology.flat(2), pvm=False)[0]
    assert not on_pvm.eax & (1 << KVM_FEATURE_PV_SEND_IPI)
    assert on_kvm.eax & (1 << KVM_FEATURE_PV_SEND_IPI)


def test_kvm_hyperv_replaces_kvm_leaves_with_hyper_v_ones() -> None:
    kvm_leaves = [CpuidEntry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B), CpuidEntry(0x4000_0001, eax=1 << 11)]
    out = build_cpuid(SUPPORTED + kvm_leaves, 0, CpuTopology.flat(1), pvm=True, hyperv=True)
    vendor = leaf(out, 0x4000_0000)
    assert vendor.eax == 0x4000_000A
    assert b"".join(r.to_bytes(4, "little") for r in (vendor.ebx, vendor.ecx, vendor.edx)) == b"Linux KVM Hv"
    assert leaf(out, 0x4000_0001).eax.to_bytes(4, "little") == b"Hv#1"
    assert [e.function for e in out if e.function >> 28 == 4] == list(range(0x4000_0000, 0x4000_000B))
    assert leaf(out, 0x4000_0003).eax & (1 << 2)  # the SynIC registers
    # without it, KVM's own leaves stay
    plain = build_cpuid(SUPPORTED + kvm_leaves, 0, CpuTopology.flat(1))
    assert leaf(plain, 0x4000_0000).ebx == 0x4B4D564B
