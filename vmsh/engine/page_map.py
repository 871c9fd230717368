"""The guest's virtual memory map: every mapped run of a long-mode page table, coalesced.

``paging.translate`` answers for one address; a core dump wants the whole picture, so that a
debugger reading the dump (gdb, which knows kernel symbols by virtual address) finds the pages
the kernel's stacks and variables live in. :func:`mapped_runs` walks 4- or 5-level long-mode
page tables (Intel SDM vol. 3A §4.5) from CR3 and yields ``(virtual, physical, size)`` runs in
which both addresses advance together. It reads entries only through ``read_u64(gpa)``, so it is
unit-tested on a fake memory; an entry that points outside guest RAM is skipped, not followed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from vmsh.engine.paging import PTE_ADDR_MASK, PTE_P, PTE_PS, PagingMode
from vmsh.errors import GuestMemoryError

LOG = logging.getLogger(__name__)

#: runs of the upper (kernel) half of the canonical address space start here (48-bit)
KERNEL_HALF_48 = 0xFFFF_8000_0000_0000


def _canonical(va: int, levels: int) -> int:
    """Sign-extend a ``12 + 9 * levels``-bit address to 64 bits."""
    bits = 12 + 9 * levels
    if va & (1 << (bits - 1)):
        va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
    return va


def _leaves(mode: PagingMode, read_u64: Callable[[int], int], kernel_only: bool) -> Iterator[tuple[int, int, int]]:
    """``(va, pa, size)`` of every present leaf entry, in virtual address order."""
    levels = mode.levels
    if levels == 0:
        return

    def walk(table: int, level: int, va_base: int) -> Iterator[tuple[int, int, int]]:
        shift = 12 + 9 * (level - 1)
        first = 256 if (kernel_only and level == levels) else 0
        for i in range(first, 512):
            try:
                entry = read_u64(table + i * 8)
            except GuestMemoryError:
                return  # a table outside RAM: nothing under it can be read
            if not entry & PTE_P:
                continue
            va = va_base | (i << shift)
            if level == 1 or (level in (2, 3) and entry & PTE_PS):
                size = 1 << shift
                yield _canonical(va, levels), entry & PTE_ADDR_MASK & ~(size - 1), size
            else:
                yield from walk(entry & PTE_ADDR_MASK, level - 1, va)

    yield from walk(mode.cr3 & PTE_ADDR_MASK, levels, 0)


def mapped_runs(mode: PagingMode, read_u64: Callable[[int], int], *, kernel_only: bool = True,
                is_ram: Callable[[int, int], bool] | None = None) -> list[tuple[int, int, int]]:
    """The mapped runs of the page tables ``mode`` names, as ``(virtual, physical, size)``.

    :param kernel_only: only the upper half (the kernel's mappings, the same in every process).
    :param is_ram: keeps only leaves whose physical range is guest RAM (device windows and
        holes are left out).
    """
    runs: list[list[int]] = []
    for va, pa, size in _leaves(mode, read_u64, kernel_only):
        if is_ram is not None and not is_ram(pa, size):
            continue
        if runs and runs[-1][0] + runs[-1][2] == va and runs[-1][1] + runs[-1][2] == pa:
            runs[-1][2] += size
        else:
            runs.append([va, pa, size])
    return [(va, pa, size) for va, pa, size in runs]
