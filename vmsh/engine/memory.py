"""Guest physical memory: mmap'd RAM regions, bounds-checked access, KVM memslot registration.

``GuestMemoryMmap`` implements ``vmsh.guest_memory.GuestMemory`` (the protocol devices use) over
mmap regions: reads and writes at guest physical addresses (``GuestAddress``) that may cross from
one region into the next, and zero-copy ``memoryview`` slices for I/O paths (``os.preadv`` into
guest buffers). An address or length outside RAM raises ``GuestMemoryError``; nothing here does
raw pointer math for the callers.

The provider side (``GuestRegion.create`` / ``GuestRegion.from_file`` and
``GuestMemoryMmap.register``) builds the regions and hands them to KVM as memslots. RAM is laid
out as in cloud-hypervisor's x86_64 layout (its ``arch/src/x86_64/layout.rs``): the first
``min(size, 3 GiB)`` at 0, the rest from 4 GiB; see ``ram_ranges``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmsh.engine import page_runs
from vmsh.errors import GuestMemoryError
from vmsh.guest_memory import FixedWidthAccess, GuestAddress
from vmsh.syscalls import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

LOG = logging.getLogger(__name__)


#: start of the 32-bit MMIO hole: RAM below it is [0, 3 GiB) (``layout.rs`` MEM_32BIT_RESERVED_START)
MEM_32BIT_RESERVED_START = 0xC000_0000
#: RAM above the hole continues here (``layout.rs`` RAM_64BIT_START)
RAM_64BIT_START = 0x1_0000_0000

# Linux mmap flags the mmap module does not export on every Python version.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_MAP_HUGETLB = 0x40000
_MAP_HUGE_SHIFT = 26

#: the unit of ``GuestMemoryMmap.discard`` (the host's base page)
PAGE_SIZE = mmap.PAGESIZE


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of RAM into ``(guest_addr, length)`` ranges around the 32-bit hole.

    >>> ram_ranges(512 << 20)
    [(0, 536870912)]
    >>> [hex(a) for a, _ in ram_ranges(4 << 30)]
    ['0x0', '0x100000000']
    """
    low = min(size, MEM_32BIT_RESERVED_START)
    ranges = [(0, low)]
    if size > low:
        ranges.append((RAM_64BIT_START, size - low))
    return ranges


@dataclass(frozen=True, slots=True)
class MemoryOptions:
    """How RAM is backed (mirrors the ``--memory`` keys that concern the host mapping)."""

    #: back RAM with a memfd (MAP_SHARED) so it can be handed to other processes
    shared: bool = False
    #: back RAM with hugetlbfs pages
    hugepages: bool = False
    #: hugepage size in bytes (None: the host default)
    hugepage_size: int | None = None
    #: madvise(MADV_MERGEABLE) for KSM
    mergeable: bool = False
    #: madvise(MADV_HUGEPAGE) for transparent huge pages
    thp: bool = True
    #: fault every page in at creation (MAP_POPULATE)
    prefault: bool = False


