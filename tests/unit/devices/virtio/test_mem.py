"""virtio-mem: configuration, resize rules, plug/unplug/unplug-all/state requests with every
bad input a guest can send, memory given back on unplug, and the state round trip."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeInterrupt, Ring
from vmsh.devices.virtio.mem import (
    BLOCK_SIZE,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    VirtioMem,
    VirtioMemState,
)
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.engine.memory import GuestMemoryMmap, GuestRegion
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceError, DeviceStateError

#: the device's region: 8 blocks after 16 MiB of ordinary RAM
REGION, BLOCKS = 32 << 20, 8


@pytest.fixture
def ram() -> Iterator[GuestMemoryMmap]:
    memory = GuestMemoryMmap.create(16 << 20)
    region = GuestRegion.create(REGION, BLOCKS * BLOCK_SIZE)
    region.hotplug = True
    memory.add_region(region)
    yield memory
    memory.close()


def activate(ram: GuestMemoryMmap, requested: int = 0) -> tuple[VirtioMem, Ring, FakeInterrupt, Allocator]:
    dev = VirtioMem(REGION, BLOCKS * BLOCK_SIZE, requested)
    alloc = Allocator(0x1000, 16 << 20)
    ring = Ring.create(ram, alloc, 16)
    irq = FakeInterrupt()
    dev.activate(ram, [ring.attach(VirtQueue(ram, 128))], irq, dev.avail_features)
    return dev, ring, irq, alloc


def request(dev: VirtioMem, ring: Ring, ram: GuestMemoryMmap, alloc: Allocator, kind: int, addr: int = 0,
            nb_blocks: int = 0, *, req_len: int = 24, resp_len: int = 10) -> tuple[int, int, int] | int:
    """Send one request; ``(response type, state, used length)``, or the used length alone when
    the device wrote nothing."""
    req = alloc.alloc(24, 8)
    resp = alloc.alloc(16, 8)
    ram.write(req, struct.pack("<H6xQH6x", kind, addr, nb_blocks))
    ram.write(resp, b"\xff" * 10)
    bufs = [(req, req_len, False)] + ([(resp, resp_len, True)] if resp_len else [])
    ring.add(bufs)
    dev.queue_notify(0)
    (_, used_len), = ring.take_used()
    if used_len == 0:
        return 0
    kind_out, state = struct.unpack("<H6xH", ram.read(resp, 10))
    return kind_out, state, used_len


def test_config_layout_and_features() -> None:
    dev = VirtioMem(REGION, BLOCKS * BLOCK_SIZE, 4 * BLOCK_SIZE)
    block, node, addr, size, usable, plugged, requested = struct.unpack("<QH6xQQQQQ", dev.read_config(0, 56))
    assert (block, node, addr, size, usable, plugged, requested) == (
        BLOCK_SIZE, 0, REGION, BLOCKS * BLOCK_SIZE, BLOCKS * BLOCK_SIZE, 0, 4 * BLOCK_SIZE)
    assert not dev.avail_features & (1 << VIRTIO_MEM_F_ACPI_PXM)
    numa = VirtioMem(REGION, BLOCKS * BLOCK_SIZE, node_id=1)
    assert numa.avail_features & (1 << VIRTIO_MEM_F_ACPI_PXM)
    assert struct.unpack_from("<H", numa.read_config(8, 2))[0] == 1
    with pytest.raises(DeviceError):
        VirtioMem(REGION + 4096, BLOCKS * BLOCK_SIZE)
    with pytest.raises(DeviceError):
        VirtioMem(REGION, BLOCKS * BLOCK_SIZE, node_id=0x10000)
    with pytest.raises(DeviceError):
        VirtioMem(REGION, BLOCKS * BLOCK_SIZE, (BLOCKS + 1) * BLOCK_SIZE)


def test_resize_rules(ram: GuestMemoryMmap) -> None:
    dev, _, irq, _ = activate(ram)
    dev.resize(2 * BLOCK_SIZE)
    assert dev.requested_size == 2 * BLOCK_SIZE and irq.config == 1
    with pytest.raises(DeviceError, match="identical"):
        dev.resize(2 * BLOCK_SIZE)
    with pytest.raises(DeviceError, match="bigger than region_size"):
        dev.resize((BLOCKS + 1) * BLOCK_SIZE)
    with pytest.raises(DeviceError, match="not aligned on block_size"):
        dev.resize(BLOCK_SIZE + 4096)
    assert dev.requested_size == 2 * BLOCK_SIZE and irq.config == 1


def test_plug_state_unplug(ram: GuestMemoryMmap) -> None:
    dev, ring, _, alloc = activate(ram, 3 * BLOCK_SIZE)
    send = lambda *a, **k: request(dev, ring, ram, alloc, *a, **k)  # noqa: E731
    assert send(VIRTIO_MEM_REQ_PLUG, REGION, 2) == (VIRTIO_MEM_RESP_ACK, 0, 10)
    assert dev.plugged_size == 2 * BLOCK_SIZE
    assert struct.unpack_from("<Q", dev.read_config(40, 8))[0] == 2 * BLOCK_SIZE
    # beyond requested_size: NACK, nothing plugged
    assert send(VIRTIO_MEM_REQ_PLUG, REGION + 2 * BLOCK_SIZE, 2)[0] == VIRTIO_MEM_RESP_NACK
    # a block already plugged: ERROR
    assert send(VIRTIO_MEM_REQ_PLUG, REGION + BLOCK_SIZE, 1)[0] == VIRTIO_MEM_RESP_ERROR
    assert send(VIRTIO_MEM_REQ_STATE, REGION, 2)[:2] == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)
    assert send(VIRTIO_MEM_REQ_STATE, REGION + BLOCK_SIZE, 2)[:2] == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
    assert send(VIRTIO_MEM_REQ_STATE, REGION + 4 * BLOCK_SIZE, 4)[:2] == (VIRTIO_MEM_RESP_ACK,
                                                                          VIRTIO_MEM_STATE_UNPLUGGED)
    # the guest uses the plugged RAM; an unplug gives it back (the guest reads zeros after a re-plug)
    ram.write(REGION + BLOCK_SIZE, b"secret")
    assert send(VIRTIO_MEM_REQ_UNPLUG, REGION + BLOCK_SIZE, 2)[0] == VIRTIO_MEM_RESP_ERROR  # half plugged
    assert send(VIRTIO_MEM_REQ_UNPLUG, REGION + BLOCK_SIZE, 1) == (VIRTIO_MEM_RESP_ACK, 0, 10)
    assert ram.read(REGION + BLOCK_SIZE, 6) == b"\0" * 6
    assert dev.plugged_size == BLOCK_SIZE and dev.plugged_ranges() == [(REGION, BLOCK_SIZE)]
    assert send(VIRTIO_MEM_REQ_UNPLUG_ALL) == (VIRTIO_MEM_RESP_ACK, 0, 10)
    assert dev.plugged_size == 0 and dev.plugged_ranges() == []
    assert dev.counters()["bad_requests"] == 2


@pytest.mark.parametrize("kind, addr, nb_blocks", [
    (VIRTIO_MEM_REQ_PLUG, REGION + 4096, 1),                     # not block-aligned
    (VIRTIO_MEM_REQ_PLUG, REGION, 0),                            # no blocks
    (VIRTIO_MEM_REQ_PLUG, REGION - BLOCK_SIZE, 1),               # below the region
    (VIRTIO_MEM_REQ_PLUG, REGION + (BLOCKS - 1) * BLOCK_SIZE, 2),  # past its end
    (VIRTIO_MEM_REQ_PLUG, (1 << 64) - BLOCK_SIZE, 0xFFFF),      # wraps the address space
    (VIRTIO_MEM_REQ_STATE, 0, 1),                                # ordinary RAM
    (VIRTIO_MEM_REQ_UNPLUG, REGION, BLOCKS + 1),
    (7, REGION, 1),                                              # no such request
])
def test_bad_requests_are_errors(ram: GuestMemoryMmap, kind: int, addr: int, nb_blocks: int) -> None:
    dev, ring, _, alloc = activate(ram, BLOCKS * BLOCK_SIZE)
    assert request(dev, ring, ram, alloc, kind, addr, nb_blocks)[0] == VIRTIO_MEM_RESP_ERROR
    assert dev.plugged_size == 0 and not dev.needs_reset


def test_short_buffers_are_returned_unanswered(ram: GuestMemoryMmap) -> None:
    dev, ring, _, alloc = activate(ram, BLOCKS * BLOCK_SIZE)
    assert request(dev, ring, ram, alloc, VIRTIO_MEM_REQ_PLUG, REGION, 1, req_len=20) == 0
    assert request(dev, ring, ram, alloc, VIRTIO_MEM_REQ_PLUG, REGION, 1, resp_len=0) == 0
    assert request(dev, ring, ram, alloc, VIRTIO_MEM_REQ_PLUG, REGION, 1, resp_len=8) == 0
    assert dev.plugged_size == 0 and dev.counters()["bad_requests"] == 3


def test_state_round_trip_and_bad_states(ram: GuestMemoryMmap) -> None:
    dev, ring, _, alloc = activate(ram, 4 * BLOCK_SIZE)
    request(dev, ring, ram, alloc, VIRTIO_MEM_REQ_PLUG, REGION + 2 * BLOCK_SIZE, 3)
    state = from_plain(VirtioMemState, to_plain(dev.state()))
    again = VirtioMem(REGION, BLOCKS * BLOCK_SIZE)
    again.restore(state)
    assert again.plugged_size == 3 * BLOCK_SIZE and again.requested_size == 4 * BLOCK_SIZE
    assert again.plugged_ranges() == [(REGION + 2 * BLOCK_SIZE, 3 * BLOCK_SIZE)]
    for bad in (VirtioMemState(4 * BLOCK_SIZE, 2 * BLOCK_SIZE, state.plugged),   # size is not the bitmap's
                VirtioMemState(4 * BLOCK_SIZE, 0, b"\0\0"),                      # another region's bitmap
                VirtioMemState((BLOCKS + 1) * BLOCK_SIZE, 0, b"\0"),             # beyond the region
                VirtioMemState(BLOCK_SIZE + 1, 0, b"\0"),                       # not whole blocks
                VirtioMemState(0, 0, b"\0", node_id=1)):                         # another node
        with pytest.raises(DeviceStateError):
            VirtioMem(REGION, BLOCKS * BLOCK_SIZE).restore(bad)
    odd = VirtioMem(REGION, 6 * BLOCK_SIZE)
    with pytest.raises(DeviceStateError):
        odd.restore(VirtioMemState(0, 7 * BLOCK_SIZE, b"\x7f"))  # a block past the last
