"""CPUID patching: APIC ids, topology leaves, hypervisor bit, CX16 on PVM."""

from __future__ import annotations

from vmsh.engine.cpuid import CPUID_1_ECX_CX16, CPUID_1_ECX_HYPERVISOR, CpuTopology, build_cpuid
from vmsh.engine.kvm_types import CpuidEntry

SUPPORTED = [
    CpuidEntry(0, eax=0x10),
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


def test_cpuid_phys_bits_capped() -> None:
    out = build_cpuid(SUPPORTED, 0, CpuTopology.flat(2), phys_bits=40)
    assert leaf(out, 0x8000_0008).eax & 0xFF == 40
    assert leaf(out, 0x8000_0008).ecx & 0xFF == 1


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
