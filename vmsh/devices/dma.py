"""DMA remapping for devices behind the virtio-iommu: the address spaces and the translated view.

``IommuMappings`` is the table the virtio-iommu device (``vmsh.devices.virtio.iommu``) edits on
the guest's requests - domains, the endpoints attached to them, and each domain's mappings of I/O
virtual addresses (IOVA) to guest physical addresses - and the devices behind the IOMMU read.
``TranslatedMemory`` is the ``GuestMemory`` such a device gets instead of guest RAM: every address
the device uses is an IOVA of its endpoint, translated through the table, then checked against RAM
by the real ``GuestMemory`` beneath. So the hostile-guest checks keep holding: an IOVA that no
mapping covers (or a mapping without the needed permission) raises ``GuestMemoryError`` - which the
virtqueue turns into a failed chain and the device into DEVICE_NEEDS_RESET - and is recorded as a
fault for the virtio-iommu to report on its event queue (virtio 1.2 §5.13.6.7); it never reaches
host memory that is not guest RAM. A range that spans several mappings is cut into one piece per
mapping (each piece a separate view), so buffers the guest maps page by page work.

Permissions (MAP's READ and WRITE flags): copies check them (``read`` needs READ, ``write`` needs
WRITE); a zero-copy view (``slices``), which the virtqueue makes for every buffer whatever its
direction, needs one of the two, since Linux maps a device-writable buffer WRITE-only and a
device-readable one READ-only. A mapping with neither flag translates nothing.

Devices not behind the IOMMU get the plain ``GuestMemory`` and pay nothing for this module.

Endpoint ids are PCI requester ids with the segment (``segment << 16 | bus << 8 | devfn``), as
cloud-hypervisor's ``vmm/src/device_manager.rs`` and its VIOT table number them.

Threads: the table has one leaf lock (``IommuMappings._lock``): the device thread that translates
and the virtio-iommu's request processing both take it and call nothing while holding it.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from vmsh.errors import GuestMemoryError
from vmsh.guest_memory import FixedWidthAccess, GuestAddress, GuestMemory, MemoryRegion

LOG = logging.getLogger(__name__)

# MAP flags (virtio 1.2 §5.13.6.5)
MAP_F_READ = 1
MAP_F_WRITE = 2
MAP_F_MMIO = 4
MAP_F_MASK = MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO

# Fault reasons and flags (§5.13.6.7)
FAULT_R_UNKNOWN = 0
FAULT_R_DOMAIN = 1  # the endpoint is not attached to a domain (and there is no bypass)
FAULT_R_MAPPING = 2  # no mapping, or one without the access's permission
FAULT_F_READ = 1
FAULT_F_WRITE = 2
FAULT_F_ADDRESS = 0x100  # ``address`` is valid

#: faults waiting for a buffer on the event queue; more are counted and dropped
MAX_PENDING_FAULTS = 128
#: mappings all domains together may hold (a guest asking for more gets NOMEM): about 200 MiB
#: of host memory at most, whatever the guest asks
MAX_MAPPINGS = 1 << 20
#: pieces one translated range may be cut into (a page per piece is 256 MiB)
MAX_PIECES = 1 << 16


def endpoint_id(segment: int, slot: int, function: int = 0, bus: int = 0) -> int:
    """The endpoint id of a PCI function: its requester id with the segment above it."""
    return segment << 16 | bus << 8 | slot << 3 | function


@dataclass(frozen=True, slots=True)
class Fault:
    """One translation fault, as the event queue reports it (§5.13.6.7)."""

    reason: int
    flags: int
    endpoint: int
    address: int


@dataclass(slots=True)
class Domain:
    """An address space: its mappings as sorted starts and ``start -> (end, phys, flags)``."""

    bypass: bool = False
    starts: list[int] = field(default_factory=list)
    maps: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def lookup(self, iova: int) -> tuple[int, int, int, int] | None:
        """The mapping ``(start, end, phys, flags)`` holding ``iova``, or None."""
        i = bisect.bisect_right(self.starts, iova) - 1
        if i < 0:
            return None
        start = self.starts[i]
        end, phys, flags = self.maps[start]
        return (start, end, phys, flags) if iova <= end else None

    def overlapping(self, lo: int, hi: int) -> list[int]:
        """Starts of the mappings that share a byte with ``[lo, hi]``."""
        i = bisect.bisect_right(self.starts, hi)
        out: list[int] = []
        while i > 0:
            start = self.starts[i - 1]
            if self.maps[start][0] < lo:
                break  # mappings do not overlap one another: nothing further left reaches lo
            out.append(start)
            i -= 1
        return out

    def add(self, start: int, end: int, phys: int, flags: int) -> None:
        bisect.insort(self.starts, start)
        self.maps[start] = (end, phys, flags)

    def remove(self, start: int) -> None:
        del self.starts[bisect.bisect_left(self.starts, start)]
        del self.maps[start]


class IommuMappings:
    """Domains, attached endpoints and mappings; translation for the endpoints' devices.

    ``endpoints`` is the set of endpoint ids behind the IOMMU (the others are refused with
    NOENT). ``bypass``: unattached endpoints reach guest RAM untranslated (the virtio-iommu's
    ``bypass`` configuration field, §5.13.4).

    Example::

        table = IommuMappings({endpoint_id(0, 3)})
        table.attach(1, endpoint_id(0, 3), bypass=False)
        table.map(1, 0x1000, 0x1fff, 0x80000, MAP_F_READ | MAP_F_WRITE)
        table.translate(endpoint_id(0, 3), 0x1800, 16, MAP_F_READ)   # [(0x80800, 16)]
    """

    def __init__(self, endpoints: Iterable[int] = ()) -> None:
        self._lock = threading.Lock()
        self.endpoints: set[int] = set(endpoints)
        self.bypass = True
        self.domains: dict[int, Domain] = {}
        #: endpoint -> domain id
        self.attached: dict[int, int] = {}
        self.faults: deque[Fault] = deque()
        self.dropped_faults = 0
        #: called (no lock held) after a fault was recorded: wakes the event queue's delivery
        self.on_fault: Callable[[], None] | None = None

    # -- the virtio-iommu's requests (each returns a status of §5.13.6) -------------------------

    def reset(self) -> None:
        """The virtio-iommu was reset: no domain, nothing attached, bypass again."""
        with self._lock:
            self.domains.clear()
            self.attached.clear()
            self.faults.clear()
            self.bypass = True

    def attach(self, domain: int, endpoint: int, *, bypass: bool) -> str:
        """Attach ``endpoint`` to ``domain`` (created if new), leaving its old domain.

        :returns: "ok", "noent" (unknown endpoint) or "inval" (a domain of the other kind).
        """
        with self._lock:
            if endpoint not in self.endpoints:
                return "noent"
            existing = self.domains.get(domain)
            if existing is not None and existing.bypass != bypass:
                return "inval"
            if self.attached.get(endpoint) == domain:
                return "ok"  # already there: leaving first would destroy the domain with its mappings
            self._detach(endpoint)
            if existing is None:
                self.domains[domain] = Domain(bypass=bypass)
            self.attached[endpoint] = domain
            return "ok"

    def detach(self, domain: int, endpoint: int) -> str:
        """Detach ``endpoint`` from ``domain``: "ok", "noent" or "inval" (attached elsewhere)."""
        with self._lock:
            if endpoint not in self.endpoints or domain not in self.domains:
                return "noent"
            if self.attached.get(endpoint) != domain:
                return "inval"
            self._detach(endpoint)
            return "ok"

    def _detach(self, endpoint: int) -> None:
        old = self.attached.pop(endpoint, None)
        # §5.13.6.4: a domain that lost its last endpoint goes away with its mappings
        if old is not None and old not in self.attached.values():
            del self.domains[old]

    def map(self, domain: int, start: int, end: int, phys: int, flags: int) -> str:
        """Map ``[start, end]`` (inclusive) to ``phys``: "ok", "noent", "inval" (bypass domain,
        overlap) or "nomem"."""
        with self._lock:
            d = self.domains.get(domain)
            if d is None:
                return "noent"
            if d.bypass or d.overlapping(start, end):
                return "inval"
            if sum(len(x.starts) for x in self.domains.values()) >= MAX_MAPPINGS:
                return "nomem"
            d.add(start, end, phys, flags)
            return "ok"

    def unmap(self, domain: int, start: int, end: int) -> str:
        """Remove the mappings inside ``[start, end]``: "ok", "noent", "inval" (bypass domain)
        or "range" (a mapping would be split: then nothing is removed, §5.13.6.6)."""
        with self._lock:
            d = self.domains.get(domain)
            if d is None:
                return "noent"
            if d.bypass:
                return "inval"
            hit = d.overlapping(start, end)
            if any(s < start or d.maps[s][0] > end for s in hit):
                return "range"
            for s in hit:
                d.remove(s)
            return "ok"

    def set_endpoints(self, endpoints: set[int]) -> None:
        """The endpoints behind the IOMMU now (devices were plugged, unplugged or moved): one
        that left is detached, and its domain goes if it was the domain's last."""
        with self._lock:
            for gone in set(self.attached) - endpoints:
                self._detach(gone)
            self.endpoints = set(endpoints)

    def load(self, bypass: bool, domains: dict[int, Domain], attached: dict[int, int]) -> None:
        """Replace the whole table (a restore, already checked by the virtio-iommu)."""
        with self._lock:
            self.bypass = bypass
            self.domains = domains
            self.attached = attached
            self.faults.clear()

    def set_bypass(self, bypass: bool) -> None:
        with self._lock:
            self.bypass = bypass

    def take_fault(self) -> Fault | None:
        """The oldest fault not yet reported, or None."""
        with self._lock:
            return self.faults.popleft() if self.faults else None

    def requeue_fault(self, fault: Fault) -> None:
        """Put back a fault that found no event buffer (it is reported first next time)."""
        with self._lock:
            self.faults.appendleft(fault)

    # -- translation (the endpoints' device threads) ---------------------------------------------

    def translate(self, endpoint: int, iova: int, length: int, access: int) -> list[tuple[int, int]]:
        """``[(guest physical address, length), ...]`` covering ``[iova, iova+length)`` for a
        device of ``endpoint``; ``access`` is the MAP permission needed (READ, WRITE, or 0 for
        either: a zero-copy view may be read or written).

        :raises GuestMemoryError: for an untranslatable byte (and the fault is recorded).
        """
        if length < 0 or iova < 0 or iova + length > 1 << 64:
            raise GuestMemoryError(f"IOVA range {iova:#x}+{length:#x} is not valid")
        fault: Fault | None = None
        with self._lock:
            dom_id = self.attached.get(endpoint)
            if dom_id is None:
                if self.bypass:
                    return [(iova, length)]
                fault = Fault(FAULT_R_DOMAIN, _fault_flags(access), endpoint, iova)
            else:
                d = self.domains[dom_id]
                if d.bypass:
                    return [(iova, length)]
                pieces, fault = self._walk(d, endpoint, iova, length, access)
                if fault is None:
                    return pieces
            self._record(fault)
        assert fault is not None
        if self.on_fault is not None:
            self.on_fault()
        raise GuestMemoryError(f"IOVA {fault.address:#x} of endpoint {endpoint:#x} is not mapped"
                               + (" for this access" if fault.reason == FAULT_R_MAPPING else ""))

    @staticmethod
    def _walk(d: Domain, endpoint: int, iova: int, length: int,
              access: int) -> tuple[list[tuple[int, int]], Fault | None]:
        pieces: list[tuple[int, int]] = []
        pos, left = iova, length
        while left > 0:
            m = d.lookup(pos)
            if m is None or (m[3] & access) != access or not m[3] & (MAP_F_READ | MAP_F_WRITE):
                return [], Fault(FAULT_R_MAPPING, _fault_flags(access), endpoint, pos)
            start, end, phys, _ = m
            n = min(left, end - pos + 1)
            gpa = phys + (pos - start)
            if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)  # contiguous in RAM too: one piece
            else:
                if len(pieces) >= MAX_PIECES:
                    return [], Fault(FAULT_R_UNKNOWN, _fault_flags(access), endpoint, pos)
                pieces.append((gpa, n))
            pos += n
            left -= n
        return pieces, None

    def _record(self, fault: Fault) -> None:
        LOG.debug("IOMMU fault: %s", fault)
        if len(self.faults) >= MAX_PENDING_FAULTS:
            self.dropped_faults += 1
        else:
            self.faults.append(fault)


