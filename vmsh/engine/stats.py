"""KVM's binary statistics (``KVM_GET_STATS_FD``) for a VM or a vCPU, by name.

The stats fd holds a header, an id string, one descriptor per statistic (flags, exponent,
size in u64s, offset, bucket size, name) and a data block; descriptors are read once and the
data block re-read with ``pread`` on every sample (Linux Documentation/virt/kvm/api.rst,
"KVM_GET_STATS_FD"). On this project's PVM hosts the interesting ones are ``exits``,
``insn_emulation``, ``insn_emulation_fail``, ``io_exits``, ``mmio_exits``, ``halt_exits`` and
``mmu_pte_write`` (every guest instruction there is emulated, see ``pvm.py``).

Example::

    stats = KvmStats(vcpu_fd.stats_fd())
    stats.read()["insn_emulation"]
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from vmsh.errors import KvmError

LOG = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIIIII")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size (then the name)

# descriptor flags (linux/kvm.h KVM_STATS_*)
STATS_TYPE_MASK = 0xF
STATS_TYPE_CUMULATIVE = 0x0
STATS_TYPE_INSTANT = 0x1
STATS_TYPE_PEAK = 0x2
STATS_TYPE_LINEAR_HIST = 0x3
STATS_TYPE_LOG_HIST = 0x4
_TYPE_NAMES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}


@dataclass(frozen=True, slots=True)
class StatDesc:
    """One statistic's descriptor."""

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def kind(self) -> str:
        """cumulative, instant, peak, linear_hist or log_hist."""
        return _TYPE_NAMES.get(self.flags & STATS_TYPE_MASK, "unknown")


class KvmStats:
    """Reader over one stats fd (owned: ``close()`` closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            raw = os.pread(fd, _HEADER.size, 0)
            _flags, name_size, num_desc, id_offset, desc_offset, self._data_offset = _HEADER.unpack(raw)
            self.id = os.pread(fd, name_size, id_offset).split(b"\0", 1)[0].decode()
            desc_size = _DESC.size + name_size
            block = os.pread(fd, desc_size * num_desc, desc_offset)
        except (OSError, struct.error) as err:
            raise KvmError("cannot read the KVM stats header") from err
        self.descs: list[StatDesc] = []
        for i in range(num_desc):
            base = i * desc_size
            flags, exponent, size, offset, bucket = _DESC.unpack_from(block, base)
            name = block[base + _DESC.size:base + desc_size].split(b"\0", 1)[0].decode()
            self.descs.append(StatDesc(name, flags, exponent, size, offset, bucket))
        self._data_size = max((d.offset + 8 * d.size for d in self.descs), default=0)

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Sample every statistic: an int, or a tuple of buckets for histograms."""
        try:
            data = os.pread(self.fd, self._data_size, self._data_offset)
        except OSError as err:
            raise KvmError("cannot read KVM stats") from err
        out: dict[str, int | tuple[int, ...]] = {}
        for d in self.descs:
            values = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = values[0] if d.size == 1 else values
        return out

    def read_counters(self) -> dict[str, int]:
        """Only the scalar statistics."""
        return {k: v for k, v in self.read().items() if isinstance(v, int)}

    def close(self) -> None:
        """Close the stats fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
