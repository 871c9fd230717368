"""Split virtqueue: chains, indirect tables, used ring, notification suppression, hostile rings."""

from __future__ import annotations

import time

import pytest

from tests.unit.devices.virtio.driver import Allocator, Ring
from vmsh.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    VirtQueue,
    VirtQueueState,
)
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import DeviceError, DeviceStateError, VirtQueueError


def make(mem: GuestMemoryMmap, alloc: Allocator, size: int = 8, **kw: bool) -> tuple[VirtQueue, Ring]:
    ring = Ring.create(mem, alloc, size)
    return ring.attach(VirtQueue(mem, size), **kw), ring


def test_queue_error_is_a_device_error() -> None:
    assert issubclass(VirtQueueError, DeviceError)


def test_queue_pop_empty(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, _ = make(mem, alloc)
    assert q.pop() is None


def test_queue_pop_chain_and_add_used(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    a, b = alloc.alloc(100), alloc.alloc(200)
    mem.write(a, b"request")
    head = ring.add([(a, 100, False), (b, 200, True)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.descriptors == [Descriptor(a, 100, False), Descriptor(b, 200, True)]
    assert chain.readable_len == 100 and chain.writable_len == 200
    assert chain.read(0, 7) == b"request"
    assert chain.write(b"x" * 300) == 200
    assert mem.read(b, 200) == b"x" * 200
    assert q.pop() is None
    q.add_used(chain.head, 200)
    assert ring.take_used() == [(head, 200)]


def test_queue_chain_helpers_cross_descriptors(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    bufs = [alloc.alloc(4) for _ in range(3)]
    for i, addr in enumerate(bufs):
        mem.write(addr, bytes([i]) * 4)
    ring.add([(addr, 4, False) for addr in bufs])
    chain = q.pop()
    assert chain is not None
    assert chain.read(2, 6) == b"\0\0\1\1\1\1"
    assert chain.read_all() == b"\0" * 4 + b"\1" * 4 + b"\2" * 4
    assert [len(v) for v in chain.readable_views(3, 6)] == [1, 4, 1]
    assert chain.readable_ranges(3, 6) == [(bufs[0] + 3, 1), (bufs[1], 4), (bufs[2], 1)]


def test_queue_indirect_table_flattened(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, indirect=True)
    a, b, c = alloc.alloc(16), alloc.alloc(512), alloc.alloc(1)
    head = ring.add([(a, 16, False), (b, 512, True), (c, 1, True)], alloc=alloc, indirect=True)
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert [d.length for d in chain.descriptors] == [16, 512, 1]
    assert chain.writable_len == 513


def test_queue_avail_idx_wraps(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, size=4)
    buf = alloc.alloc(8)
    ring.avail_idx = 0xFFFE
    mem.write_u16(ring.avail + 2, ring.avail_idx)
    q.next_avail = q.next_used = 0xFFFE
    ring.last_used = 0xFFFE
    mem.write_u16(ring.used + 2, 0xFFFE)
    heads = [ring.add([(buf, 8, True)]) for _ in range(3)]
    got = []
    while (chain := q.pop()) is not None:
        got.append(chain.head)
        q.add_used(chain.head, 8)
    assert got == heads and q.next_avail == 1 and q.next_used == 1
    assert [h for h, _ in ring.take_used()] == heads


def test_queue_no_interrupt_flag(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    assert q.needs_notification()
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification()


def test_queue_event_idx_suppression(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, event_idx=True)
    buf = alloc.alloc(8)
    # The driver wants an interrupt only when used idx passes 3 (i.e. after the 4th buffer).
    ring.set_used_event(3)
    for _ in range(5):
        ring.add([(buf, 8, True)])
    wanted = []
    while (chain := q.pop()) is not None:
        q.add_used(chain.head, 8)
        wanted.append(q.needs_notification())
    # the first check has no history and always signals; then only crossing used_event does
    assert wanted == [True, False, False, True, False]


def test_queue_event_idx_rearms_avail_event(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, event_idx=True)
    buf = alloc.alloc(8)
    ring.add([(buf, 8, True)])
    ring.add([(buf, 8, True)])
    assert q.pop() is not None and q.pop() is not None
    assert q.pop() is None
    assert ring.avail_event() == 2  # notify me as soon as entry 2 is made available


def test_queue_validate(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    q.validate()
    q.size = 6
    assert not q.is_valid()
    q.size = 16  # above max
    assert not q.is_valid()
    q.size = 8
    q.desc_table = ring.desc + 8  # misaligned
    assert not q.is_valid()
    q.desc_table = mem.size - 16  # runs off RAM
    assert not q.is_valid()


def test_queue_state_round_trip(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, event_idx=True)
    buf = alloc.alloc(8)
    for _ in range(3):
        ring.add([(buf, 8, True)])
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 8)
    q.needs_notification()
    state = q.state()
    again = VirtQueue(mem, 8)
    again.restore(state)
    assert again.state() == state
    assert again.pop() is not None and again.pop() is not None and again.pop() is None
    with pytest.raises(DeviceStateError):
        VirtQueue(mem, 16).restore(state)
    with pytest.raises(DeviceStateError):
        again.restore(VirtQueueState(max_size=8, size=8, next_avail=1 << 16))


# -- hostile rings: each ends in VirtQueueError, quickly -------------------------------------


def hostile(q: VirtQueue) -> VirtQueueError:
    start = time.monotonic()
    with pytest.raises(VirtQueueError) as info:
        q.pop()
    assert time.monotonic() - start < 1.0
    return info.value


def test_queue_hostile_head_out_of_range(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    ring.publish(8)
    assert "index 8" in str(hostile(q))


def test_queue_hostile_next_out_of_range(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    ring.write_desc(0, alloc.alloc(8), 8, VIRTQ_DESC_F_NEXT, 100)
    ring.publish(0)
    hostile(q)


def test_queue_hostile_loop(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, size=256)
    buf = alloc.alloc(8)
    ring.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, buf, 8, VIRTQ_DESC_F_NEXT, 0)
    ring.publish(0)
    assert "loop" in str(hostile(q))


def test_queue_hostile_self_loop_in_indirect_table(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, indirect=True)
    table = alloc.alloc(64)
    buf = alloc.alloc(8)
    for i in range(4):
        ring.write_desc(i, buf, 8, VIRTQ_DESC_F_NEXT, i, table=table)
    ring.write_desc(0, table, 64, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    hostile(q)


def test_queue_hostile_nested_indirect(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, indirect=True)
    table = alloc.alloc(16)
    ring.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, table=table)
    ring.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    assert "nested" in str(hostile(q))


def test_queue_hostile_indirect_with_next(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, indirect=True)
    table = alloc.alloc(16)
    ring.write_desc(0, alloc.alloc(8), 8, 0, table=table)
    ring.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    ring.publish(0)
    hostile(q)


def test_queue_hostile_indirect_not_negotiated(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    table = alloc.alloc(16)
    ring.write_desc(0, alloc.alloc(8), 8, 0, table=table)
    ring.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    hostile(q)


@pytest.mark.parametrize("length", [0, 15, 16 * 9, 0xFFFF_FFF0])
def test_queue_hostile_indirect_table_length(mem: GuestMemoryMmap, alloc: Allocator, length: int) -> None:
    q, ring = make(mem, alloc, indirect=True)
    ring.write_desc(0, alloc.alloc(16 * 9), length, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    hostile(q)


def test_queue_hostile_indirect_table_outside_ram(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc, indirect=True)
    ring.write_desc(0, mem.size - 16, 32, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    hostile(q)


def test_queue_hostile_readable_after_writable(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    buf = alloc.alloc(8)
    ring.write_desc(0, buf, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, buf, 8, 0)
    ring.publish(0)
    assert "readable" in str(hostile(q))


@pytest.mark.parametrize("addr,length", [(16 << 20, 8), ((16 << 20) - 4, 8), (1 << 63, 1),
                                         (0xFFFF_FFFF_FFFF_FFF0, 0xFFFF_FFFF)])
def test_queue_hostile_buffer_outside_ram(mem: GuestMemoryMmap, alloc: Allocator, addr: int, length: int) -> None:
    q, ring = make(mem, alloc)
    ring.write_desc(0, addr, length, VIRTQ_DESC_F_WRITE)
    ring.publish(0)
    hostile(q)


def test_queue_hostile_avail_idx_jump(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, ring = make(mem, alloc)
    mem.write_u16(ring.avail + 2, 9)  # 9 entries in a ring of 8
    assert "ahead" in str(hostile(q))


def test_queue_hostile_rings_outside_ram_at_runtime(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    q, _ = make(mem, alloc)
    q.avail_ring = mem.size + 0x1000  # validate() would refuse; pop must not crash either
    hostile(q)
    q2, ring2 = make(mem, alloc)
    ring2.add([(alloc.alloc(8), 8, True)])
    chain = q2.pop()
    assert chain is not None
    q2.used_ring = 1 << 40
    with pytest.raises(VirtQueueError):
        q2.add_used(chain.head, 8)
    with pytest.raises(VirtQueueError):
        q2.add_used(99, 8)


def test_queue_hostile_huge_lengths_no_allocation(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    # Zero-length descriptors and max-length chains are walked without allocating their size.
    q, ring = make(mem, alloc, size=8)
    for i in range(8):
        ring.write_desc(i, 0, 0, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, (i + 1) % 8)
    ring.publish(0)
    hostile(q)
