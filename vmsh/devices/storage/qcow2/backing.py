"""Opening a qcow2 image's backing file: read-only, a relative name resolved against the image's
directory, its format from the header extension or detected (qcow2 or raw), loops refused."""

from __future__ import annotations

import os
from typing import Protocol

from vmsh.devices.storage.disk_file import DiskFile
from vmsh.devices.storage.raw import RawFile
from vmsh.errors import DeviceError

#: a deeper chain is refused (QEMU has no fixed limit; this bounds descriptors and recursion)
MAX_CHAIN = 64
QCOW2_MAGIC = b"QFI\xfb"


class OpenQcow2(Protocol):
    """How to open a qcow2 backing file (``Qcow2File``, passed in: it opens its own backing files)."""

    def __call__(self, path: str, *, readonly: bool, seen: frozenset[tuple[int, int]]) -> DiskFile: ...


def open_backing(image: str, name: str, fmt: str | None, seen: frozenset[tuple[int, int]],
                 open_qcow2: OpenQcow2) -> DiskFile:
    """The backing file ``name`` of ``image``; ``seen`` holds the chain's (st_dev, st_ino) so far.

    :raises DeviceError: if it cannot be opened, is a loop or the chain is too deep.
    """
    path = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(image)), name)
    if len(seen) >= MAX_CHAIN:
        raise DeviceError(f"qcow2 image {image}: backing chain deeper than {MAX_CHAIN}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise DeviceError(f"qcow2 image {image}: cannot open backing file {path}") from err
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in seen:
            raise DeviceError(f"qcow2 image {image}: backing file loop at {path}")
        if fmt is None:
            fmt = "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"
        if fmt == "raw":
            disk = RawFile(path, fd, readonly=True, direct=False)
            fd = -1
            return disk
    except OSError as err:
        raise DeviceError(f"qcow2 image {image}: cannot read backing file {path}") from err
    finally:
        if fd >= 0:
            os.close(fd)
    return open_qcow2(path, readonly=True, seen=seen)