def _fault_flags(access: int) -> int:
    read = FAULT_F_READ if access & MAP_F_READ else 0
    return FAULT_F_ADDRESS | read | (FAULT_F_WRITE if access & MAP_F_WRITE else 0)


class TranslatedMemory(FixedWidthAccess):
    """The ``GuestMemory`` of one endpoint behind the IOMMU: addresses are its IOVAs.

    ``find_region`` always raises: the virtqueue then reads its rings through the translated
    accessors each time instead of keeping a view of a region (a remapped ring is followed).
    ``endpoint`` is set by the engine once the device has its PCI slot.
    """

    def __init__(self, memory: GuestMemory, table: IommuMappings, endpoint: int = -1) -> None:
        self.memory = memory
        self.table = table
        self.endpoint = endpoint

    def _pieces(self, addr: int, length: int, access: int) -> list[tuple[int, int]]:
        return self.table.translate(self.endpoint, addr, length, access)

    def find_region(self, addr: int) -> MemoryRegion:
        raise GuestMemoryError(f"IOVA {addr:#x} has no region of its own")

    def checked_offset(self, addr: int, offset: int) -> GuestAddress:
        if not self.is_valid_range(addr + offset, 1):
            raise GuestMemoryError(f"IOVA {addr:#x}+{offset:#x} is not mapped")
        return GuestAddress(addr + offset)

    def is_valid_range(self, addr: int, length: int) -> bool:
        try:
            pieces = self._pieces(addr, length, 0)
        except GuestMemoryError:
            return False
        return all(self.memory.is_valid_range(a, n) for a, n in pieces)

    def slice(self, addr: int, length: int) -> memoryview:
        pieces = self._pieces(addr, length, 0)
        if len(pieces) > 1:
            raise GuestMemoryError(f"IOVA range {addr:#x}+{length:#x} is not contiguous in guest RAM")
        return self.memory.slice(*pieces[0]) if pieces else memoryview(b"")

    def slices(self, addr: int, length: int) -> list[memoryview]:
        out: list[memoryview] = []
        for gpa, n in self._pieces(addr, length, 0):
            out.extend(self.memory.slices(gpa, n))
        return out

    def slices_of(self, addrs: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        out: list[memoryview] = []
        for addr, n in zip(addrs, lengths, strict=True):
            if n:
                out.extend(self.slices(addr, n))
        return out

    def read(self, addr: int, length: int) -> bytes:
        pieces = self._pieces(addr, length, MAP_F_READ)
        return b"".join(self.memory.read(a, n) for a, n in pieces)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pieces = self._pieces(addr, len(src), MAP_F_WRITE)
        for a, n in pieces:  # checked before the first byte is written
            if not self.memory.is_valid_range(a, n):
                raise GuestMemoryError(f"guest physical {a:#x}+{n:#x} is not RAM")
        pos = 0
        for a, n in pieces:
            self.memory.write(a, src[pos:pos + n])
            pos += n

    def discard(self, addr: int, length: int) -> None:
        for a, n in self._pieces(addr, length, MAP_F_WRITE):
            self.memory.discard(a, n)

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        self.write(addr, bytes([value]) * length)


