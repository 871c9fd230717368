"""GuestMemoryMmap.discard: pages given back to the host read as zeros; bad ranges are refused."""

from __future__ import annotations

import pytest

from vmsh.engine.memory import PAGE_SIZE, GuestMemoryMmap, GuestRegion, MemoryOptions
from vmsh.errors import GuestMemoryError


def _nonzero_pages(mem: GuestMemoryMmap) -> int:
    return sum(1 for i in range(0, mem.size, PAGE_SIZE) if mem.read(i, 1) != b"\0")


@pytest.mark.parametrize("shared", [False, True])
def test_discard_zeroes_pages(shared: bool) -> None:
    mem = GuestMemoryMmap.create(64 * PAGE_SIZE, MemoryOptions(shared=shared, thp=False))
    try:
        mem.fill(0, 8 * PAGE_SIZE, 0xAA)
        mem.discard(2 * PAGE_SIZE, 3 * PAGE_SIZE)
        assert mem.read(PAGE_SIZE, PAGE_SIZE) == b"\xaa" * PAGE_SIZE
        assert mem.read(2 * PAGE_SIZE, 3 * PAGE_SIZE) == bytes(3 * PAGE_SIZE)
        assert mem.read(5 * PAGE_SIZE, 1) == b"\xaa"
        assert _nonzero_pages(mem) == 5
        mem.discard(0, 0)  # nothing to do
    finally:
        mem.close()


def test_discard_across_regions() -> None:
    a = GuestRegion.create(0, 4 * PAGE_SIZE)
    b = GuestRegion.create(4 * PAGE_SIZE, 4 * PAGE_SIZE)
    mem = GuestMemoryMmap([a, b])
    try:
        mem.fill(0, 8 * PAGE_SIZE, 1)
        mem.discard(3 * PAGE_SIZE, 2 * PAGE_SIZE)
        assert mem.read(3 * PAGE_SIZE, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
        assert mem.read(2 * PAGE_SIZE, 1) == b"\1" and mem.read(5 * PAGE_SIZE, 1) == b"\1"
    finally:
        mem.close()


@pytest.mark.parametrize("addr,length", [
    (1, PAGE_SIZE), (0, PAGE_SIZE + 1), (-PAGE_SIZE, PAGE_SIZE), (0, -PAGE_SIZE),
    (60 * PAGE_SIZE, 8 * PAGE_SIZE), (1 << 40, PAGE_SIZE),
])
def test_discard_refuses_bad_ranges(addr: int, length: int) -> None:
    mem = GuestMemoryMmap.create(64 * PAGE_SIZE)
    try:
        mem.fill(0, 64 * PAGE_SIZE, 7)
        with pytest.raises(GuestMemoryError):
            mem.discard(addr, length)
        assert mem.read(60 * PAGE_SIZE, 4 * PAGE_SIZE) == b"\7" * 4 * PAGE_SIZE  # nothing discarded
    finally:
        mem.close()
