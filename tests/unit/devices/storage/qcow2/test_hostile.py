"""Corrupt and hostile qcow2 images: a clear DeviceError at open, or EIO for the request that meets
the damage — never a crash, a leaked descriptor, or guest data written into the image's metadata."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.devices.storage.qcow2.qemu import header_field, poke, qcow2_from, qemu_img, random_raw
from vmsh.devices.storage import open_disk
from vmsh.devices.storage.qcow2 import Qcow2File
from vmsh.devices.storage.qcow2.image import COMPRESSED, COPIED
from vmsh.errors import DeviceError

CS = 65536
SIZE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A v3 image, 64 KiB clusters, data in its first clusters (so L1[0] has an L2 table)."""
    ref = tmp_path / "ref.raw"
    with open(ref, "wb") as f:
        f.truncate(SIZE)
        f.write(random.Random(1).randbytes(4 * CS))
    return qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=CS, compat="1.1")


def l1_offset(image: Path) -> int:
    return header_field(image, 40, ">Q")


def l2_offset(image: Path) -> int:
    return header_field(image, l1_offset(image), ">Q") & 0x00FF_FFFF_FFFF_FE00


def reftable_offset(image: Path) -> int:
    return header_field(image, 48, ">Q")


def refblock_offset(image: Path) -> int:
    return header_field(image, reftable_offset(image), ">Q")


def refused(path: Path, match: str, *, readonly: bool = False) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError, match=match):
        open_disk(str(path), readonly=readonly)
    assert len(os.listdir("/proc/self/fd")) == fds, "descriptors are closed"


# -- refused at open --------------------------------------------------------------------------

HEADER_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("version", lambda p: poke(p, 4, ">I", 4), "version 4 is not served"),
    ("cluster_bits", lambda p: poke(p, 20, ">I", 30), "cluster_bits 30 out of range"),
    ("huge size", lambda p: poke(p, 24, ">Q", 1 << 62), "virtual size .* too large"),
    ("size beyond L1", lambda p: poke(p, 24, ">Q", 1 << 40), "L1 table of 1 entries too small"),
    ("huge L1", lambda p: (poke(p, 36, ">I", 1 << 30)), "L1 table of .* entries too large"),
    ("L1 past the end", lambda p: poke(p, 40, ">Q", 1 << 40), "L1 table at .* past the end"),
    ("L1 misaligned", lambda p: poke(p, 40, ">Q", l1_offset(p) + 512), "L1 table offset .* not cluster-aligned"),
    ("L1 on the refcount table", lambda p: poke(p, 40, ">Q", reftable_offset(p)), "overlaps other metadata"),
    ("reftable huge", lambda p: poke(p, 56, ">I", 1 << 28), "refcount table of .* clusters invalid"),
    ("reftable misaligned", lambda p: poke(p, 48, ">Q", reftable_offset(p) + 8), "not cluster-aligned"),
    ("refblock past the end", lambda p: poke(p, reftable_offset(p), ">Q", 1 << 40), "refcount block 0 .* past the end"),
    ("refblock on the L1 table", lambda p: poke(p, reftable_offset(p), ">Q", l1_offset(p)), "overlaps other metadata"),
    ("refblock misaligned", lambda p: poke(p, reftable_offset(p), ">Q", refblock_offset(p) + 512), "misaligned"),
    ("L2 past the end", lambda p: poke(p, l1_offset(p), ">Q", COPIED | 1 << 40), "L2 table at .* past the end"),
    ("L2 on the header", lambda p: poke(p, l1_offset(p), ">Q", COPIED | 0), "^$never"),  # 0 = unallocated
    ("L2 on the refcount block", lambda p: poke(p, l1_offset(p), ">Q", COPIED | refblock_offset(p)),
     "overlaps other metadata"),
    ("L2 misaligned", lambda p: poke(p, l1_offset(p), ">Q", COPIED | (l2_offset(p) + 512)), "is invalid"),
    ("L1 reserved bits", lambda p: poke(p, l1_offset(p), ">Q", COPIED | 1 << 60 | l2_offset(p)), "is invalid"),
    ("refcount order", lambda p: poke(p, 96, ">I", 7), "refcount_order 7 out of range"),
    ("encryption method", lambda p: poke(p, 32, ">I", 1), "encryption"),
    ("unknown incompatible", lambda p: poke(p, 72, ">Q", 1 << 20), "unknown incompatible feature bits 0x100000"),
    ("unknown autoclear", lambda p: poke(p, 88, ">Q", 1 << 7), "unknown autoclear feature bits 0x80"),
    ("dirty", lambda p: poke(p, 72, ">Q", 1), "marked dirty"),
    ("corrupt", lambda p: poke(p, 72, ">Q", 2), "marked corrupt"),
    ("magic only", lambda p: p.write_bytes(b"QFI\xfb\x00\x00\x00\x03"), "header truncated"),
]


