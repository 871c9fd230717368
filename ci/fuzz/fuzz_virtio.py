"""Fuzz campaign: virtqueue descriptor chains for every virtio device model.

Each input picks a device (block, net, console, rng, balloon with every queue, pmem, vsock,
watchdog), the features the driver acks, one of its queues and a split ring for it (size,
ring addresses, descriptor table, available ring and idx, event indexes) plus the contents of
the buffers the descriptors point at (mostly small integers, so that request headers have
plausible types, sectors and lengths). Descriptors point anywhere: the buffer area, the rings,
the last bytes of RAM, past RAM, 2^64-1; lengths up to 2^32-1; flags with NEXT, WRITE and
INDIRECT in any mix; ``next`` inside and outside the table. Guest RAM is a 1 MiB
:class:`GuestMemoryMmap` (an anonymous mapping, as the unit tests build it).

The campaign does what the virtio-pci transport does at DRIVER_OK (``validate`` the ready
queues, then ``activate``; an error there is the transport's NEEDS_RESET), then
kicks the queue a few times. A device may enter DEVICE_NEEDS_RESET; nothing may raise out of
``queue_notify``. Devices are built once and reset between inputs, as a driver resets them.
virtio-net needs a tap (root and /dev/net/tun); without one it is left out and the campaign
says so.

Usage: ``python3 ci/fuzz/fuzz_virtio.py --inputs 100000``
"""

from __future__ import annotations

import os
import random
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz import fuzzlib
from tests.unit.devices.virtio.driver import FakeInterrupt
from tests.unit.fakes import FakeTrigger
from vmsh.devices.backends.tap import Tap
from vmsh.devices.virtio.balloon import VirtioBalloon
from vmsh.devices.virtio.block import VirtioBlock
from vmsh.devices.virtio.console import VirtioConsole
from vmsh.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VirtioDevice, has_feature
from vmsh.devices.virtio.net import VirtioNet
from vmsh.devices.virtio.pmem import VirtioPmem
from vmsh.devices.virtio.queue import VirtQueue, is_power_of_two
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.devices.virtio.vsock.device import VirtioVsock
from vmsh.devices.virtio.watchdog import VirtioWatchdog
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import VmshError

RAM_SIZE = 1 << 20
#: where buffers are (the descriptors mostly point here)
DATA, DATA_END = 0x1000, 0x40000
#: where the rings under test go unless the input moves them; the other queues' empty rings follow
RINGS = 0x80000
PMEM_START, PMEM_SIZE = 1 << 32, 2 << 20
DEVICES = ("block", "net", "console", "rng", "balloon", "pmem", "vsock", "watchdog")


class NoWatcher:
    """The I/O loop that never calls back (the campaign drives queues by kicks only)."""

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove(self, fd: int) -> None:
        pass


@dataclass
class RingInput:
    device: str
    features: int  # a mask applied to what the device offers
    queue: int  # the queue under test (modulo the device's queue count)
    size: int
    desc: int
    avail: int
    used: int
    descriptors: list[tuple[int, int, int, int]]  # (addr, len, flags, next)
    avail_flags: int
    avail_idx: int
    heads: list[int]
    used_event: int
    writes: list[tuple[int, bytes]]  # buffer contents
    kicks: int


_U64 = (1 << 64) - 1
EDGE_ADDRS = [0, RINGS, RAM_SIZE - 1, RAM_SIZE - 16, RAM_SIZE - 4096, RAM_SIZE, RAM_SIZE + 4096, PMEM_START, 1 << 63,
              _U64 - 15, _U64]
EDGE_LENGTHS = [0, 1, 2, 4, 8, 16, 44, 64, 512, 4096, 65536, RAM_SIZE, 1 << 31, (1 << 32) - 1]
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT = 1, 2, 4


def _addr(rnd: random.Random) -> int:
    pick = rnd.randrange(10)
    if pick < 6:
        return rnd.randrange(DATA, DATA_END - 256) & ~(0xF if pick < 4 else 0)
    if pick < 9:
        return rnd.choice(EDGE_ADDRS)
    return rnd.getrandbits(64)


def _length(rnd: random.Random) -> int:
    pick = rnd.randrange(10)
    if pick < 6:
        return rnd.choice((1, 4, 8, 12, 16, 44, 64, 128, 256, 512, 1024, 4096))
    if pick < 9:
        return rnd.choice(EDGE_LENGTHS)
    return rnd.getrandbits(32)


def _content(rnd: random.Random) -> bytes:
    """Mostly small little-endian u32s: request types, sectors, ops, lengths."""
    if rnd.randrange(4) == 0:
        return rnd.randbytes(rnd.randrange(129))
    words = [rnd.choice((rnd.randrange(17), rnd.getrandbits(32), 4096, 0xFFFFFFFF, 1, 0))
             for _ in range(rnd.randint(1, 24))]
    return struct.pack(f"<{len(words)}I", *words)


Desc = tuple[int, int, int, int]


