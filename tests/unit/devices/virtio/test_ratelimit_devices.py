"""virtio-blk and virtio-net under a rate limit: throttled chains stay in the ring, nothing is
dropped, and the queue completes once the (fake) clock has refilled the buckets and the
resume timer fires."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.devices.storage.fakes import FakeKernel
from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver, Ring
from tests.unit.fakes import FakeClock, FakeWatcher
from vmsh.config.model import (
    RateLimiterConfig,
    RateLimiterGroupConfig,
    TokenBucketConfig,
)
from vmsh.devices.backends.tap import Tap
from vmsh.devices.ratelimit import RateLimiter, RateLimiterGroup
from vmsh.devices.storage import raw
from vmsh.devices.virtio.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VirtioBlock,
)
from vmsh.devices.virtio.net import VNET_HDR_SIZE, VirtioNet
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.harness.waiting import wait_until

DISK_SIZE = 1 << 20


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


def bucket(size: int, refill_ms: int = 1000, burst: int = 0) -> TokenBucketConfig:
    return TokenBucketConfig(size=size, one_time_burst=burst, refill_time=refill_ms)


class LimitedDisk:
    """A probed disk whose requests are submitted without waiting for completion."""

    def __init__(self, blk: VirtioBlock, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter) -> None:
        self.blk, self.mem, self.alloc = blk, mem, alloc
        self.pci = VirtioPciDevice(blk, mem, router)
        self.driver = PciDriver(self.pci, mem, alloc)
        self.ring: Ring = self.driver.probe()[0]
        self.status: dict[int, int] = {}

    def submit(self, rtype: int, sector: int = 0, in_len: int = 0) -> int:
        hdr = self.alloc.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(hdr, 16, False)]
        if in_len:
            bufs.append((self.alloc.alloc(in_len, 512), in_len, True))
        status = self.alloc.alloc(1)
        self.mem.write(status, b"\xee")
        bufs.append((status, 1, True))
        head = self.ring.add(bufs)
        self.status[head] = status
        return head

    def done(self) -> list[int]:
        heads = [h for h, _ in self.ring.take_used()]
        assert all(self.mem.read(self.status[h], 1)[0] == VIRTIO_BLK_S_OK for h in heads)
        return heads

    @property
    def pending(self) -> int:
        return self.blk.queues[0].pending()


def make_disk(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter, limiter: RateLimiter,
              watcher: FakeWatcher) -> LimitedDisk:
    # Synchronous I/O: each request completes within the kick, and the watcher holds only the
    # limiter's timer (test_block_rate_limit_with_io_uring covers the asynchronous path).
    return LimitedDisk(VirtioBlock(str(image), rate_limiter=limiter, watcher=watcher, disable_io_uring=True,
                                   disable_aio=True), mem, alloc, router)


def fire(watcher: FakeWatcher) -> None:
    """What the I/O loop does when the resume timer's fd is readable."""
    (callback,) = watcher.fds.values()
    callback()  # type: ignore[operator]  # the fake watcher stores callables


def test_block_bandwidth_limit_holds_requests_in_the_ring(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                         router: FakeRouter, clock: FakeClock) -> None:
    limiter = RateLimiter.from_config(RateLimiterConfig(bandwidth=bucket(8192)), clock=clock)
    assert limiter is not None
    watcher = FakeWatcher()
    disk = make_disk(image, mem, alloc, router, limiter, watcher)
    try:
        heads = [disk.submit(VIRTIO_BLK_T_IN, 8 * i, in_len=4096) for i in range(4)]
        disk.driver.kick(0)
        assert disk.done() == heads[:2]  # 8 KiB of budget
        assert disk.pending == 2  # the rest is still available, not dropped
        assert disk.blk.counters()["throttled"] == 1
        assert len(watcher.fds) == 1  # the resume timer is armed
        disk.driver.kick(0)  # a kick while blocked takes nothing
        assert disk.done() == [] and disk.pending == 2
        clock.advance_ms(499)
        fire(watcher)  # too early: still blocked, re-armed
        assert disk.done() == [] and disk.pending == 2
        clock.advance_ms(1)
        fire(watcher)
        assert disk.done() == heads[2:3]
        clock.advance_ms(500)
        fire(watcher)
        assert disk.done() == heads[3:] and disk.pending == 0
        assert disk.blk.counters()["read_ops"] == 4 and disk.blk.counters()["read_bytes"] == 4 * 4096
    finally:
        disk.pci.close()
    assert watcher.fds == {}  # close releases the timer


