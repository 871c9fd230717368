"""KVM-side state of a VM and of each vCPU as plain data, for snapshots.

``save_vcpu`` / ``restore_vcpu`` cover everything KVM keeps for a vCPU: general and segment
registers, the XSAVE image (x87/SSE/AVX, MXCSR), XCRs, debug registers, MSRs, the local APIC
page, pending events, the MP state and the CPUID table. ``save_vm`` / ``restore_vm`` cover
the in-kernel irqchip (both PICs and the IOAPIC), the PIT and kvmclock. Guest RAM and device
models are saved elsewhere.

Restore order follows what KVM needs (Firecracker ``vstate/vcpu``, QEMU
``kvm_arch_put_registers``): CPUID first (it shapes which MSRs and XSAVE features are
valid), then the MP state, registers, segments, XSAVE, XCRs, debug registers, the LAPIC, MSRs,
and the events last (they may refer to the LAPIC state). Every state object is frozen data of
ints, bytes and tuples; the snapshot decoder checks every int against its C width (the
``vmsh.state_types`` annotations) and the setters check the sizes of the raw structs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmsh._native import lib
from vmsh.engine.kvm import Kvm, VmFd
from vmsh.engine.kvm_ioctl import KvmIoctlError
from vmsh.engine.kvm_types import CpuidEntry, Regs, Sregs, VcpuEvents
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.state_types import U32, U64

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VcpuState:
    """One vCPU, as KVM holds it; every integer has the width of its ``<linux/kvm.h>`` field."""

    vcpu_id: U32
    cpuid: tuple[CpuidEntry, ...]
    #: ``struct kvm_mp_state``
    mp_state: U32
    regs: Regs
    sregs: Sregs
    xsave: bytes
    #: ``struct kvm_xcr`` (xcr, value) pairs
    xcrs: tuple[tuple[U32, U64], ...]
    debugregs: bytes
    lapic: bytes
    #: ``struct kvm_msr_entry`` (index, data) pairs
    msrs: tuple[tuple[U32, U64], ...]
    events: VcpuEvents
    #: KVM_SET_TSC_KHZ's argument, a u32 in the kernel
    tsc_khz: U32


@dataclass(frozen=True, slots=True)
class VmKvmState:
    """The VM-wide in-kernel devices."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    #: ``struct kvm_clock_data`` clock, in ns
    clock: U64


def saveable_msrs(kvm: Kvm, fd: VcpuFd) -> list[int]:
    """The MSR indices KVM lists *and* lets this vCPU read (KVM_GET_MSRS stops at the first
    one it rejects, so the list is probed once)."""
    candidates = kvm.msr_index_list()
    good: list[int] = []
    while candidates:
        got = fd.get_msrs(candidates)
        n = len(got)
        good.extend(candidates[:n])
        candidates = candidates[n + 1:]  # skip the one that failed
    return good


def save_vcpu(fd: VcpuFd, msr_indices: list[int]) -> VcpuState:
    """Read a (stopped) vCPU's whole KVM state."""
    return VcpuState(
        vcpu_id=fd.vcpu_id,
        cpuid=tuple(fd.get_cpuid2()),
        mp_state=fd.get_mp_state(),
        regs=fd.get_regs(),
        sregs=fd.get_sregs(),
        xsave=fd.get_xsave(),
        xcrs=tuple(sorted(fd.get_xcrs().items())),
        debugregs=fd.get_debugregs(),
        lapic=fd.get_lapic(),
        msrs=tuple(sorted(fd.get_msrs(msr_indices).items())),
        events=fd.get_vcpu_events(),
        tsc_khz=fd.get_tsc_khz(),
    )


def restore_vcpu(fd: VcpuFd, state: VcpuState) -> None:
    """Load ``state`` into a fresh vCPU (created on a VM that already has its irqchip)."""
    fd.set_cpuid2(list(state.cpuid))
    try:
        fd.set_tsc_khz(state.tsc_khz)
    except KvmIoctlError as err:
        LOG.info("vcpu%d: TSC frequency %d kHz not restored: %s", fd.vcpu_id, state.tsc_khz, err)
    fd.set_mp_state(state.mp_state)
    fd.set_regs(state.regs)
    fd.set_sregs(state.sregs)
    fd.set_xsave(state.xsave)
    fd.set_xcrs(dict(state.xcrs))
    fd.set_debugregs(state.debugregs)
    fd.set_lapic(state.lapic)
    done = fd.set_msrs(dict(state.msrs))
    if done != len(state.msrs):
        LOG.warning("vcpu%d: KVM took %d of %d MSRs on restore", fd.vcpu_id, done, len(state.msrs))
    fd.set_vcpu_events(state.events)


def save_vm(vm: VmFd) -> VmKvmState:
    """Read the in-kernel irqchip, PIT and clock (vCPUs stopped)."""
    return VmKvmState(
        pic_master=vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER),
        pic_slave=vm.get_irqchip(lib.KVM_IRQCHIP_PIC_SLAVE),
        ioapic=vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC),
        pit=vm.get_pit2(),
        clock=vm.get_clock()[0],
    )


def restore_vm(vm: VmFd, state: VmKvmState) -> None:
    """Load ``state`` into a VM created with KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2."""
    vm.set_irqchip(state.pic_master)
    vm.set_irqchip(state.pic_slave)
    vm.set_irqchip(state.ioapic)
    vm.set_pit2(state.pit)
    vm.set_clock(state.clock)
