"""Which format an image is in, detected as cloud-hypervisor v40 detects it, and opening it.

The checks are cloud-hypervisor's (``block/src/lib.rs``, ``detect_image_type``): the qcow2 magic
at offset 0, a VHD footer cookie in the last 512 bytes, the VHDX signature at offset 0; anything
else is raw.
"""

from __future__ import annotations

import enum
import os

from vmsh.devices.storage.disk_file import DiskFile
from vmsh.devices.storage.qcow2 import Qcow2File
from vmsh.devices.storage.raw import RawFile, file_size
from vmsh.devices.storage.vhd import open_fixed_vhd
from vmsh.devices.storage.vhdx import VhdxFile
from vmsh.errors import DeviceError

#: qcow2 header magic at offset 0 ("QFI\xfb", QEMU docs/interop/qcow2.txt)
QCOW2_MAGIC = b"QFI\xfb"
#: VHDX file type identifier at offset 0 (MS-VHDX §2.2.1)
VHDX_SIGNATURE = b"vhdxfile"
#: VHD footer cookie, in the last 512 bytes of a fixed VHD (Microsoft's VHD format spec)
VHD_COOKIE = b"conectix"
VHD_FOOTER_SIZE = 512


class ImageFormat(enum.Enum):
    """The formats cloud-hypervisor v40 tells apart (its ``ImageType``)."""

    RAW = "raw"
    QCOW2 = "qcow2"
    VHD = "VHD"
    VHDX = "VHDX"


def detect_image_format(path: str, size: int) -> ImageFormat:
    """The format of the image at ``path`` (``size`` bytes). It reads through its own buffered
    descriptor, so an image opened with O_DIRECT needs no aligned buffer here.

    :raises OSError: if the image cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 8, 0)
        tail = os.pread(fd, len(VHD_COOKIE), size - VHD_FOOTER_SIZE) if size >= VHD_FOOTER_SIZE else b""
    finally:
        os.close(fd)
    if head[:4] == QCOW2_MAGIC:
        return ImageFormat.QCOW2
    if tail == VHD_COOKIE:
        return ImageFormat.VHD
    if head == VHDX_SIGNATURE:
        return ImageFormat.VHDX
    return ImageFormat.RAW


def open_disk(path: str, *, readonly: bool = False, direct: bool = False) -> DiskFile:
    """The image at ``path`` behind the :class:`DiskFile` of its format.

    :raises DeviceError: if the image cannot be opened or read, or is not a valid image of its format.
    """
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise DeviceError(f"cannot open disk image {path}") from err
    try:
        image_format = detect_image_format(path, file_size(fd))
        if image_format is ImageFormat.RAW:
            return RawFile(path, fd, readonly=readonly, direct=direct)
        if image_format is ImageFormat.VHD:
            return open_fixed_vhd(path, fd, readonly=readonly, direct=direct)
        if image_format is ImageFormat.VHDX:
            return VhdxFile(path, fd, readonly=readonly, direct=direct)
        # qcow2 opens its own descriptor, buffered: metadata I/O is small and unaligned, so
        # O_DIRECT is not applied to qcow2 images.
        os.close(fd)
        fd = -1
        return Qcow2File(path, readonly=readonly)
    except OSError as err:
        if fd >= 0:
            os.close(fd)
        raise DeviceError(f"cannot read disk image {path}") from err
    except DeviceError:
        if fd >= 0:
            os.close(fd)
        raise
