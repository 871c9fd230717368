"""Synthetic kernel images for the loader's unit tests and the engine's tiny kernels: a minimal
PVH ELF (one PT_LOAD, an optional Xen PVH entry note) and a minimal bzImage (a setup header
and a protected-mode payload)."""

from __future__ import annotations

import struct


def make_elf(entry_note: int | None = 0x1000200, paddr: int = 0x1000000, code: bytes = b"\x90" * 64,
             bss: int = 32) -> bytes:
    """A minimal ELF64 x86_64 with one PT_LOAD and (optionally) a PVH note in a PT_NOTE."""
    notes = b""
    if entry_note is not None:
        notes += struct.pack("<III", 4, 4, 1) + b"GNU\0" + b"abcd"  # an unrelated note first
        notes += struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry_note)
    phnum = 2
    phoff = 64
    data_off = phoff + phnum * 56
    note_off = data_off + len(code)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       0xFFFFFFFF81000000, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, data_off, 0xFFFFFFFF81000000, paddr, len(code), len(code) + bss, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return ehdr + load + note + code + notes


def make_bzimage(version: int = 0x20F, setup_sects: int = 2, payload: bytes = b"\xfa\xf4" * 100,
                 code32_start: int = 0x100000, loadflags: int = 0x01) -> bytes:
    """A bzImage with boot protocol ``version``, ``setup_sects`` setup sectors (the header in the
    second) and ``payload`` as its protected-mode code."""
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x6A  # header ends at 0x26c
    struct.pack_into("<IH", img, 0x202, 0x53726448, version)
    img[0x211] = loadflags
    struct.pack_into("<I", img, 0x214, code32_start)
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", img, 0x238, 2048)
    return bytes(img) + payload