class GuestRegion:
    """One contiguous mapping of guest RAM at ``start``."""

    def __init__(self, start: int, mm: mmap.mmap, fd: int | None = None, *, shared: bool = False,
                 backing: tuple[int, int] | None = None, fresh: bool = False) -> None:
        #: RAM in a hotplug area (ACPI hot-added, or a virtio-mem region): not boot RAM, so not
        #: in the e820 map the kernel starts with
        self.hotplug = False
        self.start = start
        self.size = len(mm)
        self.end = start + self.size
        self.mmap = mm
        #: the memfd backing a shared region (None for anonymous memory)
        self.fd = fd
        #: ``fd`` (or the ``backing`` file) is mapped MAP_SHARED: its pages are the file's, not
        #: private copies, so another process that maps the file sees the guest's RAM
        self.shared = shared
        #: writable zero-copy view of the whole region
        self.view = memoryview(mm)
        #: the file (an fd this region owns) and offset a file-backed region maps: its untouched
        #: pages read from there
        self.backing = backing
        #: made here as fresh RAM or with its ``backing`` known, so ``data_runs`` may leave pages
        #: out; a region of unknown origin is saved whole
        self._contents_known = fresh or backing is not None
        self._host_addr: int | None = None

    @classmethod
    def create(cls, start: int, size: int, options: MemoryOptions = MemoryOptions()) -> GuestRegion:
        """Map ``size`` bytes of fresh zeroed RAM for guest address ``start``.

        :raises GuestMemoryError: when the host cannot provide the mapping.
        """
        # MAP_NORESERVE keeps a large guest from being refused up front by overcommit checks;
        # not for hugetlbfs, where it would turn "no huge pages left" into a SIGBUS on first
        # touch instead of a clean error here.
        flags = 0 if options.hugepages else _MAP_NORESERVE
        if options.prefault:
            flags |= _MAP_POPULATE
        fd: int | None = None
        try:
            if options.shared or options.hugepages:
                mfd_flags = os.MFD_CLOEXEC
                if options.hugepages:
                    mfd_flags |= os.MFD_HUGETLB
                    if options.hugepage_size:
                        mfd_flags |= (options.hugepage_size.bit_length() - 1) << _MAP_HUGE_SHIFT
                fd = os.memfd_create("vmsh-ram", mfd_flags)
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, flags | (mmap.MAP_SHARED if options.shared else mmap.MAP_PRIVATE),
                               mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                mm = mmap.mmap(-1, size, flags | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as err:
            if fd is not None:
                os.close(fd)
            raise GuestMemoryError(f"cannot map {size} bytes of guest RAM at {start:#x}") from err
        if options.thp and not options.hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            _madvise(mm, mmap.MADV_HUGEPAGE)
        if options.mergeable and hasattr(mmap, "MADV_MERGEABLE"):
            _madvise(mm, mmap.MADV_MERGEABLE)
        return cls(start, mm, fd, shared=options.shared, fresh=True)

    @classmethod
    def from_file(cls, start: int, path: str, offset: int, size: int, options: MemoryOptions) -> GuestRegion:
        """Map ``size`` bytes of ``path`` from ``offset`` for guest address ``start``: shared
        (the guest writes the file) with ``options.shared``, else copy-on-write. A file
        shorter than that is extended.

        :raises GuestMemoryError: when the file cannot be opened or mapped.
        """
        flags = (mmap.MAP_SHARED if options.shared else mmap.MAP_PRIVATE) | (_MAP_POPULATE if options.prefault else 0)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise GuestMemoryError(f"cannot open the memory zone file {path}") from err
        try:
            if os.fstat(fd).st_size < offset + size:
                os.ftruncate(fd, offset + size)
            mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError) as err:
            os.close(fd)
            raise GuestMemoryError(f"cannot map {size} bytes of {path} as guest RAM") from err
        if options.mergeable and hasattr(mmap, "MADV_MERGEABLE"):
            _madvise(mm, mmap.MADV_MERGEABLE)
        return cls(start, mm, shared=options.shared, backing=(fd, offset))

    @property
    def host_addr(self) -> int:
        """The host virtual address of the mapping (for KVM_SET_USER_MEMORY_REGION)."""
        if self._host_addr is None:
            from vmsh._native import ffi

            # INVARIANTS: from_buffer pins the mmap's buffer export; we keep the cdata on self
            # so the address stays valid until close().
            self._pin = ffi.from_buffer(self.mmap)
            self._host_addr = int(ffi.cast("uintptr_t", self._pin))
        return self._host_addr

    def data_runs(self) -> page_runs.Runs:
        """The runs of the region that may hold non-zero bytes (the rest reads as zeros):
        pages this process has touched, and whatever its memfd or backing file has data for.
        When the host cannot tell, or the region's origin is unknown, the whole region."""
        if not self._contents_known:
            return [(0, self.size)]
        try:
            runs = [page_runs.resident_runs(self.host_addr, self.size)]
            if self.fd is not None:
                runs.append(page_runs.file_data_runs(self.fd, 0, self.size))
            if self.backing is not None:
                runs.append(page_runs.file_data_runs(*self.backing, self.size))
        except OSError as err:
            LOG.info("guest RAM at %#x: cannot tell untouched pages (%s); saving all of it", self.start, err)
            return [(0, self.size)]
        return page_runs.merge(*runs)

    def discard(self, offset: int, length: int) -> None:
        """Give ``[offset, offset+length)`` of the mapping back to the host (page-aligned).

        Private memory (anonymous, or a private file mapping) is dropped with
        madvise(MADV_DONTNEED): the next touch faults in a zero page (or the file's page). A
        shared memfd has the range punched out of the file, which also unmaps it.

        :raises GuestMemoryError: if the host refuses.
        """
        try:
            if self.fd is not None and self.shared:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                self.mmap.madvise(mmap.MADV_DONTNEED, offset, length)
        except (OSError, ValueError) as err:
            raise GuestMemoryError(f"cannot discard guest RAM at {self.start + offset:#x}+{length:#x}") from err

    def close(self) -> None:
        """Unmap (the region must no longer be a memslot)."""
        self.view.release()
        if hasattr(self, "_pin"):
            from vmsh._native import ffi

            ffi.release(self._pin)
            del self._pin
        try:
            self.mmap.close()
        except BufferError:
            # A view of this RAM is still referenced (say, by a traceback a log record keeps):
            # unmapping under it would turn its next use into a crash. The mapping goes when
            # the last view does.
            LOG.debug("guest RAM at %#x is still referenced; it is unmapped with its last view", self.start)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.backing is not None:
            os.close(self.backing[0])
            self.backing = None


