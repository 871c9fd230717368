"""GuestMemoryMmap bounds and region crossings; Bus routing and overlap checks."""

from __future__ import annotations

import pytest

from vmsh.engine.bus import Bus, BusError
from vmsh.engine.memory import GuestMemoryMmap, GuestRegion, ram_ranges
from vmsh.errors import GuestMemoryError


@pytest.fixture
def two_regions() -> GuestMemoryMmap:
    # [0, 8 KiB) and [16 KiB, 20 KiB) with a hole, plus [8 KiB, 12 KiB) adjacent to the first
    mem = GuestMemoryMmap([GuestRegion.create(0, 0x2000), GuestRegion.create(0x2000, 0x1000),
                       GuestRegion.create(0x4000, 0x1000)])
    yield mem
    mem.close()


def test_ram_ranges_split_around_the_32bit_hole() -> None:
    assert ram_ranges(1 << 30) == [(0, 1 << 30)]
    assert ram_ranges(4 << 30) == [(0, 3 << 30), (4 << 30, 1 << 30)]


def test_memory_read_write_round_trip(two_regions: GuestMemoryMmap) -> None:
    two_regions.write(0x100, b"abc")
    assert two_regions.read(0x100, 3) == b"abc"
    two_regions.write_u64(0x4008, 0x1122334455667788)
    assert two_regions.read_u32(0x400C) == 0x11223344


def test_memory_access_crossing_adjacent_regions(two_regions: GuestMemoryMmap) -> None:
    two_regions.write(0x1FFE, b"wxyz")
    assert two_regions.read(0x1FFE, 4) == b"wxyz"
    assert [len(v) for v in two_regions.slices(0x1FFE, 4)] == [2, 2]


def test_memory_slice_is_zero_copy(two_regions: GuestMemoryMmap) -> None:
    view = two_regions.slice(0x10, 4)
    view[:] = b"\x01\x02\x03\x04"
    assert two_regions.read(0x10, 4) == b"\x01\x02\x03\x04"


def test_memory_slice_refuses_to_cross_regions(two_regions: GuestMemoryMmap) -> None:
    with pytest.raises(GuestMemoryError, match="leaves its RAM region"):
        two_regions.slice(0x1FFE, 4)


@pytest.mark.parametrize("addr,length", [(0x3000, 1), (0x2FFF, 2), (0x5000, 1), (-1, 1), (0x4FFF, 2)])
def test_memory_rejects_accesses_outside_ram(two_regions: GuestMemoryMmap, addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.read(addr, length)
    with pytest.raises(GuestMemoryError):
        two_regions.write(addr, bytes(length))
    assert not two_regions.is_valid_range(addr, length)


def test_memory_write_outside_ram_writes_nothing(two_regions: GuestMemoryMmap) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.write(0x2FFE, b"abcd")  # runs into the hole at 0x3000
    assert two_regions.read(0x2FFE, 2) == b"\0\0"


def test_memory_checked_offset(two_regions: GuestMemoryMmap) -> None:
    assert two_regions.checked_offset(0x4000, 0xFFF) == 0x4FFF
    with pytest.raises(GuestMemoryError):
        two_regions.checked_offset(0x4000, 0x1000)


def test_memory_rejects_overlapping_regions() -> None:
    a, b = GuestRegion.create(0, 0x2000), GuestRegion.create(0x1000, 0x1000)
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemoryMmap([a, b])
    a.close()
    b.close()


def test_memory_create_shared_memfd_region() -> None:
    from vmsh.engine.memory import MemoryOptions

    mem = GuestMemoryMmap.create(1 << 20, MemoryOptions(shared=True))
    assert mem.regions[0].fd is not None
    mem.write(0, b"x")
    assert mem.read(0, 1) == b"x"
    mem.close()


def test_memory_create_rejects_bad_sizes() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemoryMmap.create(1000)


class Dev:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, object]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(("r", offset, size))
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, bytes(data)))


