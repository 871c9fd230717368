"""Fixed VHD images made by qemu-img read as their raw reference, take writes that qemu-img reads
back, and never show or expose their footer to the guest; dynamic and differencing VHDs and
corrupt footers are refused at open."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from tests.unit.devices.storage.qemu_img import (
    apply_to_raw,
    needs_qemu_img,
    qemu_ok,
    reference,
    scattered_writes,
    split_views,
)
from vmsh.devices.storage import open_disk
from vmsh.devices.storage.raw import RawFile
from vmsh.devices.storage.vhd import footer_checksum
from vmsh.devices.virtio.block import VirtioBlock
from vmsh.errors import DeviceError

pytestmark = needs_qemu_img
SIZE = 16 << 20


def _current_size(img: Path) -> int:
    return int(struct.unpack_from(">Q", img.read_bytes()[-512:], 48)[0])


@pytest.mark.parametrize("force_size", ["on", "off"])
@pytest.mark.parametrize("direct", [False, True])
def test_fixed_vhd_reads_writes_and_qemu_agrees(tmp_path: Path, force_size: str, direct: bool) -> None:
    ref = reference(tmp_path / "ref.raw", SIZE, seed=11)
    img = tmp_path / "disk.vhd"
    qemu_ok("convert", "-O", "vpc", "-o", f"subformat=fixed,force_size={force_size}", str(ref), str(img))
    footer = img.read_bytes()[-512:]
    # Without force_size qemu rounds the size to a CHS geometry, padding the data with zeros.
    size = _current_size(img)
    assert size == img.stat().st_size - 512 and size >= SIZE
    disk = open_disk(str(img), direct=direct)
    try:
        assert isinstance(disk, RawFile) and disk.size == size
        buf = bytearray(size)
        disk.read([memoryview(buf)], 0)
        assert bytes(buf) == ref.read_bytes() + bytes(size - SIZE)
        writes = scattered_writes(SIZE, seed=12)
        for offset, data in writes:
            disk.write(split_views(data), offset)
        disk.flush()
    finally:
        disk.close()
    apply_to_raw(ref, writes)
    assert img.read_bytes()[-512:] == footer, "the footer is never written"
    # qemu-img shows a fixed VHD's footer as the disk's last sector: compare all but that.
    out = tmp_path / "out.raw"
    qemu_ok("convert", "-f", "vpc", "-O", "raw", str(img), str(out))
    assert out.read_bytes()[:size] == ref.read_bytes() + bytes(size - SIZE)


def test_the_guest_sees_the_data_without_the_footer(tmp_path: Path) -> None:
    img = tmp_path / "disk.vhd"
    qemu_ok("create", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(img), str(SIZE))
    dev = VirtioBlock(str(img))
    try:
        assert dev.capacity == SIZE >> 9
    finally:
        dev.close()


def _fixed(tmp_path: Path) -> Path:
    img = tmp_path / "disk.vhd"
    qemu_ok("create", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(img), str(SIZE))
    return img


def _set_footer(img: Path, offset: int, data: bytes, *, fix_checksum: bool = True) -> None:
    footer = bytearray(img.read_bytes()[-512:])
    footer[offset:offset + len(data)] = data
    if fix_checksum:
        footer[64:68] = footer_checksum(bytes(footer)).to_bytes(4, "big")
    with open(img, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(footer)


CORRUPTIONS = {
    "checksum": (lambda img: _set_footer(img, 100, b"x", fix_checksum=False), "footer checksum"),
    "version": (lambda img: _set_footer(img, 12, b"\x00\x02\x00\x00"), "unknown format version"),
    "size past the data": (lambda img: _set_footer(img, 48, (SIZE + 512).to_bytes(8, "big")),
                           f"says {SIZE + 512} bytes but the file holds {SIZE}"),
    "differencing": (lambda img: _set_footer(img, 60, (4).to_bytes(4, "big")), "is a differencing VHD"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_footer_is_refused(tmp_path: Path, name: str) -> None:
    img = _fixed(tmp_path)
    corrupt, message = CORRUPTIONS[name]
    corrupt(img)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError, match=f"^VHD image {img}.*{message}"):
        open_disk(str(img))
    assert len(os.listdir("/proc/self/fd")) == fds


def test_dynamic_vhd_is_refused_not_served_as_raw(tmp_path: Path) -> None:
    img = tmp_path / "dyn.vhd"
    qemu_ok("create", "-f", "vpc", "-o", "subformat=dynamic", str(img), str(SIZE))
    with pytest.raises(DeviceError, match=f"^VHD image {img} is a dynamic VHD: vmsh serves fixed VHDs only"):
        open_disk(str(img))
