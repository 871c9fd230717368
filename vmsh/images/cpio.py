"""A reproducible ``newc`` cpio writer (the format the kernel unpacks as initramfs).

Entries are written sorted by path with fixed owner, mtime and inode numbers, so
the same inputs give byte-identical archives.

The data of every regular file of a page or more starts on a 4 KiB boundary of the
archive: its name is padded with NULs (the kernel reads the name up to its first NUL
and only checks that the last byte of ``namesize`` is one) and, where that padding
cannot reach the boundary, the file's parent directory is written once more before it
with a padded name (recreating an existing directory with the same mode changes
nothing). Loaded page-aligned and uncompressed, such an archive lets the default
kernel make those pages the files' page cache instead of copying them
(guest-images/patches, ``initramfs_inplace``).
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_HEADER_SIZE = 110
#: file data of at least this size is page-aligned in the archive (the guest's page size)
PAGE_SIZE = 4096
#: the kernel skips an entry whose namesize exceeds PATH_MAX
_PATH_MAX = 4096


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


def _record(out: BinaryIO, ino: int, entry: Entry, mtime: int, namesize: int = 0) -> int:
    """Write one entry, its name NUL-padded to ``namesize`` bytes if that is longer; return
    the bytes written."""
    name = entry.path.encode() + b"\0"
    name += b"\0" * (namesize - len(name))
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, mtime, len(entry.data), 0, 0,
              entry.rdev[0], entry.rdev[1], len(name), 0)
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    record = header + name + _pad(len(header) + len(name)) + entry.data + _pad(len(entry.data))
    out.write(record)
    return len(record)


def _align4(n: int) -> int:
    return n + (-n % 4)


def _aligning_namesize(offset: int, path: str) -> int | None:
    """The namesize that puts the data of an entry whose header is at ``offset`` (4-aligned)
    on a page boundary, if one between the name's own size and PATH_MAX does."""
    shortest = len(path.encode()) + 1
    # the data starts at offset + align4(110 + namesize): find that distance
    for distance in (-offset % PAGE_SIZE, -offset % PAGE_SIZE + PAGE_SIZE):
        namesize = max(shortest, distance - _HEADER_SIZE - 3)
        if _align4(_HEADER_SIZE + namesize) == distance and namesize <= _PATH_MAX:
            return namesize
    return None


def write(out: BinaryIO, entries: list[Entry], mtime: int = 0) -> None:
    """Write ``entries`` (parents before children, by sorting) and the trailer."""
    seen: dict[str, tuple[int, Entry]] = {}
    offset = 0
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        if entry.path in seen:
            raise ValueError(f"duplicate cpio entry {entry.path}")
        seen[entry.path] = (ino, entry)
        namesize = 0
        if stat.S_ISREG(entry.mode) and len(entry.data) >= PAGE_SIZE:
            namesize = _aligning_namesize(offset, entry.path) or 0
            parent = seen.get(entry.path.rpartition("/")[0])
            if not namesize and parent is not None and stat.S_ISDIR(parent[1].mode):
                offset += _realign_with(out, offset, entry.path, *parent, mtime)
                namesize = _aligning_namesize(offset, entry.path) or 0
        offset += _record(out, ino, entry, mtime, namesize)
    _record(out, 0, Entry(_TRAILER, 0), 0)


def _realign_with(out: BinaryIO, offset: int, path: str, ino: int, directory: Entry, mtime: int) -> int:
    """Write ``directory`` again, its name padded so that ``path``'s data can then be aligned;
    return the bytes written."""
    for namesize in range(len(directory.path.encode()) + 1, _PATH_MAX + 1, 4):
        if _aligning_namesize(offset + _align4(_HEADER_SIZE + namesize), path):
            return _record(out, ino, directory, mtime, namesize)
    raise AssertionError("a directory entry of some size always allows the alignment")


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
        name = data[off : off + namesize - 1].split(b"\0", 1)[0].decode()
        off += namesize + (-(110 + namesize) % 4)
        if name == _TRAILER:
            return members
        members[name] = (mode, data[off : off + size])
        off += size + (-size % 4)
