"""Kernel loaders: ELF ``vmlinux`` through its PVH entry, and bzImage through the 32-bit boot protocol.

``load_kernel`` tries ELF first and falls back to bzImage, like cloud-hypervisor
(``vmm/src/vm.rs``, ``load_kernel``); a file that is neither gives a ``LoaderError``.

- ELF: every ``PT_LOAD`` segment is copied to its ``p_paddr`` (its bss zeroed), and the
  ``PT_NOTE`` segments are searched for the Xen note ``XEN_ELFNOTE_PHYS32_ENTRY`` (type 18,
  name "Xen"), whose first 4 bytes are the 32-bit PVH entry point (Xen
  include/public/elfnote.h; Linux arch/x86/platform/pvh/head.S). An ELF without it cannot be
  booted by vmsh.
- bzImage: the setup header at file offset 0x1f1 must carry "HdrS", protocol >= 2.00 and
  LOADED_HIGH; the protected-mode part (after ``(setup_sects or 4) + 1`` sectors) is copied to
  ``code32_start`` and entered there in 32-bit mode (Linux Documentation/arch/x86/boot.rst,
  "THE REAL-MODE KERNEL HEADER" and "32-bit BOOT PROTOCOL").

The loaders take bytes (or a path) and write through ``GuestMemoryMmap``; they are unit-tested on
synthetic images.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from vmsh.engine.boot import layout
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import GuestMemoryError, VmshError

LOG = logging.getLogger(__name__)


class LoaderError(VmshError):
    """A kernel, firmware or initramfs that cannot be loaded."""


# ELF (System V ABI, ELF-64 Object File Format 1.5)
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
#: Xen ELF note carrying the 32-bit PVH entry (xen/include/public/elfnote.h)
XEN_ELFNOTE_PHYS32_ENTRY = 18
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")

# bzImage setup header (boot.rst), offsets in the file and in boot_params
SETUP_HEADER_OFFSET = 0x1F1
SETUP_SECTS_OFFSET = 0x1F1
BOOT_FLAG_OFFSET = 0x1FE
HEADER_MAGIC_OFFSET = 0x202
VERSION_OFFSET = 0x206
TYPE_OF_LOADER_OFFSET = 0x210
LOADFLAGS_OFFSET = 0x211
CODE32_START_OFFSET = 0x214
INITRD_ADDR_MAX_OFFSET = 0x22C
CMDLINE_SIZE_OFFSET = 0x238
#: "HdrS"
HDRS_MAGIC = 0x53726448
#: loadflags bit 0: protected-mode code loaded at 0x100000
LOADED_HIGH = 0x01
#: loadflags bit 7: heap_end_ptr is valid
CAN_USE_HEAP = 0x80


@dataclass(frozen=True, slots=True)
class KernelImage:
    """Where a kernel went and how to enter it."""

    #: "pvh" (ELF through its PVH note) or "bzimage" (32-bit boot protocol)
    kind: str
    #: guest physical entry point (32-bit protected mode, paging off)
    entry: int
    #: lowest and one-past-highest guest physical addresses written
    load_start: int
    load_end: int
    #: bzImage only: the setup header bytes [0x1f1, end of header), to copy into boot_params
    setup_header: bytes = b""
    #: bzImage only: protocol version, highest initrd address, cmdline size limit
    protocol: int = 0
    initrd_addr_max: int = 0xFFFF_FFFF
    cmdline_max: int = layout.CMDLINE_MAX_SIZE


def map_payload(path: str | os.PathLike[str], limit: int) -> bytes | mmap.mmap:
    """A kernel, firmware or initramfs file, mapped read-only rather than read.

    Only a regular file is taken, and only one no larger than ``limit`` (the guest's RAM): a FIFO
    would block the caller (and with it the VMM's control loop) until a writer comes, and a
    character device such as ``/dev/zero`` has no end. The file is opened non-blocking and
    checked with ``fstat`` on the open descriptor, before a byte is read. The mapping goes when
    its last reference does (an ELF vmlinux with its symbols is three times what is loaded).

    :raises LoaderError: "not a regular file", "larger than the guest's RAM", or the OS error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise LoaderError(err.strerror or str(err)) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoaderError("not a regular file")
        if st.st_size > limit:
            raise LoaderError(f"it is {st.st_size} bytes, larger than the guest's {limit} bytes of RAM")
        if st.st_size == 0:
            return b""
        try:
            return mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise LoaderError("cannot map it") from err
    finally:
        os.close(fd)


def _read(mem: GuestMemoryMmap, source: bytes | str | os.PathLike[str]) -> bytes | mmap.mmap:
    return source if isinstance(source, bytes) else map_payload(source, mem.size)


def load_kernel(mem: GuestMemoryMmap, source: bytes | str | os.PathLike[str]) -> KernelImage:
    """Load an ELF vmlinux (PVH) or a bzImage into ``mem``.

    :raises LoaderError: if the image is neither, or does not fit in RAM, or ``source`` is not a
        regular file no larger than the guest's RAM (:func:`map_payload`).
    """
    data = _read(mem, source)
    if data[:4] == ELF_MAGIC:
        return load_elf(mem, data)
    if is_bzimage(data):
        return load_bzimage(mem, data)
    raise LoaderError("kernel is neither an ELF vmlinux nor a bzImage")


def is_bzimage(data: bytes | mmap.mmap) -> bool:
    """True if ``data`` has a Linux setup header ("HdrS" at 0x202)."""
    return len(data) > 0x240 and struct.unpack_from("<I", data, HEADER_MAGIC_OFFSET)[0] == HDRS_MAGIC


def find_pvh_entry(data: bytes | mmap.mmap) -> int | None:
    """The PVH entry from the ELF's PT_NOTE segments, or None.

    :raises LoaderError: when the entry note is cut off by the end of its segment or the file.
    """
    _ident, _type, _machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = \
        _EHDR.unpack_from(data, 0)
    for i in range(phnum):
        p_type, _f, p_offset, _va, _pa, p_filesz, _memsz, _align = _PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(data))
        # Note entries: namesz, descsz, type, then name and desc each padded to 4 bytes
        # (the ELF64 gABI says 8, but Linux and Xen emit 4-byte aligned notes).
        align = 4
        while pos + _NHDR.size <= end:
            namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
            name_at = pos + _NHDR.size
            desc_at = name_at + ((namesz + align - 1) & ~(align - 1))
            name = data[name_at:name_at + namesz]
            if ntype == XEN_ELFNOTE_PHYS32_ENTRY and name == b"Xen\x00" and descsz >= 4:
                if desc_at + 4 > end:
                    raise LoaderError("ELF kernel's PVH entry note runs past its PT_NOTE segment")
                return int(struct.unpack_from("<I", data, desc_at)[0])
            pos = desc_at + ((descsz + align - 1) & ~(align - 1))
    return None


def load_elf(mem: GuestMemoryMmap, data: bytes | mmap.mmap) -> KernelImage:
    """Load an ELF64 x86_64 vmlinux and return its PVH entry.

    :raises LoaderError: on a malformed ELF, one without a PVH note, or one that does not fit.
    """
    if len(data) < _EHDR.size:
        raise LoaderError("ELF kernel is truncated")
    ident, _e_type, machine, _v, _e_entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = \
        _EHDR.unpack_from(data, 0)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise LoaderError("ELF kernel is not a little-endian x86_64 ELF64")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        raise LoaderError("ELF kernel has a bad program header table")
    entry = find_pvh_entry(data)
    if entry is None:
        raise LoaderError("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                          "build it with CONFIG_PVH=y")
    if entry < layout.HIGH_RAM_START:
        raise LoaderError(f"ELF kernel entry {entry:#x} is below {layout.HIGH_RAM_START:#x}")
    lo, hi = 1 << 64, 0
    for i in range(phnum):
        p_type, _f, p_offset, _va, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_paddr < layout.HIGH_RAM_START:
            raise LoaderError(f"ELF segment at {p_paddr:#x} is below {layout.HIGH_RAM_START:#x}")
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise LoaderError("ELF segment lies outside the file")
        try:
            mem.write(p_paddr, memoryview(data)[p_offset:p_offset + p_filesz])
            if p_memsz > p_filesz:
                mem.fill(p_paddr + p_filesz, p_memsz - p_filesz, 0)
        except GuestMemoryError as err:
            raise LoaderError(f"ELF segment {p_paddr:#x}+{p_memsz:#x} does not fit in guest RAM") from err
        lo, hi = min(lo, p_paddr), max(hi, p_paddr + p_memsz)
    if hi == 0:
        raise LoaderError("ELF kernel has no loadable segment")
    LOG.debug("ELF kernel loaded at %#x-%#x, PVH entry %#x", lo, hi, entry)
    return KernelImage("pvh", entry, lo, hi)


def load_bzimage(mem: GuestMemoryMmap, data: bytes | mmap.mmap) -> KernelImage:
    """Load a bzImage's protected-mode code at ``code32_start``.

    :raises LoaderError: for an old or malformed header, or an image that does not fit.
    """
    if not is_bzimage(data):
        raise LoaderError("not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", data, VERSION_OFFSET)[0]
    loadflags = data[LOADFLAGS_OFFSET]
    if version < 0x200 or not loadflags & LOADED_HIGH:
        raise LoaderError(f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} without "
                          "LOADED_HIGH is not supported")
    setup_sects = data[SETUP_SECTS_OFFSET] or 4
    setup_size = (setup_sects + 1) * 512
    code32_start = struct.unpack_from("<I", data, CODE32_START_OFFSET)[0]
    if code32_start < layout.HIGH_RAM_START:
        raise LoaderError(f"bzImage code32_start {code32_start:#x} is below {layout.HIGH_RAM_START:#x}")
    if setup_size >= len(data):
        raise LoaderError("bzImage is truncated")
    # The header ends at 0x202 + the byte at 0x201 (the jump's offset), boot.rst "DETAILS OF
    # HEADER FIELDS"; it is copied as-is into boot_params.hdr.
    header_end = min(0x202 + data[0x201], 0x280)
    setup_header = data[SETUP_HEADER_OFFSET:header_end]
    initrd_addr_max = 0x37FF_FFFF  # boot.rst: the default for protocols < 2.03
    cmdline_max = 255  # boot.rst: before 2.06 the limit is 255 characters
    if version >= 0x203:
        initrd_addr_max = struct.unpack_from("<I", data, INITRD_ADDR_MAX_OFFSET)[0]
    if version >= 0x206:
        cmdline_max = struct.unpack_from("<I", data, CMDLINE_SIZE_OFFSET)[0]
    kernel = memoryview(data)[setup_size:]
    try:
        mem.write(code32_start, kernel)
    except GuestMemoryError as err:
        raise LoaderError(f"bzImage ({len(kernel)} bytes at {code32_start:#x}) does not fit in guest RAM") from err
    LOG.debug("bzImage protocol %#x loaded at %#x (+%#x)", version, code32_start, len(kernel))
    return KernelImage("bzimage", code32_start, code32_start, code32_start + len(kernel), setup_header,
                       version, initrd_addr_max, min(cmdline_max, layout.CMDLINE_MAX_SIZE - 1))


def load_initramfs(mem: GuestMemoryMmap, source: bytes | str | os.PathLike[str],
                   kernel: KernelImage) -> tuple[int, int]:
    """Place the initramfs at the top of the RAM below 3 GiB, page-aligned (as cloud-hypervisor's
    ``vmm/src/vm.rs`` ``load_initramfs`` does).

    :returns: ``(guest address, size)``.
    :raises LoaderError: if it cannot be read or does not fit above the kernel.
    """
    data = _read(mem, source)
    low_end = mem.regions[0].end
    top = min(low_end, kernel.initrd_addr_max + 1)
    addr = (top - len(data)) & ~0xFFF
    if addr < kernel.load_end:
        raise LoaderError(f"initramfs of {len(data)} bytes does not fit between the kernel and "
                          f"{top:#x}; give the guest more memory")
    mem.write(addr, memoryview(data))
    return addr, len(data)


def load_cmdline(mem: GuestMemoryMmap, cmdline: str | bytes, max_len: int = layout.CMDLINE_MAX_SIZE - 1) -> int:
    """Write the NUL-terminated command line at CMDLINE_START; returns its length.

    :raises LoaderError: if it is longer than ``max_len`` or contains a NUL.
    """
    raw = cmdline.encode() if isinstance(cmdline, str) else cmdline
    if b"\x00" in raw:
        raise LoaderError("kernel command line contains a NUL byte")
    if len(raw) > max_len:
        raise LoaderError(f"kernel command line is {len(raw)} bytes, the kernel takes at most {max_len}")
    mem.write(layout.CMDLINE_START, raw + b"\x00")
    return len(raw)
