"""PIO and MMIO buses: route a guest access at an address to the device owning that range.

A bus maps non-overlapping ``[base, base+length)`` ranges to ``BusDevice`` objects, rejects
overlaps, checks that each access fits inside its range, and calls the device with the offset
from its base, under that device's lock (vCPU threads and the event loop may touch a device
concurrently). Accesses that hit no device behave like an empty bus: reads return all-ones,
writes are dropped, and both are logged at debug level once per address.

The lookup is on every vCPU exit, so it is cached per address (rust-vmm's ``vm-device`` keeps the
same split between buses and address allocators).
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vmsh.devices.base import BusDevice
from vmsh.errors import VmshError

LOG = logging.getLogger(__name__)

#: an access cache this big is dropped and rebuilt rather than grown
_CACHE_MAX = 4096


class BusError(VmshError):
    """A device range that overlaps another or cannot be found."""


@dataclass(eq=False)
class BusRange:
    """One device's window on a bus."""

    base: int
    length: int
    device: BusDevice
    name: str = ""
    #: serializes the vCPU threads and the event loop on this device; None when the device
    #: says it is safe without (``thread_safe = True``: it only does GIL-atomic updates)
    lock: threading.Lock | None = field(default_factory=threading.Lock)

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.length


class Bus:
    """An address space of device ranges (one for PIO, one for MMIO).

    Example::

        bus = Bus("pio")
        bus.insert(serial, 0x3F8, 8, name="__serial")
        bus.write(0x3F8, b"A")
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._cache: dict[int, BusRange | None] = {}
        # Per-address writer closures: the vCPU hot path is one dict lookup and one call.
        self._writers: dict[int, Callable[[bytes], bool]] = {}
        #: (size | addr << 4) -> callable(data) for accesses known to fit their device; filled
        #: by ``fast_writer``, cleared (never rebound) on every map change, so a vCPU loop may
        #: hold a reference to it. Lock-free devices get a functools.partial of their write,
        #: so the common port write costs no Python frame of the bus at all.
        self.fast_writers: dict[int, Callable[[bytes], object]] = {}
        self._warned: set[int] = set()
        self._mutex = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int, name: str = "") -> BusRange:
        """Map ``device`` at ``[base, base+length)``.

        :raises BusError: if the range is empty or overlaps another device.
        """
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        with self._mutex:
            i = bisect.bisect_right(self._bases, base)
            if i > 0 and self._ranges[i - 1].end > base:
                raise BusError(f"{self.name}: {name or 'device'} at {base:#x} overlaps "
                               f"{self._ranges[i - 1].name or 'a device'} at {self._ranges[i - 1].base:#x}")
            if i < len(self._ranges) and base + length > self._ranges[i].base:
                raise BusError(f"{self.name}: {name or 'device'} at {base:#x} overlaps "
                               f"{self._ranges[i].name or 'a device'} at {self._ranges[i].base:#x}")
            entry = BusRange(base, length, device, name)
            if getattr(device, "thread_safe", False):
                entry.lock = None
            self._ranges.insert(i, entry)
            self._bases.insert(i, base)
            self._cache = {}
            self._writers = {}
            self.fast_writers.clear()
        return entry

    def remove(self, base: int) -> BusDevice:
        """Unmap the range starting at ``base``.

        :raises BusError: if no range starts there.
        """
        with self._mutex:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise BusError(f"{self.name}: no device at {base:#x}")
            entry = self._ranges.pop(i)
            del self._bases[i]
            self._cache = {}
            self._writers = {}
            self.fast_writers.clear()
        return entry.device

    def ranges(self) -> list[BusRange]:
        """The mapped ranges in address order."""
        return list(self._ranges)

    def find(self, addr: int) -> BusRange | None:
        """The range holding ``addr``, or None."""
        try:
            return self._cache[addr]
        except KeyError:
            pass
        i = bisect.bisect_right(self._bases, addr) - 1
        entry = self._ranges[i] if i >= 0 and addr < self._ranges[i].end else None
        if len(self._cache) >= _CACHE_MAX:
            self._cache = {}
        self._cache[addr] = entry
        return entry

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes at ``addr``; all-ones where no device answers."""
        entry = self.find(addr)
        if entry is None or addr + size > entry.base + entry.length:
            self._unhandled("read", addr, size)
            return b"\xff" * size
        if entry.lock is None:
            data = entry.device.read(addr - entry.base, size)
        else:
            with entry.lock:
                data = entry.device.read(addr - entry.base, size)
        if len(data) != size:
            # A device model bug must not corrupt the guest's register: pad or cut.
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> bool:
        """Write ``data`` at ``addr``; returns False (and drops it) where no device answers."""
        try:
            writer = self._writers[addr]
        except KeyError:
            writer = self._make_writer(addr)
        return writer(data)

    def _make_writer(self, addr: int) -> Callable[[bytes], bool]:
        entry = self.find(addr)
        if entry is None:
            def unmapped(data: bytes) -> bool:
                self._unhandled("write", addr, len(data))
                return False
            writer = unmapped
        else:
            dev_write = entry.device.write
            offset = addr - entry.base
            room = entry.end - addr
            lock = entry.lock
            if lock is None:
                def writer(data: bytes) -> bool:
                    if len(data) > room:
                        self._unhandled("write", addr, len(data))
                        return False
                    dev_write(offset, data)
                    return True
            else:
                acquire, release = lock.acquire, lock.release

                def writer(data: bytes) -> bool:
                    if len(data) > room:
                        self._unhandled("write", addr, len(data))
                        return False
                    acquire()
                    try:
                        dev_write(offset, data)
                    finally:
                        release()
                    return True
        if len(self._writers) >= _CACHE_MAX:
            self._writers = {}
        self._writers[addr] = writer
        return writer

    def fast_writer(self, addr: int, size: int) -> Callable[[bytes], object] | None:
        """A callable taking the data of a ``size``-byte write at ``addr``, cached in
        ``fast_writers``; None when no device takes the whole access (use ``write`` then)."""
        entry = self.find(addr)
        if entry is None or addr + size > entry.end or size > 15:
            return None
        dev_write = entry.device.write
        offset = addr - entry.base
        lock = entry.lock
        if lock is None:
            writer: Callable[[bytes], object] = functools.partial(dev_write, offset)
        else:
            acquire, release = lock.acquire, lock.release

            def writer(data: bytes) -> None:
                acquire()
                try:
                    dev_write(offset, data)
                finally:
                    release()
        if len(self.fast_writers) >= _CACHE_MAX:
            self.fast_writers.clear()
        self.fast_writers[size | addr << 4] = writer
        return writer

    def _unhandled(self, what: str, addr: int, size: int) -> None:
        if addr not in self._warned and len(self._warned) < 256:
            self._warned.add(addr)
            LOG.debug("%s: unhandled %s of %d bytes at %#x", self.name, what, size, addr)
