"""Put a loaded kernel and a fresh vCPU into the state Linux expects at its 32-bit entry.

``configure_vcpu`` applies the per-vCPU setup of cloud-hypervisor's ``arch/src/x86_64/`` (CPUID,
boot MSRs, FPU, LAPIC LINT pins, registers and segments); ``write_boot_tables`` writes the
command line and either the zero page (bzImage) or hvm_start_info (PVH).
"""

from __future__ import annotations

import logging
import struct

from vmsh.engine.boot import layout, regs
from vmsh.engine.boot.bootparams import e820_map, write_boot_params, write_pvh_start_info
from vmsh.engine.boot.loader import KernelImage, load_cmdline
from vmsh.engine.cpuid import CpuTopology, build_cpuid
from vmsh.engine.kvm_types import CpuidEntry
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.engine.memory import GuestMemoryMmap

LOG = logging.getLogger(__name__)

# MSR indices (SDM vol. 4, Table 2-2)
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
#: IA32_MISC_ENABLE bit 0: fast strings
MISC_ENABLE_FAST_STRING = 1 << 0
#: MTRRdefType: E (bit 11) | default type write-back (6)
MTRR_DEF_TYPE_ENABLE_WB = (1 << 11) | 6

#: the boot MSR values (cloud-hypervisor's ``arch/src/x86_64/regs.rs`` ``boot_msr_entries``)
BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_ENABLE_WB,
}

# Local APIC register offsets and LVT delivery modes (SDM vol. 3A §11.5.1)
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(lapic: bytearray, offset: int, mode: int) -> None:
    value = struct.unpack_from("<I", lapic, offset)[0]
    value = (value & ~0x700) | (mode << 8)
    struct.pack_into("<I", lapic, offset, value)


def configure_vcpu(fd: VcpuFd, mem: GuestMemoryMmap, kernel: KernelImage, supported_cpuid: list[CpuidEntry],
                   topology: CpuTopology, *, pvm: bool, irqchip: bool = True,
                   phys_bits: int | None = None, hyperv: bool = False) -> None:
    """CPUID, MSRs, FPU, LAPIC, registers and segments for ``fd`` at the kernel's entry."""
    fd.set_cpuid2(build_cpuid(supported_cpuid, fd.vcpu_id, topology, pvm=pvm, phys_bits=phys_bits, hyperv=hyperv))
    done = fd.set_msrs(BOOT_MSRS)
    if done != len(BOOT_MSRS):
        LOG.warning("vcpu%d: KVM took %d of %d boot MSRs", fd.vcpu_id, done, len(BOOT_MSRS))
    fd.set_fpu(regs.boot_fpu())
    if irqchip:
        lapic = bytearray(fd.get_lapic())
        _set_delivery_mode(lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT)
        _set_delivery_mode(lapic, APIC_LVT_LINT1, APIC_MODE_NMI)
        fd.set_lapic(bytes(lapic))
    fd.set_sregs(regs.protected_mode_sregs(fd.get_sregs(), mem))
    if kernel.kind == "pvh":
        fd.set_regs(regs.pvh_regs(kernel.entry))
    else:
        fd.set_regs(regs.bzimage_regs(kernel.entry))


def write_boot_tables(mem: GuestMemoryMmap, kernel: KernelImage, cmdline: str,
                      initrd: tuple[int, int] | None, rsdp: int = 0) -> None:
    """Command line plus the zero page (bzImage) or hvm_start_info (PVH)."""
    n = load_cmdline(mem, cmdline, kernel.cmdline_max)
    mem.write_u16(layout.EBDA_POINTER, layout.EBDA_START >> 4)
    e820 = e820_map(mem)
    if kernel.kind == "pvh":
        write_pvh_start_info(mem, initrd, e820, rsdp)
    else:
        write_boot_params(mem, kernel, n, initrd, e820, rsdp)
