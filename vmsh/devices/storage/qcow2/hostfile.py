"""The image file under a qcow2 image: exact positioned reads and writes of metadata and data,
the file's end as this process has grown it, and the one durability barrier (fdatasync)."""

from __future__ import annotations

import array
import errno
import os
import sys

from vmsh.devices.storage.raw import pread_all, pwrite_all


class HostFile:
    """One descriptor on the image file (taken over: closed by :meth:`close`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.end = os.fstat(fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; EIO if they run past the end of the file."""
        if offset < 0 or offset + length > self.end:
            raise OSError(errno.EIO, f"qcow2: read of {length} bytes at {offset:#x} past the end of the image")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"qcow2: short read at {offset:#x}")
        return data

    def read_upto(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``, fewer at the end of the file."""
        return os.pread(self.fd, length, offset)

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from ``offset``; bytes past the end of the file read as zeros."""
        pread_all(self.fd, views, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writev([memoryview(data)], offset)

    def writev(self, views: list[memoryview], offset: int) -> None:
        pwrite_all(self.fd, views, offset)
        self.end = max(self.end, offset + sum(map(len, views)))

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def be64_array(data: bytes) -> array.array[int]:
    """Big-endian 64-bit table entries as a compact array (8 bytes an entry, not a Python int each)."""
    table = array.array("Q", data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def be64_bytes(table: array.array[int]) -> bytes:
    out = array.array("Q", table)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()
