"""virtio-blk: every request type against a backing file, through the PCI transport."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.devices.storage.fakes import FakeKernel, LoopWatcher
from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver, Ring
from vmsh.config.model import DiskConfig
from vmsh.devices.storage import aio, raw, uring
from vmsh.devices.virtio import block, block_fast
from vmsh.devices.virtio.block import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
)
from vmsh.devices.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET
from vmsh.devices.virtio.pci import COMMON_DEVICE_STATUS, VirtioPciDevice
from vmsh.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import DeviceError, DeviceStateError
from vmsh.guest_memory import GuestMemory

DISK_SIZE = 1 << 20  # 2048 sectors


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True, params=["native", "python"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test with the native request path (``block_fast``) for synchronous raw images, and without."""
    monkeypatch.setattr(block_fast, "ENABLED", request.param == "native")
    return bool(request.param == "native")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


class Disk:
    """A probed disk: the driver, its ring, and a request helper."""

    def __init__(self, blk: VirtioBlock, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter,
                 watcher: LoopWatcher | None = None, *, device_memory: GuestMemory | None = None,
                 **probe: object) -> None:
        """``device_memory``: what the device reaches RAM through (default ``mem``; a
        ``TranslatedMemory`` for a disk behind the virtio-iommu)."""
        self.blk, self.mem, self.alloc = blk, mem, alloc
        self.watcher = watcher
        self.pci = VirtioPciDevice(blk, device_memory if device_memory is not None else mem, router)
        self.driver = PciDriver(self.pci, mem, alloc)
        self.rings = self.driver.probe(**probe)  # type: ignore[arg-type]  # probe options of mixed types

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *, queue: int = 0,
                indirect: bool = False, split: int = 0) -> tuple[int, bytes, int]:
        """Submit one request; returns (status, data read, used length)."""
        ring: Ring = self.rings[queue]
        hdr = self.alloc.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(hdr, 16, False)]
        if out:
            addr = self.alloc.alloc(len(out), 512)
            self.mem.write(addr, out)
            bufs += self._split(addr, len(out), False, split)
        data = self.alloc.alloc(in_len, 512) if in_len else 0
        if in_len:
            bufs += self._split(data, in_len, True, split)
        status = self.alloc.alloc(1)
        self.mem.write(status, b"\xee")
        bufs.append((status, 1, True))
        head = ring.add(bufs, alloc=self.alloc, indirect=indirect)
        self.driver.kick(queue)
        used = ring.take_used()
        while not used and self.watcher is not None and self.watcher.run():
            used = ring.take_used()  # an asynchronous request that did not complete inline
        assert [h for h, _ in used] == [head]
        return self.mem.read(status, 1)[0], self.mem.read(data, in_len) if in_len else b"", used[0][1]

    @staticmethod
    def _split(addr: int, length: int, write: bool, parts: int) -> list[tuple[int, int, bool]]:
        if parts <= 1:
            return [(addr, length, write)]
        step = length // parts
        cuts = [i * step for i in range(parts)] + [length]
        return [(addr + a, b - a, write) for a, b in itertools.pairwise(cuts)]


#: how requests reach the image: --disk _disable_io_uring / _disable_aio, or no I/O loop at all
BACKENDS = {
    "io_uring": {},
    "aio": {"disable_io_uring": True},
    "sync": {"disable_io_uring": True, "disable_aio": True},
}


@pytest.fixture(params=["io_uring", "aio", "sync", "no-loop"])
def disk(request: pytest.FixtureRequest, image: Path, mem: GuestMemoryMmap, alloc: Allocator,
         router: FakeRouter) -> Iterator[Disk]:
    watcher = None if request.param == "no-loop" else LoopWatcher()
    blk = VirtioBlock(str(image), serial="vmsh-disk-0", watcher=watcher, **BACKENDS.get(request.param, {}))
    assert blk.io_backend == ("sync" if request.param == "no-loop" else request.param)
    assert (blk._fast is not None) == (blk.io_backend == "sync" and block_fast.ENABLED)
    d = Disk(blk, mem, alloc, router, watcher)
    yield d
    d.pci.close()


