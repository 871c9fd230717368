"""Initial vCPU state for the boot paths: the boot GDT, segment registers, control registers.

Both Linux entry points vmsh uses start in flat 32-bit protected mode with paging off
(cloud-hypervisor's ``arch/src/x86_64/regs.rs``): the bzImage 32-bit entry (boot.rst "32-bit BOOT
PROTOCOL": CS/DS/ES/SS flat 4 GiB, ``%esi`` = boot_params) and the PVH entry (pvh.pandoc:
``%ebx`` = hvm_start_info, CR0.PE set, CR0.PG clear). On a PVM host that 32-bit code is
emulated instruction by instruction (see ``vmsh/engine/pvm.py``), which is acceptable because it
switches to long mode after a few hundred instructions; 32-bit *paging* is refused there, and
neither entry uses it.

``long_mode_sregs`` builds a 64-bit identity-mapped state, used by the engine tests' tiny
guests.
"""

from __future__ import annotations

import dataclasses
import logging
import struct

from vmsh.engine.boot import layout
from vmsh.engine.kvm_types import DTable, Fpu, Regs, Segment, Sregs
from vmsh.engine.memory import GuestMemoryMmap

LOG = logging.getLogger(__name__)

# CR0 bits (Intel SDM vol. 3A §2.5)
X86_CR0_PE = 0x1  # protection enable
X86_CR0_ET = 0x10  # extension type (hardwired 1)
X86_CR0_NE = 0x20  # native FPU error reporting
X86_CR0_PG = 0x8000_0000  # paging
# CR4 bits (SDM vol. 3A §2.5)
X86_CR4_PAE = 0x20  # physical address extension (required by long mode)
X86_CR4_OSFXSR = 0x200  # FXSAVE/SSE enabled by the OS
X86_CR4_OSXMMEXCPT = 0x400
# EFER bits (SDM vol. 3A §2.2.1)
EFER_SCE = 0x1  # SYSCALL enable
EFER_LME = 0x100  # long mode enable
EFER_LMA = 0x400  # long mode active
EFER_NX = 0x800
# Page-table entry bits (SDM vol. 3A §4.5, Table 4-15..4-20)
PTE_PRESENT = 0x1
PTE_RW = 0x2
PTE_USER = 0x4
PTE_PS = 0x80  # 2 MiB / 1 GiB page
#: RFLAGS bit 1 is reserved and always 1
RFLAGS_RESERVED = 0x2