def _chains(rnd: random.Random, size: int) -> tuple[list[Desc], list[int], list[tuple[int, bytes]]]:
    """Well-formed chains (as a driver makes them), before corruption: descriptors, heads, buffer contents."""
    descriptors: list[tuple[int, int, int, int]] = []
    heads: list[int] = []
    writes: list[tuple[int, bytes]] = []
    free = size
    while free and len(heads) < 4:
        n = rnd.randint(1, min(free, 4))
        first = len(descriptors)
        heads.append(first)
        if rnd.randrange(5) == 0:  # an indirect table of n descriptors
            table = rnd.randrange(DATA, DATA_END - 256) & ~0xF
            entries = b""
            for j in range(n):
                addr = rnd.randrange(DATA, DATA_END - 4096)
                flags = (VIRTQ_DESC_F_NEXT if j + 1 < n else 0) | (VIRTQ_DESC_F_WRITE if j and rnd.randrange(2) else 0)
                length = rnd.choice((1, 16, 64, 512, 4096))
                entries += struct.pack("<QIHH", addr, length, flags, j + 1 if j + 1 < n else 0)
                writes.append((addr, _content(rnd)))
            writes.append((table, entries))
            descriptors.append((table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0))
            free -= 1
            continue
        for j in range(n):
            addr = rnd.randrange(DATA, DATA_END - 4096)
            more = j + 1 < n
            writable = j > 0 and rnd.randrange(2)
            flags = (VIRTQ_DESC_F_NEXT if more else 0) | (VIRTQ_DESC_F_WRITE if writable else 0)
            descriptors.append((addr, rnd.choice((1, 8, 16, 44, 64, 512, 4096)), flags, first + j + 1 if more else 0))
            if not writable:
                writes.append((addr, _content(rnd)))
        free -= n
    return descriptors, heads, writes


def _corrupt(rnd: random.Random, size: int, descriptors: list[tuple[int, int, int, int]], heads: list[int],
             writes: list[tuple[int, bytes]]) -> None:
    for _ in range(rnd.choice((0, 0, 1, 1, 2, 3, 6))):
        what = rnd.randrange(7)
        if what == 0 and descriptors:
            i = rnd.randrange(len(descriptors))
            d = list(descriptors[i])
            d[0] = _addr(rnd)
            descriptors[i] = (d[0], d[1], d[2], d[3])
        elif what == 1 and descriptors:
            i = rnd.randrange(len(descriptors))
            a, _, f, n = descriptors[i]
            descriptors[i] = (a, _length(rnd), f, n)
        elif what == 2 and descriptors:
            i = rnd.randrange(len(descriptors))
            a, ln, f, n = descriptors[i]
            descriptors[i] = (a, ln, rnd.choice((rnd.randrange(8), rnd.getrandbits(16))), n)
        elif what == 3 and descriptors:
            i = rnd.randrange(len(descriptors))
            a, ln, f, _ = descriptors[i]
            descriptors[i] = (a, ln, f, rnd.choice((rnd.randrange(size + 2), i, 0, rnd.getrandbits(16))))
        elif what == 4 and heads:
            heads[rnd.randrange(len(heads))] = rnd.choice((rnd.randrange(size + 2), rnd.getrandbits(16)))
        elif what == 5:
            descriptors.append((_addr(rnd), _length(rnd), rnd.getrandbits(16), rnd.getrandbits(16)))
        else:
            writes.append((rnd.randrange(DATA, DATA_END - 256), _content(rnd)))


@st.composite
def ring_input(draw: st.DrawFn) -> RingInput:
    # Hypothesis draws the randomness and the shape; plain random builds the tables (drawing
    # every field through Hypothesis costs about 10 ms an input)
    rnd = draw(st.randoms(use_true_random=False))
    size = 1 << rnd.randrange(9) if rnd.randrange(12) else rnd.choice((0, 3, 1024, 65535))
    table = max(1, min(size, 64))
    descriptors, heads, writes = _chains(rnd, table)
    _corrupt(rnd, table, descriptors, heads, writes)
    moved = rnd.randrange(12) == 0
    kicked = len(heads) if rnd.randrange(8) else rnd.choice((0, size + 1, rnd.getrandbits(16)))
    return RingInput(
        device=draw(st.sampled_from(DEVICES)),
        features=rnd.choice((-1, -1, 0, rnd.getrandbits(64))),
        queue=rnd.randrange(5),
        size=size,
        desc=_addr(rnd) if moved else RINGS,
        avail=_addr(rnd) if moved else RINGS + 0x10000,
        used=_addr(rnd) if moved else RINGS + 0x20000,
        descriptors=descriptors,
        avail_flags=rnd.choice((0, 0, 1, rnd.getrandbits(16))),
        avail_idx=kicked & 0xFFFF,
        heads=heads,
        used_event=rnd.choice((0, 1, rnd.getrandbits(16))),
        writes=writes,
        kicks=rnd.randint(1, 3),
    )


