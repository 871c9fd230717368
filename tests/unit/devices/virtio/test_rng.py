"""virtio-rng: buffers filled from the entropy source."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeInterrupt, Ring
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.devices.virtio.rng import MAX_REQUEST_BYTES, VirtioRng, VirtioRngState
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import DeviceError


def activate(rng: VirtioRng, mem: GuestMemoryMmap, alloc: Allocator) -> tuple[Ring, FakeInterrupt]:
    ring = Ring.create(mem, alloc, 8)
    q = ring.attach(VirtQueue(mem, 256))
    irq = FakeInterrupt()
    rng.activate(mem, [q], irq, 1 << 32)
    return ring, irq


def test_rng_fills_from_source(tmp_path: Path, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    src = tmp_path / "entropy"
    src.write_bytes(bytes(range(256)) * 4)
    rng = VirtioRng(str(src))
    ring, irq = activate(rng, mem, alloc)
    a, b = alloc.alloc(10), alloc.alloc(6)
    head = ring.add([(a, 10, True), (b, 6, True)])
    rng.queue_notify(0)
    assert ring.take_used() == [(head, 16)]
    assert mem.read(a, 10) + mem.read(b, 6) == bytes(range(16))
    assert irq.used == [0]
    assert rng.counters() == {"read_bytes": 16, "read_ops": 1}
    rng.close()


def test_rng_short_source(tmp_path: Path, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    src = tmp_path / "entropy"
    src.write_bytes(b"abc")
    rng = VirtioRng(str(src))
    ring, _ = activate(rng, mem, alloc)
    head = ring.add([(alloc.alloc(64), 64, True)])
    rng.queue_notify(0)
    assert ring.take_used() == [(head, 3)]
    rng.close()


def test_rng_huge_request_is_capped(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    rng = VirtioRng()
    ring, _ = activate(rng, mem, alloc)
    head = ring.add([(0x10_0000, 8 << 20, True)])
    rng.queue_notify(0)
    assert ring.take_used() == [(head, MAX_REQUEST_BYTES)]
    rng.close()


def test_rng_readable_only_chain_gets_nothing(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    rng = VirtioRng()
    ring, _ = activate(rng, mem, alloc)
    head = ring.add([(alloc.alloc(8), 8, False)])
    rng.queue_notify(0)
    assert ring.take_used() == [(head, 0)]
    rng.close()


def test_rng_not_activated_or_reset_ignores_kicks(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    rng = VirtioRng()
    rng.queue_notify(0)
    rng.queue_notify(3)
    ring, _ = activate(rng, mem, alloc)
    rng.reset()
    ring.add([(alloc.alloc(8), 8, True)])
    rng.queue_notify(0)
    assert ring.take_used() == []
    rng.close()


def test_rng_bad_source() -> None:
    with pytest.raises(DeviceError):
        VirtioRng("/nonexistent/entropy")


def test_rng_state() -> None:
    rng = VirtioRng()
    rng.restore(VirtioRngState(read_bytes=5, read_ops=1))
    assert rng.state() == VirtioRngState(5, 1)
    rng.close()