def test_block_config_and_features(disk: Disk, image: Path) -> None:
    assert disk.driver.device_config(0, 8) == DISK_SIZE // 512
    assert disk.driver.device_config(12, 4) == 126  # seg_max
    assert disk.driver.device_config(20, 4) == 512  # blk_size
    assert disk.driver.device_config(34, 2) == 1  # num_queues
    f = disk.blk.avail_features
    assert f >> VIRTIO_BLK_F_FLUSH & 1 and f >> VIRTIO_BLK_F_DISCARD & 1 and f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert not f >> VIRTIO_BLK_F_RO & 1 and not f >> VIRTIO_BLK_F_MQ & 1
    assert disk.pci.config.read(0x08, 4) == bytes([1, 0x00, 0x80, 0x01])  # mass storage, other
    assert disk.pci.config.read(0x00, 4) == struct.pack("<HH", 0x1AF4, 0x1042)


def test_block_read(disk: Disk, image: Path) -> None:
    status, data, used = disk.request(VIRTIO_BLK_T_IN, 8, in_len=4096)
    assert status == VIRTIO_BLK_S_OK and used == 4097
    if disk.blk._fast is not None:
        assert disk.blk._fast.ops == 1  # served natively
    assert sha(data) == sha(image.read_bytes()[8 * 512:8 * 512 + 4096])
    assert disk.blk.counters()["read_bytes"] == 4096 and disk.blk.counters()["read_ops"] == 1


@pytest.mark.parametrize("indirect,split", [(False, 3), (True, 1), (True, 8)])
def test_block_write_scattered(disk: Disk, image: Path, indirect: bool, split: int) -> None:
    payload = os.urandom(8192)
    status, _, used = disk.request(VIRTIO_BLK_T_OUT, 100, out=payload, indirect=indirect, split=split)
    assert status == VIRTIO_BLK_S_OK and used == 1
    assert sha(image.read_bytes()[100 * 512:100 * 512 + 8192]) == sha(payload)
    status, data, _ = disk.request(VIRTIO_BLK_T_IN, 100, in_len=8192, indirect=indirect, split=split)
    assert status == VIRTIO_BLK_S_OK and data == payload
    assert disk.blk.counters()["write_bytes"] == 8192


def test_block_last_sector_and_out_of_range(disk: Disk, image: Path) -> None:
    last = DISK_SIZE // 512 - 1
    assert disk.request(VIRTIO_BLK_T_IN, last, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert disk.request(VIRTIO_BLK_T_IN, last, in_len=1024)[0] == VIRTIO_BLK_S_IOERR
    assert disk.request(VIRTIO_BLK_T_OUT, last + 1, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert disk.request(VIRTIO_BLK_T_IN, (1 << 64) - 1, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert disk.request(VIRTIO_BLK_T_IN, 0, in_len=100)[0] == VIRTIO_BLK_S_IOERR  # not whole sectors
    assert len(image.read_bytes()) == DISK_SIZE
    assert disk.blk.counters()["errors"] == 4


def test_block_flush(disk: Disk) -> None:
    assert disk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert disk.blk.counters()["flush_ops"] == 1


def test_block_get_id(disk: Disk) -> None:
    status, data, used = disk.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == VIRTIO_BLK_S_OK and data == b"vmsh-disk-0".ljust(20, b"\0") and used == 21


def test_block_get_id_default_serial(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
    d = Disk(VirtioBlock(str(image)), mem, alloc, router)
    st = image.stat()
    _, data, _ = d.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert data.rstrip(b"\0") == f"{st.st_dev}{st.st_rdev}{st.st_ino}".encode()[:20]
    d.pci.close()


def test_block_unsupported_type(disk: Disk) -> None:
    assert disk.request(10, in_len=16)[0] == VIRTIO_BLK_S_UNSUPP  # GET_LIFETIME
    assert disk.request(0x1234)[0] == VIRTIO_BLK_S_UNSUPP


def test_block_write_zeroes(disk: Disk, image: Path) -> None:
    seg = struct.pack("<QII", 10, 4, 0)
    assert disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_OK
    content = image.read_bytes()
    assert content[10 * 512:14 * 512] == bytes(2048) and content[9 * 512:10 * 512] != bytes(512)
    seg = struct.pack("<QII", 20, 8, 1)  # unmap allowed
    assert disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes()[20 * 512:28 * 512] == bytes(4096)
    assert len(image.read_bytes()) == DISK_SIZE
    assert disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 2047, 2, 0))[0] == VIRTIO_BLK_S_IOERR
    assert disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 1, 2))[0] == VIRTIO_BLK_S_UNSUPP