class _Harness:
    def __init__(self) -> None:
        self.mem: GuestMemoryMmap | None = None
        self.devices: dict[str, VirtioDevice] = {}
        self.skipped: dict[str, str] = {}
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def setup(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vmsh-fuzz-virtio-")
        d = self.tmp.name
        self.mem = GuestMemoryMmap.create(RAM_SIZE)
        with open(f"{d}/disk.img", "wb") as f:
            f.truncate(1 << 20)
        with open(f"{d}/pmem.img", "wb") as f:
            f.truncate(PMEM_SIZE)
        makers: dict[str, Callable[[], VirtioDevice]] = {
            "block": lambda: VirtioBlock(f"{d}/disk.img", num_queues=2, queue_size=256, serial="fuzz"),
            "net": lambda: VirtioNet(Tap.open(None, 2), b"\x02\0\0\0\0\1", NoWatcher()),
            "console": lambda: VirtioConsole(out=lambda data: None, cols=80, rows=25),
            "rng": lambda: VirtioRng(),
            "balloon": lambda: VirtioBalloon(1 << 20, deflate_on_oom=True, free_page_reporting=True, stats=True),
            "pmem": lambda: VirtioPmem(f"{d}/pmem.img", PMEM_START, PMEM_SIZE),
            "vsock": lambda: VirtioVsock(3, f"{d}/vsock.sock", NoWatcher()),
            "watchdog": lambda: VirtioWatchdog(FakeTrigger(), interval=3600),
        }
        for name, make in makers.items():
            try:
                self.devices[name] = make()
            except (OSError, VmshError) as err:  # no tap without root and /dev/net/tun
                self.skipped[name] = str(err)

    def teardown(self) -> None:
        for dev in self.devices.values():
            dev.close()
        self.devices.clear()
        if self.mem is not None:
            self.mem.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    def target(self, inp: RingInput) -> None:
        mem = self.mem
        assert mem is not None
        dev = self.devices.get(inp.device)
        if dev is None:
            return
        dev.reset()
        mem.fill(0, RAM_SIZE)
        nq = len(dev.queue_max_sizes)
        index = inp.queue % nq
        features = dev.avail_features & inp.features
        queues = []
        for i, max_size in enumerate(dev.queue_max_sizes):
            q = VirtQueue(mem, max_size)
            q.event_idx = has_feature(features, VIRTIO_F_EVENT_IDX)
            q.indirect = has_feature(features, VIRTIO_F_INDIRECT_DESC)
            if i == index:
                # a power of two over the queue's maximum is refused at DRIVER_OK like 0 or 3: keep to it
                size = min(inp.size, max_size) if is_power_of_two(inp.size) else inp.size
                q.size, q.desc_table, q.avail_ring, q.used_ring = size, inp.desc, inp.avail, inp.used
            else:  # an empty, valid ring of 2 entries per other queue
                base = RINGS + 0x30000 + 0x1000 * i
                q.size, q.desc_table, q.avail_ring, q.used_ring = 2, base, base + 0x100, base + 0x200
            q.ready = True
            queues.append(q)
        self._write_ring(mem, inp)
        for addr, data in inp.writes:
            mem.write(addr, data)
        # DRIVER_OK as the transport does it: a ring the driver placed badly is NEEDS_RESET
        # (VirtioPciDevice._activate), and so is a device that cannot start with the acked
        # features (virtio-net: a tap refuses GUEST_ECN without GUEST_TSO4/6, a set §5.1.3.1 forbids)
        try:
            for q in queues:
                q.validate()
            dev.activate(mem, queues, FakeInterrupt(), features)
        except (VmshError, OSError, ValueError):
            return
        for _ in range(inp.kicks):
            dev.queue_notify(index)

    @staticmethod
    def _write_ring(mem: GuestMemoryMmap, inp: RingInput) -> None:
        def put(addr: int, data: bytes) -> None:
            if mem.is_valid_range(addr, len(data)):
                mem.write(addr, data)

        for i, (addr, length, flags, nxt) in enumerate(inp.descriptors):
            put(inp.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        size = max(inp.size, 1)
        put(inp.avail, struct.pack("<HH", inp.avail_flags, inp.avail_idx))
        for i, head in enumerate(inp.heads[:size]):
            put(inp.avail + 4 + 2 * i, struct.pack("<H", head))
        put(inp.avail + 4 + 2 * size, struct.pack("<H", inp.used_event))


HARNESS = _Harness()
CAMPAIGN = fuzzlib.Campaign("virtio", ring_input(), HARNESS.target, (), time_limit=5.0,
                            setup=HARNESS.setup, teardown=HARNESS.teardown)

if __name__ == "__main__":
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        print("no /dev/net/tun: virtio-net is left out", file=sys.stderr)
    code = fuzzlib.main(CAMPAIGN)
    if HARNESS.skipped:
        print("left out: " + ", ".join(f"{k} ({v})" for k, v in HARNESS.skipped.items()))
    sys.exit(code)
