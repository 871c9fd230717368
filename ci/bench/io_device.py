"""Benchmark: the VMM's own virtio-blk and virtio-net capacity, without a guest (issue #6).

The real device models (``VirtioBlock``, ``VirtioNet``) run in this process on a
``GuestMemoryMmap``; a host-side driver plays the guest: it lays out split virtqueues in that
memory, fills descriptor chains the way Linux's drivers do, calls the device's kick
(``queue_notify``, what the I/O thread calls when a queue's ioeventfd fires) or the tap's
readable callback, and reaps the used ring. Only the device's calls are timed, in thread CPU
time, so the driver's own Python does not count; requests/s are requests per device CPU
second (the capacity of one I/O thread). On hardware KVM the guest's own instructions run
natively, so this is what bounds vmsh's in-guest throughput; on a PVM host the in-guest rows
are bound instead by the guest kernel's emulated instructions (``io.py`` prints how many
per request).

Requests have the in-guest rows' sizes:

* block (a raw image in the page cache of the temporary directory's file system): 1 MiB sequential writes and reads
  split as Linux's virtio-blk splits them (``seg_max`` = queue size - 2 page segments per
  request, each request's segments in one indirect table, one request per kick, as with
  queue depth 1), and 4 KiB random reads (header, page, status: an indirect table of 3);
* net (a datagram socketpair stands in for the tap, so the host's network stack is not
  measured; the benchmark drains and fills the other end outside the timing): transmit
  and receive of 1514-byte frames and of 64 KiB TSO/GSO frames with the 12-byte vnet
  header, mergeable 4 KiB receive buffers, 8 frames per kick.

Block requests go through each back-end of the device (``--backends``): ``io_uring`` and
``aio`` (asynchronous, the default for raw images; a request that does not complete inside the
submitting call is reaped from the engine's eventfd, as the I/O loop would, inside the timing)
and ``sync`` (``_disable_io_uring=on,_disable_aio=on``: ``preadv``/``pwritev`` on the I/O thread).

``--gap-ms`` leaves the device idle between requests, as a guest does (on a PVM host a 4 KiB
read costs the guest about 9 ms of emulated instructions): the device's code and data are then
no longer in the CPU's caches and TLB, which is what a real guest's requests cost the I/O
thread (about 10x the back-to-back figure on this machine class: see README, Benchmarks).
``sync-python`` is ``sync`` with the native request path (``vmsh/devices/virtio/block_fast.py``)
turned off: the Python path, for a comparison in one run. ``sync-thread`` drives the disk as
KVM and the guest do: a real I/O loop, the kick eventfd written, the irqfd waited for; the
loop serves the first kick and the queue's server thread (``_disk0_q0``) the others, and the
CPU of every thread but the benchmark's own is counted.

Measured here (load 8-10 on 2 cores), VMM CPU per request, native sync / Python sync: 4 KiB
random read 5.2 / 14.4 us back to back; 1 MiB sequential read (two requests) 19 / 56 us, write
37 / 77 us. With the server thread (load 5): 4 KiB read 4.4 us back to back, 38.6 us with
``--gap-ms 5`` (80 us for ``sync`` called inline after the same gap); a real guest's 4 KiB read
costs its thread about 23-33 us (``io.py``; README, Benchmarks).

Usage: ``python ci/bench/io_device.py [--seconds 2] [--gap-ms 0]
[--backends io_uring,aio,sync,sync-python,sync-thread]`` (no root, no KVM).
"""

from __future__ import annotations

import argparse
import os
import random
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmsh.devices.backends.tap import Tap
from vmsh.devices.virtio import block_fast
from vmsh.devices.virtio.block import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from vmsh.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from vmsh.devices.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR_SIZE,
    VirtioNet,
)
from vmsh.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueue,
)
from vmsh.engine.io_loop import IoLoop
from vmsh.engine.memory import GuestMemoryMmap

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
_DESC = struct.Struct("<QIHH")
_BLK_HDR = struct.Struct("<IIQ")
#: virtio_net_hdr_v1 of a TSO frame: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start/offset
_GSO_HDR = struct.pack("<BBHHHHH", 1, 1, 66, 1448, 34, 16, 0)


