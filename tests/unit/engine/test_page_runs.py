"""Finding the pages of a mapping that can hold data (what a snapshot writes)."""

from __future__ import annotations

import ctypes
import mmap
import os

from vmsh.engine import page_runs
from vmsh.engine.memory import GuestRegion, MemoryOptions

PAGE = page_runs.PAGE_SIZE


def address(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def test_only_touched_pages_of_anonymous_memory_are_resident() -> None:
    mm = mmap.mmap(-1, 64 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm[3 * PAGE] = 1
    mm[10 * PAGE:13 * PAGE] = b"x" * 3 * PAGE
    assert page_runs.resident_runs(address(mm), 64 * PAGE) == [(3 * PAGE, PAGE), (10 * PAGE, 3 * PAGE)]


def test_file_data_runs_skip_holes(tmp_path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 * PAGE)
        f.seek(8 * PAGE)
        f.write(b"d" * 10)  # part of a page: the whole page is data
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = page_runs.file_data_runs(fd, 0, 64 * PAGE)
        # the file system may report data in larger blocks; it must cover page 8 and not everything
        assert any(s <= 8 * PAGE < s + n for s, n in runs)
        assert sum(n for _, n in runs) < 64 * PAGE
        # relative to an offset, and clipped to the size asked
        assert page_runs.file_data_runs(fd, 16 * PAGE, 16 * PAGE) == []
    finally:
        os.close(fd)


def test_merge_joins_overlapping_and_touching_runs() -> None:
    assert page_runs.merge([(0, 4), (10, 2)], [(2, 4), (6, 1)], []) == [(0, 7), (10, 2)]


def test_a_region_restored_from_a_file_saves_the_file_data_and_its_own_writes(tmp_path) -> None:
    path = tmp_path / "memory"
    with open(path, "wb") as f:
        f.truncate(32 * PAGE)
        f.seek(2 * PAGE)
        f.write(b"f" * PAGE)
    region = GuestRegion.from_file(0, str(path), 0, 32 * PAGE, MemoryOptions())
    try:
        region.view[20 * PAGE] = 7
        runs = region.data_runs()
        covered = {p for s, n in runs for p in range(s // PAGE, (s + n) // PAGE)}
        assert {2, 20} <= covered and len(covered) < 32
    finally:
        region.close()


def test_a_restored_vm_saves_the_snapshot_pages_it_never_touched(tmp_path) -> None:
    """Regression: a clone's RAM maps its snapshot's memory file; a page the clone never
    touched is in no page table, yet holds the snapshot's data, which its own snapshot must keep."""
    from vmsh.engine.memory_manager import map_snapshot_memory

    path = tmp_path / "memory-ranges"
    with open(path, "wb") as f:
        f.truncate(64 * PAGE)
        f.seek(40 * PAGE)
        f.write(b"kernel text")
    memory = map_snapshot_memory(path, prefault=False)
    try:
        (region,) = memory.regions
        region.view[3 * PAGE] = 1  # touched since the restore
        covered = {p for s, n in region.data_runs() for p in range(s // PAGE, (s + n) // PAGE)}
        assert {3, 40} <= covered
    finally:
        memory.close()


def test_a_region_of_unknown_origin_is_saved_whole(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8 * PAGE)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8 * PAGE, mmap.MAP_PRIVATE)
    region = GuestRegion(0, mm)
    try:
        assert region.data_runs() == [(0, 8 * PAGE)]
    finally:
        region.close()
