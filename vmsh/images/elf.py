"""Just enough ELF64 reading for guest kernels and modules.

Finds note entries (the Xen PVH entry note that lets a VMM start ``vmlinux`` in
32-bit protected mode) and named sections (a module's ``.modinfo``), without
depending on binutils at test time.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from vmsh.errors import ImageError

log = logging.getLogger(__name__)

#: include/xen/interface/elfnote.h: the 32-bit physical entry point of a PVH kernel
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4
SHT_NOTE = 7


@dataclass(frozen=True)
class Note:
    """One ELF note: owner name, type and descriptor bytes."""

    name: bytes
    type: int
    desc: bytes


def _header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    """Return (phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx) of an ELF64 LE file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError("not a little-endian ELF64 file")
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from("<HHHHH", data, 0x36)
    return phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx


def parse_notes(blob: bytes) -> list[Note]:
    """Split a note segment or section into notes (4-byte aligned name and desc)."""
    notes: list[Note] = []
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        off += 12
        name = blob[off : off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = blob[off : off + descsz]
        off += (descsz + 3) & ~3
        notes.append(Note(name, ntype, desc))
    return notes


def notes(data: bytes) -> list[Note]:
    """All notes of an ELF64 image, from its PT_NOTE segments."""
    phoff, _, phentsize, phnum, *_ = _header(data)
    found: list[Note] = []
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == PT_NOTE:
            found.extend(parse_notes(data[p_offset : p_offset + p_filesz]))
    return found


def pvh_entry(path: Path) -> int | None:
    """Return the PVH 32-bit entry address of an ELF kernel, or None if it has no PVH note."""
    for note in notes(path.read_bytes()):
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            # the descriptor is a 32-bit address (an 8-byte one is zero-extended)
            return int.from_bytes(note.desc[:8], "little")
    return None


def section(data: bytes, wanted: str) -> bytes | None:
    """Return the bytes of the section named ``wanted``, or None."""
    _, shoff, _, _, shentsize, shnum, shstrndx = _header(data)

    def sh(i: int) -> tuple[int, int, int, int]:
        name, stype, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, stype, offset, size

    _, _, stroff, strsize = sh(shstrndx)
    strtab = data[stroff : stroff + strsize]
    for i in range(shnum):
        name, _stype, offset, size = sh(i)
        if strtab[name : strtab.index(b"\0", name)].decode() == wanted:
            return data[offset : offset + size]
    return None


def modinfo(path: Path) -> dict[str, list[str]]:
    """Parse a kernel module's ``.modinfo`` section into ``{key: [values]}``."""
    blob = section(path.read_bytes(), ".modinfo")
    if blob is None:
        raise ImageError(f"{path.name}: no .modinfo section")
    info: dict[str, list[str]] = {}
    for item in blob.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info
