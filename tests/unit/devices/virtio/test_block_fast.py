"""virtio-blk's native fast path (``block_fast``, ``native/blk_fast.c``) against the Python path.

Each scenario lays out a ring - well-formed or hostile - in two identical guests, one device
with the fast path and one without; afterwards guest RAM, the image, the counters and the
device status must be byte for byte the same. The fast path must have served the plain
requests itself and handed every other chain back (its ``ops`` counts what it served), and it
never touches memory outside the RAM regions: a buffer past RAM's end or across two regions is
the Python path's.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.devices.storage.fakes import LoopWatcher
from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver, Ring
from vmsh.devices.ratelimit import RateLimiter, TokenBucket
from vmsh.devices.virtio import block_fast
from vmsh.devices.virtio.block import (
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from vmsh.devices.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmsh.engine.memory import GuestMemoryMmap, GuestRegion

RAM_HALF = 8 << 20
RAM_SIZE = 2 * RAM_HALF
DISK_SIZE = 1 << 20
N, W, IND = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


class Guest:
    """Guest RAM in two adjacent regions, a sync virtio-blk on a copy of the image, its driver."""

    def __init__(self, image: Path, fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(block_fast, "ENABLED", fast)
        self.mem = GuestMemoryMmap([GuestRegion.create(0, RAM_HALF), GuestRegion.create(RAM_HALF, RAM_HALF)])
        self.alloc = Allocator(0x1000, RAM_SIZE)
        self.image = image
        self.blk = VirtioBlock(str(image), serial="fast-path", disable_io_uring=True, disable_aio=True)
        assert (self.blk._fast is not None) == fast
        self.pci = VirtioPciDevice(self.blk, self.mem, FakeRouter())
        self.driver = PciDriver(self.pci, self.mem, self.alloc)
        self.ring: Ring = self.driver.probe()[0]

    def header(self, rtype: int, sector: int = 0) -> int:
        addr = self.alloc.alloc(16)
        self.mem.write(addr, struct.pack("<IIQ", rtype, 0, sector))
        return addr

    def buf(self, n: int, fill: int = 0xEE) -> int:
        addr = self.alloc.alloc(n, 512)
        self.mem.write(addr, bytes([fill]) * n)
        return addr

    def outcome(self) -> tuple[bytes, bytes, dict[str, int], bool]:
        return (self.mem.read(0, RAM_SIZE), self.image.read_bytes(), self.blk.counters(),
                bool(self.driver.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET))

    def close(self) -> None:
        self.pci.close()
        self.mem.close()


def read_chain(g: Guest, sector: int = 8, n: int = 4096) -> None:
    g.ring.add([(g.header(VIRTIO_BLK_T_IN, sector), 16, False), (g.buf(n), n, True), (g.buf(1), 1, True)])


def write_chain(g: Guest, sector: int = 16, n: int = 1024, indirect: bool = False) -> None:
    g.ring.add([(g.header(VIRTIO_BLK_T_OUT, sector), 16, False), (g.buf(n, 0x5A), n, False), (g.buf(1), 1, True)],
               alloc=g.alloc, indirect=indirect)


def raw_chain(g: Guest, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    """Descriptors written as given (index = position), ``head`` published."""
    for i, (addr, length, flags, nxt) in enumerate(descs):
        g.ring.write_desc(i, addr, length, flags, nxt)
    g.ring.publish(head)


def indirect_chain(g: Guest, descs: list[tuple[int, int, int, int]], table_len: int | None = None,
                   table: int | None = None, flags: int = IND) -> None:
    if table is None:
        table = g.alloc.alloc(16 * max(1, len(descs)), 16)
    for i, (addr, length, f, nxt) in enumerate(descs):
        g.ring.write_desc(i, addr, length, f, nxt, table=table)
    g.ring.write_desc(0, table, 16 * len(descs) if table_len is None else table_len, flags, 1)
    g.ring.publish(0)


def plain(g: Guest) -> None:
    read_chain(g)
    write_chain(g)
    write_chain(g, 40, 8192, indirect=True)
    g.ring.add([(g.header(VIRTIO_BLK_T_FLUSH), 16, False), (g.buf(1), 1, True)])
    read_chain(g, 40, 8192)


def header_split_and_empty_status_tail(g: Guest) -> None:
    h = g.header(VIRTIO_BLK_T_IN, 3)
    d, s = g.buf(512), g.buf(1)
    raw_chain(g, [(h, 8, N, 1), (h + 8, 8, N, 2), (d, 512, W | N, 3), (s, 1, W | N, 4), (0, 0, W, 0)])


def mixed_batch(g: Guest) -> None:
    read_chain(g, 1)
    g.ring.add([(g.header(VIRTIO_BLK_T_GET_ID), 16, False), (g.buf(20), 20, True), (g.buf(1), 1, True)])
    g.ring.add([(g.header(10), 16, False), (g.buf(1), 1, True)])  # unsupported
    read_chain(g, 2)
    read_chain(g, DISK_SIZE // 512)  # past the capacity: IOERR
    read_chain(g, 3, 100)  # not whole sectors: IOERR
    read_chain(g, (1 << 64) - 1, 512)  # sector + count overflows 64 bits: IOERR
    read_chain(g, 4)


def _data_buffer(addr: int, length: int) -> Callable[[Guest], None]:
    def scenario(g: Guest) -> None:
        raw_chain(g, [(g.header(VIRTIO_BLK_T_IN), 16, N, 1), (addr, length, W | N, 2), (g.buf(1), 1, W, 0)])
    return scenario


def _write_from(addr: int, length: int) -> Callable[[Guest], None]:
    def scenario(g: Guest) -> None:
        raw_chain(g, [(g.header(VIRTIO_BLK_T_OUT), 16, N, 1), (addr, length, N, 2), (g.buf(1), 1, W, 0)])
    return scenario


def no_status(g: Guest) -> None:
    g.ring.add([(g.header(VIRTIO_BLK_T_IN), 16, False)])


def short_header(g: Guest) -> None:
    h = g.header(VIRTIO_BLK_T_IN)
    raw_chain(g, [(h, 8, N, 1), (g.buf(1), 1, W, 0)])


def next_out_of_table(g: Guest) -> None:
    raw_chain(g, [(g.header(VIRTIO_BLK_T_IN), 16, N, 500)])


def loop(g: Guest) -> None:
    h, s = g.header(VIRTIO_BLK_T_FLUSH), g.buf(1)
    raw_chain(g, [(h, 16, N, 1), (s, 1, W | N, 0)])


def readable_after_writable(g: Guest) -> None:
    h, s = g.header(VIRTIO_BLK_T_FLUSH), g.buf(1)
    raw_chain(g, [(s, 1, W | N, 1), (h, 16, 0, 0)])


def head_out_of_table(g: Guest) -> None:
    g.ring.publish(200)


def avail_idx_too_far(g: Guest) -> None:
    read_chain(g)
    g.mem.write_u16(g.ring.avail + 2, 300)


def _indirect(kind: str) -> Callable[[Guest], None]:
    def scenario(g: Guest) -> None:
        h, d, s = g.header(VIRTIO_BLK_T_IN), g.buf(512), g.buf(1)
        good = [(h, 16, N, 1), (d, 512, W | N, 2), (s, 1, W, 0)]
        if kind == "nested":
            indirect_chain(g, [(h, 16, N, 1), (g.alloc.alloc(48, 16), 48, IND, 0)])
        elif kind == "odd length":
            indirect_chain(g, good, table_len=40)
        elif kind == "empty":
            indirect_chain(g, good, table_len=0)
        elif kind == "longer than the queue":
            indirect_chain(g, good, table_len=16 * 256)
        elif kind == "past RAM":
            indirect_chain(g, [], table_len=48, table=RAM_SIZE - 32)
        elif kind == "with NEXT":
            indirect_chain(g, good, flags=IND | N)
        elif kind == "loop inside":
            indirect_chain(g, [(h, 16, N, 1), (s, 1, W | N, 0)])
        elif kind == "next outside":
            indirect_chain(g, [(h, 16, N, 7), (s, 1, W, 0)])
        elif kind == "after a direct descriptor":
            table = g.alloc.alloc(32, 16)
            g.ring.write_desc(0, d, 512, W | N, 1, table=table)
            g.ring.write_desc(1, s, 1, W, 0, table=table)
            raw_chain(g, [(h, 16, N, 1), (table, 32, IND, 0)])
        else:
            raise AssertionError(kind)
    return scenario


#: scenario -> requests the fast path itself completes
SCENARIOS: dict[str, tuple[Callable[[Guest], None], int]] = {
    "plain": (plain, 5),
    "header split, empty status tail": (header_split_and_empty_status_tail, 1),
    "mixed batch": (mixed_batch, 3),
    "buffer past RAM": (_data_buffer(RAM_SIZE - 256, 512), 0),
    "buffer at 2^64": (_data_buffer((1 << 64) - 256, 512), 0),
    "buffer of 4 GiB": (_data_buffer(0x10000, 0xFFFF_FE00), 0),
    "buffer across two regions": (_data_buffer(RAM_HALF - 256, 512), 0),
    "write from across two regions": (_write_from(RAM_HALF - 512, 1024), 0),
    "write from past RAM": (_write_from(RAM_SIZE - 512, 1024), 0),
    "no status": (no_status, 0),
    "short header": (short_header, 0),
    "next out of the table": (next_out_of_table, 0),
    "loop": (loop, 0),
    "readable after writable": (readable_after_writable, 0),
    "head out of the table": (head_out_of_table, 0),
    "avail idx too far ahead": (avail_idx_too_far, 0),
    **{f"indirect {k}": (_indirect(k), 0) for k in (
        "nested", "odd length", "empty", "longer than the queue", "past RAM", "with NEXT", "loop inside",
        "next outside", "after a direct descriptor")},
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
def pair(image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Guest, Guest]]:
    copy = tmp_path / "copy.raw"
    copy.write_bytes(image.read_bytes())
    python, native = Guest(image, False, monkeypatch), Guest(copy, True, monkeypatch)
    yield python, native
    python.close()
    native.close()


@pytest.mark.parametrize("name", SCENARIOS)
def test_fast_path_matches_the_python_path(pair: tuple[Guest, Guest], name: str) -> None:
    scenario, served = SCENARIOS[name]
    python, native = pair
    for g in pair:
        scenario(g)
        g.driver.kick(0)
    assert native.blk._fast is not None and native.blk._fast.ops == served
    a, b = python.outcome(), native.outcome()
    assert a[2] == b[2] and a[3] == b[3]  # counters, DEVICE_NEEDS_RESET
    assert a[1] == b[1]  # the image
    assert a[0] == b[0]  # every byte of guest RAM: data, status bytes, used ring


def test_fast_path_only_for_synchronous_unlimited_page_cache_io(image: Path) -> None:
    """A rate-limited disk, O_DIRECT and asynchronous I/O keep the Python path."""
    watcher = LoopWatcher()
    disks = [VirtioBlock(str(image), disable_io_uring=True, disable_aio=True),
             VirtioBlock(str(image)),  # no I/O loop: synchronous
             VirtioBlock(str(image), direct=True, disable_io_uring=True, disable_aio=True),
             VirtioBlock(str(image), rate_limiter=RateLimiter(ops=TokenBucket(1000, 100))),
             VirtioBlock(str(image), watcher=watcher)]
    try:
        assert [d._fast is not None for d in disks] == [True, True, False, False, disks[4].io_backend == "sync"]
    finally:
        for d in disks:
            d.close()


def test_fast_path_host_errors_are_ioerr(pair: tuple[Guest, Guest], caplog: pytest.LogCaptureFixture) -> None:
    """preadv failing (an image fd opened write-only) completes with IOERR, logged, as in Python;
    the requests after it are still served."""
    python, native = pair
    for g in pair:
        fd = os.open(g.image, os.O_WRONLY)
        os.close(g.blk.disk.fd)
        g.blk.disk.fd = fd
        if g.blk._fast is not None:
            g.blk._fast._disk.fd = fd
        read_chain(g)
        write_chain(g)
        g.driver.kick(0)
    assert native.blk._fast is not None and native.blk._fast.ops == 2
    a, b = python.outcome(), native.outcome()
    assert a == b and a[2]["errors"] == 1 and a[2]["write_ops"] == 1
    assert caplog.text.count("Bad file descriptor") == 2