@pytest.mark.parametrize("name, damage, match", [c for c in HEADER_CASES if c[0] != "L2 on the header"],
                         ids=[c[0] for c in HEADER_CASES if c[0] != "L2 on the header"])
def test_damaged_header_and_tables_are_refused(image: Path, name: str, damage: Callable[[Path], None],
                                               match: str) -> None:
    damage(image)
    refused(image, match)


@pytest.mark.parametrize("bit, word", [(0, "dirty"), (1, "corrupt")])
def test_dirty_or_corrupt_image_still_opens_read_only(image: Path, bit: int, word: str) -> None:
    poke(image, 72, ">Q", 1 << bit)
    refused(image, f"marked {word}")
    open_disk(str(image), readonly=True).close()


@pytest.mark.parametrize("opts, match", [
    (["-o", "extended_l2=on"], "incompatible feature 'extended L2 entries' is not supported"),
    (["-o", "data_file=data.raw"], "incompatible feature 'external data file' is not supported"),
    (["-o", "compression_type=zstd"], "compression type 'zstd' is not supported"),
    (["--object", "secret,id=sec0,data=123456", "-o",
      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"], "encryption"),
], ids=["extended_l2", "data_file", "zstd", "luks"])
def test_features_not_served_are_refused_by_name(tmp_path: Path, opts: list[str], match: str) -> None:
    image = tmp_path / "disk.qcow2"
    for _ in range(10):
        # LUKS key derivation benchmarks the CPU and, on a busy host, fails now and then with
        # "Unable to get accurate CPU usage": try again.
        result = qemu_img("create", "-q", "-f", "qcow2", *opts, image, "1M", cwd=tmp_path, check=False)
        if result.returncode == 0:
            break
        assert "CPU usage" in result.stderr, result.stderr
    else:
        pytest.fail(f"qemu-img could not create the image: {result.stderr}")
    refused(image, match)


@pytest.mark.parametrize("chain", [["a"], ["a", "b"], ["a", "b", "c"]], ids=["self", "two", "three"])
def test_backing_loops_are_refused(tmp_path: Path, chain: list[str]) -> None:
    for i, name in enumerate(chain):
        nxt = chain[(i + 1) % len(chain)]
        # "./": qemu-img refuses a backing name equal to the image's own; the loop is by file identity
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"./{nxt}.qcow2", "-F", "qcow2", f"{name}.qcow2", "1M",
                 cwd=tmp_path)
    refused(tmp_path / "a.qcow2", "backing file loop")


def test_missing_backing_file_is_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", "a.qcow2", "1M", cwd=tmp_path)
    refused(tmp_path / "a.qcow2", "cannot open backing file .*gone.raw")


# -- EIO for the request ----------------------------------------------------------------------

def _set_l2(image: Path, index: int, entry: int) -> None:
    poke(image, l2_offset(image) + 8 * index, ">Q", entry)


@pytest.mark.parametrize("entry, target", [
    (lambda p: COPIED | 1 << 40, None),
    (lambda p: COPIED | reftable_offset(p), "reftable"),
    (lambda p: COPIED | refblock_offset(p), "refblock"),
    (lambda p: COPIED | l1_offset(p), "l1"),
    (lambda p: COPIED | l2_offset(p), "l2"),
    (lambda p: COPIED | (l2_offset(p) + CS + 512), None),  # misaligned
    (lambda p: COPIED | 1 << 4 | (l2_offset(p) + CS), None),  # reserved bits
    (lambda p: COMPRESSED | (1 << 40), None),
    (lambda p: COMPRESSED | reftable_offset(p), None),
], ids=["past-end", "into-reftable", "into-refblock", "into-L1", "into-L2", "misaligned", "reserved",
        "compressed-past-end", "compressed-into-reftable"])
def test_bad_l2_entry_fails_that_request_only(image: Path, entry: Callable[[Path], int], target: str | None) -> None:
    _set_l2(image, 1, entry(image))
    before = image.read_bytes()
    disk = Qcow2File(str(image), readonly=False)
    try:
        buf = bytearray(4096)
        with pytest.raises(OSError) as info:
            disk.read([memoryview(buf)], CS)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            disk.write([memoryview(b"\xee" * 4096)], CS)
        assert info.value.errno == errno.EIO
        disk.read([memoryview(buf)], 0)  # the rest of the image still works
        disk.read([memoryview(buf)], 2 * CS)
        disk.write([memoryview(b"\x55" * 4096)], 2 * CS)
        disk.flush()
    finally:
        disk.close()
    after = image.read_bytes()
    meta = {"reftable": reftable_offset(image), "refblock": refblock_offset(image), "l1": l1_offset(image),
            "l2": l2_offset(image)}
    for name, off in meta.items():
        if name not in ("refblock", "l2"):  # those change legitimately (the write to cluster 2 is in place)
            assert after[off:off + CS] == before[off:off + CS], f"{name} untouched"
    assert b"\xee" * 4096 not in after, "the refused write reached no cluster"


def test_refcount_underflow_is_an_io_error(image: Path) -> None:
    """A data cluster whose refcount is 0: freeing it is an I/O error, not a negative count."""
    data = header_field(image, l2_offset(image) + 8, ">Q") & 0x00FF_FFFF_FFFF_FE00
    poke(image, refblock_offset(image) + 2 * (data // CS), ">H", 0)
    disk = Qcow2File(str(image), readonly=False)
    try:
        disk.discard(CS, CS)
        with pytest.raises(OSError) as info:
            disk.flush()
        assert info.value.errno == errno.EIO
    finally:
        disk.close()


def test_freed_cluster_of_refcount_zero_is_never_reallocated_over_metadata(image: Path) -> None:
    """The refcount block claims the L1 table's cluster is free; new data goes elsewhere."""
    l1 = l1_offset(image)
    poke(image, refblock_offset(image) + 2 * (l1 // CS), ">H", 0)
    before = image.read_bytes()[l1:l1 + 8]
    disk = Qcow2File(str(image), readonly=False)
    try:
        for off in range(8 * CS, 16 * CS, CS):
            disk.write([memoryview(b"\x77" * CS)], off)
        disk.flush()
    finally:
        disk.close()
    assert image.read_bytes()[l1:l1 + 8] == before


@pytest.mark.parametrize("refcount_bits", [1, 2, 8, 64])
def test_refcount_widths(tmp_path: Path, refcount_bits: int) -> None:
    rng = random.Random(refcount_bits)
    ref = random_raw(tmp_path / "ref.raw", SIZE, rng)
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size=4096,refcount_bits={refcount_bits}", ref,
             image)
    disk = Qcow2File(str(image), readonly=False)
    try:
        for _ in range(60):
            off = rng.randrange(0, SIZE // 512 - 32) * 512
            data = rng.randbytes(rng.randrange(1, 32) * 512)
            disk.write([memoryview(data)], off)
            with open(ref, "r+b") as f:
                f.seek(off)
                f.write(data)
            if rng.random() < 0.2:
                disk.discard(off // 4096 * 4096, 8192)  # two whole clusters: read back as zeros
                with open(ref, "r+b") as f:
                    f.seek(off // 4096 * 4096)
                    f.write(bytes(8192))
    finally:
        disk.close()
    assert qemu_img("check", image, check=False).returncode == 0
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", image, ref, check=False).returncode == 0


def test_snapshot_table_on_the_l1_table_is_refused(image: Path) -> None:
    qemu_img("snapshot", "-c", "s1", image)
    poke(image, 64, ">Q", l1_offset(image))  # snapshots_offset
    refused(image, "snapshot table overlaps other metadata")


def test_snapshot_l1_on_the_refcount_table_is_refused(image: Path) -> None:
    qemu_img("snapshot", "-c", "s1", image)
    poke(image, header_field(image, 64, ">Q"), ">Q", reftable_offset(image))  # the snapshot's l1_table_offset
    refused(image, "snapshot L1 table overlaps other metadata")
