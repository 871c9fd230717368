"""VHDX images made by qemu-img read back as their raw reference; after vmsh's writes (into
present blocks and into blocks it allocates) `qemu-img check` is clean and `qemu-img compare`
agrees with the reference written the same way; corrupt headers, tables and BAT entries are
refused at open, and a read-only open leaves the file untouched."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.unit.devices.storage.qemu_img import (
    apply_to_raw,
    needs_qemu_img,
    qemu_ok,
    reference,
    scattered_writes,
    split_views,
    virtual_size,
)
from vmsh.devices.storage import open_disk
from vmsh.devices.storage.crc32c import crc32c
from vmsh.devices.storage.vhdx import VhdxFile
from vmsh.errors import DeviceError

pytestmark = needs_qemu_img
SIZE = 24 << 20
MiB = 1 << 20


def test_crc32c_check_value() -> None:
    # The CRC catalogue's check value for CRC-32C ("123456789"), and a continued CRC.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283


def _read_all(disk: VhdxFile) -> bytes:
    buf = bytearray(disk.size)
    disk.read([memoryview(buf)], 0)
    return bytes(buf)


@pytest.mark.parametrize("subformat, block", [("dynamic", "1M"), ("dynamic", "8M"), ("dynamic", "32M"),
                                              ("fixed", "1M"), ("fixed", "16M")])
@pytest.mark.parametrize("direct", [False, True])
def test_converted_image_reads_writes_and_qemu_agrees(tmp_path: Path, subformat: str, block: str,
                                                      direct: bool) -> None:
    ref = reference(tmp_path / "ref.raw", SIZE, seed=len(block))
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", "-o", f"subformat={subformat},block_size={block}", str(ref), str(img))
    disk = open_disk(str(img), direct=direct)
    try:
        assert isinstance(disk, VhdxFile)
        assert disk.size == virtual_size(img, "vhdx") == SIZE
        assert _read_all(disk) == ref.read_bytes()
        writes = scattered_writes(SIZE, seed=7)
        for offset, data in writes:
            disk.write(split_views(data), offset)
        disk.flush()
        for offset, data in writes[-1:]:  # the last: no later write overlaps it
            out = memoryview(bytearray(len(data)))
            disk.read([out[:512], out[512:]], offset)
            assert out == data
    finally:
        disk.close()
    apply_to_raw(ref, writes)
    assert "No errors were found" in qemu_ok("check", "-f", "vhdx", str(img))
    qemu_ok("compare", "-f", "raw", "-F", "vhdx", str(ref), str(img))


def test_empty_dynamic_image_grows_and_qemu_reads_it(tmp_path: Path) -> None:
    img = tmp_path / "empty.vhdx"
    qemu_ok("create", "-f", "vhdx", "-o", "block_size=2M", str(img), str(SIZE))
    before = img.stat().st_size
    disk = open_disk(str(img))
    try:
        assert _read_all(disk) == bytes(SIZE)
        disk.write([memoryview(b"\x5a" * 4096)], 5 * MiB + 512)  # block 2 only
        disk.write([memoryview(b"\xa5" * 8192)], 2 * MiB - 4096)  # straddles blocks 0 and 1
        disk.flush()
    finally:
        disk.close()
    assert img.stat().st_size >= before + 3 * 2 * MiB
    assert "No errors were found" in qemu_ok("check", "-f", "vhdx", str(img))
    io = subprocess.run(["qemu-io", "-f", "vhdx", "-c", "read -P 0x5a 5243392 4096", "-c", "read -P 0 4194304 1048576",
                         "-c", "read -P 0xa5 2093056 8192", "-c", "read -P 0 0 2093056", str(img)],
                        capture_output=True, text=True, check=False)
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout + io.stderr


def test_beyond_one_chunk_the_bat_skips_sector_bitmap_entries(tmp_path: Path) -> None:
    # With 512-byte sectors a chunk (the blocks before one sector-bitmap BAT entry) covers 4 GiB.
    img = tmp_path / "big.vhdx"
    qemu_ok("create", "-f", "vhdx", "-o", "block_size=1M", str(img), "5G")
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", f"write -P 0x11 {4 << 30} 65536", str(img)], check=True,
                   capture_output=True)
    disk = open_disk(str(img))
    try:
        out = bytearray(65536)
        disk.read([memoryview(out)], 4 << 30)
        assert out == b"\x11" * 65536
        disk.write([memoryview(b"\x22" * 4096)], (4 << 30) + (3 << 20))
    finally:
        disk.close()
    io = subprocess.run(["qemu-io", "-f", "vhdx", "-c", f"read -P 0x22 {(4 << 30) + (3 << 20)} 4096", str(img)],
                        capture_output=True, text=True, check=False)
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout + io.stderr
    assert "No errors were found" in qemu_ok("check", "-f", "vhdx", str(img))


def test_readonly_open_and_reads_leave_the_file_untouched(tmp_path: Path) -> None:
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", str(reference(tmp_path / "ref.raw", SIZE, seed=3)), str(img))
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    for readonly in (True, False):
        disk = open_disk(str(img), readonly=readonly)
        _read_all(disk)
        disk.flush()
        disk.close()
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest


def test_first_write_gives_both_headers_new_write_guids(tmp_path: Path) -> None:
    img = tmp_path / "disk.vhdx"
    qemu_ok("create", "-f", "vhdx", str(img), str(SIZE))
    before = [_header(img, n) for n in (0, 1)]
    disk = open_disk(str(img))
    disk.write([memoryview(bytes(512))], 0)
    disk.write([memoryview(bytes(512))], 512)
    disk.close()
    after = [_header(img, n) for n in (0, 1)]
    assert max(h["seq"] for h in after) == max(h["seq"] for h in before) + 2
    for h in after:
        assert h["crc_ok"] and h["file_write"] not in {b["file_write"] for b in before}
        assert h["data_write"] not in {b["data_write"] for b in before}
    assert "No errors were found" in qemu_ok("check", "-f", "vhdx", str(img))


# -- corrupt images -----------------------------------------------------------------------

HEADER_AT = (64 << 10, 128 << 10)
REGION_AT = (192 << 10, 256 << 10)


def _header(img: Path, n: int) -> dict[str, object]:
    raw = img.read_bytes()[HEADER_AT[n]:HEADER_AT[n] + 4096]
    crc_ok = struct.unpack_from("<I", raw, 4)[0] == crc32c(raw[:4] + bytes(4) + raw[8:])
    return {"seq": struct.unpack_from("<Q", raw, 8)[0], "file_write": raw[16:32], "data_write": raw[32:48],
            "crc_ok": crc_ok}


def _patch(img: Path, offset: int, data: bytes, checksum_of: tuple[int, int] | None = None) -> None:
    """Write ``data`` at ``offset``; with ``checksum_of`` (start, length), fix that structure's CRC."""
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)
        if checksum_of:
            start, length = checksum_of
            f.seek(start)
            raw = bytearray(f.read(length))
            raw[4:8] = bytes(4)
            raw[4:8] = crc32c(raw).to_bytes(4, "little")
            f.seek(start)
            f.write(raw)


