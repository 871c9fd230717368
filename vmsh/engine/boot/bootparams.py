"""The tables a Linux kernel reads at entry: the e820 map, boot_params, and PVH's hvm_start_info.

- bzImage: ``struct boot_params`` (the zero page) at ZERO_PAGE_START with the image's setup
  header, the command line pointer, the initramfs and the e820 table (Linux
  arch/x86/include/uapi/asm/bootparam.h; Documentation/arch/x86/zero-page.rst).
- PVH: ``struct hvm_start_info`` (version 1) at PVH_INFO_START, a module list with the
  initramfs, and an ``hvm_memmap_table_entry`` array (Xen
  include/public/arch-x86/hvm/start_info.h).

Both describe the same RAM map (cloud-hypervisor's ``arch/src/x86_64/mod.rs``).
"""

from __future__ import annotations

import logging
import struct

from vmsh.engine.boot import layout
from vmsh.engine.boot.loader import TYPE_OF_LOADER_OFFSET, KernelImage, LoaderError
from vmsh.engine.memory import GuestMemoryMmap

LOG = logging.getLogger(__name__)

# boot_params offsets (zero-page.rst)
BP_ACPI_RSDP_ADDR = 0x070  # u64
BP_EXT_RAMDISK_IMAGE = 0x0C0  # u32: high half of ramdisk_image
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8  # u8
BP_E820_TABLE = 0x2D0  # 128 x {u64 addr, u64 size, u32 type}
BP_E820_MAX = 128
# setup header fields inside boot_params (boot.rst)
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
#: type_of_loader 0xff: "undefined" boot loader (boot.rst)
LOADER_TYPE_UNDEFINED = 0xFF

#: hvm_start_info magic (start_info.h XEN_HVM_START_MAGIC_VALUE)
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
_START_INFO = struct.Struct("<IIIIQQQQII")  # 56 bytes, version 1
_MODLIST = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
_MEMMAP = struct.Struct("<QQII")  # addr, size, type, reserved
_E820 = struct.Struct("<QQI")


def e820_map(mem: GuestMemoryMmap, reserve_ecam: bool = True) -> list[tuple[int, int, int]]:
    """The guest's memory map as ``(addr, size, type)``: low RAM, RAM from 1 MiB, RAM above 4 GiB."""
    entries = [(0, layout.LOW_RAM_END, layout.E820_RAM)]
    for region in mem.boot_regions:
        start = max(region.start, layout.HIGH_RAM_START)
        if region.end > start:
            entries.append((start, region.end - start, layout.E820_RAM))
    if reserve_ecam:
        entries.append((layout.PCI_MMCONFIG_START, layout.PCI_MMCONFIG_SIZE, layout.E820_RESERVED))
    return entries


def write_boot_params(mem: GuestMemoryMmap, kernel: KernelImage, cmdline_len: int,
                      initrd: tuple[int, int] | None, e820: list[tuple[int, int, int]],
                      rsdp: int = 0) -> None:
    """Build the zero page for a bzImage at ZERO_PAGE_START."""
    if len(e820) > BP_E820_MAX:
        raise LoaderError(f"{len(e820)} e820 entries, boot_params holds {BP_E820_MAX}")
    page = bytearray(4096)
    page[0x1F1:0x1F1 + len(kernel.setup_header)] = kernel.setup_header
    if page[TYPE_OF_LOADER_OFFSET] == 0:
        page[TYPE_OF_LOADER_OFFSET] = LOADER_TYPE_UNDEFINED
    struct.pack_into("<I", page, HDR_CMD_LINE_PTR, layout.CMDLINE_START)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<II", page, HDR_RAMDISK_IMAGE, addr & 0xFFFF_FFFF, size & 0xFFFF_FFFF)
        struct.pack_into("<II", page, BP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    struct.pack_into("<Q", page, BP_ACPI_RSDP_ADDR, rsdp)
    page[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        _E820.pack_into(page, BP_E820_TABLE + i * _E820.size, addr, size, kind)
    mem.write(layout.ZERO_PAGE_START, page)
    del cmdline_len  # the length is implied by the NUL; kept in the signature for callers' checks


def write_pvh_start_info(mem: GuestMemoryMmap, initrd: tuple[int, int] | None,
                         e820: list[tuple[int, int, int]], rsdp: int = 0,
                         cmdline: bool = True) -> None:
    """Write hvm_start_info, the module list and the memory map for a PVH entry."""
    nr_modules = 0
    if initrd is not None:
        mem.write(layout.MODLIST_START, _MODLIST.pack(initrd[0], initrd[1], 0, 0))
        nr_modules = 1
    for i, (addr, size, kind) in enumerate(e820):
        mem.write(layout.MEMMAP_START + i * _MEMMAP.size, _MEMMAP.pack(addr, size, kind, 0))
    info = _START_INFO.pack(XEN_HVM_START_MAGIC_VALUE, 1, 0, nr_modules,
                            layout.MODLIST_START if nr_modules else 0,
                            layout.CMDLINE_START if cmdline else 0, rsdp, layout.MEMMAP_START,
                            len(e820), 0)
    mem.write(layout.PVH_INFO_START, info)