# Selectors into the boot GDT (index << 3)
GDT_CODE_SELECTOR = 0x08
GDT_DATA_SELECTOR = 0x10
GDT_TSS_SELECTOR = 0x18


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor (SDM vol. 3A §3.4.5, Figure 3-8).

    ``flags`` is the 16-bit "access byte | (G,D/B,L,AVL) << 12" form.

    >>> hex(gdt_entry(0xC09B, 0, 0xFFFFFFFF))
    '0xcf9b000000ffff'
    """
    return (((base & 0xFF000000) << 32) | ((flags & 0x0000F0FF) << 40) | ((limit & 0x000F0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0x0000FFFF))


def segment_from_gdt(entry: int, index: int) -> Segment:
    """The ``kvm_segment`` (hidden cache included) for descriptor ``entry`` at GDT ``index``."""
    return Segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=_limit(entry),
        selector=index * 8,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=(entry >> 55) & 1,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


def _limit(entry: int) -> int:
    raw = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    if (entry >> 55) & 1:  # G: limit in 4 KiB units
        return (raw << 12) | 0xFFF
    return raw


#: flat 32-bit code (type 0xb, D=1, G=1), flat data (type 3), 32-bit busy TSS (type 0xb)
BOOT_GDT_32 = (0, gdt_entry(0xC09B, 0, 0xFFFFFFFF), gdt_entry(0xC093, 0, 0xFFFFFFFF),
               gdt_entry(0x008B, 0, 0x67))
#: 64-bit code (L=1, D=0), flat data, busy TSS
BOOT_GDT_64 = (0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF),
               gdt_entry(0x008B, 0, 0x67))


def write_gdt_idt(mem: GuestMemoryMmap, gdt: tuple[int, ...]) -> None:
    """Write ``gdt`` at BOOT_GDT_START and a zero IDT entry at BOOT_IDT_START."""
    mem.write(layout.BOOT_GDT_START, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write_u64(layout.BOOT_IDT_START, 0)


def _apply_gdt(sregs: Sregs, gdt: tuple[int, ...]) -> None:
    code = segment_from_gdt(gdt[1], 1)
    data = segment_from_gdt(gdt[2], 2)
    sregs.cs = code
    sregs.ds = data
    sregs.es = dataclasses.replace(data)
    sregs.fs = dataclasses.replace(data)
    sregs.gs = dataclasses.replace(data)
    sregs.ss = dataclasses.replace(data)
    sregs.tr = segment_from_gdt(gdt[3], 3)
    sregs.gdt = DTable(layout.BOOT_GDT_START, len(gdt) * 8 - 1)
    sregs.idt = DTable(layout.BOOT_IDT_START, 7)


def protected_mode_sregs(sregs: Sregs, mem: GuestMemoryMmap) -> Sregs:
    """Flat 32-bit protected mode, paging off (both Linux 32-bit entry paths).

    Writes the boot GDT/IDT into ``mem`` and returns ``sregs`` updated (EFER untouched, as
    KVM_GET_SREGS read it; cloud-hypervisor's ``arch/src/x86_64/regs.rs``).
    """
    write_gdt_idt(mem, BOOT_GDT_32)
    _apply_gdt(sregs, BOOT_GDT_32)
    sregs.cr0 = (sregs.cr0 & ~X86_CR0_PG) | X86_CR0_PE
    sregs.cr4 = 0
    return sregs


def identity_page_tables(mem: GuestMemoryMmap) -> int:
    """Identity-map the low 4 GiB with 2 MiB pages; returns the CR3 value.

    One PML4 entry -> four PDPT entries -> four page directories of 512 2 MiB pages each
    (SDM vol. 3A §4.5, 4-level paging), at PML4_START..PDE_START+16 KiB. 4 GiB so that test
    guests reach the MMIO hole below 4 GiB.
    """
    mem.write_u64(layout.PML4_START, layout.PDPTE_START | PTE_PRESENT | PTE_RW)
    for i in range(4):
        pd = layout.PDE_START + i * 0x1000
        mem.write_u64(layout.PDPTE_START + i * 8, pd | PTE_PRESENT | PTE_RW)
        entries = [((i << 30) + (j << 21)) | PTE_PRESENT | PTE_RW | PTE_PS for j in range(512)]
        mem.write(pd, struct.pack("<512Q", *entries))
    return layout.PML4_START


def long_mode_sregs(sregs: Sregs, mem: GuestMemoryMmap) -> Sregs:
    """64-bit mode at CPL0 with the low 4 GiB identity-mapped (page tables written to ``mem``)."""
    write_gdt_idt(mem, BOOT_GDT_64)
    _apply_gdt(sregs, BOOT_GDT_64)
    sregs.cr3 = identity_page_tables(mem)
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
    sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE
    return sregs


def pvh_regs(entry: int) -> Regs:
    """General registers at the PVH entry: rip = entry, rbx = hvm_start_info (pvh.pandoc)."""
    return Regs(rip=entry, rbx=layout.PVH_INFO_START, rflags=RFLAGS_RESERVED)


def bzimage_regs(entry: int) -> Regs:
    """General registers at the bzImage 32-bit entry: rsi = boot_params, a boot stack (boot.rst)."""
    return Regs(rip=entry, rsp=layout.BOOT_STACK_POINTER, rbp=layout.BOOT_STACK_POINTER,
                rsi=layout.ZERO_PAGE_START, rflags=RFLAGS_RESERVED)


def boot_fpu() -> Fpu:
    """FPU at reset as Linux expects it: FCW 0x37f (all exceptions masked), MXCSR 0x1f80."""
    return Fpu(fcw=0x37F, mxcsr=0x1F80)
