"""The CPUID a vCPU sees: KVM's supported set, patched for vmsh's topology and host.

Starting point is ``KVM_GET_SUPPORTED_CPUID``; then, as cloud-hypervisor's
``arch/src/x86_64/mod.rs`` does: the hypervisor bit, TSC-deadline, the APIC id of each vCPU in
leaf 1 EBX, and the physical address width in 0x8000_0008. The topology (``--cpus
topology=threads:cores:dies:packages``, or one package of single-threaded cores) is written into
every leaf that describes it, whether or not KVM returned the leaf: leaf 1's logical count and HTT,
leaves 0xB and 0x1F (x2APIC topology; leaf 0's maximum is raised to 0x1F), leaf 4's core count and,
on AMD, 0x8000_0001's CmpLegacy and TopoExt, 0x8000_0008 ECX and 0x8000_001E. A PVM host returns
0xB at level 0 only (all zeros) and no 0x1F: a guest there saw one core per package whatever the
configuration. On a PVM host CX16 is cleared: CMPXCHG16B is not emulated there and clearing CX16 is
the one CPUID mask PVM keeps (tests/engine/test_boot.py).

Bit positions: Intel SDM vol. 2A, CPUID, Tables 3-10/3-11 (leaf 1), leaves 04H, 0BH and 1FH;
AMD APM vol. 3 Appendix E (0x8000_0001, 0x8000_0008, 0x8000_001E).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from vmsh.engine.kvm_types import CpuidEntry

LOG = logging.getLogger(__name__)

# Leaf 1 ECX
CPUID_1_ECX_CX16 = 1 << 13  # CMPXCHG16B
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31  # "running under a hypervisor"
# Leaf 1 EDX
CPUID_1_EDX_HTT = 1 << 28  # EBX[23:16] is valid
# Leaf 0xb / 0x1f ECX[15:8] level types
LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2
LEVEL_TYPE_DIE = 5  # 0x1f only
#: ``struct kvm_cpuid_entry2`` flags: the leaf has subleaves (``index`` matters); KVM's spelling
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
# Leaf 0x8000_0001 ECX (AMD)
CPUID_80000001_ECX_CMP_LEGACY = 1 << 1
CPUID_80000001_ECX_TOPOEXT = 1 << 22
#: leaf 0 vendors whose CPUs have AMD's topology leaves
AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


@dataclass(frozen=True, slots=True)
class CpuTopology:
    """threads per core, cores per die, dies per package, packages."""

    threads_per_core: int = 1
    cores_per_die: int = 1
    dies_per_package: int = 1
    packages: int = 1

    @classmethod
    def flat(cls, vcpus: int) -> CpuTopology:
        """One package, one die, ``vcpus`` single-threaded cores."""
        return cls(1, max(vcpus, 1), 1, 1)

    @property
    def per_package(self) -> int:
        """Logical processors per package."""
        return self.threads_per_core * self.cores_per_die * self.dies_per_package

    @property
    def cores_per_package(self) -> int:
        """Cores per package."""
        return self.cores_per_die * self.dies_per_package

    @property
    def shifts(self) -> tuple[int, int, int]:
        """How far an x2APIC id shifts right to give its core, die and package id."""
        smt = _width(self.threads_per_core)
        die = smt + _width(self.cores_per_die)
        return smt, die, die + _width(self.dies_per_package)

    def apic_id(self, index: int) -> int:
        """The x2APIC id of vCPU ``index``: its thread, core, die and package numbers packed in
        fields as wide as their counts need, as a guest decodes it with :meth:`shifts` (the
        layout of cloud-hypervisor's ``get_x2apic_id``). It is the index itself when every count
        but the packages' is a power of two (and for :meth:`flat`); otherwise ids are sparse
        (``topology=3:1:1:2``: 0, 1, 2, 4, 5, 6)."""
        t = self
        smt, die, package = self.shifts
        thread, core = index % t.threads_per_core, index // t.threads_per_core % t.cores_per_die
        die_index = index // (t.threads_per_core * t.cores_per_die) % t.dies_per_package
        return thread | core << smt | die_index << die | (index // t.per_package) << package


#: KVM's paravirtual feature leaf and the PV IPI bit in its EAX (Documentation/virt/kvm/x86/cpuid.rst)
KVM_CPUID_FEATURES = 0x4000_0001
KVM_FEATURE_PV_SEND_IPI = 11

# Hyper-V's CPUID interface (Microsoft Hypervisor Top Level Functional Specification 6.0,
# §2.4 "Hypervisor CPUID Leaves"), which ``--cpus kvm_hyperv=on`` puts where KVM's own
# leaves were, as cloud-hypervisor does. KVM emulates what the leaves announce.
HV_CPUID_VENDOR = 0x4000_0000  # EAX: highest leaf; EBX-EDX: vendor "Linux KVM Hv"
HV_CPUID_INTERFACE = 0x4000_0001  # EAX: "Hv#1", the interface signature Hyper-V guests check
HV_CPUID_VERSION = 0x4000_0002  # build number, major/minor version
HV_CPUID_FEATURES = 0x4000_0003  # the partition privileges guests may use
HV_CPUID_ENLIGHTENMENTS = 0x4000_0004  # recommendations
HV_CPUID_LAST = 0x4000_000A  # leaves up to here are defined ("Hv#1" compliance)
HV_SIGNATURE_HV1 = 0x3123_7648  # "Hv#1"
HV_VENDOR = (0x756E_694C, 0x564B_2078, 0x7648_204D)  # "Linu", "x KV", "M Hv"
HV_VERSION = (0x3839, 0xA_0000)  # build 14393, version 10.0
# 0x4000_0003 EAX privileges: partition reference counter, SynIC, synthetic timers, reference TSC
HV_ACCESS_PARTITION_REFERENCE_COUNTER = 1 << 1
HV_ACCESS_SYNIC_REGS = 1 << 2
HV_ACCESS_SYNTHETIC_TIMER_REGS = 1 << 3
HV_ACCESS_PARTITION_REFERENCE_TSC = 1 << 9
HV_CPU_DYNAMIC_PARTITIONING = 1 << 3  # EDX
HV_RECOMMEND_RELAXED_TIMING = 1 << 5  # 0x4000_0004 EAX


def hyperv_leaves() -> list[CpuidEntry]:
    """The Hyper-V leaves 0x4000_0000-0x4000_000A that ``kvm_hyperv=on`` gives the guest."""
    leaves = {
        HV_CPUID_VENDOR: CpuidEntry(HV_CPUID_VENDOR, eax=HV_CPUID_LAST, ebx=HV_VENDOR[0], ecx=HV_VENDOR[1],
                                    edx=HV_VENDOR[2]),
        HV_CPUID_INTERFACE: CpuidEntry(HV_CPUID_INTERFACE, eax=HV_SIGNATURE_HV1),
        HV_CPUID_VERSION: CpuidEntry(HV_CPUID_VERSION, eax=HV_VERSION[0], ebx=HV_VERSION[1]),
        HV_CPUID_FEATURES: CpuidEntry(
            HV_CPUID_FEATURES,
            eax=(HV_ACCESS_PARTITION_REFERENCE_COUNTER | HV_ACCESS_SYNIC_REGS | HV_ACCESS_SYNTHETIC_TIMER_REGS
                 | HV_ACCESS_PARTITION_REFERENCE_TSC),
            edx=HV_CPU_DYNAMIC_PARTITIONING),
        HV_CPUID_ENLIGHTENMENTS: CpuidEntry(HV_CPUID_ENLIGHTENMENTS, eax=HV_RECOMMEND_RELAXED_TIMING),
    }
    return [leaves.get(f, CpuidEntry(f)) for f in range(HV_CPUID_VENDOR, HV_CPUID_LAST + 1)]


def _width(count: int) -> int:
    """Bits of the x2APIC id that number ``count`` items (0 for one)."""
    return max(count - 1, 0).bit_length()


def vendor(supported: list[CpuidEntry]) -> bytes:
    """The vendor string of leaf 0 (EBX, EDX, ECX), e.g. ``b"AuthenticAMD"``."""
    leaf0 = next((e for e in supported if e.function == 0), None)
    if leaf0 is None:
        return b""
    return b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))


def is_amd(supported: list[CpuidEntry]) -> bool:
    """AMD's topology leaves apply (AMD, and Hygon, which implements them)."""
    return vendor(supported) in AMD_VENDORS


def topology_leaves(topology: CpuTopology, apic_id: int) -> list[CpuidEntry]:
    """Leaves 0xB and 0x1F (V2 extended topology) for the vCPU with x2APIC id ``apic_id``.

    Each subleaf describes one level: EAX[4:0] the shift of the x2APIC id to the next level's
    id, EBX[15:0] the logical processors at this level, ECX[15:8] the level type and ECX[7:0]
    the subleaf, EDX the x2APIC id; a subleaf of type 0 ends the list (Intel SDM vol. 2A,
    CPUID leaves 0BH and 1FH). 0xB knows threads and cores only, so its core level spans the
    whole package; 0x1F adds the die level.
    """
    t = topology
    smt_shift, die_shift, package_shift = t.shifts
    per_core = t.threads_per_core
    per_die = per_core * t.cores_per_die
    flag = KVM_CPUID_FLAG_SIGNIFCANT_INDEX

    def level(fn: int, index: int, shift: int, count: int, kind: int) -> CpuidEntry:
        return CpuidEntry(fn, index, flags=flag, eax=shift, ebx=count, ecx=(kind << 8) | index, edx=apic_id)

    return [
        level(0xB, 0, smt_shift, per_core, LEVEL_TYPE_SMT),
        level(0xB, 1, package_shift, t.per_package, LEVEL_TYPE_CORE),
        level(0xB, 2, 0, 0, LEVEL_TYPE_INVALID),
        level(0x1F, 0, smt_shift, per_core, LEVEL_TYPE_SMT),
        level(0x1F, 1, die_shift, per_die, LEVEL_TYPE_CORE),
        level(0x1F, 2, package_shift, t.per_package, LEVEL_TYPE_DIE),
        level(0x1F, 3, 0, 0, LEVEL_TYPE_INVALID),
    ]


def _amd_topology(e: CpuidEntry, topology: CpuTopology, apic_id: int) -> None:
    """AMD's view of the same topology (AMD APM vol. 3, Appendix E.4.7, E.4.15)."""
    t = topology
    smt_shift, die_shift, package_shift = t.shifts
    if e.function == 0x8000_0001:
        # TopoExt: 0x8000_001E (and 0x8000_001D) are valid; CmpLegacy: the package's
        # logical processors (leaf 1 EBX[23:16]) are cores, not hyper-threads of one core
        e.ecx |= CPUID_80000001_ECX_TOPOEXT
        if t.per_package > 1:
            e.ecx |= CPUID_80000001_ECX_CMP_LEGACY
        else:
            e.ecx &= ~CPUID_80000001_ECX_CMP_LEGACY
    elif e.function == 0x8000_0008:
        # ECX[15:12] ApicIdSize: the x2APIC id bits below the package; ECX[7:0] NC: logical
        # processors per package - 1
        e.ecx = (e.ecx & ~0xF0FF) | (package_shift << 12) | (min(t.per_package, 256) - 1)
    elif e.function == 0x8000_001E:
        e.eax = apic_id  # extended APIC id
        # EBX[15:8] threads per compute unit - 1, EBX[7:0] compute unit (core) id in the package
        core = (apic_id >> smt_shift) & ((1 << (package_shift - smt_shift)) - 1)
        e.ebx = (e.ebx & ~0xFFFF) | ((t.threads_per_core - 1) << 8) | (core & 0xFF)
        # ECX[10:8] nodes per processor - 1, ECX[7:0] node id (a die is a node)
        e.ecx = (e.ecx & ~0x7FF) | ((min(t.dies_per_package, 8) - 1) << 8) | ((apic_id >> die_shift) & 0xFF)
        e.edx = 0


def build_cpuid(supported: list[CpuidEntry], vcpu_id: int, topology: CpuTopology, *,
                pvm: bool = False, phys_bits: int | None = None, hyperv: bool = False) -> list[CpuidEntry]:
    """The CPUID table for the vCPU whose KVM id and x2APIC id is ``vcpu_id``
    (``topology.apic_id(index)``).

    The topology leaves are written from ``topology`` whether or not KVM offers them (a PVM
    host returns leaf 0xB at level 0 only, all zeros, and no 0x1F), as cloud-hypervisor's
    ``update_cpuid_topology`` (``arch/src/x86_64/mod.rs``) does for ``--cpus topology``.

    :param supported: from ``Kvm.supported_cpuid()``.
    :param pvm: clear what a PVM host cannot emulate (CX16).
    :param phys_bits: cap the guest physical address width (0x8000_0008 EAX[7:0]).
    :param hyperv: Hyper-V's leaves instead of KVM's at 0x4000_0000 (``kvm_hyperv=on``).
    """
    if hyperv:
        supported = [e for e in supported if not HV_CPUID_VENDOR <= e.function <= HV_CPUID_LAST] + hyperv_leaves()
    amd = is_amd(supported)
    max_ext = next((e.eax for e in supported if e.function == 0x8000_0000), 0)
    topo_ext = amd and max_ext >= 0x8000_001E
    out: list[CpuidEntry] = []
    for e in supported:
        if e.function in (0xB, 0x1F) or (topo_ext and e.function == 0x8000_001E):
            continue  # written from the topology below
        e = replace(e)
        if e.function == 0:
            e.eax = max(e.eax, 0x1F)  # so that the guest reads leaf 0x1F (the die level)
        elif e.function == 1:
            e.ecx |= CPUID_1_ECX_HYPERVISOR | CPUID_1_ECX_TSC_DEADLINE
            if pvm:
                e.ecx &= ~CPUID_1_ECX_CX16
            # EBX[31:24] initial APIC id, EBX[23:16] max logical processors per package
            e.ebx = (e.ebx & 0x0000FFFF) | ((vcpu_id & 0xFF) << 24) | (min(topology.per_package, 255) << 16)
            if topology.per_package > 1:
                e.edx |= CPUID_1_EDX_HTT
            else:
                e.edx &= ~CPUID_1_EDX_HTT
        elif e.function == 4 and e.eax & 0x1F:
            # EAX[31:26]: addressable core ids per package - 1 (Intel deterministic cache leaf)
            e.eax = (e.eax & 0x03FFFFFF) | ((min(topology.cores_per_package, 64) - 1) << 26)
        elif e.function == KVM_CPUID_FEATURES and pvm and not hyperv:
            # A PVM host does not complete the PV IPI hypercall: a guest that uses it spins
            # forever bringing up its second vCPU. Plain APIC IPIs work.
            e.eax &= ~(1 << KVM_FEATURE_PV_SEND_IPI)
        elif e.function == 0x8000_0008 and phys_bits is not None:
            e.eax = (e.eax & ~0xFF) | min(phys_bits, e.eax & 0xFF)
        if amd and (e.function != 0x8000_0001 or topo_ext):
            _amd_topology(e, topology, vcpu_id)
        out.append(e)
    out += topology_leaves(topology, vcpu_id)
    if topo_ext:
        amd_leaf = CpuidEntry(0x8000_001E)
        _amd_topology(amd_leaf, topology, vcpu_id)
        out.append(amd_leaf)
    return out
