"""virtio-mem (virtio 1.2 §5.15 "Memory Device"): RAM the guest plugs and unplugs block by block.

The device owns one region of guest physical memory (``addr``, ``region_size``), mapped as RAM
by the VMM from the start but not in the guest's memory map. The host sets ``requested_size``
(``resize``, from ``vm.resize desired_ram`` / ``vm.resize-zone``) and signals a configuration
change; the guest's driver (Linux's ``drivers/virtio/virtio_mem.c``) then sends requests on the
one queue until ``plugged_size`` matches:

- ``PLUG`` / ``UNPLUG`` of ``nb_blocks`` blocks at ``addr``: ACK, or NACK for a plug beyond
  ``requested_size``, or ERROR for a range that is not whole blocks inside the usable region
  or not all in the other state (§5.15.6.2, .3);
- ``UNPLUG_ALL``: every block unplugged (§5.15.6.4);
- ``STATE``: whether a range is plugged, unplugged or mixed (§5.15.6.5).

Every guest value is checked: the request's size and type, the range's alignment, bounds and
overflow. Unplugged blocks' host memory is given back (``GuestMemory.discard``: madvise
MADV_DONTNEED, or a punched hole in a shared memfd), so the guest reads zeros from a block it
plugs again (§5.15.6.2: plugged memory is not guaranteed to hold old data). Layout and limits
follow cloud-hypervisor's ``virtio-devices/src/mem.rs``: 2 MiB blocks, one queue of 128.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vmsh.devices.state import check_length, check_range, expect_state
from vmsh.devices.virtio.device import COMMON_FEATURES, VirtioDevice
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue
from vmsh.errors import DeviceError, GuestMemoryError
from vmsh.state_types import U16, U64

LOG = logging.getLogger(__name__)

VIRTIO_ID_MEM = 24
#: feature bits (§5.15.3): ``node_id`` is an ACPI proximity domain
VIRTIO_MEM_F_ACPI_PXM = 0
#: cloud-hypervisor's block size (VIRTIO_MEM_DEFAULT_BLOCK_SIZE) and queue size
BLOCK_SIZE = 2 << 20
QUEUE_SIZE = 128

# request types (§5.15.6)
VIRTIO_MEM_REQ_PLUG = 0
VIRTIO_MEM_REQ_UNPLUG = 1
VIRTIO_MEM_REQ_UNPLUG_ALL = 2
VIRTIO_MEM_REQ_STATE = 3
# response types
VIRTIO_MEM_RESP_ACK = 0
VIRTIO_MEM_RESP_NACK = 1
VIRTIO_MEM_RESP_BUSY = 2
VIRTIO_MEM_RESP_ERROR = 3
# states of a range (STATE request)
VIRTIO_MEM_STATE_PLUGGED = 0
VIRTIO_MEM_STATE_UNPLUGGED = 1
VIRTIO_MEM_STATE_MIXED = 2

#: struct virtio_mem_req: le16 type, le16 padding[3], then le64 addr, le16 nb_blocks, le16 padding[3]
_REQ = struct.Struct("<H6xQH6x")
#: struct virtio_mem_resp: le16 type, le16 padding[3], then le16 state
_RESP = struct.Struct("<H6xH")
#: struct virtio_mem_config (§5.15.4): block_size, node_id, padding, addr, region_size,
#: usable_region_size, plugged_size, requested_size
_CONFIG = struct.Struct("<QH6xQQQQQ")


@dataclass(frozen=True, slots=True)
class VirtioMemState:
    """Plain-data state of a ``VirtioMem``: the sizes and one bit per block (bitmap bytes,
    block i in bit i % 8 of byte i // 8)."""

    requested_size: U64
    plugged_size: U64
    plugged: bytes
    node_id: U16 = 0


class VirtioMem(VirtioDevice):
    """The virtio-mem device of one memory zone's hotplug region ``[addr, addr+region_size)``.

    :param requested_size: what the guest is asked to plug at start (the zone's ``hotplugged_size``).
    :param node_id: the zone's NUMA node (offered with VIRTIO_MEM_F_ACPI_PXM), None without NUMA.
    :raises DeviceError: for a region or size that is not whole blocks.

    Example::

        mem = VirtioMem(1 << 32, 1 << 30)
        mem.resize(256 << 20)   # vm.resize: the guest plugs 128 blocks
    """

    state_type = VirtioMemState
    device_type = VIRTIO_ID_MEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, addr: int, region_size: int, requested_size: int = 0, node_id: int | None = None) -> None:
        super().__init__()
        if addr % BLOCK_SIZE or region_size % BLOCK_SIZE or region_size <= 0 or requested_size % BLOCK_SIZE:
            raise DeviceError(f"virtio-mem region {addr:#x}+{region_size:#x} is not whole {BLOCK_SIZE >> 20} MiB "
                              "blocks")
        if node_id is not None and not 0 <= node_id <= 0xFFFF:
            raise DeviceError(f"virtio-mem: NUMA node {node_id} does not fit the 16-bit node_id")
        if requested_size > region_size:
            raise DeviceError(f"virtio-mem: requested size {requested_size:#x} is bigger than the region "
                              f"{region_size:#x}")
        self.avail_features = COMMON_FEATURES | (1 << VIRTIO_MEM_F_ACPI_PXM if node_id is not None else 0)
        self.addr = addr
        self.region_size = region_size
        self.node_id = node_id or 0
        self.requested_size = requested_size
        self.plugged_size = 0
        self.blocks = region_size // BLOCK_SIZE
        self._plugged = bytearray((self.blocks + 7) // 8)
        self._counts = {"plug_requests": 0, "unplug_requests": 0, "state_requests": 0, "bad_requests": 0}

    # -- configuration (§5.15.4) --------------------------------------------------------------

    def config_bytes(self) -> bytes:
        # usable_region_size is the whole region: cloud-hypervisor's, and what Linux expects
        # of a region that never moves
        return _CONFIG.pack(BLOCK_SIZE, self.node_id, self.addr, self.region_size, self.region_size,
                            self.plugged_size, self.requested_size)

    def resize(self, size: int) -> None:
        """Ask the guest to have ``size`` bytes plugged (cloud-hypervisor's ``Mem::resize``).

        :raises DeviceError: for the size already requested, one bigger than the region, or
            one that is not whole blocks (cloud-hypervisor's three errors).
        """
        if size == self.requested_size:
            raise DeviceError(f"new size {size:#x} and requested_size are identical")
        if size > self.region_size:
            raise DeviceError(f"new size {size:#x} is bigger than region_size {self.region_size:#x}")
        if size % BLOCK_SIZE:
            raise DeviceError(f"new size {size:#x} is not aligned on block_size {BLOCK_SIZE:#x}")
        with self._locks[0]:  # not while a request reads it
            self.requested_size = size
        if self.activated and self.interrupt is not None:
            self.interrupt.signal_config_change()

    # -- blocks ------------------------------------------------------------------------------

    def is_plugged(self, block: int) -> bool:
        return bool(self._plugged[block // 8] >> (block % 8) & 1)

    def _set(self, first: int, count: int, plugged: bool) -> None:
        for block in range(first, first + count):
            if plugged:
                self._plugged[block // 8] |= 1 << (block % 8)
            else:
                self._plugged[block // 8] &= ~(1 << (block % 8)) & 0xFF

    def _count(self, first: int, count: int) -> int:
        """How many of the blocks ``first .. first+count-1`` are plugged."""
        return sum(1 for block in range(first, first + count) if self.is_plugged(block))

    def _range(self, addr: int, nb_blocks: int) -> int | None:
        """The first block of a request's range, None unless it is whole blocks in the region
        (cloud-hypervisor's ``valid_range``, which also wants it to end before the region's end;
        the spec allows the last block, as here)."""
        if addr % BLOCK_SIZE or nb_blocks == 0 or addr < self.addr:
            return None
        first = (addr - self.addr) // BLOCK_SIZE
        if first + nb_blocks > self.blocks:
            return None
        return first

    def _discard(self, first: int, count: int) -> None:
        assert self.memory is not None
        try:
            self.memory.discard(self.addr + first * BLOCK_SIZE, count * BLOCK_SIZE)
        except GuestMemoryError as err:
            # the host keeps the memory; the guest no longer uses it. Not the guest's fault.
            LOG.warning("virtio-mem: %s", err)

    # -- requests (§5.15.6) --------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        used = False
        while (chain := queue.pop()) is not None:
            written = self._request(chain)
            queue.add_used(chain.head, written)
            used = True
        if used:
            self.signal_used(index)

    def _request(self, chain: DescriptorChain) -> int:
        data = chain.read(0, _REQ.size)
        if len(data) < _REQ.size or chain.writable_len < _RESP.size:
            # no room for a request or an answer: nothing to do but return the buffer
            self._counts["bad_requests"] += 1
            return 0
        kind, addr, nb_blocks = _REQ.unpack(data)
        resp, state = self.handle(kind, addr, nb_blocks)
        chain.write(_RESP.pack(resp, state))
        return _RESP.size

    def handle(self, kind: int, addr: int, nb_blocks: int) -> tuple[int, int]:
        """One request: ``(response type, state)`` (the state only means something for STATE)."""
        if kind == VIRTIO_MEM_REQ_UNPLUG_ALL:
            self._counts["unplug_requests"] += 1
            self._discard(0, self.blocks)
            self._plugged = bytearray(len(self._plugged))
            self.plugged_size = 0
            return VIRTIO_MEM_RESP_ACK, 0
        if kind not in (VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_STATE):
            LOG.debug("virtio-mem: unknown request type %d", kind)
            self._counts["bad_requests"] += 1
            return VIRTIO_MEM_RESP_ERROR, 0
        first = self._range(addr, nb_blocks)
        if first is None:
            self._counts["bad_requests"] += 1
            return VIRTIO_MEM_RESP_ERROR, 0
        plugged = self._count(first, nb_blocks)
        size = nb_blocks * BLOCK_SIZE
        if kind == VIRTIO_MEM_REQ_STATE:
            self._counts["state_requests"] += 1
            state = (VIRTIO_MEM_STATE_PLUGGED if plugged == nb_blocks
                     else VIRTIO_MEM_STATE_UNPLUGGED if plugged == 0 else VIRTIO_MEM_STATE_MIXED)
            return VIRTIO_MEM_RESP_ACK, state
        if kind == VIRTIO_MEM_REQ_PLUG:
            self._counts["plug_requests"] += 1
            if self.plugged_size + size > self.requested_size:
                return VIRTIO_MEM_RESP_NACK, 0
            if plugged:
                self._counts["bad_requests"] += 1
                return VIRTIO_MEM_RESP_ERROR, 0
            self._set(first, nb_blocks, True)
            self.plugged_size += size
            return VIRTIO_MEM_RESP_ACK, 0
        self._counts["unplug_requests"] += 1
        if plugged != nb_blocks:
            self._counts["bad_requests"] += 1
            return VIRTIO_MEM_RESP_ERROR, 0
        self._discard(first, nb_blocks)
        self._set(first, nb_blocks, False)
        self.plugged_size -= size
        return VIRTIO_MEM_RESP_ACK, 0

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """``(guest address, length)`` of each run of plugged blocks."""
        runs: list[tuple[int, int]] = []
        for block in range(self.blocks):
            if self.is_plugged(block):
                start = self.addr + block * BLOCK_SIZE
                if runs and runs[-1][0] + runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + BLOCK_SIZE)
                else:
                    runs.append((start, BLOCK_SIZE))
        return runs

    # -- snapshot and counters ---------------------------------------------------------------

    def state(self) -> VirtioMemState:
        return VirtioMemState(self.requested_size, self.plugged_size, bytes(self._plugged), self.node_id)

    def restore(self, state: VirtioMemState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, a bitmap of another length or with
            bits past the last block, a requested size beyond the region or not whole blocks,
            a plugged size that is not what the bitmap says, or another NUMA node.
        """
        s = expect_state(state, VirtioMemState)
        check_length("plugged", s.plugged, len(self._plugged))
        check_range("requested_size", s.requested_size, 0, self.region_size)
        if s.requested_size % BLOCK_SIZE:
            check_range("requested_size % block_size", s.requested_size % BLOCK_SIZE, 0, 0)
        bitmap = bytearray(s.plugged)
        if self.blocks % 8:
            check_range("plugged (bits past the last block)", bitmap[-1] >> (self.blocks % 8), 0, 0)
        # the node comes from the config the device was built from, as the features it offers do
        check_range("node_id", s.node_id, self.node_id, self.node_id)
        count = sum(bin(b).count("1") for b in bitmap)
        check_range("plugged_size", s.plugged_size, count * BLOCK_SIZE, count * BLOCK_SIZE)
        self.requested_size = s.requested_size
        self.plugged_size = s.plugged_size
        self._plugged = bitmap

    def counters(self) -> dict[str, int]:
        return {**self._counts, "plugged_size": self.plugged_size, "requested_size": self.requested_size}
