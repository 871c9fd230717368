"""The CPUID a vCPU sees: KVM's supported set, patched for vmsh's topology and host.

Starting point is ``KVM_GET_SUPPORTED_CPUID``; then, as cloud-hypervisor's
``arch/src/x86_64/mod.rs`` does: the hypervisor bit, TSC-deadline, the APIC id of each vCPU in
leaf 1 EBX, leaves 0xb/0x1f (x2APIC topology) and AMD's 0x8000_001e, the logical-processor
counts, and the physical address width in 0x8000_0008. On a PVM host CX16 is cleared: CMPXCHG16B is not emulated there
and clearing CX16 is the one CPUID mask PVM keeps (tests/engine/test_boot.py).

Bit positions: Intel SDM vol. 2A, CPUID, Tables 3-10/3-11 (leaf 1), leaf 0BH; AMD APM vol. 3
Appendix E (0x8000_0008, 0x8000_001E).
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


def _shift_for(count: int) -> int:
    """Bits needed to number ``count`` items (the x2APIC id field width)."""
    return max(count - 1, 0).bit_length()


def build_cpuid(supported: list[CpuidEntry], vcpu_id: int, topology: CpuTopology, *,
                pvm: bool = False, phys_bits: int | None = None, hyperv: bool = False) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_id`` (its APIC id is its index).

    :param supported: from ``Kvm.supported_cpuid()``.
    :param pvm: clear what a PVM host cannot emulate (CX16).
    :param phys_bits: cap the guest physical address width (0x8000_0008 EAX[7:0]).
    :param hyperv: Hyper-V's leaves instead of KVM's at 0x4000_0000 (``kvm_hyperv=on``).
    """
    if hyperv:
        supported = [e for e in supported if not HV_CPUID_VENDOR <= e.function <= HV_CPUID_LAST] + hyperv_leaves()
    smt_shift = _shift_for(topology.threads_per_core)
    core_shift = smt_shift + _shift_for(topology.cores_per_die * topology.dies_per_package)
    out: list[CpuidEntry] = []
    for e in supported:
        e = replace(e)
        if e.function == 1:
            e.ecx |= CPUID_1_ECX_HYPERVISOR | CPUID_1_ECX_TSC_DEADLINE
            if pvm:
                e.ecx &= ~CPUID_1_ECX_CX16
            # EBX[31:24] initial APIC id, EBX[23:16] max logical processors per package
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(topology.per_package, 255) << 16)
            if topology.per_package > 1:
                e.edx |= CPUID_1_EDX_HTT
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id  # x2APIC id
            if e.index == 0:
                e.eax, e.ebx, e.ecx = smt_shift, topology.threads_per_core, (LEVEL_TYPE_SMT << 8)
            elif e.index == 1:
                e.eax, e.ebx, e.ecx = core_shift, topology.per_package, (LEVEL_TYPE_CORE << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif e.function == 4 and e.eax & 0x1F:
            # EAX[31:26]: addressable core ids per package - 1 (Intel deterministic cache leaf)
            e.eax = (e.eax & 0x03FFFFFF) | ((min(topology.cores_per_die * topology.dies_per_package, 64) - 1) << 26)
        elif e.function == KVM_CPUID_FEATURES and pvm and not hyperv:
            # A PVM host does not complete the PV IPI hypercall: a guest that uses it spins
            # forever bringing up its second vCPU. Plain APIC IPIs work.
            e.eax &= ~(1 << KVM_FEATURE_PV_SEND_IPI)
        elif e.function == 0x8000_0008:
            if phys_bits is not None:
                e.eax = (e.eax & ~0xFF) | min(phys_bits, e.eax & 0xFF)
            # ECX[7:0]: number of physical threads - 1 (AMD)
            e.ecx = (e.ecx & ~0xFF) | (min(topology.per_package, 256) - 1)
        elif e.function == 0x8000_001E:
            e.eax = vcpu_id  # extended APIC id
            e.ebx = (e.ebx & ~0xFF00) | ((topology.threads_per_core - 1) << 8) | (vcpu_id >> smt_shift & 0xFF)
            e.ecx = (e.ecx & ~0xFF) | (vcpu_id >> core_shift & 0xFF)  # node id
        out.append(e)
    return out