def test_block_rate_limit_with_io_uring(image: Path, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter,
                                       clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limiter admits requests before they reach the kernel queue; the ones it admitted
    complete when the kernel says so, the others wait in the ring for the timer."""
    kernels: list[FakeKernel] = []

    def fake_queue(depth: int, **_: bool) -> FakeKernel:
        kernels.append(FakeKernel(depth))
        return kernels[-1]

    monkeypatch.setattr(raw, "open_kernel_queue", fake_queue)
    limiter = RateLimiter.from_config(RateLimiterConfig(bandwidth=bucket(8192)), clock=clock)
    assert limiter is not None
    watcher = FakeWatcher()
    disk = LimitedDisk(VirtioBlock(str(image), rate_limiter=limiter, watcher=watcher), mem, alloc, router)
    (kernel,) = kernels
    try:
        heads = [disk.submit(VIRTIO_BLK_T_IN, 8 * i, in_len=4096) for i in range(4)]
        disk.driver.kick(0)
        assert len(kernel.submitted) == 2 and disk.done() == [] and disk.pending == 2
        kernel.complete()
        watcher.fds[kernel.fd]()  # type: ignore[operator]  # the engine's completion callback
        assert disk.done() == heads[:2]
        timer = next(cb for fd, cb in watcher.fds.items() if fd != kernel.fd)
        clock.advance_ms(1000)
        timer()  # type: ignore[operator]  # the limiter's timer fired: both fit again
        assert len(kernel.submitted) == 2 and disk.pending == 0
        kernel.complete()
        watcher.fds[kernel.fd]()  # type: ignore[operator]
        assert disk.done() == heads[2:] and disk.blk.counters()["fake_ops"] == 4
    finally:
        disk.pci.close()
    assert watcher.fds == {}


def test_block_ops_limit_counts_every_request(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                              router: FakeRouter, clock: FakeClock) -> None:
    limiter = RateLimiter.from_config(RateLimiterConfig(ops=bucket(2, 100, burst=1)), clock=clock)
    assert limiter is not None
    watcher = FakeWatcher()
    disk = make_disk(image, mem, alloc, router, limiter, watcher)
    try:
        heads = [disk.submit(VIRTIO_BLK_T_FLUSH) for _ in range(5)]
        disk.driver.kick(0)
        assert disk.done() == heads[:3]  # burst 1 + size 2
        clock.advance_ms(50)  # one op back
        fire(watcher)
        assert disk.done() == heads[3:4]
        clock.advance_ms(50)
        fire(watcher)
        assert disk.done() == heads[4:] and disk.pending == 0
    finally:
        disk.pci.close()


def test_block_reset_while_throttled_cancels_the_timer(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                       router: FakeRouter, clock: FakeClock) -> None:
    limiter = RateLimiter.from_config(RateLimiterConfig(ops=bucket(1)), clock=clock)
    assert limiter is not None
    watcher = FakeWatcher()
    disk = make_disk(image, mem, alloc, router, limiter, watcher)
    try:
        disk.submit(VIRTIO_BLK_T_FLUSH)
        disk.submit(VIRTIO_BLK_T_FLUSH)
        disk.driver.kick(0)
        assert len(disk.done()) == 1
        disk.blk.reset()
        clock.advance_ms(2000)
        fire(watcher)  # a stale expiry after reset does nothing
        assert disk.ring.take_used() == []
    finally:
        disk.pci.close()


def test_block_group_shared_by_two_disks(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                         router: FakeRouter, clock: FakeClock) -> None:
    group = RateLimiterGroup.from_config(RateLimiterGroupConfig(
        id="group0", rate_limiter_config=RateLimiterConfig(bandwidth=bucket(8192))), clock=clock)
    w0, w1 = FakeWatcher(), FakeWatcher()
    d0 = make_disk(image, mem, alloc, router, group.limiter, w0)
    d1 = make_disk(image, mem, alloc, FakeRouter(), group.limiter, w1)
    try:
        a = [d0.submit(VIRTIO_BLK_T_IN, 0, in_len=4096) for _ in range(2)]
        b = [d1.submit(VIRTIO_BLK_T_IN, 0, in_len=4096) for _ in range(2)]
        d0.driver.kick(0)
        d1.driver.kick(0)
        assert d0.done() == a and d1.done() == []  # d0 took the whole group budget
        assert d1.pending == 2 and d1.blk.counters()["throttled"] == 1
        clock.advance_ms(1000)
        fire(w1)
        assert d1.done() == b
    finally:
        d0.pci.close()
        d1.pci.close()


def test_block_without_watcher_uses_a_thread_timer(image: Path, mem: GuestMemoryMmap, alloc: Allocator,
                                                   router: FakeRouter) -> None:
    limiter = RateLimiter.from_config(RateLimiterConfig(ops=bucket(1, 20)))  # real clock: 50 ops/s
    assert limiter is not None
    disk = LimitedDisk(VirtioBlock(str(image), rate_limiter=limiter), mem, alloc, router)
    try:
        heads = [disk.submit(VIRTIO_BLK_T_FLUSH) for _ in range(3)]
        disk.driver.kick(0)
        done: list[int] = []

        def all_done() -> bool:
            done.extend(disk.done())
            return len(done) >= 3

        wait_until(all_done, 5, "the thread timer to release the throttled flushes", interval=0.01)
        assert done == heads
    finally:
        disk.pci.close()


# --- virtio-net ------------------------------------------------------------------------------------


class FakeTap(Tap):
    """A tap made of one end of a datagram socketpair; the test holds the other end."""

    def set_offload(self, flags: int) -> None:
        pass


@pytest.fixture
def wire() -> Iterator[tuple[FakeTap, socket.socket]]:
    dev_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev_end.setblocking(False)
    host_end.setblocking(False)
    tap = FakeTap("faketap", [dev_end.detach()])
    yield tap, host_end
    host_end.close()
    tap.close()


class LimitedNet:
    def __init__(self, tap: FakeTap, mem: GuestMemoryMmap, alloc: Allocator, router: FakeRouter,
                 factory: Callable[[], RateLimiter | None], watcher: FakeWatcher) -> None:
        self.mem, self.alloc = mem, alloc
        self.net = VirtioNet(tap, b"\x02\0\0\0\0\1", watcher, rate_limiter=factory)
        self.pci = VirtioPciDevice(self.net, mem, router)
        self.driver = PciDriver(self.pci, mem, alloc)
        self.rx, self.tx = self.driver.probe()[:2]

    def send(self, payload: bytes) -> int:
        addr = self.alloc.alloc(VNET_HDR_SIZE + len(payload))
        self.mem.write(addr, bytes(VNET_HDR_SIZE) + payload)
        return self.tx.add([(addr, VNET_HDR_SIZE + len(payload), False)])

    def post_rx(self, n: int) -> list[int]:
        return [self.rx.add([(self.alloc.alloc(2048), 2048, True)]) for _ in range(n)]


def recv_all(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536)[VNET_HDR_SIZE:])
        except BlockingIOError:
            return out


def test_net_tx_ops_limit(wire: tuple[FakeTap, socket.socket], mem: GuestMemoryMmap, alloc: Allocator,
                          router: FakeRouter, clock: FakeClock) -> None:
    tap, host = wire
    watcher = FakeWatcher()
    dev = LimitedNet(tap, mem, alloc, router,
                     lambda: RateLimiter.from_config(RateLimiterConfig(ops=bucket(2)), clock=clock), watcher)
    try:
        heads = [dev.send(b"frame%d" % i + bytes(60)) for i in range(3)]
        dev.driver.kick(1)
        assert [h for h, _ in dev.tx.take_used()] == heads[:2]
        assert [f[:6] for f in recv_all(host)] == [b"frame0", b"frame1"]
        assert dev.net.counters()["tx_throttled"] == 1
        assert dev.net.queues[1].pending() == 1
        timer_fds = [fd for fd in watcher.fds if fd not in tap.fds]
        assert len(timer_fds) == 1
        clock.advance_ms(500)
        watcher.fds[timer_fds[0]]()  # type: ignore[operator]  # the fake watcher stores callables
        assert [h for h, _ in dev.tx.take_used()] == heads[2:]
        assert [f[:6] for f in recv_all(host)] == [b"frame2"]
        assert dev.net.counters()["tx_frames"] == 3
    finally:
        dev.pci.close()


def test_net_rx_bandwidth_limit(wire: tuple[FakeTap, socket.socket], mem: GuestMemoryMmap, alloc: Allocator,
                                router: FakeRouter, clock: FakeClock) -> None:
    tap, host = wire
    watcher = FakeWatcher()
    frame = bytes(VNET_HDR_SIZE) + bytes(988)  # 1000 bytes on the wire side
    dev = LimitedNet(tap, mem, alloc, router,
                     lambda: RateLimiter.from_config(RateLimiterConfig(bandwidth=bucket(2000)), clock=clock),
                     watcher)
    try:
        dev.post_rx(4)
        dev.driver.kick(0)
        for _ in range(3):
            host.send(frame)
        tap_fd = tap.fds[0]
        watcher.fds[tap_fd]()  # type: ignore[operator]  # the tap is readable
        assert len(dev.rx.take_used()) == 2
        assert tap_fd not in watcher.fds  # unwatched while throttled: no busy loop
        assert dev.net.counters()["rx_throttled"] == 1
        clock.advance_ms(500)
        (timer,) = watcher.fds.values()
        timer()  # type: ignore[operator]  # the fake watcher stores callables
        assert len(dev.rx.take_used()) == 1
        assert tap_fd in watcher.fds  # watching the tap again
        assert dev.net.counters()["rx_frames"] == 3
    finally:
        dev.pci.close()


def test_net_without_limit_has_no_timer(wire: tuple[FakeTap, socket.socket], mem: GuestMemoryMmap, alloc: Allocator,
                                        router: FakeRouter) -> None:
    tap, _ = wire
    watcher = FakeWatcher()
    dev = LimitedNet(tap, mem, alloc, router, lambda: None, watcher)
    try:
        assert "tx_throttled" not in dev.net.counters()
        assert list(watcher.fds) == tap.fds
    finally:
        dev.pci.close()