def test_block_discard(disk: Disk, image: Path) -> None:
    seg = struct.pack("<QII", 0, 16, 0)
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=seg)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes()[:8192] == bytes(8192)  # ext4 and tmpfs punch holes
    assert len(image.read_bytes()) == DISK_SIZE
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 1, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=seg * 2)[0] == VIRTIO_BLK_S_UNSUPP  # max_discard_seg 1
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=b"short")[0] == VIRTIO_BLK_S_UNSUPP
    assert disk.blk.counters()["discard_ops"] == 1


def test_block_readonly(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
    before = image.read_bytes()
    d = Disk(VirtioBlock.from_config(DiskConfig(path=str(image), readonly=True)), mem, alloc, router)
    assert d.blk.avail_features >> VIRTIO_BLK_F_RO & 1
    assert not d.blk.avail_features >> VIRTIO_BLK_F_DISCARD & 1
    assert d.request(VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 1, 0))[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 1, 0))[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert d.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes() == before
    d.pci.close()


@pytest.mark.parametrize("backend", ["io_uring", "aio", "no-loop"])
def test_block_direct(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter, backend: str) -> None:
    watcher = None if backend == "no-loop" else LoopWatcher()
    try:
        blk = VirtioBlock(str(image), direct=True, watcher=watcher, **BACKENDS.get(backend, {}))
    except DeviceError:
        pytest.skip("the file system of tmp_path has no O_DIRECT")
    assert blk.io_backend == ("sync" if backend == "no-loop" else backend)
    d = Disk(blk, mem, alloc, router, watcher)
    payload = os.urandom(4096)
    assert d.request(VIRTIO_BLK_T_OUT, 16, out=payload)[0] == VIRTIO_BLK_S_OK  # aligned: direct
    assert d.request(VIRTIO_BLK_T_OUT, 24, out=payload, split=7)[0] == VIRTIO_BLK_S_OK  # misaligned: bounce
    content = image.read_bytes()
    assert content[16 * 512:16 * 512 + 4096] == payload and content[24 * 512:24 * 512 + 4096] == payload
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 24, in_len=4096, split=3)
    assert status == VIRTIO_BLK_S_OK and data == payload
    if backend != "no-loop":
        # the aligned write went to the kernel queue; the split ones took the bounce path
        assert d.blk.counters()[f"{backend}_ops"] == 1
    d.pci.close()