def _region(img: Path, guid: str) -> tuple[int, int]:
    raw = img.read_bytes()[REGION_AT[0]:REGION_AT[0] + 65536]
    for i in range(struct.unpack_from("<I", raw, 8)[0]):
        g, offset, length, _ = struct.unpack_from("<16sQII", raw, 16 + 32 * i)
        if uuid.UUID(bytes_le=g) == uuid.UUID(guid):
            return offset, length
    raise AssertionError(guid)


def _metadata_item(img: Path, guid: str) -> int:
    """The file offset of a metadata item's value."""
    start, _ = _region(img, "8B7CA206-4790-4B9A-B8FE-575F050F886E")
    raw = img.read_bytes()[start:start + 65536]
    for i in range(struct.unpack_from("<H", raw, 10)[0]):
        g, offset, _, _, _ = struct.unpack_from("<16sIIII", raw, 32 + 32 * i)
        if uuid.UUID(bytes_le=g) == uuid.UUID(guid):
            return start + offset
    raise AssertionError(guid)


BAT = "2DC27766-F623-4200-9D64-115E9BFD4A08"


def _bat_entry(img: Path, index: int) -> int:
    offset, _ = _region(img, BAT)
    with open(img, "rb") as f:
        f.seek(offset + 8 * index)
        return int.from_bytes(f.read(8), "little")


def _set_bat(img: Path, index: int, value: int) -> None:
    _patch(img, _region(img, BAT)[0] + 8 * index, value.to_bytes(8, "little"))


def _both_headers(img: Path, offset_in_header: int, data: bytes) -> None:
    for at in HEADER_AT:
        _patch(img, at + offset_in_header, data, checksum_of=(at, 4096))


