"""Which pages of a RAM mapping can hold data: what a snapshot must write, and what it can leave
as a hole in its memory file.

A guest rarely touches most of its RAM. Reading an untouched page faults in the zero page
(about 12 µs each on a PVM host: 6 s for 2 GiB), so the snapshot asks the kernel instead:

- ``/proc/self/pagemap`` (Documentation/admin-guide/mm/pagemap.rst): one 64-bit entry per
  virtual page, bit 63 "present", bit 62 "swapped". A page of private memory that is neither
  has never been written: it reads as zeros, or as its backing file's page.
- ``lseek(SEEK_DATA/SEEK_HOLE)`` on a backing file (a memfd, or the memory file of the
  snapshot a VM was restored from): the ranges the file has data for.

Runs are ``(offset, length)`` pairs in bytes, page-aligned, sorted and disjoint.
"""

from __future__ import annotations

import errno
import mmap
import os
import re

PAGE_SIZE = mmap.PAGESIZE
_PAGEMAP_ENTRY = 8
# byte 7 of a little-endian pagemap entry holds bits 56-63: 0x80 present, 0x40 swapped
_RESIDENT = bytes(1 if b & 0xC0 else 0 for b in range(256))
_RUN = re.compile(rb"\x01+")

Runs = list[tuple[int, int]]


def resident_runs(addr: int, size: int) -> Runs:
    """The runs of ``[addr, addr + size)`` of this process's memory that are present or swapped.

    :raises OSError: when pagemap cannot be read.
    """
    first, count = addr // PAGE_SIZE, size // PAGE_SIZE
    entries = bytearray()
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(first * _PAGEMAP_ENTRY)
        while len(entries) < count * _PAGEMAP_ENTRY:
            chunk = f.read(count * _PAGEMAP_ENTRY - len(entries))
            if not chunk:
                raise OSError(f"short read of /proc/self/pagemap at page {first + len(entries) // 8:#x}")
            entries += chunk
    flags = bytes(entries[7::_PAGEMAP_ENTRY]).translate(_RESIDENT)
    return [(m.start() * PAGE_SIZE, (m.end() - m.start()) * PAGE_SIZE) for m in _RUN.finditer(flags)]


def file_data_runs(fd: int, offset: int, size: int) -> Runs:
    """The runs of ``[offset, offset + size)`` of file ``fd`` that have data, relative to ``offset``.

    :raises OSError: when the file system cannot tell (then everything may be data).
    """
    runs: Runs = []
    pos, end = offset, offset + size
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        start -= start % PAGE_SIZE
        stop = min(end, -(-stop // PAGE_SIZE) * PAGE_SIZE)
        runs.append((start - offset, stop - start))
        pos = stop
    return runs


def merge(*run_lists: Runs) -> Runs:
    """The union of run lists, sorted, with touching runs joined."""
    out: Runs = []
    for start, length in sorted(r for runs in run_lists for r in runs):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, start + length - prev_start))
        else:
            out.append((start, length))
    return out