def test_block_multi_queue(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
    d = Disk(VirtioBlock(str(image), num_queues=2, queue_size=64), mem, alloc, router)
    assert d.blk.avail_features >> VIRTIO_BLK_F_MQ & 1
    assert d.driver.device_config(34, 2) == 2 and len(d.rings) == 2 and d.rings[1].size == 64
    payload = os.urandom(1024)
    assert d.request(VIRTIO_BLK_T_OUT, 4, out=payload, queue=1)[0] == VIRTIO_BLK_S_OK
    assert d.request(VIRTIO_BLK_T_IN, 4, in_len=1024, queue=0)[1] == payload
    assert router.fired.count(1) == 1 and router.fired.count(2) == 1  # one vector per queue
    d.pci.close()


def test_block_malformed_requests_complete(disk: Disk) -> None:
    ring = disk.rings[0]
    # no status byte at all: returned with length 0
    hdr = disk.alloc.alloc(16)
    head = ring.add([(hdr, 16, False)])
    disk.driver.kick(0)
    assert ring.take_used() == [(head, 0)]
    # a header shorter than 16 bytes: IOERR
    status = disk.alloc.alloc(1)
    head = ring.add([(hdr, 8, False), (status, 1, True)])
    disk.driver.kick(0)
    assert ring.take_used() == [(head, 1)] and disk.mem.read(status, 1)[0] == VIRTIO_BLK_S_IOERR
    assert not disk.driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_block_hostile_chain_needs_reset(disk: Disk) -> None:
    ring = disk.rings[0]
    hdr = disk.alloc.alloc(16)
    ring.write_desc(0, hdr, 16, VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, hdr, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)
    ring.publish(0)
    disk.driver.kick(0)
    assert disk.driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_block_bad_image() -> None:
    with pytest.raises(DeviceError):
        VirtioBlock("/nonexistent/disk.raw")
    with pytest.raises(DeviceError):
        VirtioBlock.from_config(DiskConfig())


def test_block_state_round_trip(disk: Disk, image: Path, mem: GuestMemoryMmap) -> None:
    payload = os.urandom(512)
    disk.request(VIRTIO_BLK_T_OUT, 1, out=payload)
    state = disk.pci.state()
    assert state.device.write_ops == 1
    router2 = FakeRouter()
    clone = VirtioPciDevice(VirtioBlock(str(image), serial="vmsh-disk-0"), mem, router2)
    clone.restore(state)
    assert clone.state() == state
    disk.pci = disk.driver.dev = clone  # the guest keeps using the same rings
    assert disk.request(VIRTIO_BLK_T_IN, 1, in_len=512)[1] == payload
    assert clone.counters()["read_ops"] == 1 and clone.counters()["write_ops"] == 1
    clone.close()
    image.write_bytes(b"\0" * 512)  # the image shrank: a snapshot of the old one no longer fits
    with pytest.raises(DeviceStateError):
        VirtioPciDevice(VirtioBlock(str(image)), mem, router2).restore(state)


# -- asynchronous I/O with a kernel queue the test drives (tests/unit/devices/storage/fakes.py) --

class AsyncDisk(Disk):
    """A disk whose engines are :class:`FakeKernel` s: requests complete when the test says."""

    def __init__(self, image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter,
                 monkeypatch: pytest.MonkeyPatch, *, ordered_fsync: bool = True, queue_size: int = 128) -> None:
        self.kernels: list[FakeKernel] = []

        def fake_queue(depth: int, *, io_uring: bool = True, aio: bool = True) -> FakeKernel:
            kernel = FakeKernel(depth, ordered_fsync=ordered_fsync)
            self.kernels.append(kernel)
            return kernel

        monkeypatch.setattr(raw, "open_kernel_queue", fake_queue)
        watcher = LoopWatcher()
        super().__init__(VirtioBlock(str(image), watcher=watcher, queue_size=queue_size), mem, alloc, router, watcher)
        self.kernel = self.kernels[0]

    def post(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0) -> tuple[int, int, int]:
        """Add one request without waiting; returns (head, status address, data address)."""
        hdr = self.alloc.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(hdr, 16, False)]
        data = 0
        if out:
            data = self.alloc.alloc(len(out), 512)
            self.mem.write(data, out)
            bufs.append((data, len(out), False))
        if in_len:
            data = self.alloc.alloc(in_len, 512)
            bufs.append((data, in_len, True))
        status = self.alloc.alloc(1)
        self.mem.write(status, b"\xee")
        bufs.append((status, 1, True))
        return self.rings[0].add(bufs), status, data

    def tokens(self) -> list[int]:
        return [op.token for op in self.kernel.submitted]