CORRUPTIONS = {
    "both header checksums": (lambda img: [_patch(img, at + 100, b"x") for at in HEADER_AT], "no valid header"),
    "log to replay": (lambda img: _both_headers(img, 48, uuid.uuid4().bytes_le), "log .* replay"),
    "header version": (lambda img: _both_headers(img, 66, b"\x02\x00"), "unknown header version 2"),
    "both region tables": (lambda img: [_patch(img, at + 40, b"x") for at in REGION_AT], "no valid region table"),
    "BAT past the end": (lambda img: _set_bat(img, 1, (img.stat().st_size + (8 << 20)) | 6), "BAT entry 1 points"),
    "BAT in the header section": (lambda img: _set_bat(img, 1, 0 | 6), "BAT entry 1 points at 0"),
    "BAT onto the BAT": (lambda img: _set_bat(img, 1, _region(img, BAT)[0] | 6), "BAT entry 1 .* overlaps metadata"),
    "two blocks in one place": (lambda img: _set_bat(img, 1, _bat_entry(img, 0)), "overlaps another block"),
    "BAT state": (lambda img: _set_bat(img, 1, _bat_entry(img, 1) & ~7 | 4), "invalid state 4"),
    "partially present": (lambda img: _set_bat(img, 1, _bat_entry(img, 1) & ~7 | 7), "partially present"),
    "block size": (lambda img: _patch(img, _metadata_item(img, "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"),
                                      (3 << 20).to_bytes(4, "little")), "block size 3145728"),
    "has a parent": (lambda img: _patch(img, _metadata_item(img, "CAA16737-FA36-4D43-B3B6-33F0AA44E76B") + 4,
                                        (2).to_bytes(4, "little")), "differencing"),
    "absurd size": (lambda img: _patch(img, _metadata_item(img, "2FA54224-CD1B-4876-B211-5DBED83BF4B8"),
                                       (1 << 62).to_bytes(8, "little")), "virtual disk size"),
    "sector size": (lambda img: _patch(img, _metadata_item(img, "8141BF1D-A96F-4709-BA47-F233A8FAAB5F"),
                                       (1024).to_bytes(4, "little")), "logical sector size 1024"),
    "truncated": (lambda img: os.truncate(img, 512 << 10), "shorter than the 1 MiB header section"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_image_is_refused_at_open(tmp_path: Path, name: str) -> None:
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", "-o", "subformat=fixed,block_size=1M", str(reference(tmp_path / "r", SIZE, 1)),
            str(img))
    corrupt, message = CORRUPTIONS[name]
    corrupt(img)
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError, match=f"^VHDX image {img}: .*{message}"):
        open_disk(str(img))
    assert len(os.listdir("/proc/self/fd")) == fds, "the image's descriptors are closed"
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest, "nothing is written to a refused image"


def test_one_corrupt_header_or_region_table_is_survived(tmp_path: Path) -> None:
    ref = reference(tmp_path / "ref.raw", SIZE, seed=5)
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", str(ref), str(img))
    current = max((0, 1), key=lambda n: int(str(_header(img, n)["seq"])))
    _patch(img, HEADER_AT[current] + 200, b"x")
    _patch(img, REGION_AT[0] + 40, b"x")
    disk = open_disk(str(img))
    try:
        assert _read_all(disk) == ref.read_bytes()
    finally:
        disk.close()


