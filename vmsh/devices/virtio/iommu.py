"""virtio-iommu (virtio 1.2 §5.13): the guest's IOMMU for the devices placed behind it.

Two queues: requests (ATTACH, DETACH, MAP, UNMAP, PROBE) and events, where translation faults are
reported (§5.13.6.7). The domains, attachments and mappings live in an ``IommuMappings`` table
(``vmsh.devices.dma``) that the devices behind the IOMMU translate through; this model edits it on
the driver's requests, validating every field first. As cloud-hypervisor's (``virtio-devices/src/
iommu.rs``): device type 23, queues of 256, features MAP_UNMAP, PROBE and BYPASS_CONFIG, pages of
4 KiB and 2 MiB, and a PROBE answer with one reserved region, the x86 MSI window
0xfee00000-0xfeefffff, which the guest must not map.

Faults come from the endpoints' device threads (``IommuMappings.translate``); they wait in the
table and are written into the event queue's buffers when this device processes that queue, which
the engine triggers when one is recorded (``IommuMappings.on_fault``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vmsh.devices.dma import (
    MAP_F_MASK,
    MAX_MAPPINGS,
    Domain,
    IommuMappings,
)
from vmsh.devices.state import check_bits, check_max_length, expect_state
from vmsh.devices.virtio.device import COMMON_FEATURES, VirtioDevice, has_feature
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.errors import DeviceStateError
from vmsh.state_types import U8, U32, U64

LOG = logging.getLogger(__name__)

VIRTIO_ID_IOMMU = 23
#: cloud-hypervisor's queue size, for both queues
IOMMU_QUEUE_SIZE = 256
REQUEST_QUEUE = 0
EVENT_QUEUE = 1

# Feature bits (§5.13.3)
VIRTIO_IOMMU_F_INPUT_RANGE = 0
VIRTIO_IOMMU_F_DOMAIN_RANGE = 1
VIRTIO_IOMMU_F_MAP_UNMAP = 2
VIRTIO_IOMMU_F_BYPASS = 3
VIRTIO_IOMMU_F_PROBE = 4
VIRTIO_IOMMU_F_MMIO = 5
VIRTIO_IOMMU_F_BYPASS_CONFIG = 6

# Request types (§5.13.6)
T_ATTACH = 1
T_DETACH = 2
T_MAP = 3
T_UNMAP = 4
T_PROBE = 5

# Status codes (§5.13.6)
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
S_DEVERR = 3
S_INVAL = 4
S_RANGE = 5
S_NOENT = 6
S_FAULT = 7
S_NOMEM = 8
_STATUS = {"ok": S_OK, "inval": S_INVAL, "range": S_RANGE, "noent": S_NOENT, "nomem": S_NOMEM}

ATTACH_F_BYPASS = 1

# PROBE properties (§5.13.6.8)
PROBE_T_NONE = 0
PROBE_T_RESV_MEM = 1
RESV_MEM_T_RESERVED = 0
RESV_MEM_T_MSI = 1

#: 4 KiB and 2 MiB pages (cloud-hypervisor's mask): the granule is 4 KiB
PAGE_SIZE_MASK = (1 << 12) | (1 << 21)
PAGE_GRANULE = 1 << 12
#: the x86 MSI doorbell window, reserved in every endpoint's address space
MSI_RANGE = (0xFEE0_0000, 0xFEEF_FFFF)
#: one RESV_MEM property: {le16 type; le16 length} then {u8 subtype; u8 reserved[3]; le64 start; le64 end}
_PROP_HEAD = struct.Struct("<HH")
_RESV_MEM = struct.Struct("<B3xQQ")
PROBE_SIZE = _PROP_HEAD.size + _RESV_MEM.size

# Request bodies after the 4-byte head (§5.13.6.3-8)
_ATTACH = struct.Struct("<III4s")  # domain, endpoint, flags, reserved
_DETACH = struct.Struct("<II8s")  # domain, endpoint, reserved
_MAP = struct.Struct("<IQQQI")  # domain, virt_start, virt_end, phys_start, flags
_UNMAP = struct.Struct("<IQQ4s")  # domain, virt_start, virt_end, reserved
_PROBE = struct.Struct("<I64s")  # endpoint, reserved
_BODIES = {T_ATTACH: _ATTACH, T_DETACH: _DETACH, T_MAP: _MAP, T_UNMAP: _UNMAP, T_PROBE: _PROBE}
_HEAD = 4
_TAIL = 4
#: {u8 reason; u8 reserved[3]; le32 flags; le32 endpoint; u8 reserved[4]; le64 address}
_FAULT = struct.Struct("<B3xII4xQ")
#: config: page_size_mask, input_range, domain_range, probe_size, bypass, reserved[3]
_CONFIG = struct.Struct("<QQQIIIB3x")
_BYPASS_OFFSET = 36

#: largest endpoint and domain counts a state may hold (endpoints: 32 slots x 96 segments)
MAX_ENDPOINTS = 32 * 96


@dataclass(frozen=True, slots=True)
class IommuMappingState:
    """One mapping: ``[start, end]`` (inclusive) of a domain's IOVAs to ``phys``."""

    start: U64
    end: U64
    phys: U64
    flags: U8