def test_block_async_many_in_flight_complete_in_any_order(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                          router: FakeRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    d = AsyncDisk(image, mem, alloc, router, monkeypatch)
    content = image.read_bytes()
    posted = [d.post(VIRTIO_BLK_T_IN, 8 * i, in_len=4096) for i in range(8)]
    d.driver.kick(0)
    assert len(d.kernel.submitted) == 8 and d.rings[0].take_used() == []  # all in flight at once
    tokens = d.tokens()
    fired = len(router.fired)
    d.kernel.complete(tokens[::-1][:5])  # the last five, newest first
    d.watcher.run()  # type: ignore[union-attr]  # AsyncDisk always has a watcher
    used = d.rings[0].take_used()
    assert [h for h, _ in used] == [p[0] for p in posted[::-1][:5]]  # the used ring in completion order
    assert all(length == 4097 for _, length in used)
    assert len(router.fired) == fired + 1  # one interrupt for the batch
    d.kernel.complete()
    d.watcher.run()  # type: ignore[union-attr]
    assert [h for h, _ in d.rings[0].take_used()] == [p[0] for p in posted[:3]]
    for i, (_, status, data) in enumerate(posted):
        assert mem.read(status, 1)[0] == VIRTIO_BLK_S_OK
        assert mem.read(data, 4096) == content[8 * i * 512:8 * i * 512 + 4096]
    counters = d.blk.counters()
    assert counters["read_ops"] == 8 and counters["fake_ops"] == 8
    d.pci.close()


@pytest.mark.parametrize("ordered_fsync", [True, False], ids=["drain-flag", "device-waits"])
def test_block_async_flush_waits_for_earlier_writes(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                    router: FakeRouter, monkeypatch: pytest.MonkeyPatch,
                                                    ordered_fsync: bool) -> None:
    d = AsyncDisk(image, mem, alloc, router, monkeypatch, ordered_fsync=ordered_fsync)
    writes = [d.post(VIRTIO_BLK_T_OUT, 16 * i, out=os.urandom(2048)) for i in range(3)]
    flush = d.post(VIRTIO_BLK_T_FLUSH)
    d.driver.kick(0)
    if ordered_fsync:
        # io_uring: the fsync is queued with IOSQE_IO_DRAIN; the fake kernel checks it runs last
        assert [op.kind for op in d.kernel.submitted] == ["write"] * 3 + ["fsync"]
        assert d.kernel.submitted[-1].drain
        d.kernel.complete()
        d.watcher.run()  # type: ignore[union-attr]
    else:
        # AIO cannot order an fsync: the device waited for the writes, then synced
        assert d.kernel.waits == 1 and not d.kernel.submitted
    assert [op.kind for op in d.kernel.history] == ["write"] * 3 + (["fsync"] if ordered_fsync else [])
    used = d.rings[0].take_used()
    assert sorted(h for h, _ in used) == sorted([w[0] for w in writes] + [flush[0]])
    assert [h for h, _ in used][-1] == flush[0]
    assert all(mem.read(s, 1)[0] == VIRTIO_BLK_S_OK for _, s, _ in [*writes, flush])
    assert d.blk.counters()["flush_ops"] == 1 and d.blk.counters()["write_ops"] == 3
    d.pci.close()


def test_block_async_errors_are_ioerr(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    d = AsyncDisk(image, mem, alloc, router, monkeypatch)
    bad, good = d.post(VIRTIO_BLK_T_IN, 0, in_len=512), d.post(VIRTIO_BLK_T_OUT, 8, out=bytes(512))
    d.driver.kick(0)
    d.kernel.fail[d.tokens()[0]] = -errno.EIO
    d.kernel.complete()
    d.watcher.run()  # type: ignore[union-attr]
    used = dict(d.rings[0].take_used())
    assert used == {bad[0]: 1, good[0]: 1}  # no data counted for the failed read
    assert mem.read(bad[1], 1)[0] == VIRTIO_BLK_S_IOERR and mem.read(good[1], 1)[0] == VIRTIO_BLK_S_OK
    assert d.blk.counters()["errors"] == 1 and d.blk.counters()["read_ops"] == 0
    assert not d.driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    d.pci.close()


def test_block_async_reset_waits_for_requests_in_flight(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                        router: FakeRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    d = AsyncDisk(image, mem, alloc, router, monkeypatch)
    posted = [d.post(VIRTIO_BLK_T_IN, 0, in_len=4096) for _ in range(4)]
    d.driver.kick(0)
    assert len(d.kernel.submitted) == 4
    d.driver.set_common(COMMON_DEVICE_STATUS, 0, 1)  # the driver resets the device
    # the reset returned only once the kernel was done with the guest's buffers ...
    assert not d.kernel.submitted and d.kernel.waits == 1
    # ... and the requests were dropped: no status, no used element for a queue that is gone
    assert d.rings[0].used_idx() == 0 and all(mem.read(s, 1) == b"\xee" for _, s, _ in posted)
    assert d.watcher.run(0.01) <= 1 and d.rings[0].used_idx() == 0  # type: ignore[union-attr]
    d.pci.close()


def test_block_async_pause_completes_requests_in_flight(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                        router: FakeRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    d = AsyncDisk(image, mem, alloc, router, monkeypatch)
    posted = [d.post(VIRTIO_BLK_T_OUT, 8 * i, out=bytes([i]) * 512) for i in range(3)]
    d.driver.kick(0)
    fired = len(router.fired)
    d.blk.pause()  # what a snapshot does first: nothing stays in flight
    assert not d.kernel.submitted
    assert sorted(h for h, _ in d.rings[0].take_used()) == sorted(p[0] for p in posted)
    assert len(router.fired) == fired + 1
    d.blk.resume()
    content = image.read_bytes()
    assert all(content[8 * i * 512:8 * i * 512 + 512] == bytes([i]) * 512 for i in range(3))
    d.pci.close()


def test_block_async_full_engine_leaves_requests_in_the_ring(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                             router: FakeRouter,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block, "MAX_DEPTH", 2)
    d = AsyncDisk(image, mem, alloc, router, monkeypatch)
    posted = [d.post(VIRTIO_BLK_T_IN, i, in_len=512) for i in range(3)]
    d.driver.kick(0)
    assert len(d.kernel.submitted) == 2  # the third waits in the ring
    d.kernel.complete()
    d.watcher.run()  # type: ignore[union-attr]  # completions, then the waiting request
    assert len(d.kernel.submitted) == 1 and len(d.rings[0].take_used()) == 2
    d.kernel.complete()
    d.watcher.run()  # type: ignore[union-attr]
    assert d.rings[0].take_used() == [(posted[2][0], 513)]
    d.pci.close()


def test_block_async_backend_choice(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = LoopWatcher()
    for keys, backend in ((BACKENDS["io_uring"], "io_uring"), (BACKENDS["aio"], "aio"), (BACKENDS["sync"], "sync")):
        blk = VirtioBlock(str(image), watcher=watcher, **keys)
        # an io_uring or AIO context's eventfd; a synchronous queue's kick and handoff eventfds
        # when a server thread will serve it natively
        watched = 1 if backend != "sync" else 2 * len(blk._servers)
        assert blk.io_backend == backend and len(watcher.callbacks) == watched
        assert bool(blk._servers) == (backend == "sync" and block_fast.ENABLED)
        blk.close()
        assert not watcher.callbacks
    assert VirtioBlock.from_config(DiskConfig(path=str(image), disable_io_uring=True)).io_backend == "sync"  # no loop
    # a host without io_uring (or with it disabled by sysctl or seccomp) falls back to AIO
    monkeypatch.setattr(uring.IoUring, "__init__", _refuse)
    blk = VirtioBlock(str(image), watcher=watcher)
    assert blk.io_backend == "aio"
    blk.close()
    monkeypatch.setattr(aio.LinuxAio, "__init__", _refuse)
    blk = VirtioBlock(str(image), watcher=watcher)
    assert blk.io_backend == "sync" and len(watcher.callbacks) == 2 * len(blk._servers)
    blk.close()
    assert not watcher.callbacks


def _refuse(self: object, depth: int) -> None:
    raise OSError(errno.ENOSYS, "not on this host")


def test_block_async_all_queues_or_none(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the host gives the first queue a context and refuses the second (aio-max-nr reached):
    # the disk serves both queues synchronously rather than one of them
    made: list[FakeKernel] = []

    def one_only(depth: int, **_: bool) -> FakeKernel | None:
        if made:
            return None
        made.append(FakeKernel(depth))
        return made[-1]

    monkeypatch.setattr(raw, "open_kernel_queue", one_only)
    watcher = LoopWatcher()
    blk = VirtioBlock(str(image), num_queues=2, watcher=watcher)
    # no engine's eventfd is watched (only the queues' own kick and handoff eventfds, natively)
    assert blk.io_backend == "sync" and len(watcher.callbacks) == 2 * len(blk._servers) and made[0].closed
    assert len(blk._servers) == (2 if block_fast.ENABLED else 0)
    blk.close()


def test_block_async_flushes_count_against_the_depth(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                     router: FakeRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    # the submission ring holds ``depth`` entries, flushes included
    monkeypatch.setattr(block, "MAX_DEPTH", 2)
    d = AsyncDisk(image, mem, alloc, router, monkeypatch)
    posted = [d.post(VIRTIO_BLK_T_FLUSH) for _ in range(3)]
    d.driver.kick(0)
    assert len(d.kernel.submitted) == 2
    d.kernel.complete()
    d.watcher.run()  # type: ignore[union-attr]
    d.kernel.complete()
    d.watcher.run()  # type: ignore[union-attr]
    assert sorted(h for h, _ in d.rings[0].take_used()) == sorted(p[0] for p in posted)
    d.pci.close()