@pytest.mark.parametrize("stop", ["after growing the file", "after writing the data"])
def test_an_allocation_cut_short_leaves_a_consistent_image(tmp_path: Path, stop: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # What a VMM killed in the middle of an allocation leaves: the file as it was at that step.
    ref = reference(tmp_path / "ref.raw", SIZE, seed=9)
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", "-o", "block_size=1M", str(ref), str(img))
    disk = open_disk(str(img))
    assert isinstance(disk, VhdxFile)
    disk.write([memoryview(bytes(512))], 0)  # the first write's header update happens here
    disk.write([memoryview(ref.read_bytes()[:512])], 0)
    empty = next(b for b in range(SIZE // MiB) if disk._present(b + b // disk.chunk_ratio) is None)

    def killed(*_: object) -> None:
        raise OSError(5, "killed")

    if stop == "after growing the file":
        monkeypatch.setattr(disk._data, "write", killed)
    else:
        monkeypatch.setattr(disk, "_pwrite", killed)
    with pytest.raises(OSError, match="killed"):
        disk.write([memoryview(b"\x77" * 4096)], empty * MiB + 8192)
    monkeypatch.undo()
    disk.close()
    assert "No errors were found" in qemu_ok("check", "-f", "vhdx", str(img))
    qemu_ok("compare", "-f", "raw", "-F", "vhdx", str(ref), str(img))
    again = open_disk(str(img))
    try:
        assert _read_all(again) == ref.read_bytes()
    finally:
        again.close()


def test_write_zeroes_and_discard(tmp_path: Path) -> None:
    ref = reference(tmp_path / "ref.raw", SIZE, seed=4)
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", "-o", "block_size=1M", str(ref), str(img))
    data = ref.read_bytes()
    present = next(o for o in range(0, SIZE, MiB) if any(data[o:o + MiB]))
    empty = next(o for o in range(0, SIZE, MiB) if not any(data[o:o + MiB]))
    size = img.stat().st_size
    disk = open_disk(str(img))
    try:
        disk.write_zeroes(present + 4096, 8192, unmap=False)
        disk.write_zeroes(present + 65536, 65536, unmap=True)
        disk.write_zeroes(empty, MiB, unmap=False)
        disk.discard(empty, MiB)
        disk.flush()
        out = bytearray(MiB)
        disk.read([memoryview(out)], present)
        assert out[4096:12288] == bytes(8192) and out[65536:131072] == bytes(65536)
    finally:
        disk.close()
    assert img.stat().st_size == size, "zeroing blocks that read as zeros allocates nothing"
    apply_to_raw(ref, [(present + 4096, bytes(8192)), (present + 65536, bytes(65536))])
    assert "No errors were found" in qemu_ok("check", "-f", "vhdx", str(img))
    qemu_ok("compare", "-f", "raw", "-F", "vhdx", str(ref), str(img))


def test_random_damage_to_metadata_gives_clean_errors(tmp_path: Path) -> None:
    # Bytes changed at random in the BAT and the metadata region (not covered by checksums):
    # the image is refused with a DeviceError at open, or serves requests (an OSError at worst).
    base = tmp_path / "base.vhdx"
    qemu_ok("convert", "-O", "vhdx", "-o", "block_size=1M", str(reference(tmp_path / "ref.raw", SIZE, 2)), str(base))
    targets = [_region(base, BAT), _region(base, "8B7CA206-4790-4B9A-B8FE-575F050F886E")]
    rng = random.Random(1)
    opened = refused = 0
    for _ in range(60):
        img = tmp_path / "fuzz.vhdx"
        shutil.copyfile(base, img)
        for _ in range(rng.randrange(1, 4)):
            start, _length = rng.choice(targets)
            spot = start + rng.choice([rng.randrange(0, 512), 65536 + rng.randrange(0, 64)])
            _patch(img, spot, bytes([rng.randrange(256)]))
        try:
            disk = open_disk(str(img))
        except DeviceError:
            refused += 1
            continue
        opened += 1
        meta_start, meta_length = targets[1]
        before = img.read_bytes()
        try:
            _read_all(disk)
            disk.write([memoryview(b"\x01" * 4096)], rng.randrange(0, disk.size - 4096) // 512 * 512)
        except OSError:
            pass
        finally:
            disk.close()
        after = img.read_bytes()
        for start, length in [(0, HEADER_AT[0]), (REGION_AT[0], 1 << 20), (meta_start, meta_length)]:
            assert after[start:start + length] == before[start:start + length], "no write into metadata"
    assert opened and refused


def test_4k_logical_sectors(tmp_path: Path) -> None:
    # qemu-img makes (and opens) 512-byte-sector images only; within one chunk the BAT is laid
    # out the same with 4 KiB sectors, so the image patched to say 4096 holds the same data.
    ref = reference(tmp_path / "ref.raw", SIZE, seed=8)
    img = tmp_path / "disk.vhdx"
    qemu_ok("convert", "-O", "vhdx", "-o", "block_size=1M", str(ref), str(img))
    _patch(img, _metadata_item(img, "8141BF1D-A96F-4709-BA47-F233A8FAAB5F"), (4096).to_bytes(4, "little"))
    disk = open_disk(str(img))
    try:
        assert isinstance(disk, VhdxFile) and disk.logical_sector_size == 4096
        assert disk.chunk_ratio == (1 << 23) * 4096 // MiB
        assert _read_all(disk) == ref.read_bytes()
        writes = scattered_writes(SIZE, seed=13)
        for offset, data in writes:
            disk.write(split_views(data), offset)
    finally:
        disk.close()
    apply_to_raw(ref, writes)
    again = open_disk(str(img))
    try:
        assert _read_all(again) == ref.read_bytes()
    finally:
        again.close()
