"""Image formats are detected as cloud-hypervisor detects them and each is served by its own
DiskFile; an image that carries a format's signature without its structures is refused when the
disk is opened (exposed as raw, the guest's writes would destroy its metadata)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmsh.devices.storage import ImageFormat, detect_image_format, open_disk
from vmsh.devices.storage.qcow2 import Qcow2File
from vmsh.devices.virtio.block import VirtioBlock
from vmsh.errors import DeviceError

SIZE = 1 << 20


def _image(path: Path, head: bytes = b"", tail: bytes = b"") -> Path:
    """A 1 MiB image with ``head`` at offset 0 and ``tail`` at the start of its last 512 bytes."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(head)
        f.seek(SIZE - 512)
        f.write(tail)
    return path


# The VHD footer: cookie, features, version 1.0, data offset all ones (fixed), ... (MS VHD spec)
VHD_FOOTER = b"conectix" + bytes(4) + b"\x00\x01\x00\x00" + b"\xff" * 8
# Only the signature: no valid footer checksum, no VHDX headers (test_vhd.py and test_vhdx.py
# open real images).
FAKES = [
    (ImageFormat.VHD, {"tail": VHD_FOOTER}, "VHD image {path}: footer checksum"),
    (ImageFormat.VHDX, {"head": b"vhdxfile"}, "VHDX image {path}: no valid header"),
]


@pytest.mark.parametrize("name, layout, message", FAKES)
@pytest.mark.parametrize("direct", [False, True])
def test_signature_without_structures_is_refused(tmp_path: Path, name: ImageFormat, layout: dict[str, bytes],
                                                 message: str, direct: bool) -> None:
    path = _image(tmp_path / "disk.img", **layout)
    assert detect_image_format(str(path), SIZE) is name
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError, match="^" + message.format(path=path)):
        VirtioBlock(str(path), direct=direct)
    assert len(os.listdir("/proc/self/fd")) == fds, "the image's descriptors are closed"


@pytest.mark.parametrize("direct", [False, True])
def test_qcow2_is_served(tmp_path: Path, direct: bool) -> None:
    qemu_img = shutil.which("qemu-img")
    assert qemu_img, "qemu-img not found: install qemu-utils (ci/debian-packages.txt)"
    path = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "3M"], check=True)
    assert detect_image_format(str(path), path.stat().st_size) is ImageFormat.QCOW2
    disk = VirtioBlock(str(path), direct=direct)
    try:
        assert isinstance(disk.disk, Qcow2File)
        assert disk.capacity == (3 << 20) >> 9, "the virtual size, not the file's"
    finally:
        disk.close()


def test_qcow2_magic_with_a_broken_header_is_refused(tmp_path: Path) -> None:
    path = _image(tmp_path / "disk.img", head=b"QFI\xfb\x00\x00\x00\x03")
    assert detect_image_format(str(path), SIZE) is ImageFormat.QCOW2
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError, match=f"^qcow2 image {path}: cluster_bits 0 out of range"):
        open_disk(str(path))
    assert len(os.listdir("/proc/self/fd")) == fds, "the image's descriptors are closed"


@pytest.mark.parametrize("layout", [{}, {"head": b"QFI"}, {"head": b"vhdxfil"}, {"tail": b"conecti"},
                                    {"head": b"conectix"}])
def test_raw_images_are_served(tmp_path: Path, layout: dict[str, bytes]) -> None:
    path = _image(tmp_path / "disk.img", **layout)
    assert detect_image_format(str(path), SIZE) is ImageFormat.RAW
    disk = VirtioBlock(str(path))
    try:
        assert disk.capacity == SIZE >> 9
    finally:
        disk.close()


def test_tiny_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "tiny.img"
    path.write_bytes(b"QF")
    assert detect_image_format(str(path), 2) is ImageFormat.RAW