class Counter:
    """A ``VirtioInterrupt`` that counts interrupts (the irqfd writes the I/O thread would make)."""

    def __init__(self) -> None:
        self.used = 0

    def signal_used_queue(self, queue_index: int) -> None:
        self.used += 1

    def signal_config_change(self) -> None:
        raise RuntimeError("the device asked for a reset")


class IrqfdCounter(Counter):
    """An irqfd for queue 0, which a disk queue's server thread writes itself and the I/O loop
    through this interrupt (as the engine's MSI-X router does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)

    def queue_irqfd(self, queue_index: int) -> int | None:
        return self.fd if queue_index == 0 else None

    def signal_used_queue(self, queue_index: int) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self) -> None:
        """Block until the queue's interrupt."""
        if not select.select([self.fd], [], [], 5)[0]:
            raise RuntimeError("no interrupt within 5 s")
        self.used += os.eventfd_read(self.fd)


class NoWatcher:
    """The I/O loop's fd registry: the benchmark calls the readable callbacks itself."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        self.callbacks.pop(fd, None)


class Ring:
    """The driver side of one split virtqueue, with an indirect table slot per descriptor."""

    def __init__(self, mem: GuestMemoryMmap, base: int, size: int, table_room: int) -> None:
        self.mem, self.size = mem, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.tables = (self.used + 6 + 8 * size + 4095) & ~4095
        self.table_room = table_room
        self.end = self.tables + size * table_room
        mem.fill(base, self.end - base)
        self.avail_idx = self.last_used = 0
        self.free = list(range(size))

    def queue(self, max_size: int, memory: GuestMemoryMmap) -> VirtQueue:
        q = VirtQueue(memory, max_size)
        q.size, q.desc_table, q.avail_ring, q.used_ring, q.ready = self.size, self.desc, self.avail, self.used, True
        q.event_idx = q.indirect = True
        return q

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool) -> int:
        """Publish a chain of ``(addr, len, device_writable)``; returns its head."""
        head = self.free.pop()
        n = len(bufs)
        raw = bytearray(16 * n)
        for i, (addr, length, w) in enumerate(bufs):
            more = i + 1 < n
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if more else 0)
            _DESC.pack_into(raw, 16 * i, addr, length, flags, i + 1 if more else 0)
        if indirect:
            table = self.tables + head * self.table_room
            self.mem.write(table, raw)
            self.mem.write(self.desc + 16 * head, _DESC.pack(table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0))
        else:
            assert n == 1
            self.mem.write(self.desc + 16 * head, raw)
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return head

    def reap(self) -> list[tuple[int, int]]:
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.last_used != idx:
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.last_used % self.size), 8))
            self.free.append(head)
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        # virtqueue_get_buf_ctx_split with callbacks on: interrupt at the next used buffer
        self.mem.write_u16(self.avail + 4 + 2 * self.size, self.last_used)
        return out


@dataclass
class DeviceRow:
    """One measured workload: requests and bytes moved, device CPU and wall seconds, interrupts."""

    key: str
    label: str
    requests: int
    moved: int
    cpu: float
    wall: float
    interrupts: int

    @property
    def per_second(self) -> float:
        return self.requests / self.cpu if self.cpu else 0.0

    @property
    def mib_per_second(self) -> float:
        return self.moved / self.cpu / MiB if self.cpu else 0.0

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / self.moved * GiB if self.moved else 0.0


class Timer:
    """Sums the CPU and wall time of the device's calls, less what reading the clocks costs (the
    CPU clock is a system call of a few microseconds here). The CPU is the process's: the
    benchmark has no other thread, so it is the device's plus the io_uring workers (``iou-wrk``)
    that serve requests the kernel could not complete inline (page-cache misses, O_DIRECT)."""

    _overhead: tuple[int, int] | None = None

    def __init__(self) -> None:
        self.cpu = self.wall = 0
        if Timer._overhead is None:
            Timer._overhead = (0, 0)
            probe = Timer()
            for _ in range(200):
                probe.call(lambda: None)
            Timer._overhead = (probe.cpu // 200, probe.wall // 200)

    def call(self, fn: Callable[[], None]) -> None:
        c, w = time.process_time_ns(), time.perf_counter_ns()
        fn()
        cpu, wall = Timer._overhead or (0, 0)
        self.cpu += max(0, time.process_time_ns() - c - cpu)
        self.wall += max(0, time.perf_counter_ns() - w - wall)


class ThreadsTimer(Timer):
    """The CPU of every thread but the calling one (the I/O loop and the disk queue's server
    thread) around each call, with the wall time: what the device costs when the benchmark's
    driver only writes the kick eventfd and waits for the irqfd."""

    def call(self, fn: Callable[[], None]) -> None:
        c, t, w = time.process_time_ns(), time.thread_time_ns(), time.perf_counter_ns()
        fn()
        self.cpu += max(0, (time.process_time_ns() - c) - (time.thread_time_ns() - t))
        self.wall += max(0, time.perf_counter_ns() - w)


def _activate(device: VirtioDevice, mem: GuestMemoryMmap, queues: list[VirtQueue], features: int) -> Counter:
    irq = Counter()
    device.activate(mem, queues, irq, features & device.avail_features)
    return irq


def _pages(mem_base: int, count: int) -> list[int]:
    """``count`` scattered page addresses (every other page: no two adjacent, like user pages)."""
    return [mem_base + 2 * PAGE * i for i in range(count)]


# -- block ------------------------------------------------------------------------------------------

#: ``--disk`` keys of each back-end
BACKEND_KEYS = {"io_uring": {}, "aio": {"disable_io_uring": True},
                "sync": {"disable_io_uring": True, "disable_aio": True},
                "sync-python": {"disable_io_uring": True, "disable_aio": True},
                "sync-thread": {"disable_io_uring": True, "disable_aio": True}}


def bench_block(seconds: float, workdir: Path, disk_mib: int = 64, backend: str = "io_uring",
                gap: float = 0.0) -> list[DeviceRow]:
    """Sequential 1 MiB writes and reads, random 4 KiB reads: one request per kick, ``gap``
    seconds of idleness before each."""
    queue_size = 128
    mem = GuestMemoryMmap.create(64 * MiB)
    disk = workdir / "device-bench.raw"
    chunk = bytes(range(256)) * (MiB // 256)
    with open(disk, "wb") as f:
        f.writelines(chunk for _ in range(disk_mib))
    threaded = backend == "sync-thread"
    loop = IoLoop("bench-io") if threaded else None
    watcher: NoWatcher | IoLoop = loop if loop is not None else NoWatcher()
    block_fast.ENABLED = backend != "sync-python"
    try:
        dev = VirtioBlock(str(disk), queue_size=queue_size, watcher=watcher, **BACKEND_KEYS[backend])
    finally:
        block_fast.ENABLED = True
    if dev.io_backend != backend.removesuffix("-python").removesuffix("-thread"):
        raise RuntimeError(f"this host has no {backend} (the device chose {dev.io_backend})")
    if threaded and not dev.kick_fds:
        raise RuntimeError("the disk has no queue server (vmsh._blkfast not built?)")

    def kick() -> None:
        if loop is not None:
            # as KVM's ioeventfd: the I/O loop serves the first kick, the queue's thread the rest
            irq.used = 0
            os.eventfd_write(dev.kick_fds[0], 1)
            irq.wait()  # type: ignore[attr-defined]  # an IrqfdCounter when threaded
            return
        dev.queue_notify(0)
        if dev.io_backend != "sync" and ring.mem.read_u16(ring.used + 2) == ring.last_used:
            # not completed inside the submitting call: wait for the engine's eventfd
            fds = list(watcher.callbacks)
            for fd in select.select(fds, [], [], 5)[0]:
                watcher.callbacks[fd]()

    seg_max = queue_size - 2
    ring = Ring(mem, 0x10000, queue_size, 16 * (seg_max + 2))
    queue = ring.queue(queue_size, mem)
    features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX
    if loop is not None:
        irq = IrqfdCounter()
        dev.activate(mem, [queue], irq, features & dev.avail_features)
        loop.start()
        timer: Timer | ThreadsTimer
    else:
        irq = _activate(dev, mem, [queue], features)
    headers = 0x100000  # a header and a status byte per ring slot
    data = 0x200000  # 256 scattered pages
    pages = _pages(data, 256)
    capacity = disk_mib * MiB // 512
    rows = []
    try:
        for key, label, rtype, size, sequential in (
                ("seq-write", "sequential write, 1 MiB", VIRTIO_BLK_T_OUT, MiB, True),
                ("seq-read", "sequential read, 1 MiB", VIRTIO_BLK_T_IN, MiB, True),
                ("rand-read", "random read, 4 KiB", VIRTIO_BLK_T_IN, PAGE, False)):
            rng = random.Random(1)
            timer, moved, requests, irq.used = (ThreadsTimer() if loop is not None else Timer()), 0, 0, 0
            offset = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if sequential:
                    offset = offset + size if offset + size <= capacity * 512 - size else 0
                else:
                    offset = rng.randrange(capacity * 512 // size) * size
                # Linux splits the transfer into requests of at most seg_max page segments
                npages = size // PAGE
                for first in range(0, npages, seg_max):
                    segs = pages[first:min(npages, first + seg_max)]
                    slot = ring.free[-1]
                    hdr = headers + 32 * slot
                    mem.write(hdr, _BLK_HDR.pack(rtype, 0, (offset + first * PAGE) // 512))
                    bufs = [(hdr, 16, False), *[(p, PAGE, rtype == VIRTIO_BLK_T_IN) for p in segs],
                            (hdr + 16, 1, True)]
                    ring.add(bufs, indirect=True)
                    if gap:
                        time.sleep(gap)
                    timer.call(kick)
                    for _, _length in ring.reap():
                        if mem.read(hdr + 16, 1) != b"\0":
                            raise RuntimeError(f"{key}: request failed")
                        requests += 1
                moved += size
            rows.append(DeviceRow(f"blk-{key}", f"virtio-blk {label}, {backend}", requests, moved,
                                  timer.cpu / 1e9, timer.wall / 1e9, requests if loop is not None else irq.used))
    finally:
        dev.close()
        if loop is not None:
            loop.stop()
        mem.close()
        disk.unlink()
    return rows


# -- net --------------------------------------------------------------------------------------------

class PairTap(Tap):
    """A tap made of one end of a datagram socketpair (the benchmark holds the other end)."""

    def set_offload(self, flags: int) -> None:
        pass


def bench_net(seconds: float, batch: int = 8) -> list[DeviceRow]:
    """Transmit and receive of 1514-byte and 64 KiB GSO frames, ``batch`` per kick."""
    dev_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (dev_end, host_end):
        s.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 4 * MiB)
    watcher = NoWatcher()
    net = VirtioNet(PairTap("bench", [dev_end.detach()]), b"\x02\0\0\0\0\1", watcher, queue_size=256)
    mem = GuestMemoryMmap.create(64 * MiB)
    rx_ring = Ring(mem, 0x10000, 256, 0)
    tx_ring = Ring(mem, 0x40000, 256, 16 * 20)
    irq = _activate(net, mem, [rx_ring.queue(256, mem), tx_ring.queue(256, mem)],
                    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX
                    | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4
                    | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_MRG_RXBUF)
    readable = next(iter(watcher.callbacks.values()))
    rx_pages = _pages(0x1000000, 256)  # a receive buffer per ring slot
    tx_area = 0x2000000
    rows = []
    try:
        for size, name in ((1514, "1514-byte frames"), (65536, "64 KiB GSO frames")):
            header = _GSO_HDR if size > 1514 else bytes(VNET_HDR_SIZE)
            # transmit: Linux puts the header and the linear part in one descriptor, page
            # fragments in the others (an indirect table when there are several)
            linear = min(size, 66)
            mem.write(tx_area, header + bytes(linear))
            frag_pages = _pages(tx_area + 0x400000, (size - linear + PAGE - 1) // PAGE)
            timer, frames, irq.used = Timer(), 0, 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(batch):
                    rest, bufs = size - linear, [(tx_area, linear + VNET_HDR_SIZE, False)]
                    for p in frag_pages:
                        bufs.append((p, min(PAGE, rest), False))
                        rest -= min(PAGE, rest)
                    tx_ring.add(bufs, indirect=len(bufs) > 1)
                timer.call(lambda: net.queue_notify(1))
                got = len(tx_ring.reap())
                for _ in range(got):
                    if len(host_end.recv(size + VNET_HDR_SIZE + 64)) != size + VNET_HDR_SIZE:
                        raise RuntimeError("transmit: a frame arrived cut")
                frames += got
            rows.append(DeviceRow(f"net-tx-{size}", f"virtio-net transmit, {name}", frames, frames * size,
                                  timer.cpu / 1e9, timer.wall / 1e9, irq.used))
            # receive: mergeable 4 KiB buffers, kept topped up like virtnet's refill
            frame = header + bytes(size)
            timer, frames, irq.used = Timer(), 0, 0
            while rx_ring.free:
                head = rx_ring.free[-1]
                rx_ring.add([(rx_pages[head], PAGE, True)], indirect=False)
            timer.call(lambda: net.queue_notify(0))
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(batch):
                    host_end.send(frame)
                timer.call(readable)
                used = rx_ring.reap()
                if sum(length for _, length in used) != batch * len(frame):
                    raise RuntimeError("receive: frames went missing")
                frames += batch
                while rx_ring.free:
                    head = rx_ring.free[-1]
                    rx_ring.add([(rx_pages[head], PAGE, True)], indirect=False)
                timer.call(lambda: net.queue_notify(0))
            rows.append(DeviceRow(f"net-rx-{size}", f"virtio-net receive, {name}", frames, frames * size,
                                  timer.cpu / 1e9, timer.wall / 1e9, irq.used))
    finally:
        net.close()
        host_end.close()
        mem.close()
    return rows


def measure(seconds: float, backends: tuple[str, ...] = ("io_uring", "sync"), gap: float = 0.0,
            net: bool = True, base: str | None = None) -> list[DeviceRow]:
    """Every workload, ``seconds`` each: the block rows once per back-end, the image in ``base``
    (the default temporary directory: a disk file system, in its page cache; on tmpfs the device
    serves requests synchronously whatever the back-end)."""

    with tempfile.TemporaryDirectory(prefix="vmsh-io-device-", dir=base) as tmp:
        rows = [row for backend in backends for row in bench_block(seconds, Path(tmp), backend=backend, gap=gap)]
        return rows + (bench_net(seconds) if net else [])


def number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def report(rows: list[DeviceRow], beside: dict[str, tuple[str, float, str]] | None = None) -> None:
    """The table; ``beside`` maps a row key to (a VMM's name, its in-guest rate, unit) to print next to it."""
    print(f"\n{'device capacity (one I/O thread, no guest)':<44}{'req/s':>10}{'MiB/s':>10}{'CPU s/GiB':>11}"
          f"{'us/req':>9}{'irq/req':>8}")
    for r in rows:
        print(f"{r.label:<44}{number(r.per_second):>10}{number(r.mib_per_second):>10}{r.cpu_per_gib:>11.3f}"
              f"{r.cpu / max(1, r.requests) * 1e6:>9.1f}{r.interrupts / max(1, r.requests):>8.2f}")
        if beside and r.key in beside:
            name, rate, unit = beside[r.key]
            mine = r.per_second if unit == "IOPS" else r.mib_per_second
            print(f"  {name} in guest: {number(rate)} {unit} (vmsh's device capacity / that = "
                  f"{number(mine / rate) if rate else '-'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each workload")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="idle time before each block request (a guest's think time; the net rows have none)")
    parser.add_argument("--backends", default="io_uring,aio,sync",
                        help="block back-ends to measure (sync-python: sync without the native path; "
                        "sync-thread: through the queue's server thread)")
    parser.add_argument("--no-net", action="store_true", help="block rows only")
    parser.add_argument("--dir", help="where the block image goes (default: the temporary directory; "
                        "not tmpfs, where the device does not use asynchronous I/O)")
    args = parser.parse_args(argv)
    report(measure(args.seconds, tuple(args.backends.split(",")), args.gap_ms / 1000, not args.no_net, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
