"""RawFile: the virtual disk is the file; reads past a shrunk end are zeros; O_DIRECT requests
that are not whole blocks go through the bounce buffer; discard and write-zeroes free or zero."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from vmsh.devices.storage import open_disk
from vmsh.devices.storage.raw import RawFile

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_size_identity_and_data(image: Path) -> None:
    disk = open_disk(str(image))
    try:
        assert isinstance(disk, RawFile) and disk.size == SIZE
        st = image.stat()
        assert disk.identity == (st.st_dev, st.st_rdev, st.st_ino)
        buf = bytearray(8192)
        disk.read([memoryview(buf)[:100], memoryview(buf)[100:]], 4096)
        assert bytes(buf) == image.read_bytes()[4096:4096 + 8192]
        disk.write([memoryview(b"abc"), memoryview(b"def")], 10)
        assert image.read_bytes()[10:16] == b"abcdef"
    finally:
        disk.close()
        disk.close()  # a second close does nothing


def test_read_past_a_shrunk_end_is_zeros(image: Path) -> None:
    disk = open_disk(str(image))
    try:
        os.truncate(image, 4096)
        buf = bytearray(b"\xff" * 8192)
        disk.read([memoryview(buf)], 0)
        assert bytes(buf[4096:]) == bytes(4096)
    finally:
        disk.close()


def test_discard_and_write_zeroes(image: Path) -> None:
    disk = open_disk(str(image))
    try:
        disk.write_zeroes(0, 8192, unmap=False)
        disk.write_zeroes(65536, 8192, unmap=True)
        disk.discard(131072, 65536)
        data = image.read_bytes()
        assert data[:8192] == bytes(8192) and data[65536:65536 + 8192] == bytes(8192)
        assert len(data) == SIZE
    finally:
        disk.close()


def test_direct_bounces_what_is_not_whole_blocks(image: Path) -> None:
    try:
        disk = open_disk(str(image), direct=True)
    except Exception:
        pytest.skip("the file system of tmp_path has no O_DIRECT")
    aligned = mmap.mmap(-1, 8192)  # page-aligned: the direct path
    try:
        disk.read([memoryview(aligned)[:4096]], 0)
        assert aligned[:4096] == image.read_bytes()[:4096]
        odd = bytearray(1024)  # two blocks in pieces that are not blocks: bounced
        disk.read([memoryview(odd)[:300], memoryview(odd)[300:]], 512)
        assert bytes(odd) == image.read_bytes()[512:1536]
        unaligned = memoryview(aligned)[1:513]  # a block at an odd address: EINVAL, then bounced
        disk.write([unaligned], 1024)
        assert image.read_bytes()[1024:1536] == aligned[1:513]
    finally:
        disk.close()
