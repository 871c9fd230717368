"""virtio-pmem (virtio 1.2 §5.19): a host file the guest sees as persistent memory.

The region itself is not this device's business: the engine maps the backing file into guest
physical memory (a KVM memslot) at an address it chooses, and hands that address and the size to
the constructor. With ``discard_writes=on`` the engine maps the file MAP_PRIVATE, so the guest's
writes stay in copy-on-write pages and never reach the file; otherwise MAP_SHARED, so they land
in the file's page cache. The device only reports the region in its configuration::

    struct virtio_pmem_config { le64 start; le64 size; }

and serves the one request queue: a FLUSH (``le32 type = 0``) makes the guest's writes durable by
fsync'ing the backing file, answered with ``le32 ret``: 0 on success, 1 (EIO) on failure or for
an unknown request type, as cloud-hypervisor answers (Linux's virtio_pmem turns any non-zero
answer into -EIO). With ``discard_writes`` there is nothing to make durable, and FLUSH succeeds.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from vmsh.config.model import PmemConfig
from vmsh.devices.state import expect_state
from vmsh.devices.virtio.device import VirtioDevice
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue
from vmsh.errors import DeviceError, DeviceStateError
from vmsh.state_types import U64

LOG = logging.getLogger(__name__)

VIRTIO_ID_PMEM = 27
#: cloud-hypervisor's pmem queue size
PMEM_QUEUE_SIZE = 256
VIRTIO_PMEM_REQ_TYPE_FLUSH = 0
VIRTIO_PMEM_RESP_TYPE_OK = 0
VIRTIO_PMEM_RESP_TYPE_EIO = 1
_U32 = struct.Struct("<I")
#: the region must be page-aligned in guest physical memory
REGION_ALIGN = 4096


@dataclass(frozen=True, slots=True)
class VirtioPmemState:
    """Plain-data state of a ``VirtioPmem``: the region (a cross-check) and counters."""

    start: U64 = 0
    size: U64 = 0
    flush_ops: U64 = 0
    errors: U64 = 0


class VirtioPmem(VirtioDevice):
    """A persistent-memory device over ``path``, mapped by the engine at ``start``.

    :param path: the backing file (opened here only to fsync it).
    :param start: guest physical address where the engine mapped the file.
    :param size: bytes of the mapping.
    :param discard_writes: the engine mapped the file MAP_PRIVATE: writes never reach it.
    :raises DeviceError: for a misaligned or empty region, or a file that cannot be opened.

    Example::

        pmem = VirtioPmem.from_config(PmemConfig(file="pmem.img"), start=0x1_4000_0000)
    """

    state_type = VirtioPmemState

    device_type = VIRTIO_ID_PMEM

    def __init__(self, path: str, start: int, size: int, *, discard_writes: bool = False,
                 queue_size: int = PMEM_QUEUE_SIZE) -> None:
        if size <= 0 or start < 0 or start % REGION_ALIGN or size % REGION_ALIGN or start + size > 1 << 64:
            raise DeviceError(f"virtio-pmem: bad region {start:#x}+{size:#x}")
        self.queue_max_sizes = (queue_size,)
        super().__init__()
        self.path = path
        self.start = start
        self.size = size
        self.discard_writes = discard_writes
        try:
            self.fd = os.open(path, (os.O_RDONLY if discard_writes else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open pmem file {path}") from err
        self.flush_ops = 0
        self.errors = 0

    @classmethod
    def from_config(cls, config: PmemConfig, start: int, size: int | None = None) -> VirtioPmem:
        """A pmem device from ``--pmem`` keys, mapped by the engine at ``start``.

        ``size`` is the mapping's size; by default ``config.size`` or else the file's size.

        :raises DeviceError: if the file cannot be read or the region is bad.
        """
        if size is None:
            size = config.size
        if size is None:
            try:
                size = os.stat(config.file).st_size
            except OSError as err:
                raise DeviceError(f"cannot open pmem file {config.file}") from err
        return cls(config.file, start, size, discard_writes=config.discard_writes)

    def config_bytes(self) -> bytes:
        return struct.pack("<QQ", self.start, self.size)

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        used = False
        while (chain := queue.pop()) is not None:
            queue.add_used(chain.head, self._request(chain))
            used = True
        if used:
            self.signal_used(index)

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written (the 4-byte answer, or 0 without room)."""
        if chain.writable_len < _U32.size:
            LOG.debug("virtio-pmem: request without room for an answer")
            self.errors += 1
            return 0
        status = VIRTIO_PMEM_RESP_TYPE_EIO
        if chain.readable_len >= _U32.size:
            (rtype,) = _U32.unpack(chain.read(0, _U32.size))
            if rtype == VIRTIO_PMEM_REQ_TYPE_FLUSH:
                status = self._flush()
            else:
                LOG.debug("virtio-pmem: unknown request type %d", rtype)
        if status != VIRTIO_PMEM_RESP_TYPE_OK:
            self.errors += 1
        return chain.write(_U32.pack(status))

    def _flush(self) -> int:
        self.flush_ops += 1
        if self.discard_writes:
            return VIRTIO_PMEM_RESP_TYPE_OK
        try:
            os.fsync(self.fd)
        except OSError as err:
            LOG.warning("virtio-pmem %s: fsync: %s", self.path, err)
            return VIRTIO_PMEM_RESP_TYPE_EIO
        return VIRTIO_PMEM_RESP_TYPE_OK

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def state(self) -> VirtioPmemState:
        return VirtioPmemState(self.start, self.size, self.flush_ops, self.errors)

    def restore(self, state: VirtioPmemState) -> None:
        """Load counters; a snapshot of a region elsewhere or of another size is refused.

        :raises DeviceStateError: for another state class, a region that differs, or a
            counter beyond 64 bits.
        """
        s = expect_state(state, VirtioPmemState)
        if s.start != self.start:
            raise DeviceStateError("start", f"{s.start:#x} is not where {self.path} is mapped ({self.start:#x})")
        if s.size != self.size:
            raise DeviceStateError("size", f"{s.size:#x} is not the size of {self.path} ({self.size:#x})")
        self.flush_ops, self.errors = s.flush_ops, s.errors

    def counters(self) -> dict[str, int]:
        return {"flush_ops": self.flush_ops, "errors": self.errors}
