"""Qcow2File against qemu-img: images qemu-img made (v2 and v3, cluster sizes 512 B..2 MiB,
compressed, with raw and qcow2 backing files) read back as their raw reference; after random
writes, discards and write-zeroes mirrored onto the reference, ``qemu-img check`` is clean and
``qemu-img compare`` finds the image equal to the reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.unit.devices.storage.qcow2.qemu import (
    assert_same,
    check_clean,
    header_field,
    mirror_write,
    qcow2_from,
    qemu_img,
    random_raw,
    read_all,
)
from vmsh.devices.storage import open_disk
from vmsh.devices.storage.qcow2 import Qcow2File
from vmsh.devices.storage.qcow2 import image as image_module
from vmsh.devices.storage.qcow2 import refcounts as refcounts_module
from vmsh.devices.storage.qcow2.image import OFFSET_MASK

SIZE = 8 << 20
COMPAT = {"v2": "0.10", "v3": "1.1"}


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_reads_match_the_raw_reference(tmp_path: Path, version: str, cluster_size: int, compress: bool) -> None:
    rng = random.Random(f"{version}{cluster_size}{compress}")
    ref = random_raw(tmp_path / "ref.raw", SIZE, rng)
    image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=cluster_size, compat=COMPAT[version],
                       compress=compress)
    assert header_field(image, 4, ">I") == (2 if version == "v2" else 3)
    disk = open_disk(str(image), readonly=True)
    try:
        assert isinstance(disk, Qcow2File) and disk.size == SIZE
        assert read_all(disk, SIZE) == ref.read_bytes()
        want = ref.read_bytes()
        for _ in range(40):  # unaligned pieces spanning clusters, split over several buffers
            off = rng.randrange(0, SIZE // 512 - 64) * 512
            bufs = [bytearray(rng.randrange(1, 9) * 512) for _ in range(rng.randrange(1, 4))]
            disk.read([memoryview(b) for b in bufs], off)
            got = b"".join(bufs)
            assert got == want[off:off + len(got)]
    finally:
        disk.close()


def _exercise(disk: Qcow2File, ref: Path, rng: random.Random, *, ops: int, v2_backing: bool) -> None:
    """Random writes, discards and write-zeroes on ``disk``, mirrored onto ``ref``.

    Discard frees whole clusters, which then read as zeros (v3, or no backing file); on a v2 image
    over a backing file it does nothing (the format cannot say "zeros here").
    """
    size, cs = disk.size, disk.cs
    for i in range(ops):
        op = rng.random()
        n = rng.choice([512, 4096, cs, 3 * cs + 1024, 70000 // 512 * 512])
        n = min(n, size)
        off = rng.randrange(0, (size - n) // 512 + 1) * 512
        if op < 0.6:
            data = rng.randbytes(n)
            cut = rng.randrange(0, n + 1)
            disk.write([memoryview(data)[:cut], memoryview(data)[cut:]], off)
            mirror_write(ref, off, data)
        elif op < 0.8:
            disk.write_zeroes(off, n, unmap=rng.random() < 0.5)
            mirror_write(ref, off, bytes(n))
        else:
            disk.discard(off, n)
            if not v2_backing:
                lo = -(-off // cs) * cs
                hi = (off + n) // cs * cs
                if hi > lo:
                    mirror_write(ref, lo, bytes(hi - lo))
        if i % 17 == 0:
            disk.flush()


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("cluster_size", [512, 65536])
@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("tiny_caches", [False, True], ids=["default-caches", "tiny-caches"])
def test_random_writes_agree_with_qemu_img(tmp_path: Path, version: str, cluster_size: int,
                                           backing: str | None, tiny_caches: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if tiny_caches:  # two tables per cache: evictions write tables back in mid-request
        monkeypatch.setattr(image_module, "L2_CACHE_BYTES", 0)
        monkeypatch.setattr(refcounts_module, "CACHE_BYTES", 0)
    rng = random.Random(f"w{version}{cluster_size}{backing}")
    ref = random_raw(tmp_path / "ref.raw", SIZE, rng)
    if backing is None:
        image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=cluster_size, compat=COMPAT[version])
    else:
        base = random_raw(tmp_path / "base.raw", SIZE, rng, pieces=20)
        if backing == "qcow2":
            base = qcow2_from(base, tmp_path / "base.qcow2", cluster_size=4096, compat="1.1")
        image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=cluster_size, compat=COMPAT[version],
                           backing=base, backing_fmt=backing)
        assert header_field(image, 8, ">Q"), "the image has a backing file"
    disk = Qcow2File(str(image), readonly=False)
    try:
        assert read_all(disk, SIZE) == ref.read_bytes()
        _exercise(disk, ref, rng, ops=150, v2_backing=version == "v2" and backing is not None)
        assert read_all(disk, SIZE) == ref.read_bytes()
    finally:
        disk.close()
    check_clean(image)
    assert_same(image, ref)


def test_writes_over_compressed_clusters(tmp_path: Path) -> None:
    rng = random.Random("compressed")
    ref = random_raw(tmp_path / "ref.raw", SIZE, rng, pieces=40)
    image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=65536, compat="1.1", compress=True)
    disk = Qcow2File(str(image), readonly=False)
    try:
        _exercise(disk, ref, rng, ops=80, v2_backing=False)
    finally:
        disk.close()
    check_clean(image)
    assert_same(image, ref)


def test_refcount_table_grows_and_qemu_reads_it(tmp_path: Path) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB of the file; 24 MiB of data
    needs a larger table, moved past everything in use."""
    size = 32 << 20
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, str(size))
    ref = tmp_path / "ref.raw"
    with open(ref, "wb") as f:
        f.truncate(size)
    old_table = header_field(image, 48, ">Q")
    rng = random.Random("grow")
    disk = Qcow2File(str(image), readonly=False)
    try:
        for off in range(0, 24 << 20, 1 << 20):
            data = rng.randbytes(1 << 20)
            disk.write([memoryview(data)], off)
            mirror_write(ref, off, data)
        disk.flush()
    finally:
        disk.close()
    assert header_field(image, 48, ">Q") != old_table
    assert header_field(image, 56, ">I") > 1
    check_clean(image)
    assert_same(image, ref)