def test_bus_routes_with_device_relative_offsets() -> None:
    bus, a, b = Bus("pio"), Dev(), Dev()
    bus.insert(a, 0x3F8, 8)
    bus.insert(b, 0x400, 4)
    assert bus.write(0x3FB, b"\x03")
    assert bus.read(0x402, 1) == b"\x02"
    assert a.log == [("w", 3, b"\x03")] and b.log == [("r", 2, 1)]


def test_bus_unmapped_reads_ones_and_drops_writes() -> None:
    bus = Bus("pio")
    assert bus.read(0x10, 2) == b"\xff\xff"
    assert not bus.write(0x10, b"\x00")


def test_bus_access_must_fit_in_the_range() -> None:
    bus, a = Bus("mmio"), Dev()
    bus.insert(a, 0x1000, 4)
    assert bus.read(0x1002, 4) == b"\xff" * 4
    assert not bus.write(0x1003, b"\0\0")
    assert a.log == []


@pytest.mark.parametrize("base,length", [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x100)])
def test_bus_rejects_overlaps(base: int, length: int) -> None:
    bus = Bus("pio")
    bus.insert(Dev(), 0x3F8, 8)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Dev(), base, length)


def test_bus_remove_then_reinsert_updates_routing() -> None:
    bus, a, b = Bus("pio"), Dev(), Dev()
    bus.insert(a, 0x80, 1)
    bus.write(0x80, b"\x01")
    assert bus.remove(0x80) is a
    bus.insert(b, 0x80, 1)
    bus.write(0x80, b"\x02")
    assert a.log == [("w", 0, b"\x01")] and b.log == [("w", 0, b"\x02")]
    with pytest.raises(BusError):
        bus.remove(0x81)


def test_bus_fast_writer_routes_and_is_invalidated_on_remove() -> None:
    bus, a = Bus("pio"), Dev()
    bus.insert(a, 0x3F8, 8)
    w = bus.fast_writer(0x3F9, 1)
    assert w is not None and bus.fast_writers[1 | 0x3F9 << 4] is w
    w(b"\x07")
    assert a.log == [("w", 1, b"\x07")]
    assert bus.fast_writer(0x3FF, 2) is None  # does not fit
    assert bus.fast_writer(0x10, 1) is None  # unmapped
    bus.remove(0x3F8)
    assert bus.fast_writers == {}


def test_bus_fast_writer_takes_the_device_lock() -> None:
    bus = Bus("pio")
    seen: list[bool] = []

    class Locked(Dev):
        def write(self, offset: int, data: bytes) -> None:
            seen.append(entry.lock is not None and entry.lock.locked())

    entry = bus.insert(Locked(), 0x80, 1)
    w = bus.fast_writer(0x80, 1)
    assert w is not None
    w(b"\x01")
    assert seen == [True] and entry.lock is not None and not entry.lock.locked()


def test_bus_thread_safe_devices_get_no_lock() -> None:
    class Safe(Dev):
        thread_safe = True

    assert Bus("pio").insert(Safe(), 0x80, 1).lock is None


def test_memory_hugepages_unavailable_is_a_clean_error() -> None:
    from vmsh.engine.memory import MemoryOptions

    with open("/proc/sys/vm/nr_hugepages") as f:
        if int(f.read()) >= 16:
            pytest.skip("this host has huge pages reserved")
    with pytest.raises(GuestMemoryError, match="cannot map"):
        GuestMemoryMmap.create(32 << 20, MemoryOptions(hugepages=True))


def test_memory_prefault_and_mergeable_options_map() -> None:
    from vmsh.engine.memory import MemoryOptions

    mem = GuestMemoryMmap.create(2 << 20, MemoryOptions(prefault=True, mergeable=True, thp=False))
    mem.write_u8(0x1FFFFF, 7)
    assert mem.read_u8(0x1FFFFF) == 7
    mem.close()
