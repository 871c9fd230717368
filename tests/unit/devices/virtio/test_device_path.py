"""The fast device path: chain views made while walking, rings read through their region's
view, the driver's idx read once per batch, a block request in one preadv/pwritev, and frames
read from the tap straight into receive buffers - each also against a hostile driver."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from tests.unit.devices.test_ratelimit import FakeWatcher
from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver, Ring
from vmsh.devices.backends.tap import Tap
from vmsh.devices.virtio.block import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from vmsh.devices.virtio.net import (
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR_SIZE,
    VirtioNet,
)
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    VirtQueue,
)
from vmsh.engine.memory import GuestMemoryMmap, GuestRegion
from vmsh.errors import GuestMemoryError, VirtQueueError

MiB = 1 << 20


def make(mem: GuestMemoryMmap, alloc: Allocator, size: int = 8, **kw: bool) -> tuple[VirtQueue, Ring]:
    ring = Ring.create(mem, alloc, size)
    return ring.attach(VirtQueue(mem, size), **kw), ring


# -- chains ---------------------------------------------------------------------------------------


def test_chain_views_are_guest_ram(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, indirect=True)
    a, b, c = alloc.alloc(16), alloc.alloc(4096), alloc.alloc(1)
    ring.add([(a, 16, False), (b, 4096, True), (c, 1, True)], alloc=alloc, indirect=True)
    chain = q.pop()
    assert chain is not None and (chain.readable_len, chain.writable_len) == (16, 4097)
    for view in chain.writable_views(0, 4096):
        view[:] = b"\xab" * len(view)
    assert mem.read(b, 4096) == b"\xab" * 4096
    assert chain.write_tail(b"\x07") and mem.read(c, 1) == b"\x07"
    assert [len(v) for v in chain.writable_views(4000, 200)] == [96, 1]


def test_chain_write_tail_across_descriptors_and_too_short(mem: GuestMemoryMmap) -> None:
    chain = DescriptorChain(mem, 0, [(0x1000, 4, True), (0x2000, 1, True)])
    assert chain.write_tail(b"wxyz") and mem.read(0x1000, 4) == b"\0wxy" and mem.read(0x2000, 1) == b"z"
    assert not chain.write_tail(b"123456")
    assert mem.read(0x1000, 4) == b"\0wxy"


def test_single_descriptor_chain_outside_ram_fails(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    ring.write_desc(0, mem.size - 8, 16, VIRTQ_DESC_F_WRITE)  # runs off the end of RAM
    ring.publish(0)
    with pytest.raises(VirtQueueError, match="not in guest RAM"):
        q.pop()
    q2, ring2 = make(mem, alloc)
    ring2.write_desc(0, 1 << 62, 0, VIRTQ_DESC_F_WRITE)  # no bytes: nothing to check, nothing to touch
    ring2.publish(0)
    chain = q2.pop()
    assert chain is not None and chain.writable_len == 0 and chain.writable_views() == []


def test_oversized_indirect_table_and_indirect_loop(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, size=4, indirect=True)
    table = alloc.alloc(16 * 5)
    ring.write_desc(0, table, 16 * 5, VIRTQ_DESC_F_INDIRECT)  # 5 entries > queue size 4
    ring.publish(0)
    with pytest.raises(VirtQueueError, match="indirect table"):
        q.pop()
    q2, ring2 = make(mem, alloc, size=4, indirect=True)
    table = alloc.alloc(32)
    buf = alloc.alloc(8)
    ring2.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 1, table=table)
    ring2.write_desc(1, buf, 8, VIRTQ_DESC_F_NEXT, 0, table=table)  # back to 0
    ring2.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    ring2.publish(0)
    with pytest.raises(VirtQueueError, match="loop"):
        q2.pop()


def test_failed_walk_keeps_no_view_of_ram() -> None:
    mem = GuestMemoryMmap.create(1 * MiB)
    alloc = Allocator(0x1000, 1 * MiB)
    q, ring = make(mem, alloc)
    buf = alloc.alloc(64)
    ring.write_desc(0, buf, 64, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    ring.write_desc(1, buf, 64, VIRTQ_DESC_F_NEXT, 2)  # readable after writable
    ring.publish(0)
    try:
        q.pop()
    except VirtQueueError as err:
        kept = err  # noqa: F841 - a caller that keeps the error, as a log record may
    mem.close()
    assert mem.regions[0].mmap.closed  # nothing held the RAM mapped


def test_buffer_across_two_ram_regions(tmp_path: Path) -> None:
    mem = GuestMemoryMmap([GuestRegion.create(0, MiB), GuestRegion.create(MiB, MiB)])
    try:
        alloc = Allocator(0x1000, MiB - 0x2000)
        q, ring = make(mem, alloc)
        ring.add([(MiB - 100, 300, True)])
        chain = q.pop()
        assert chain is not None and [len(v) for v in chain.writable_views()] == [100, 200]
        chain.write(bytes(range(256)) + bytes(44))
        assert mem.read(MiB - 100, 300) == bytes(range(256)) + bytes(44)
    finally:
        mem.close()


def test_ring_across_two_ram_regions_is_read_through_memory() -> None:
    mem = GuestMemoryMmap([GuestRegion.create(0, MiB), GuestRegion.create(MiB, MiB)])
    try:
        alloc = Allocator(MiB - 64, 2 * MiB)  # the descriptor table straddles the boundary
        q, ring = make(mem, alloc, size=8)
        assert ring.desc < MiB < ring.desc + 16 * 8
        buf = alloc.alloc(32)
        for _ in range(3):
            head = ring.add([(buf, 32, True)])
            chain = q.pop()
            assert chain is not None and chain.head == head
            q.add_used(chain.head, 32)
        assert len(ring.take_used()) == 3
    finally:
        mem.close()


# -- the driver's available idx -------------------------------------------------------------------


def test_avail_idx_is_read_again_once_used_up(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    buf = alloc.alloc(8)
    heads = [ring.add([(buf, 8, True)]) for _ in range(2)]
    assert q.pop().head == heads[0]  # type: ignore[union-attr]  # the queue holds a chain here
    heads.append(ring.add([(buf, 8, True)]))
    assert [q.pop().head for _ in range(2)] == heads[1:]  # type: ignore[union-attr]  # the queue holds a chain here
    assert q.pop() is None


def test_restored_queue_does_not_hand_out_unpublished_entries(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    buf = alloc.alloc(8)
    for _ in range(3):
        ring.add([(buf, 8, True)])
    assert q.pop() is not None
    state = q.state()
    fresh = ring.attach(VirtQueue(mem, 8))
    fresh.restore(state)
    assert [fresh.pop() is not None for _ in range(3)] == [True, True, False]


def test_avail_idx_jump_caught_on_the_next_read(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    buf = alloc.alloc(8)
    ring.add([(buf, 8, True)])
    assert q.pop() is not None
    mem.write_u16(ring.avail + 2, 1 + 9)  # 9 more in a ring of 8
    with pytest.raises(VirtQueueError, match="ahead"):
        q.pop()


# -- block ----------------------------------------------------------------------------------------


class Disk:
    def __init__(self, path: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
        self.mem, self.alloc = mem, alloc
        self.blk = VirtioBlock(str(path))
        self.pci = VirtioPciDevice(self.blk, mem, router)
        self.driver = PciDriver(self.pci, mem, alloc)
        (self.ring,) = self.driver.probe()

    def request(self, rtype: int, sector: int, pages: list[int], status_len: int = 1) -> tuple[int, int]:
        hdr = self.alloc.alloc(16 + status_len)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(hdr, 16, False), *[(p, 4096, rtype == VIRTIO_BLK_T_IN) for p in pages], (hdr + 16, status_len, True)]
        self.ring.add(bufs, alloc=self.alloc, indirect=True)
        self.driver.kick(0)
        ((_, used),) = self.ring.take_used()
        return self.mem.read_u8(hdr + 16 + status_len - 1), used


@pytest.fixture
def disk(tmp_path: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> Iterator[Disk]:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(2 * MiB))
    d = Disk(path, mem, alloc, router)
    yield d
    d.pci.close()


def test_block_scattered_pages_in_one_request(disk: Disk, tmp_path: Path) -> None:
    pages = [disk.alloc.alloc(8192, 4096) for _ in range(64)]  # every other page
    image = (tmp_path / "disk.raw").read_bytes()
    assert disk.request(VIRTIO_BLK_T_IN, 8, pages) == (0, 64 * 4096 + 1)
    assert b"".join(disk.mem.read(p, 4096) for p in pages) == image[4096:4096 + 64 * 4096]
    for i, p in enumerate(pages):
        disk.mem.write(p, bytes([i]) * 4096)
    assert disk.request(VIRTIO_BLK_T_OUT, 1024, pages) == (0, 1)
    assert (tmp_path / "disk.raw").read_bytes()[512 * 1024:512 * 1024 + 64 * 4096] == b"".join(
        bytes([i]) * 4096 for i in range(64))


def test_block_status_in_a_longer_last_descriptor(disk: Disk, tmp_path: Path) -> None:
    # The data may end inside the last descriptor; the status is its last byte (§5.2.6).
    data, tail, hdr = disk.alloc.alloc(4093), disk.alloc.alloc(4), disk.alloc.alloc(16)
    disk.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    disk.ring.add([(hdr, 16, False), (data, 4093, True), (tail, 4, True)], alloc=disk.alloc, indirect=True)
    disk.driver.kick(0)
    assert disk.ring.take_used()[0][1] == 4097
    image = (tmp_path / "disk.raw").read_bytes()
    assert disk.mem.read(data, 4093) + disk.mem.read(tail, 3) == image[:4096]
    assert disk.mem.read_u8(tail + 3) == 0


def test_block_read_of_a_file_that_shrank_reads_zeros(disk: Disk, tmp_path: Path) -> None:
    page = disk.alloc.alloc(4096, 4096)
    disk.mem.write(page, b"\xff" * 4096)
    os.truncate(tmp_path / "disk.raw", 4096)
    assert disk.request(VIRTIO_BLK_T_IN, 16, [page])[0] == 0
    assert disk.mem.read(page, 4096) == bytes(4096)


# -- net receive ----------------------------------------------------------------------------------


class PairTap(Tap):
    def set_offload(self, flags: int) -> None:
        pass


class Net:
    def __init__(self, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter, *, mergeable: bool = True) -> None:
        dev_end, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        dev_end.setblocking(False)
        self.host.setblocking(False)
        self.tap = PairTap("pair", [dev_end.detach()])
        self.mem, self.alloc = mem, alloc
        self.watcher = FakeWatcher()
        self.net = VirtioNet(self.tap, b"\x02\0\0\0\0\1", self.watcher)
        self.pci = VirtioPciDevice(self.net, mem, router)
        self.driver = PciDriver(self.pci, mem, alloc)
        features = None
        if not mergeable:
            self.driver.negotiate()
            features = self.driver.device_features() & ~(1 << VIRTIO_NET_F_MRG_RXBUF) & ((1 << 33) - 1)
        self.rx, self.tx = self.driver.probe(features)[:2]
        self.bufs: dict[int, tuple[int, int]] = {}

    def post(self, n: int, size: int = 1024) -> None:
        for _ in range(n):
            addr = self.alloc.alloc(size)
            self.bufs[self.rx.add([(addr, size, True)])] = (addr, size)

    def readable(self) -> None:
        self.watcher.fds[self.tap.fds[0]]()  # type: ignore[operator]  # the fake watcher stores callables

    def received(self) -> list[bytes]:
        """Frames put together from the used buffers (the header's num_buffers says how many)."""
        frames, used = [], self.rx.take_used()
        while used:
            head, length = used.pop(0)
            addr, _ = self.bufs[head]
            data = self.mem.read(addr, length)
            n = struct.unpack_from("<H", data, NUM_BUFFERS_OFFSET)[0]
            for _ in range(n - 1):
                h, ln = used.pop(0)
                data += self.mem.read(self.bufs[h][0], ln)
            frames.append(data)
        return frames

    def close(self) -> None:
        self.pci.close()
        self.host.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frame(n: int, fill: int = 0x5A) -> bytes:
    return bytes(VNET_HDR_SIZE) + bytes([fill]) * n


def test_net_rx_frame_in_one_buffer_and_across_buffers(mem: GuestMemoryMmap, alloc: Allocator,
                                                       router: FakeRouter) -> None:
    with Net(mem, alloc, router) as net:
        net.post(8)
        net.driver.kick(0)
        small, big = frame(100, 1), frame(2500, 2)
        net.host.send(small)
        net.host.send(big)
        net.readable()
        got = net.received()
        assert [len(f) for f in got] == [len(small), len(big)]
        assert got[0][VNET_HDR_SIZE:] == small[VNET_HDR_SIZE:] and got[1][VNET_HDR_SIZE:] == big[VNET_HDR_SIZE:]
        assert struct.unpack_from("<H", got[1], NUM_BUFFERS_OFFSET)[0] == 3
        assert net.net.counters()["rx_frames"] == 2


def test_net_rx_ring_dry_mid_frame_gives_buffers_back(mem: GuestMemoryMmap, alloc: Allocator,
                                                      router: FakeRouter) -> None:
    with Net(mem, alloc, router) as net:
        net.post(2)
        net.driver.kick(0)
        big = frame(3000, 7)  # needs 3 buffers of 1 KiB
        net.host.send(big)
        net.readable()
        assert net.rx.take_used() == []
        assert net.net.queues[0].next_avail == 0  # both buffers given back
        assert net.tap.fds[0] not in net.watcher.fds  # unwatched until the guest adds buffers
        net.post(2)
        net.driver.kick(0)
        (got,) = net.received()
        assert got[VNET_HDR_SIZE:] == big[VNET_HDR_SIZE:]
        assert net.tap.fds[0] in net.watcher.fds


def test_net_rx_no_buffers_leaves_frames_in_the_tap(mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
    with Net(mem, alloc, router) as net:
        net.host.send(frame(60))
        net.readable()  # nothing posted yet
        assert net.tap.fds[0] not in net.watcher.fds  # no busy loop on a readable tap
        assert net.net._pending[0] is None  # not read: still in the tap
        net.post(1)
        net.driver.kick(0)
        assert [len(f) for f in net.received()] == [VNET_HDR_SIZE + 60]


def test_net_rx_first_buffer_smaller_than_the_header(mem: GuestMemoryMmap, alloc: Allocator,
                                                     router: FakeRouter) -> None:
    with Net(mem, alloc, router) as net:
        net.post(1, size=8)
        net.post(2, size=1024)
        net.driver.kick(0)
        sent = frame(500, 3)
        net.host.send(sent)
        net.readable()  # a broken driver (§5.1.6.3.1): the frame still arrives, header split
        used = net.rx.take_used()
        got = b"".join(mem.read(net.bufs[h][0], length) for h, length in used)
        assert got[VNET_HDR_SIZE:] == sent[VNET_HDR_SIZE:]
        assert struct.unpack_from("<H", got, NUM_BUFFERS_OFFSET)[0] == len(used) == 2


def test_net_rx_oversized_frame_dropped_without_mergeable(mem: GuestMemoryMmap, alloc: Allocator,
                                                           router: FakeRouter) -> None:
    with Net(mem, alloc, router, mergeable=False) as net:
        net.post(4)
        net.driver.kick(0)
        net.host.send(frame(3000))
        net.host.send(frame(100))
        net.readable()
        used = net.rx.take_used()
        assert [length for _, length in used] == [0, VNET_HDR_SIZE + 100]
        assert net.net.counters()["rx_dropped"] == 1


def test_net_rx_hostile_buffer_outside_ram_fails_the_device(mem: GuestMemoryMmap, alloc: Allocator,
                                                            router: FakeRouter) -> None:
    with Net(mem, alloc, router) as net:
        head = net.rx._take()
        net.rx.write_desc(head, mem.size - 4, 4096, VIRTQ_DESC_F_WRITE)
        net.rx.publish(head)
        net.host.send(frame(60))
        net.driver.kick(0)
        net.readable()
        assert net.net.needs_reset
        assert net.rx.take_used() == []


# -- indirect tables decoded in one piece -----------------------------------------------------------


def _table(mem: GuestMemoryMmap, alloc: Allocator, entries: list[tuple[int, int, int, int]]) -> int:
    table = alloc.alloc(16 * len(entries))
    for i, (addr, length, flags, nxt) in enumerate(entries):
        mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    return table


def _publish_table(q: VirtQueue, ring: Ring, table: int, n: int) -> None:
    ring.write_desc(0, table, 16 * n, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)


@pytest.mark.parametrize("order", ["linear", "shuffled"])
def test_indirect_table_linear_and_shuffled_agree(mem: GuestMemoryMmap, alloc: Allocator, order: str) -> None:
    q, ring = make(mem, alloc, indirect=True)
    a, b, c = alloc.alloc(64), alloc.alloc(100), alloc.alloc(1)
    nxt, w = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
    if order == "linear":  # as drivers lay it out: 0 -> 1 -> 2
        entries = [(a, 64, nxt, 1), (b, 100, w | nxt, 2), (c, 1, w, 0)]
    else:  # the same chain as 0 -> 2 -> 1 (legal; the walk starts at entry 0, §2.7.5.3.2)
        entries = [(a, 64, nxt, 2), (c, 1, w, 0), (b, 100, w | nxt, 1)]
    _publish_table(q, ring, _table(mem, alloc, entries), 3)
    chain = q.pop()
    assert chain is not None
    got = [(d.addr, d.length, d.write_only) for d in chain.descriptors]
    assert got == [(a, 64, False), (b, 100, True), (c, 1, True)]
    assert (chain.readable_len, chain.writable_len) == (64, 101)


@pytest.mark.parametrize(("entries", "error"), [
    # a readable buffer after a writable one
    (lambda a, size: [(a, 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1), (a, 8, 0, 0)],
     "readable descriptor after"),
    # a buffer that runs out of guest RAM
    (lambda a, size: [(a, 16, VIRTQ_DESC_F_NEXT, 1), (size - 2, 4096, VIRTQ_DESC_F_WRITE, 0)],
     "not in guest RAM"),
    # an entry with flags a linear table never has (INDIRECT): the checked walk refuses it
    (lambda a, size: [(a, 16, VIRTQ_DESC_F_NEXT, 1), (a, 16, VIRTQ_DESC_F_INDIRECT, 0)], "nested"),
], ids=["readable-after-writable", "buffer-outside-ram", "odd-flags-take-the-checked-walk"])
def test_hostile_indirect_table_fails_the_pop(mem: GuestMemoryMmap, alloc: Allocator, entries, error: str) -> None:
    q, ring = make(mem, alloc, indirect=True)
    table = _table(mem, alloc, entries(alloc.alloc(64), mem.size))
    _publish_table(q, ring, table, 2)
    with pytest.raises(VirtQueueError, match=error):
        q.pop()


# -- GuestMemoryMmap's fast paths ---------------------------------------------------------------------


def test_memory_slices_of_across_regions_and_outside_ram() -> None:
    mem = GuestMemoryMmap([GuestRegion.create(0, MiB), GuestRegion.create(2 * MiB, MiB)])
    try:
        views = mem.slices_of([0x1000, 2 * MiB + 16, 0x2000], [8, 4, 0])
        assert [len(v) for v in views] == [8, 4]
        with pytest.raises(GuestMemoryError, match="not RAM"):
            mem.slices_of([0x1000, MiB + 8], [8, 8])  # the second lies in the hole
        with pytest.raises(GuestMemoryError, match="not RAM"):
            mem.slices_of([MiB - 4], [8])  # runs from RAM into the hole
        mem.write(2 * MiB, memoryview(bytearray(b"\1\0\2\0")).cast("H"))  # any format: bytes are copied
        assert mem.read(2 * MiB, 4) == b"\1\0\2\0"
        assert mem.read(0x10, 4) == bytes(4)  # the hint moved back and forth
    finally:
        mem.close()


def test_net_rx_chain_of_more_pieces_than_readv_takes(mem: GuestMemoryMmap, alloc: Allocator,
                                                      router: FakeRouter) -> None:
    dev_end, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev_end.setblocking(False)
    host.setblocking(False)
    tap = PairTap("pair", [dev_end.detach()])
    watcher = FakeWatcher()
    net = VirtioNet(tap, b"\x02\0\0\0\0\1", watcher, queue_size=2048)
    pci = VirtioPciDevice(net, mem, router)
    try:
        driver = PciDriver(pci, mem, alloc)
        rx = driver.probe()[0]
        buf = alloc.alloc(1500)
        head = rx.add([(buf + i, 1, True) for i in range(1500)], alloc=alloc, indirect=True)
        driver.kick(0)
        sent = frame(300, 9)
        host.send(sent)
        watcher.fds[tap.fds[0]]()  # type: ignore[operator]  # the fake watcher stores callables
        assert rx.take_used() == [(head, len(sent))]
        assert mem.read(buf + VNET_HDR_SIZE, 300) == sent[VNET_HDR_SIZE:]
        assert not net.needs_reset
    finally:
        pci.close()
        host.close()


def test_net_rx_frame_waiting_for_buffers_is_charged_once(mem: GuestMemoryMmap, alloc: Allocator,
                                                          router: FakeRouter) -> None:
    from tests.unit.devices.test_ratelimit import FakeClock
    from vmsh.devices.ratelimit import RateLimiter, TokenBucket

    clock = FakeClock()
    limiters: list[RateLimiter] = []

    def make_limiter() -> RateLimiter:
        limiters.append(RateLimiter(ops=TokenBucket(100, 1000, clock=clock), clock=clock))
        return limiters[-1]

    dev_end, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev_end.setblocking(False)
    host.setblocking(False)
    tap = PairTap("pair", [dev_end.detach()])
    watcher = FakeWatcher()
    net = VirtioNet(tap, b"\x02\0\0\0\0\1", watcher, rate_limiter=make_limiter)
    pci = VirtioPciDevice(net, mem, router)
    try:
        driver = PciDriver(pci, mem, alloc)
        rx = driver.probe()[0]
        rx.add([(alloc.alloc(1024), 1024, True)])
        driver.kick(0)
        host.send(frame(3000))  # needs three buffers: read, charged, then waits
        watcher.fds[tap.fds[0]]()  # type: ignore[operator]  # the fake watcher stores callables
        ops = limiters[0].ops
        assert ops is not None and ops.available() == 99
        for _ in range(2):
            rx.add([(alloc.alloc(1024), 1024, True)])
        driver.kick(0)
        assert len(rx.take_used()) == 3
        assert ops.available() == 99  # not charged again
    finally:
        pci.close()
        host.close()