@dataclass(frozen=True, slots=True)
class IommuDomainState:
    """One domain, its kind and its mappings."""

    id: U32
    bypass: bool = False
    mappings: tuple[IommuMappingState, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtioIommuState:
    """Plain-data state of a ``VirtioIommu``: the table (faults not yet reported are dropped)."""

    bypass: bool = True
    domains: tuple[IommuDomainState, ...] = ()
    #: (endpoint, domain) pairs
    attached: tuple[tuple[U32, U32], ...] = ()
    requests: U64 = 0
    faults: U64 = 0


class VirtioIommu(VirtioDevice):
    """The virtio-iommu over ``table`` (which the engine shares with the endpoints' memories).

    Example::

        table = IommuMappings({endpoint_id(0, 3)})
        iommu = VirtioIommu(table)
    """

    state_type = VirtioIommuState
    device_type = VIRTIO_ID_IOMMU
    avail_features = (COMMON_FEATURES | 1 << VIRTIO_IOMMU_F_MAP_UNMAP | 1 << VIRTIO_IOMMU_F_PROBE
                      | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG)

    def __init__(self, table: IommuMappings | None = None) -> None:
        self.queue_max_sizes = (IOMMU_QUEUE_SIZE, IOMMU_QUEUE_SIZE)
        super().__init__()
        self.table = table if table is not None else IommuMappings()
        self.requests = 0
        self.faults_reported = 0

    # -- configuration (§5.13.4) ----------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(PAGE_SIZE_MASK, 0, (1 << 64) - 1, 0, 0xFFFF_FFFF, PROBE_SIZE, int(self.table.bypass))

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``bypass`` is writable, and only once BYPASS_CONFIG was negotiated."""
        negotiated = has_feature(self.acked_features, VIRTIO_IOMMU_F_BYPASS_CONFIG)
        if offset == _BYPASS_OFFSET and len(data) == 1 and negotiated:
            self.table.set_bypass(bool(data[0] & 1))
        else:
            LOG.debug("virtio-iommu: ignored config write at %#x", offset)

    def on_reset(self) -> None:
        # §5.13.6.2: a reset detaches every endpoint and destroys every domain
        self.table.reset()

    # -- queues ---------------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == REQUEST_QUEUE:
            self._requests(queue)
        else:
            self._events(queue)

    def _requests(self, queue: VirtQueue) -> None:
        used = False
        while (chain := queue.pop()) is not None:
            self.requests += 1
            if chain.writable_len < _TAIL:
                LOG.debug("virtio-iommu: request %d has no room for its status", chain.head)
                queue.add_used(chain.head, 0)
                used = True
                continue
            props_len = chain.writable_len - _TAIL
            status, props = self._handle(chain.read(0, _HEAD + _PROBE.size), chain.readable_len, props_len)
            # the properties (zero where none: a NONE property ends the list), then the tail
            chain.write(props.ljust(props_len, b"\0")[:props_len])
            chain.write_tail(bytes((status, 0, 0, 0)))
            queue.add_used(chain.head, chain.writable_len)
            used = True
        if used:
            self.signal_used(REQUEST_QUEUE)

    def _handle(self, raw: bytes, readable_len: int, props_len: int) -> tuple[int, bytes]:
        """The status of one request (and a PROBE's properties)."""
        if len(raw) < _HEAD:
            return S_DEVERR, b""
        kind = raw[0]
        body = _BODIES.get(kind)
        if body is None:
            return S_UNSUPP, b""
        if readable_len < _HEAD + body.size:
            return S_DEVERR, b""
        fields = body.unpack_from(raw, _HEAD)
        if kind == T_ATTACH:
            domain, endpoint, flags, reserved = fields
            if any(reserved) or flags & ~ATTACH_F_BYPASS:
                return S_INVAL, b""
            if flags & ATTACH_F_BYPASS and not has_feature(self.acked_features, VIRTIO_IOMMU_F_BYPASS_CONFIG):
                return S_INVAL, b""
            return _STATUS[self.table.attach(domain, endpoint, bypass=bool(flags & ATTACH_F_BYPASS))], b""
        if kind == T_DETACH:
            domain, endpoint, reserved = fields
            if any(reserved):
                return S_INVAL, b""
            return _STATUS[self.table.detach(domain, endpoint)], b""
        if kind == T_MAP:
            domain, start, end, phys, flags = fields
            if flags & ~MAP_F_MASK:
                return S_INVAL, b""
            if start > end or end - start + 1 + phys > 1 << 64:
                return S_RANGE, b""
            if start % PAGE_GRANULE or phys % PAGE_GRANULE or (end + 1) % PAGE_GRANULE:
                return S_RANGE, b""
            return _STATUS[self.table.map(domain, start, end, phys, flags)], b""
        if kind == T_UNMAP:
            domain, start, end, reserved = fields
            if any(reserved):
                return S_INVAL, b""
            if start > end:
                return S_RANGE, b""
            return _STATUS[self.table.unmap(domain, start, end)], b""
        endpoint, reserved = fields
        if any(reserved):
            return S_INVAL, b""
        if endpoint not in self.table.endpoints:
            return S_NOENT, b""
        if props_len < PROBE_SIZE:
            return S_INVAL, b""  # §5.13.6.8: the driver gives probe_size bytes
        prop = _PROP_HEAD.pack(PROBE_T_RESV_MEM, _RESV_MEM.size) + _RESV_MEM.pack(RESV_MEM_T_MSI, *MSI_RANGE)
        return S_OK, prop

    def _events(self, queue: VirtQueue) -> None:
        """Write the faults waiting in the table into the driver's event buffers."""
        used = False
        while (fault := self.table.take_fault()) is not None:
            chain = queue.pop()
            if chain is None:
                self.table.requeue_fault(fault)
                break
            if chain.write(_FAULT.pack(fault.reason, fault.flags, fault.endpoint, fault.address)) < _FAULT.size:
                LOG.debug("virtio-iommu: event buffer %d too small for a fault", chain.head)
                queue.add_used(chain.head, 0)
            else:
                queue.add_used(chain.head, _FAULT.size)
                self.faults_reported += 1
            used = True
        if used:
            self.signal_used(EVENT_QUEUE)

    def deliver_faults(self) -> None:
        """Report the waiting faults now (the engine calls it, under this device's lock)."""
        self.queue_notify(EVENT_QUEUE)

    # -- snapshot -------------------------------------------------------------------------------

    def state(self) -> VirtioIommuState:
        t = self.table
        domains = tuple(
            IommuDomainState(dom_id, d.bypass, tuple(IommuMappingState(s, *d.maps[s]) for s in d.starts))
            for dom_id, d in sorted(t.domains.items()))
        return VirtioIommuState(t.bypass, domains, tuple(sorted(t.attached.items())), self.requests,
                                self.faults_reported)

    def restore(self, state: VirtioIommuState) -> None:
        """Load the table (untrusted): every mapping is checked as a MAP request would be.

        :raises DeviceStateError: naming the domain or attachment that does not fit.
        """
        s = expect_state(state, VirtioIommuState)
        check_max_length("attached", s.attached, MAX_ENDPOINTS)
        check_max_length("domains", s.domains, MAX_ENDPOINTS)
        if sum(len(ds.mappings) for ds in s.domains) > MAX_MAPPINGS:
            raise DeviceStateError("domains", f"more than {MAX_MAPPINGS} mappings")
        domains: dict[int, Domain] = {}
        for i, ds in enumerate(s.domains):
            if ds.id in domains:
                raise DeviceStateError(f"domains[{i}].id", f"domain {ds.id} appears twice")
            check_max_length(f"domains[{i}].mappings", ds.mappings, MAX_MAPPINGS)
            if ds.bypass and ds.mappings:
                raise DeviceStateError(f"domains[{i}].mappings", "a bypass domain has no mappings")
            d = Domain(bypass=ds.bypass)
            for j, ms in enumerate(ds.mappings):
                where = f"domains[{i}].mappings[{j}]"
                check_bits(f"{where}.flags", ms.flags, MAP_F_MASK)
                if ms.start > ms.end or ms.end - ms.start + 1 + ms.phys > 1 << 64 or d.overlapping(ms.start, ms.end):
                    raise DeviceStateError(where, f"{ms.start:#x}-{ms.end:#x} is no free range")
                d.add(ms.start, ms.end, ms.phys, ms.flags)
            domains[ds.id] = d
        attached: dict[int, int] = {}
        for i, (endpoint, dom_id) in enumerate(s.attached):
            if endpoint not in self.table.endpoints or endpoint in attached:
                raise DeviceStateError(f"attached[{i}]", f"endpoint {endpoint:#x} is not behind this IOMMU or twice")
            if dom_id not in domains:
                raise DeviceStateError(f"attached[{i}]", f"domain {dom_id} does not exist")
            attached[endpoint] = dom_id
        if set(domains) - set(attached.values()):
            raise DeviceStateError("domains", "a domain without an endpoint")
        self.table.load(s.bypass, domains, attached)
        self.requests, self.faults_reported = s.requests, s.faults

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "faults": self.faults_reported,
                "dropped_faults": self.table.dropped_faults}