def _madvise(mm: mmap.mmap, advice: int) -> None:
    try:
        mm.madvise(advice)
    except OSError as err:
        LOG.debug("madvise(%d) refused: %s", advice, err)


class GuestMemoryMmap(FixedWidthAccess):
    """Guest RAM made of non-overlapping ``GuestRegion`` s.

    Example::

        mem = GuestMemoryMmap.create(64 << 20)
        mem.write(GuestAddress(0x1000), b"hello")
        assert mem.read(GuestAddress(0x1000), 5) == b"hello"
    """

    def __init__(self, regions: list[GuestRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.start)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.end > b.start:
                raise GuestMemoryError(f"guest RAM regions overlap at {b.start:#x}")
        self._starts = [r.start for r in self.regions]
        self._slots: list[int] = []
        #: KVM memslot -> the region registered in it (a live migration's dirty log is per slot)
        self.slot_regions: dict[int, GuestRegion] = {}
        #: the region the last lookup found: nearly every access is in the same one (RAM below
        #: the 32-bit hole), and a hit costs two comparisons instead of a bisect
        self._hint = self.regions[0] if self.regions else None

    @classmethod
    def create(cls, size: int, options: MemoryOptions = MemoryOptions()) -> GuestMemoryMmap:
        """Allocate ``size`` bytes of RAM laid out around the 32-bit hole (``ram_ranges``)."""
        if size <= 0 or size % 4096:
            raise GuestMemoryError(f"guest RAM size {size} is not a positive multiple of 4 KiB")
        regions: list[GuestRegion] = []
        try:
            for start, length in ram_ranges(size):
                regions.append(GuestRegion.create(start, length, options))
        except GuestMemoryError:
            for r in regions:
                r.close()
            raise
        return cls(regions)

    @property
    def size(self) -> int:
        """Total RAM in bytes."""
        return sum(r.size for r in self.regions)

    @property
    def boot_regions(self) -> list[GuestRegion]:
        """The regions of boot RAM (the e820 map), without the hotplug areas' regions."""
        return [r for r in self.regions if not r.hotplug]

    @property
    def boot_size(self) -> int:
        """Boot RAM in bytes."""
        return sum(r.size for r in self.boot_regions)

    def add_region(self, region: GuestRegion, vm: object | None = None) -> None:
        """Add ``region`` (made by the caller; it must not overlap any other) and, with ``vm``
        (a ``VmFd``), register it as a new KVM memslot.

        Runs on the control loop while devices read guest RAM from other threads: the region
        list and the start index are replaced, never changed in place, the list first, so a
        reader that sees the new index also sees the new list.

        :raises GuestMemoryError: when it overlaps RAM; the region is not added then.
        """
        regions = sorted([*self.regions, region], key=lambda r: r.start)
        for a, b in itertools.pairwise(regions):
            if a.end > b.start:
                raise GuestMemoryError(f"guest RAM regions overlap at {b.start:#x}")
        if vm is not None:
            slot = max(self._slots, default=-1) + 1
            vm.set_user_memory_region(slot, region.start, region.size, region.host_addr)  # type: ignore[attr-defined]  # a VmFd; memory.py stays below kvm.py
            self._slots.append(slot)
            self.slot_regions[slot] = region
        self.regions = regions
        self._starts = [r.start for r in regions]

    @property
    def last_addr(self) -> int:
        """The last valid guest physical address."""
        return self.regions[-1].end - 1

    def register(self, vm: object, first_slot: int = 0) -> None:
        """Register every region as a KVM memslot on ``vm`` (a ``VmFd``)."""
        for i, r in enumerate(self.regions):
            vm.set_user_memory_region(first_slot + i, r.start, r.size, r.host_addr)  # type: ignore[attr-defined]  # a VmFd; memory.py stays below kvm.py
            self._slots.append(first_slot + i)
            self.slot_regions[first_slot + i] = r

    def close(self) -> None:
        """Unmap every region."""
        for r in self.regions:
            r.close()

    # -- consumer side ---------------------------------------------------------------------

    def find_region(self, addr: int) -> GuestRegion:
        """The region holding ``addr``.

        :raises GuestMemoryError: if ``addr`` is not RAM.
        """
        r = self._hint
        if r is not None and r.start <= addr < r.end:
            return r
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if addr < r.end:
                self._hint = r
                return r
        raise GuestMemoryError(f"guest address {addr:#x} is not RAM")

    def checked_offset(self, addr: int, offset: int) -> GuestAddress:
        """``addr + offset`` if that is still RAM.

        :raises GuestMemoryError: otherwise.
        """
        new = addr + offset
        self.find_region(new)
        return GuestAddress(new)

    def is_valid_range(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr+length)`` is entirely RAM (possibly across regions)."""
        r = self._hint
        if r is not None and length >= 0 and r.start <= addr and addr + length <= r.end:
            return True
        try:
            for _ in self._chunks(addr, length):
                pass
        except GuestMemoryError:
            return False
        return True

    def _chunks(self, addr: int, length: int) -> Iterator[tuple[GuestRegion, int, int]]:
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{length:#x}")
        done = 0
        while done < length:
            r = self.find_region(addr + done)
            off = addr + done - r.start
            n = min(length - done, r.size - off)
            yield r, off, n
            done += n

    def slice(self, addr: int, length: int) -> memoryview:
        """A zero-copy writable view of ``[addr, addr+length)``, which must lie in one region.

        :raises GuestMemoryError: if the range is not RAM or crosses a region boundary.
        """
        r = self.find_region(addr)
        off = addr - r.start
        if length < 0 or off + length > r.size:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} leaves its RAM region")
        return r.view[off:off + length]

    def slices(self, addr: int, length: int) -> list[memoryview]:
        """Zero-copy views covering ``[addr, addr+length)``, one per region crossed (none for
        ``length`` 0).

        :raises GuestMemoryError: if any byte is outside RAM.
        """
        r = self._hint
        if r is not None and length > 0 and r.start <= addr and addr + length <= r.end:
            off = addr - r.start
            return [r.view[off:off + length]]
        return [r.view[off:off + n] for r, off, n in self._chunks(addr, length)]

    def slices_of(self, addrs: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        """``slices`` of many ranges at once (a request's segments), in order, none for an
        empty one.

        :raises GuestMemoryError: if any byte of any range is outside RAM.
        """
        out: list[memoryview] = []
        r = self._hint
        if r is None:
            return out
        start, end, view = r.start, r.end, r.view
        for addr, n in zip(addrs, lengths, strict=True):
            if start <= addr and addr + n <= end:
                if n:
                    out.append(view[addr - start:addr - start + n])
            else:
                out.extend(self.slices(addr, n))
        return out

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest RAM.

        :raises GuestMemoryError: if any byte is outside RAM.
        """
        r = self.find_region(addr)
        off = addr - r.start
        if off + length <= r.size and length >= 0:
            return r.mmap[off:off + length]
        return b"".join(bytes(v) for v in self.slices(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM at ``addr``.

        :raises GuestMemoryError: if any byte is outside RAM (nothing is written then).
        """
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        r = self._hint
        n = len(data)
        if r is not None and r.start <= addr and addr + n <= r.end:
            off = addr - r.start
            r.view[off:off + n] = data
            return
        chunks = list(self._chunks(addr, len(data)))
        src = memoryview(data).cast("B")
        pos = 0
        for r, off, n in chunks:
            r.view[off:off + n] = src[pos:pos + n]
            pos += n

    def discard(self, addr: int, length: int) -> None:
        """Return the RAM at ``[addr, addr+length)`` to the host; the guest reads zeros there next.

        This is how balloon pages and reported free pages are given back. ``addr`` and
        ``length`` must be multiples of ``PAGE_SIZE``; the range may cross regions.

        :raises GuestMemoryError: if the range is not page-aligned or not entirely RAM (nothing
            is discarded then), or if the host refuses.
        """
        if addr % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard of {addr:#x}+{length:#x} is not page-aligned")
        for r, off, n in list(self._chunks(addr, length)):
            r.discard(off, n)

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        """Set ``length`` bytes at ``addr`` to ``value``."""
        for r, off, n in list(self._chunks(addr, length)):
            r.view[off:off + n] = bytes([value]) * n


