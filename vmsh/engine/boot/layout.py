"""x86_64 guest physical memory map used by vmsh (cloud-hypervisor's ``arch/src/x86_64/layout.rs``).

Everything the boot path writes below 1 MiB has a fixed address here; the kernel goes at
1 MiB and up, the initramfs at the top of the RAM below 3 GiB.
"""

from __future__ import annotations

#: low RAM reported to the guest: [0, 640 KiB)
LOW_RAM_END = 0xA0000
#: BDA word holding the EBDA segment (ACPICA looks for the RSDP through it)
EBDA_POINTER = 0x40E
#: 4-entry boot GDT (null, code, data, TSS)
BOOT_GDT_START = 0x500
#: one zero IDT entry (limit 7): any exception before the kernel sets its IDT triple-faults
BOOT_IDT_START = 0x520
#: PVH ``hvm_start_info``; %rbx/%ebx points here at the PVH entry
PVH_INFO_START = 0x6000
#: PVH ``hvm_modlist_entry[]`` (the initramfs)
MODLIST_START = 0x6040
#: PVH ``hvm_memmap_table_entry[]``
MEMMAP_START = 0x7000
#: Linux ``boot_params`` (zero page), bzImage path only (shares the address with MEMMAP)
ZERO_PAGE_START = 0x7000
#: initial stack of the bzImage 32-bit entry
BOOT_STACK_START = 0x8000
BOOT_STACK_POINTER = 0x8FF0
#: identity-mapping page tables for guests that start in long mode (tests; 64-bit entry):
#: PML4, PDPT, then four page directories 0xb000-0xefff
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
#: kernel command line, NUL-terminated
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
#: ACPI RSDP and the tables after it (EBDA)
EBDA_START = 0xA0000
RSDP_POINTER = EBDA_START
#: SMBIOS entry point and tables
SMBIOS_START = 0xF0000
#: kernel load floor: ELF e_entry and bzImage code32_start must be at or above it
HIGH_RAM_START = 0x100000
#: the 32-bit hole: RAM below it is [0, 3 GiB)
MEM_32BIT_RESERVED_START = 0xC000_0000
MEM_32BIT_RESERVED_SIZE = 896 << 20
MEM_32BIT_DEVICES_START = 0xC000_0000
MEM_32BIT_DEVICES_SIZE = 640 << 20
#: PCI ECAM, 1 MiB per segment, 256 MiB reserved
PCI_MMCONFIG_START = 0xE800_0000
PCI_MMCONFIG_SIZE = 256 << 20
#: KVM_SET_TSS_ADDR (3 pages) and KVM_SET_IDENTITY_MAP_ADDR (1 page)
KVM_TSS_START = 0xF800_0000
KVM_TSS_SIZE = 0x3000
KVM_IDENTITY_MAP_START = 0xF800_3000
IOAPIC_START = 0xFEC0_0000
APIC_START = 0xFEE0_0000
#: RAM above the hole continues here
RAM_64BIT_START = 0x1_0000_0000

#: e820 / PVH memmap entry types (ACPI 6.4 §15, "Address Range Types")
E820_RAM = 1
E820_RESERVED = 2
