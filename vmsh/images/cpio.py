"""A reproducible ``newc`` cpio writer (the format the kernel unpacks as initramfs).

Entries are written sorted by path with fixed owner, mtime and inode numbers, so
the same inputs give byte-identical archives.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``data`` is file contents or a symlink's target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(out: BinaryIO, ino: int, entry: Entry, mtime: int) -> None:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, mtime, len(entry.data), 0, 0,
              entry.rdev[0], entry.rdev[1], len(name), 0)
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    out.write(header + name + _pad(len(header) + len(name)))
    out.write(entry.data + _pad(len(entry.data)))


def write(out: BinaryIO, entries: list[Entry], mtime: int = 0) -> None:
    """Write ``entries`` (parents before children, by sorting) and the trailer."""
    seen: set[str] = set()
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        if entry.path in seen:
            raise ValueError(f"duplicate cpio entry {entry.path}")
        seen.add(entry.path)
        _record(out, ino, entry, mtime)
    _record(out, 0, Entry(_TRAILER, 0), 0)


def read_names(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into ``{path: (mode, data)}`` (for tests and checks)."""
    members: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        if data[off : off + 6] != _MAGIC:
            raise ValueError(f"bad cpio magic at {off}")
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        off += 110
        name = data[off : off + namesize - 1].decode()
        off += namesize + (-(110 + namesize) % 4)
        if name == _TRAILER:
            return members
        members[name] = (mode, data[off : off + size])
        off += size + (-size % 4)
