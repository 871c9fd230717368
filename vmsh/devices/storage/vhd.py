"""Fixed VHD images: the virtual disk's bytes, then a 512-byte footer (Microsoft's "Virtual Hard
Disk Image Format Specification", the hard disk footer).

A fixed VHD is served as a :class:`~vmsh.devices.storage.raw.RawFile` whose size is the footer's
current size, so the footer lies past the end of the disk the guest sees and no guest request
reaches it (the device refuses requests past the end). cloud-hypervisor v40 does the same
(``block/src/fixed_vhd.rs``). Dynamic and differencing VHDs are refused: v40 does not detect them
as VHD at all and would serve one as a raw disk, whose writes destroy the image's metadata.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from vmsh.devices.storage.raw import RawFile, file_size
from vmsh.errors import DeviceError

FOOTER_SIZE = 512
COOKIE = b"conectix"
#: file format version 1.0
VERSION = 0x00010000
DISK_TYPE_FIXED = 2
DISK_TYPE_NAMES = {0: "none", 1: "reserved (deprecated)", 2: "fixed", 3: "dynamic", 4: "differencing",
                   5: "reserved (deprecated)", 6: "reserved (deprecated)"}
#: cookie, features, version, data offset, time stamp, creator application, version, host OS,
#: original size, current size, geometry, disk type, checksum (big-endian, spec "Hard Disk Footer Format")
_FOOTER = struct.Struct(">8sIIQI4sI4sQQIII")
_CHECKSUM_AT = 64


@dataclass(frozen=True)
class VhdFooter:
    """The fields of a VHD footer that decide how the image is served."""

    version: int
    data_offset: int
    current_size: int
    disk_type: int
    checksum: int
    computed_checksum: int


def parse_footer(raw: bytes) -> VhdFooter:
    """The footer in ``raw`` (512 bytes).

    :raises ValueError: if ``raw`` does not start with the VHD cookie.
    """
    if len(raw) != FOOTER_SIZE or raw[:8] != COOKIE:
        raise ValueError("no VHD footer cookie")
    (_, _, version, data_offset, _, _, _, _, _, current_size, _, disk_type,
     checksum) = _FOOTER.unpack_from(raw)
    return VhdFooter(version=version, data_offset=data_offset, current_size=current_size,
                     disk_type=disk_type, checksum=checksum, computed_checksum=footer_checksum(raw))


def footer_checksum(raw: bytes) -> int:
    """The spec's checksum: the one's complement of the byte sum, the checksum field counted as zeros."""
    total = sum(raw) - sum(raw[_CHECKSUM_AT:_CHECKSUM_AT + 4])
    return ~total & 0xFFFFFFFF


def open_fixed_vhd(path: str, fd: int, *, readonly: bool, direct: bool) -> RawFile:
    """The fixed VHD open on ``fd`` (taken over on success) as a raw disk of the footer's size.

    :raises DeviceError: if the footer is corrupt, the image is not a fixed VHD, or its data is
        shorter than the footer says.
    :raises OSError: if the image cannot be read.
    """
    length = file_size(fd)
    # A buffered descriptor of its own: ``fd`` may be O_DIRECT, which needs aligned buffers.
    rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(rfd, FOOTER_SIZE, length - FOOTER_SIZE) if length >= FOOTER_SIZE else b""
    finally:
        os.close(rfd)
    try:
        footer = parse_footer(raw)
    except ValueError as err:
        raise DeviceError(f"VHD image {path}: no footer in its last {FOOTER_SIZE} bytes") from err
    if footer.checksum != footer.computed_checksum:
        raise DeviceError(f"VHD image {path}: footer checksum {footer.checksum:#010x} does not match its "
                          f"contents ({footer.computed_checksum:#010x})")
    if footer.version != VERSION:
        raise DeviceError(f"VHD image {path}: unknown format version {footer.version:#010x}")
    if footer.disk_type != DISK_TYPE_FIXED:
        kind = DISK_TYPE_NAMES.get(footer.disk_type, f"unknown ({footer.disk_type})")
        raise DeviceError(f"VHD image {path} is a {kind} VHD: vmsh serves fixed VHDs only, as cloud-hypervisor "
                          "does (convert it: qemu-img convert -O vpc -o subformat=fixed, or to raw)")
    if footer.current_size > length - FOOTER_SIZE:
        raise DeviceError(f"VHD image {path}: its footer says {footer.current_size} bytes but the file "
                          f"holds {length - FOOTER_SIZE} before the footer")
    return RawFile(path, fd, readonly=readonly, direct=direct, size=footer.current_size)