def test_internal_snapshot_is_preserved(tmp_path: Path) -> None:
    """Clusters and L2 tables shared with an internal snapshot are copied on write."""
    rng = random.Random("snap")
    ref = random_raw(tmp_path / "ref.raw", SIZE, rng, pieces=30)
    image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=4096, compat="1.1")
    qemu_img("snapshot", "-c", "before", image)
    original = ref.read_bytes()
    disk = Qcow2File(str(image), readonly=False)
    try:
        _exercise(disk, ref, rng, ops=80, v2_backing=False)
    finally:
        disk.close()
    check_clean(image)
    assert_same(image, ref)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=before", image, snap)
    assert snap.read_bytes() == original


def test_relative_backing_chain_read_only(tmp_path: Path) -> None:
    """A chain qcow2 -> qcow2 -> raw, relative names resolved against each image's directory; the
    backing files are opened read-only and never written."""
    rng = random.Random("chain")
    (tmp_path / "lower").mkdir()
    base = random_raw(tmp_path / "lower" / "base.raw", SIZE, rng)
    mid = tmp_path / "lower" / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, cwd=tmp_path / "lower")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "lower/mid.qcow2", "-F", "qcow2", top, cwd=tmp_path)
    before = (base.read_bytes(), mid.read_bytes())
    ref = tmp_path / "ref.raw"
    ref.write_bytes(base.read_bytes())
    disk = Qcow2File(str(top), readonly=False)
    try:
        _exercise(disk, ref, rng, ops=60, v2_backing=False)
        assert read_all(disk, SIZE) == ref.read_bytes()
    finally:
        disk.close()
    assert (base.read_bytes(), mid.read_bytes()) == before
    check_clean(top)
    assert_same(top, ref)


def test_backing_file_shorter_than_the_image_reads_zeros_past_its_end(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xaa" * 6000)  # not even whole sectors
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "1M", cwd=tmp_path)
    disk = Qcow2File(str(top), readonly=True)
    try:
        data = read_all(disk, 1 << 20)
    finally:
        disk.close()
    assert data[:5632] == b"\xaa" * 5632 and data[5632:] == bytes(len(data) - 5632)


def test_empty_disk(tmp_path: Path) -> None:
    image = tmp_path / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "0")
    disk = open_disk(str(image))
    try:
        assert disk.size == 0
        disk.flush()
    finally:
        disk.close()
    check_clean(image)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_write_zeroes_without_unmap_keeps_the_clusters(tmp_path: Path, version: str) -> None:
    """virtio-blk's write-zeroes without UNMAP must not deallocate; with it, the clusters are freed."""
    rng = random.Random(version)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(rng.randbytes(1 << 20))
    image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=4096, compat=COMPAT[version])
    disk = Qcow2File(str(image), readonly=False)
    try:
        hosts = [disk._entry(off)[2] & OFFSET_MASK for off in range(0, 1 << 20, 4096)]
        assert all(hosts)
        disk.write_zeroes(0, 64 << 10, unmap=False)
        disk.write_zeroes(64 << 10, 64 << 10, unmap=True)
        kept = [disk._entry(off)[2] & OFFSET_MASK for off in range(0, 128 << 10, 4096)]
        assert kept[:16] == hosts[:16], "write-zeroes without unmap keeps the allocation"
        assert kept[16:] == [0] * 16, "write-zeroes with unmap frees it"
        disk.write([memoryview(b"\x42" * 512)], 4096 + 512)  # into a kept zero cluster: in place
        assert disk._entry(4096)[2] & OFFSET_MASK == hosts[1]
    finally:
        disk.close()
    mirror_write(ref, 0, bytes(128 << 10))
    mirror_write(ref, 4096 + 512, b"\x42" * 512)
    check_clean(image)
    assert_same(image, ref)
