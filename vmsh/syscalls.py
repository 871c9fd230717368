"""Linux system calls the ``os`` module lacks, for any layer: ``fallocate(2)``."""

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
