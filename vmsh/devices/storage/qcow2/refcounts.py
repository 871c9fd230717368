"""qcow2 reference counts: the refcount table (in memory), refcount blocks (through a bounded
cache), cluster allocation, deferred freeing and growth of the table.

Ordering (what keeps a killed or crashed VMM's image consistent, leaks at most): a refcount is
raised before anything points at the cluster (the owner syncs between the two), and lowered only
after the pointer's removal is durable (:meth:`Refcounts.free` defers, :meth:`release_pending`
applies after the owner's sync). A new refcount block or table is written and synced before the
reftable entry or the header points at it.
"""

from __future__ import annotations

import errno
import logging
import struct

from vmsh.devices.storage.qcow2.cache import TableCache
from vmsh.devices.storage.qcow2.header import MAX_REFTABLE_BYTES
from vmsh.devices.storage.qcow2.hostfile import HostFile, be64_array, be64_bytes
from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

#: header offset of refcount_table_offset (u64) followed by refcount_table_clusters (u32)
HEADER_REFTABLE_FIELDS = 48
REFTABLE_RESERVED = 0x1FF  # bits 0-8 of a reftable entry
CACHE_BYTES = 4 << 20
_CAST = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Refcounts:
    """The image's refcounts.

    :param metadata: cluster indices holding metadata (shared with the image): never allocated,
        never written with guest data; refcount blocks and tables are added here.
    """

    def __init__(self, path: str, file: HostFile, cluster_bits: int, order: int, table_offset: int,
                 table_clusters: int, metadata: set[int]) -> None:
        self.path = path
        self.file = file
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = order
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1
        self.epb = (self.cs * 8) >> order  # entries per block
        self.metadata = metadata
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.read(table_offset, table_clusters * self.cs)
        self.table = be64_array(raw)
        self._check_table()
        self.cache = TableCache(CACHE_BYTES // self.cs, self._load_block, self._store_block)
        self.hint = 0  # no free cluster below this index
        self.pending: list[int] = []  # clusters whose refcount drops once the owner has synced
        self.unsynced = False  # a raised refcount may not be durable yet

    # -- opening -----------------------------------------------------------------------------

    def _check_table(self) -> None:
        for c in range(self.table_offset >> self.cluster_bits, (self.table_offset >> self.cluster_bits)
                       + self.table_clusters):
            if c in self.metadata:
                raise DeviceError(f"qcow2 image {self.path}: refcount table overlaps other metadata")
            self.metadata.add(c)
        for i, entry in enumerate(self.table):
            if not entry:
                continue
            if entry & REFTABLE_RESERVED or entry % self.cs:
                raise DeviceError(f"qcow2 image {self.path}: refcount block {i} offset {entry:#x} misaligned")
            if entry + self.cs > self.file.end:
                raise DeviceError(f"qcow2 image {self.path}: refcount block {i} at {entry:#x} past the end of the file")
            c = entry >> self.cluster_bits
            if c in self.metadata:
                raise DeviceError(f"qcow2 image {self.path}: refcount block {i} at {entry:#x} overlaps other metadata")
            self.metadata.add(c)

    # -- entries -----------------------------------------------------------------------------

    def get(self, cluster: int) -> int:
        bi, i = divmod(cluster, self.epb)
        if bi >= len(self.table) or not self.table[bi]:
            return 0
        return self._entry(self.cache.get(self.table[bi]), i)

    def _entry(self, block: bytearray, i: int) -> int:
        if self.order >= 3:
            w = self.bits >> 3
            return int.from_bytes(block[i * w:(i + 1) * w], "big")
        byte, shift = divmod(i * self.bits, 8)
        return (block[byte] >> shift) & self.max

    def _set_entry(self, block: bytearray, i: int, value: int) -> None:
        if self.order >= 3:
            w = self.bits >> 3
            block[i * w:(i + 1) * w] = value.to_bytes(w, "big")
            return
        byte, shift = divmod(i * self.bits, 8)
        block[byte] = (block[byte] & ~(self.max << shift) & 0xFF) | (value << shift)

    def _set(self, cluster: int, value: int) -> None:
        bi, i = divmod(cluster, self.epb)
        offset = self.table[bi]
        block = self.cache.get(offset)
        self._set_entry(block, i, value)
        self.cache.mark_dirty(offset)

    # -- allocation --------------------------------------------------------------------------

    def alloc(self) -> int:
        """A free cluster, its refcount raised to 1 (in the cache): its host offset.

        :raises OSError: EFBIG if the refcount table cannot grow further.
        """
        c = self.hint
        while True:
            bi, i = divmod(c, self.epb)
            if bi >= len(self.table):
                self._grow(bi)
                continue
            if not self.table[bi]:
                c = self._new_block(bi, c)  # the block takes the first usable cluster of its own range
                continue
            found = self._find_free(self.cache.get(self.table[bi]), i)
            if found is None:
                c = (bi + 1) * self.epb
                continue
            c = bi * self.epb + found
            if c in self.metadata:
                c += 1
                continue
            self._set(c, 1)
            self.unsynced = True
            self.hint = c + 1
            return c << self.cluster_bits

    def _find_free(self, block: bytearray, start: int) -> int | None:
        if self.order >= 3:
            w = self.bits >> 3
            zero = bytes(w)
            pos = block.find(zero, start * w)
            while pos != -1 and pos % w:
                pos = block.find(zero, pos + (w - pos % w))
            return None if pos == -1 else pos // w
        for i in range(start, self.epb):
            if not self._entry(block, i):
                return i
        return None

    def _new_block(self, bi: int, start: int) -> int:
        """Create refcount block ``bi`` inside the range it covers (so it counts itself); returns
        the next cluster index to try."""
        c = max(start, bi * self.epb)
        end = (bi + 1) * self.epb
        while c < end and c in self.metadata:
            c += 1
        if c == end:
            return end
        block = bytearray(self.cs)
        self._set_entry(block, c - bi * self.epb, 1)
        offset = c << self.cluster_bits
        self.file.write(offset, block)
        self.file.sync()  # the block is durable before the table points at it
        self.file.write(self.table_offset + bi * 8, struct.pack(">Q", offset))
        self.table[bi] = offset
        self.metadata.add(c)
        self.cache.put(offset, block, dirty=False)
        return c + 1

    def _grow(self, needed: int) -> None:
        """A larger refcount table, with the refcount blocks that count it, past everything in use;
        the header points at it once it is durable, and the old table is freed after that."""
        cs, epb = self.cs, self.epb
        old_n = len(self.table)
        new_n = max(old_n * 2, needed + 1)
        start = max(old_n * epb, -(-self.file.end // cs), max(self.metadata, default=0) + 1)
        start = -(-start // epb) * epb
        while True:
            n_rt = -(-new_n * 8 // cs)
            n_rb = 1
            while n_rb * epb < n_rb + n_rt:
                n_rb += 1
            last_block = (start + n_rb + n_rt - 1) // epb
            if last_block < new_n:
                break
            new_n = last_block + 1
        if n_rt * cs > MAX_REFTABLE_BYTES:
            raise OSError(errno.EFBIG, "qcow2: refcount table cannot grow further")
        used = n_rb + n_rt
        blocks: list[bytearray] = []
        for j in range(n_rb):
            block = bytearray(cs)
            first = (start // epb + j) * epb
            for c in range(max(first, start), min(first + epb, start + used)):
                self._set_entry(block, c - first, 1)
            blocks.append(block)
        table = self.table + be64_array(bytes(n_rt * cs - old_n * 8))
        for j in range(n_rb):
            table[start // epb + j] = (start + j) << self.cluster_bits
        table_offset = (start + n_rb) << self.cluster_bits
        self.file.writev([memoryview(b) for b in blocks], start << self.cluster_bits)
        self.file.write(table_offset, be64_bytes(table))
        self.file.sync()
        self.file.write(HEADER_REFTABLE_FIELDS, struct.pack(">QI", table_offset, n_rt))
        self.file.sync()
        old = range(self.table_offset >> self.cluster_bits, (self.table_offset >> self.cluster_bits)
                    + self.table_clusters)
        self.pending.extend(old)  # still metadata (never reallocated) until released
        self.table, self.table_offset, self.table_clusters = table, table_offset, n_rt
        for j in range(n_rb):
            self.cache.put((start + j) << self.cluster_bits, blocks[j], dirty=False)
        self.metadata.update(range(start, start + used))
        LOG.debug("%s: refcount table grown to %d entries at %#x", self.path, len(table), table_offset)

    # -- freeing -----------------------------------------------------------------------------

    def free(self, cluster: int) -> None:
        """Lower the cluster's refcount once the owner has made the removal of its reference durable."""
        self.pending.append(cluster)

    def release_pending(self) -> None:
        """Apply the deferred decrements (the owner has synced the removals)."""
        pending, self.pending = self.pending, []
        for c in pending:
            value = self.get(c)
            if value == 0:
                raise OSError(errno.EIO, f"qcow2: refcount of cluster {c:#x} underflows")
            self._set(c, value - 1)
            if value == 1:
                self.metadata.discard(c)
                self.hint = min(self.hint, c)

    # -- write-back --------------------------------------------------------------------------

    def _load_block(self, offset: int) -> bytearray:
        return bytearray(self.file.read(offset, self.cs))

    def _store_block(self, offset: int, block: bytearray) -> None:
        self.file.write(offset, block)

    def write_back(self) -> None:
        """Write the dirty refcount blocks (not synced: the owner syncs)."""
        self.cache.write_back()
