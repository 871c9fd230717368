"""virtio-blk's queue server threads (``block_fast.QueueServer``, ``vmsh_blk_server_*``).

A synchronous raw disk with an I/O loop owns its queues' kick eventfds (the engine makes them
the ioeventfds). The loop serves the first kick in Python and then hands the queue to a native
thread named as cloud-hypervisor names it (``_disk0_q0``), which serves plain requests and
writes the vector's irqfd itself. Here a test writes the kick eventfd as KVM would, with the
real I/O loop and a router with one eventfd per vector.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver, Ring
from vmsh.devices.virtio.block import VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from vmsh.devices.virtio.pci import MSIX_TABLE_OFFSET, VirtioPciDevice
from vmsh.engine.io_loop import IoLoop
from vmsh.engine.memory import GuestMemoryMmap

DISK_SIZE = 1 << 20
RAM_SIZE = 16 << 20


class IrqfdRouter(FakeRouter):
    """The engine's KvmMsiRouter as the device sees it: ``trigger`` (the Python path) is
    recorded, and each vector has an eventfd a device thread may write."""

    def __init__(self, vectors: int = 4) -> None:
        super().__init__()
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(vectors)]

    def eventfd(self, vector: int) -> int | None:
        return self.fds[vector] if 0 <= vector < len(self.fds) else None

    def written(self, vector: int) -> int:
        """How often the eventfd of ``vector`` was written since the last call."""
        try:
            return os.eventfd_read(self.fds[vector])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class Disk:
    """A disk with its I/O loop and driver; requests are kicked through the kick eventfd."""

    def __init__(self, image: Path) -> None:
        self.loop = IoLoop("test-io")
        self.loop.start()
        self.mem = GuestMemoryMmap.create(RAM_SIZE)
        self.alloc = Allocator(0x1000, RAM_SIZE)
        self.blk = VirtioBlock(str(image), serial="server", disable_io_uring=True, disable_aio=True,
                               watcher=self.loop, dev_id="_disk0")
        self.router = IrqfdRouter()
        self.pci = VirtioPciDevice(self.blk, self.mem, self.router)
        self.driver = PciDriver(self.pci, self.mem, self.alloc)
        self.ring: Ring = self.driver.probe()[0]
        self.image = image

    def request(self, rtype: int, sector: int, data: bytes | int) -> tuple[int, int]:
        """Queue one request; (data buffer address, status address)."""
        header = self.alloc.alloc(16)
        self.mem.write(header, struct.pack("<IIQ", rtype, 0, sector))
        status = self.alloc.alloc(1)
        if isinstance(data, int):
            buf = self.alloc.alloc(data, 512)
            self.ring.add([(header, 16, False), (buf, data, True), (status, 1, True)])
        else:
            buf = self.alloc.alloc(len(data), 512)
            self.mem.write(buf, data)
            self.ring.add([(header, 16, False), (buf, len(data), False), (status, 1, True)])
        return buf, status

    def kick(self) -> None:
        # as Linux's driver with EVENT_IDX: an interrupt for the next used entry
        self.ring.set_used_event(self.ring.used_idx())
        os.eventfd_write(self.blk.kick_fds[0], 1)  # what KVM's ioeventfd does on a notify write

    def wait_used(self, count: int) -> None:
        wait(lambda: self.ring.used_idx() >= count, f"{count} used entries")

    def close(self) -> None:
        self.pci.close()
        self.loop.stop()
        self.router.close()
        self.mem.close()


def wait(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:
            pass
    return names


def irq_written(router: IrqfdRouter, vector: int) -> bool:
    ready, _, _ = select.select([router.fds[vector]], [], [], 2.0)
    return bool(ready) and router.written(vector) > 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
def disk(image: Path) -> Iterator[Disk]:
    d = Disk(image)
    yield d
    d.close()


def test_the_first_kick_is_served_by_the_loop_then_a_named_thread_takes_the_queue(disk: Disk) -> None:
    assert len(disk.blk.kick_fds) == 1 and not disk.blk._servers[0].running
    buf, status = disk.request(VIRTIO_BLK_T_IN, 2, 4096)
    disk.kick()
    disk.wait_used(1)
    assert disk.mem.read(buf, 4096) == disk.image.read_bytes()[1024:1024 + 4096]
    assert disk.mem.read(status, 1) == b"\0"
    assert disk.router.fired == [1]  # the loop raised vector 1 through the MSI-X model
    wait(lambda: disk.blk._servers[0].running, "the queue's thread")
    assert "_disk0_q0" in thread_names()

    # from now on the thread serves and writes the irqfd itself; Python raises nothing
    data = os.urandom(8192)
    disk.request(VIRTIO_BLK_T_OUT, 16, data)
    buf, status = disk.request(VIRTIO_BLK_T_IN, 16, 8192)
    disk.kick()
    disk.wait_used(3)
    assert irq_written(disk.router, 1)
    assert disk.mem.read(buf, 8192) == data and disk.mem.read(status, 1) == b"\0"
    assert disk.image.read_bytes()[16 * 512:16 * 512 + 8192] == data
    assert disk.router.fired == [1]
    counts = disk.blk.counters()
    assert (counts["read_ops"], counts["write_ops"], counts["write_bytes"]) == (2, 1, 8192)


def test_a_chain_for_the_python_path_is_handed_back(disk: Disk) -> None:
    disk.request(VIRTIO_BLK_T_IN, 0, 512)
    disk.kick()
    wait(lambda: disk.blk._servers[0].running, "the queue's thread")
    serial, status = disk.request(VIRTIO_BLK_T_GET_ID, 0, 20)
    buf, _ = disk.request(VIRTIO_BLK_T_IN, 1, 512)
    disk.kick()
    disk.wait_used(3)
    assert disk.mem.read(serial, 6) == b"server" and disk.mem.read(status, 1) == b"\0"
    assert disk.mem.read(buf, 512) == disk.image.read_bytes()[512:1024]
    # the loop served GET_ID and the read after it, then gave the queue back to a new thread
    wait(lambda: disk.blk._servers[0].running, "the queue's thread again")


def test_a_masked_vector_is_raised_through_the_msix_model_and_stays_pending(disk: Disk) -> None:
    disk.request(VIRTIO_BLK_T_IN, 0, 512)
    disk.kick()
    wait(lambda: disk.blk._servers[0].running, "the queue's thread")
    disk.driver.write(MSIX_TABLE_OFFSET + 16 * 1 + 12, 1, 4)  # mask vector 1
    fired = list(disk.router.fired)
    disk.request(VIRTIO_BLK_T_IN, 1, 512)
    disk.kick()
    disk.wait_used(2)
    wait(lambda: disk.pci.msix.pending[1], "vector 1 pending")
    assert disk.router.written(1) == 0 and disk.router.fired == fired
    disk.driver.write(MSIX_TABLE_OFFSET + 16 * 1 + 12, 0, 4)  # unmask: the pending vector fires
    assert disk.router.fired == [*fired, 1]
    disk.request(VIRTIO_BLK_T_IN, 2, 512)
    disk.kick()
    disk.wait_used(3)
    assert irq_written(disk.router, 1)  # the thread writes the irqfd again


def test_pause_and_reset_take_the_queue_back(disk: Disk) -> None:
    for n in range(3):
        disk.request(VIRTIO_BLK_T_IN, n, 512)
        disk.kick()
        disk.wait_used(n + 1)
    wait(lambda: disk.blk._servers[0].running, "the queue's thread")
    disk.loop.pause()
    disk.blk.pause()
    assert not disk.blk._servers[0].running and "_disk0_q0" not in thread_names()
    queue = disk.blk.queues[0]
    assert (queue.next_avail, queue.next_used) == (3, 3)
    assert disk.pci.state().queues[0].next_used == 3 and disk.blk.counters()["read_ops"] == 3
    disk.loop.resume()
    disk.request(VIRTIO_BLK_T_IN, 4, 512)
    disk.kick()
    disk.wait_used(4)
    wait(lambda: disk.blk._servers[0].running, "the queue's thread after resume")
    disk.driver.set_common(0x14, 0, 1)  # device status 0: reset
    assert not disk.blk._servers[0].running
    wait(lambda: "_disk0_q0" not in thread_names(), "the thread to end")
    assert disk.blk.counters()["read_ops"] == 4
