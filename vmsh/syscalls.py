"""Linux system calls the ``os`` module lacks, for any layer: ``fallocate(2)``, ``fstatfs(2)``'s
file system type."""

from __future__ import annotations

import ctypes
import os

# fallocate(2) modes (include/uapi/linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2).

    :raises OSError: with the call's errno.
    """
    # INVARIANTS: plain integer arguments; off_t is 64-bit on the Linux targets vmsh supports.
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# f_type of fstatfs(2) (include/uapi/linux/magic.h): file systems whose files live in memory
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
HUGETLBFS_MAGIC = 0x958458F6
MEMORY_FS_MAGICS = frozenset({TMPFS_MAGIC, RAMFS_MAGIC, HUGETLBFS_MAGIC})

_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int
#: sizeof(struct statfs) on x86_64 (f_type, a long, comes first)
_STATFS_SIZE = 120


def fstatfs_type(fd: int) -> int:
    """The ``f_type`` of the file system ``fd`` is on.

    :raises OSError: with the call's errno.
    """
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[:8], "little") & 0xFFFF_FFFF
