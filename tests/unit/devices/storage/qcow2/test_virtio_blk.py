"""virtio-blk over a qcow2 image, through the PCI transport and a driver's virtqueue: requests of
every type reach Qcow2File, qemu-img agrees with the result, and a corrupt table is an I/O error
for that request while the device keeps serving the others."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from tests.unit.devices.storage.qcow2.qemu import (
    assert_same,
    check_clean,
    header_field,
    mirror_write,
    poke,
    qcow2_from,
    qemu_img,
    random_raw,
)
from tests.unit.devices.virtio.driver import Allocator, FakeRouter
from tests.unit.devices.virtio.test_block import Disk
from vmsh.devices.storage.qcow2 import Qcow2File
from vmsh.devices.virtio.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
)
from vmsh.devices.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET
from vmsh.engine.memory import GuestMemoryMmap

SIZE = 4 << 20
CS = 4096
@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random("blk")
    ref = random_raw(tmp_path / "ref.raw", SIZE, rng, pieces=20)
    base = tmp_path / "base.raw"
    base.write_bytes(ref.read_bytes())
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", "-b", base.name, "-F", "raw", image,
             cwd=tmp_path)
    return image, ref


def test_requests_reach_the_qcow2_image(files: tuple[Path, Path], mem: GuestMemoryMmap, alloc: Allocator,
                                        router: FakeRouter) -> None:
    image, ref = files
    blk = VirtioBlock(str(image))
    assert isinstance(blk.disk, Qcow2File) and blk.capacity == SIZE // 512
    disk = Disk(blk, mem, alloc, router)
    rng = random.Random("requests")
    try:
        status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=100, in_len=8192, split=3)
        assert status == VIRTIO_BLK_S_OK and data == ref.read_bytes()[100 * 512:100 * 512 + 8192]
        for _ in range(30):
            sector = rng.randrange(0, SIZE // 512 - 64)
            out = rng.randbytes(rng.randrange(1, 64) * 512)
            assert disk.request(VIRTIO_BLK_T_OUT, sector=sector, out=out, split=rng.randrange(0, 4))[0] == \
                VIRTIO_BLK_S_OK
            mirror_write(ref, sector * 512, out)
        assert disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 24, 40, 0))[0] == VIRTIO_BLK_S_OK
        mirror_write(ref, 24 * 512, bytes(40 * 512))
        # discard: whole 4 KiB clusters over a backing file read as zeros (v3 zero clusters)
        assert disk.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 800, 64, 0))[0] == VIRTIO_BLK_S_OK
        mirror_write(ref, 800 * 512, bytes(64 * 512))
        assert disk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=0, in_len=SIZE // 4)
        assert status == VIRTIO_BLK_S_OK and data == ref.read_bytes()[:SIZE // 4]
        check_clean(image)  # after the guest's flush, with the device still open
        assert_same(image, ref)
    finally:
        disk.pci.close()
    check_clean(image)
    assert_same(image, ref)


def test_corrupt_l2_entry_fails_one_request(tmp_path: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                            router: FakeRouter) -> None:
    ref = tmp_path / "ref.raw"
    with open(ref, "wb") as f:
        f.truncate(SIZE)
        f.write(random.Random(3).randbytes(4 * CS))
    image = qcow2_from(ref, tmp_path / "disk.qcow2", cluster_size=CS, compat="1.1")
    l2 = header_field(image, header_field(image, 40, ">Q"), ">Q") & 0x00FF_FFFF_FFFF_FE00
    poke(image, l2 + 8, ">Q", 1 << 63 | header_field(image, 48, ">Q"))  # cluster 1 -> the refcount table
    before = image.read_bytes()
    disk = Disk(VirtioBlock(str(image)), mem, alloc, router)
    try:
        assert disk.request(VIRTIO_BLK_T_IN, sector=CS // 512, in_len=512)[0] == VIRTIO_BLK_S_IOERR
        assert disk.request(VIRTIO_BLK_T_OUT, sector=CS // 512, out=b"\xee" * 512)[0] == VIRTIO_BLK_S_IOERR
        status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=0, in_len=512)
        assert status == VIRTIO_BLK_S_OK and data == ref.read_bytes()[:512]
        assert not disk.driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
        assert disk.blk.counters()["errors"] >= 2
    finally:
        disk.pci.close()
    assert image.read_bytes() == before, "nothing was written: the refused write, and no metadata"
