"""A qcow2 image (versions 2 and 3) as a :class:`~vmsh.devices.storage.disk_file.DiskFile`:
L1/L2 translation through a bounded L2 cache, allocation on write, zero and compressed clusters,
discard and write-zeroes, backing files, copy-on-write of clusters and tables shared with internal
snapshots (QEMU's docs/interop/qcow2.txt).

Consistency: guest data reaches the file before the L2 entry that finds it; a new cluster's
refcount is written and synced before any table entry pointing at it reaches the file; a freed
cluster's refcount drops only after its unlinking is synced (see ``refcounts``). A VMM killed at any
point leaves an image ``qemu-img check`` calls consistent, leaked clusters at most; :meth:`flush`
makes every completed write durable. Corrupt tables give ``OSError(EIO)`` for the request that
meets them, and guest data is never written into a cluster holding metadata.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import struct
import threading

from vmsh.devices.storage.disk_file import DiskFile
from vmsh.devices.storage.qcow2.backing import open_backing
from vmsh.devices.storage.qcow2.cache import TableCache
from vmsh.devices.storage.qcow2.compressed import decompress_cluster, zstd_available
from vmsh.devices.storage.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    COMPRESSION_ZSTD,
    MAX_CLUSTER_BITS,
    Header,
    parse_header,
)
from vmsh.devices.storage.qcow2.hostfile import HostFile, be64_array
from vmsh.devices.storage.qcow2.refcounts import Refcounts
from vmsh.devices.virtio.queue import window_views
from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1 and standard L2 entries
COPIED = 1 << 63  # refcount is exactly one: may be written in place
COMPRESSED = 1 << 62
ZERO = 1 << 0  # v3: the cluster reads as zeros
L1_RESERVED = ~(OFFSET_MASK | COPIED) & (2**64 - 1)
L2_RESERVED = ~(OFFSET_MASK | COPIED | COMPRESSED | ZERO) & (2**64 - 1)
HEADER_AUTOCLEAR = 88
L2_CACHE_BYTES = 8 << 20
#: deferred refcount decrements after which an internal flush applies them
MAX_PENDING_FREES = 8192
MAX_SNAPSHOTS = 65536

# cluster kinds
UNALLOCATED, ZEROED, NORMAL, COMPRESSED_KIND = range(4)


def _eio(why: str) -> OSError:
    return OSError(errno.EIO, f"qcow2: {why}")


class Qcow2File:
    """An open qcow2 image.

    :param seen: identities of the images above this one in a backing chain (loop detection).
    :raises DeviceError: if the image cannot be opened, is corrupt or uses a feature not served.
    """

    def __init__(self, path: str, *, readonly: bool, seen: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.path = path
        self.readonly = readonly
        self.backing: DiskFile | None = None
        self._lock = threading.Lock()
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open disk image {path}") from err
        self.file = HostFile(fd)
        try:
            self._open(seen)
        except OSError as err:
            self.close()
            raise DeviceError(f"cannot read qcow2 image {path}") from err
        except DeviceError:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------

    def _open(self, seen: frozenset[tuple[int, int]]) -> None:
        st = os.fstat(self.file.fd)
        self.identity = (st.st_dev, st.st_rdev, st.st_ino)
        self.block_size = st.st_blksize
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise DeviceError(f"qcow2 image {self.path}: backing file loop")
        head = self.file.read_upto(0, 1 << MAX_CLUSTER_BITS)
        h = parse_header(self.path, head[:1 << max(9, _cluster_bits(head))], self.file.end, readonly=self.readonly)
        self.header: Header = h
        if h.compression_type == COMPRESSION_ZSTD and not zstd_available():
            raise DeviceError(f"qcow2 image {self.path}: compression type 'zstd' is not supported "
                              "(no zstd module on this host)")
        self.size = h.size
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.l2_bits = self.cb - 3
        self.metadata: set[int] = {0}
        self.l1 = self._read_l1(h.l1_table_offset, h.l1_size, "L1 table")
        self.refcounts = Refcounts(self.path, self.file, self.cb, h.refcount_order, h.refcount_table_offset,
                                   h.refcount_table_clusters, self.metadata)
        self._check_l1(self.l1, "L1", shared_ok=False)
        if h.nb_snapshots:
            self._add_snapshot_metadata(h)
        if h.bitmap_directory is not None:
            off, length = h.bitmap_directory
            self._claim(off, length, "bitmap directory")
        self.l2 = TableCache(L2_CACHE_BYTES // self.cs, self._load_l2, self._store_l2)
        self._compressed_cache: tuple[int, bytes] | None = None
        self.zero_buf = memoryview(bytes(self.cs))
        if h.backing_file is not None:
            self.backing = open_backing(self.path, h.backing_file, h.backing_format, seen | {key}, Qcow2File)
        if not self.readonly and h.autoclear_features & AUTOCLEAR_BITMAPS:
            # vmsh does not update persistent bitmaps: the spec wants the bit cleared before writing.
            self.file.write(HEADER_AUTOCLEAR, struct.pack(">Q", h.autoclear_features & ~AUTOCLEAR_BITMAPS))
            self.file.sync()

    def _read_l1(self, offset: int, entries: int, what: str) -> array.array[int]:
        if not entries:
            return array.array("Q")
        first = offset >> self.cb
        for c in range(first, first + max(1, -(-entries * 8 // self.cs))):
            if c in self.metadata:
                raise DeviceError(f"qcow2 image {self.path}: {what} overlaps other metadata")
            self.metadata.add(c)
        return be64_array(self.file.read(offset, entries * 8))

    def _check_l1(self, l1: array.array[int], what: str, *, shared_ok: bool) -> None:
        own: set[int] = set()
        for i, entry in enumerate(l1):
            off = entry & OFFSET_MASK
            if not off:
                continue
            if entry & L1_RESERVED or off % self.cs:
                raise DeviceError(f"qcow2 image {self.path}: {what} entry {i} ({entry:#x}) is invalid")
            if off + self.cs > self.file.end:
                raise DeviceError(f"qcow2 image {self.path}: {what} entry {i}: L2 table at {off:#x} "
                                  "past the end of the file")
            c = off >> self.cb
            if c in own or (c in self.metadata and not shared_ok):
                raise DeviceError(f"qcow2 image {self.path}: {what} entry {i}: L2 table at {off:#x} "
                                  "overlaps other metadata")
            own.add(c)
        self.metadata.update(own)

    def _claim(self, offset: int, length: int, what: str) -> None:
        """Mark ``[offset, offset+length)`` as metadata; it must not overlap metadata already known."""
        clusters = range(offset >> self.cb, (offset + length + self.cs - 1) >> self.cb)
        if offset >= self.file.end or len(clusters) > self.file.end >> self.cb:
            raise DeviceError(f"qcow2 image {self.path}: {what} at {offset:#x} past the end of the file")
        if any(c in self.metadata for c in clusters):
            raise DeviceError(f"qcow2 image {self.path}: {what} overlaps other metadata")
        self.metadata.update(clusters)

    def _add_snapshot_metadata(self, h: Header) -> None:
        """The snapshot table, and each snapshot's L1 and L2 tables, are metadata too."""
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise DeviceError(f"qcow2 image {self.path}: {h.nb_snapshots} snapshots (too many)")
        pos = h.snapshots_offset
        tables: list[tuple[int, int]] = []
        for _ in range(h.nb_snapshots):
            l1_off, l1_size, id_len, name_len, _s, _ns, _clk, _vms, extra = struct.unpack(
                ">QIHHIIQII", self.file.read(pos, 40))
            pos += 40 + extra + id_len + name_len
            pos = (pos + 7) & ~7
            if l1_off % self.cs or l1_size * 8 > 32 << 20:
                raise DeviceError(f"qcow2 image {self.path}: snapshot L1 table invalid")
            tables.append((l1_off, l1_size))
        self._claim(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table")
        for l1_off, l1_size in tables:
            self._claim(l1_off, max(8, l1_size * 8), "snapshot L1 table")
            snap_l1 = be64_array(self.file.read(l1_off, l1_size * 8))
            self._check_l1(snap_l1, "snapshot L1", shared_ok=True)

    # -- translation -------------------------------------------------------------------------

    def _load_l2(self, offset: int) -> bytearray:
        return bytearray(self.file.read(offset, self.cs))

    def _store_l2(self, offset: int, table: bytearray) -> None:
        self._barrier()  # the refcounts of what the table points at are durable first
        self.file.write(offset, table)

    def _barrier(self) -> None:
        rc = self.refcounts
        if rc.unsynced or rc.cache.dirty:
            rc.write_back()
            self.file.sync()
            rc.unsynced = False

    def _entry(self, voff: int) -> tuple[int, int, int]:
        """(L2 table offset or 0, index in it, entry) of the cluster holding ``voff``."""
        l1i = voff >> (self.cb + self.l2_bits)
        l2i = (voff >> self.cb) & ((1 << self.l2_bits) - 1)
        l2off = self.l1[l1i] & OFFSET_MASK
        if not l2off:
            return 0, l2i, 0
        entry: int = struct.unpack_from(">Q", self.l2.get(l2off), l2i * 8)[0]
        return l2off, l2i, entry

    def _classify(self, entry: int) -> tuple[int, int, int]:
        """(kind, host offset, host length) of an L2 entry.

        :raises OSError: EIO if the entry is corrupt or points into metadata or past the file.
        """
        if entry & COMPRESSED:
            x = 62 - (self.cb - 8)
            host = entry & ((1 << x) - 1)
            length = (((entry >> x) & ((1 << (self.cb - 8)) - 1)) + 1) * 512 - (host & 511)
            if host >= self.file.end or any(c in self.metadata for c in
                                             range(host >> self.cb, ((host + length - 1) >> self.cb) + 1)):
                raise _eio(f"compressed cluster at {host:#x} past the end of the image or in metadata")
            return COMPRESSED_KIND, host, length
        if entry & L2_RESERVED:
            raise _eio(f"L2 entry {entry:#x} has reserved bits set")
        host = entry & OFFSET_MASK
        if host:
            if host % self.cs:
                raise _eio(f"L2 entry {entry:#x} misaligned")
            if host >= self.file.end:
                raise _eio(f"L2 entry points past the end of the image ({host:#x})")
            if (host >> self.cb) in self.metadata:
                raise _eio(f"L2 entry points into metadata ({host:#x})")
        if entry & ZERO:
            return ZEROED, host, self.cs
        return (NORMAL if host else UNALLOCATED), host, self.cs

    # -- reads -------------------------------------------------------------------------------

    def read(self, views: list[memoryview], offset: int) -> None:
        with self._lock:
            self._check_range(offset, sum(len(v) for v in views))
            self._read(views, offset)

    def _check_range(self, offset: int, length: int) -> None:
        # The device checks requests against the size; an offset past it would index past the L1 table.
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EIO, f"qcow2: request [{offset:#x}, +{length:#x}) past the end of the disk")

    def _read(self, views: list[memoryview], offset: int) -> None:
        total = sum(len(v) for v in views)
        pos = 0
        run: list[int] | None = None  # [kind, host or virtual start, pos, length] of mergeable pieces
        while pos < total:
            voff = offset + pos
            in_cl = voff & (self.cs - 1)
            n = min(self.cs - in_cl, total - pos)
            kind, host, hlen = self._classify(self._entry(voff)[2])
            if kind == COMPRESSED_KIND:
                if run:
                    self._read_run(views, run)
                    run = None
                data = self._decompressed(host, hlen)
                src = in_cl
                for v in window_views(views, pos, n):
                    v[:] = data[src:src + len(v)]
                    src += len(v)
            else:
                start = host + in_cl if kind == NORMAL else voff
                if run and run[0] == kind and (kind == ZEROED or run[1] + run[3] == start):
                    run[3] += n
                else:
                    if run:
                        self._read_run(views, run)
                    run = [kind, start, pos, n]
            pos += n
        if run:
            self._read_run(views, run)

    def _read_run(self, views: list[memoryview], run: list[int]) -> None:
        kind, start, pos, n = run
        win = window_views(views, pos, n)
        if kind == NORMAL:
            self.file.readv(win, start)
        elif kind == UNALLOCATED and self.backing is not None:
            self._read_backing(win, start, n)
        else:
            _zero(win, self.zero_buf)

    def _read_backing(self, win: list[memoryview], voff: int, n: int) -> None:
        assert self.backing is not None
        inside = max(0, min(n, self.backing.size - voff))
        inside -= inside % 512
        if inside:
            self.backing.read(window_views(win, 0, inside), voff)
        if inside < n:
            _zero(window_views(win, inside, n - inside), self.zero_buf)

    def _decompressed(self, host: int, length: int) -> bytes:
        if self._compressed_cache is not None and self._compressed_cache[0] == host:
            return self._compressed_cache[1]
        data = decompress_cluster(self.file.read_upto(host, length), self.cs, self.header.compression_type)
        self._compressed_cache = (host, data)
        return data

    def _old_cluster(self, vcluster: int, kind: int, host: int, hlen: int) -> bytearray:
        """The current contents of the cluster at virtual offset ``vcluster`` (for copy-on-write)."""
        buf = bytearray(self.cs)
        if kind == NORMAL:
            data = self.file.read_upto(host, self.cs)
            buf[:len(data)] = data
        elif kind == COMPRESSED_KIND:
            buf[:] = self._decompressed(host, hlen)
        elif kind == UNALLOCATED and self.backing is not None:
            n = min(self.cs, max(0, self.size - vcluster))
            n -= n % 512
            if n:
                self._read_backing([memoryview(buf)[:n]], vcluster, n)
        return buf

    # -- writes ------------------------------------------------------------------------------

    def write(self, views: list[memoryview], offset: int) -> None:
        with self._lock:
            self._check_range(offset, sum(len(v) for v in views))
            self._write(views, offset)
            self._maybe_release()

    def _write(self, views: list[memoryview], offset: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: image is read-only")
        total = sum(len(v) for v in views)
        pos = 0
        data_runs: list[list[int]] = []  # [host, pos, length]: guest data written in place or new clusters
        buffers: list[tuple[int, bytearray]] = []  # whole clusters assembled for copy-on-write
        updates: list[tuple[int, int, int, int]] = []  # (L1 index, L2 index, new entry, old entry)
        while pos < total:
            voff = offset + pos
            in_cl = voff & (self.cs - 1)
            n = min(self.cs - in_cl, total - pos)
            l1i = voff >> (self.cb + self.l2_bits)
            l2off = self._l2_for_write(l1i)
            l2i = (voff >> self.cb) & ((1 << self.l2_bits) - 1)
            entry = struct.unpack_from(">Q", self.l2.get(l2off), l2i * 8)[0]
            kind, host, hlen = self._classify(entry)
            if kind == NORMAL and entry & COPIED:
                target = host
            else:
                target = host if kind == ZEROED and host and entry & COPIED else self.refcounts.alloc()
                updates.append((l1i, l2i, target | COPIED, entry))
                if n < self.cs:
                    old = bytearray(self.cs) if kind == ZEROED else self._old_cluster(voff - in_cl, kind, host,
                                                                                         hlen)
                    dst = in_cl
                    for v in window_views(views, pos, n):
                        old[dst:dst + len(v)] = v
                        dst += len(v)
                    buffers.append((target, old))
                    pos += n
                    continue
            start = target + in_cl
            if data_runs and data_runs[-1][0] + data_runs[-1][2] == start:
                data_runs[-1][2] += n
            else:
                data_runs.append([start, pos, n])
            pos += n
        # Data first, then the entries that find it (their refcounts are synced before they reach the file).
        for host, data in buffers:
            self.file.write(host, data)
        for host, p, n in data_runs:
            self.file.writev(window_views(views, p, n), host)
        for l1i, l2i, new, old_entry in updates:
            self._set_entry(l1i, l2i, new, old_entry, keep=new & OFFSET_MASK)

    def _set_entry(self, l1i: int, l2i: int, new: int, old: int, *, keep: int = 0) -> None:
        """Point L2 entry ``l2i`` of table ``l1i`` at ``new``; the clusters only ``old`` held are freed."""
        l2off = self._l2_for_write(l1i)
        table = self.l2.get(l2off)
        struct.pack_into(">Q", table, l2i * 8, new)
        self.l2.mark_dirty(l2off)
        self._free_entry(old, keep)

    def _free_entry(self, entry: int, keep: int) -> None:
        kind, host, hlen = self._classify(entry)
        if kind == COMPRESSED_KIND:
            for c in range(host >> self.cb, ((host + hlen - 1) >> self.cb) + 1):
                self.refcounts.free(c)
        elif host and host != keep:
            self.refcounts.free(host >> self.cb)

    def _l2_for_write(self, l1i: int) -> int:
        """The offset of an L2 table for ``l1i`` this image owns alone: allocated, or copied from a
        table shared with a snapshot; its refcount and contents are synced before the L1 entry."""
        entry = self.l1[l1i]
        old = entry & OFFSET_MASK
        if old and entry & COPIED:
            return old
        table = bytearray(self.l2.get(old)) if old else bytearray(self.cs)
        new = self.refcounts.alloc()
        self.metadata.add(new >> self.cb)
        self.file.write(new, table)
        self._barrier()  # syncs the new table's contents and its refcount (alloc left them unsynced)
        self.file.write(self.header.l1_table_offset + l1i * 8, struct.pack(">Q", new | COPIED))
        self.l1[l1i] = new | COPIED
        self.l2.put(new, table, dirty=False)
        if old:
            self.l2.drop(old)
            self.refcounts.free(old >> self.cb)
        return new

    # -- discard and write-zeroes ------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            self._check_range(offset, length)
            if self.backing is not None and self.header.version < 3:
                return  # v2 cannot say "zeros over a backing file": discard is only a hint
            self._unmap(offset, length, ZERO if self.backing is not None else 0)
            self._maybe_release()

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        with self._lock:
            self._check_range(offset, length)
            end = offset + length
            first = min(end, (offset + self.cs - 1) & ~(self.cs - 1))
            last = max(first, end & ~(self.cs - 1))
            if self.backing is not None and self.header.version < 3:
                first = last = end  # no zero flag: write real zeros
            for lo, hi in ((offset, first), (last, end)):
                pos = lo
                while pos < hi:
                    n = min(self.cs, hi - pos)
                    self._write([self.zero_buf[:n]], pos)
                    pos += n
            if last > first:
                self._unmap(first, last - first, ZERO if self.backing is not None else 0, keep=not unmap)
            self._maybe_release()

    def _unmap(self, offset: int, length: int, new: int, *, keep: bool = False) -> None:
        """Replace the whole clusters in the range by ``new`` (0: unallocated, or ZERO); with
        ``keep`` (write-zeroes without unmap, which must not deallocate) a cluster the image owns
        stays allocated: a v3 zero cluster keeping its offset, or zeros written in place (v2)."""
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: image is read-only")
        voff = (offset + self.cs - 1) & ~(self.cs - 1)
        end = (offset + length) & ~(self.cs - 1)
        span = 1 << (self.cb + self.l2_bits)
        while voff < end:
            l1i = voff >> (self.cb + self.l2_bits)
            if not self.l1[l1i] & OFFSET_MASK and new == 0:
                voff = (voff + span) & ~(span - 1)  # a whole unallocated table already reads as zeros
                continue
            _, l2i, entry = self._entry(voff)
            kind, host, _ = self._classify(entry)  # never act on a corrupt entry
            if keep and host and kind in (NORMAL, ZEROED) and entry & COPIED:
                if self.header.version >= 3:
                    if entry != host | COPIED | ZERO:
                        self._set_entry(l1i, l2i, host | COPIED | ZERO, entry, keep=host)
                else:
                    self._write([self.zero_buf], voff)
            elif entry != new:
                self._set_entry(l1i, l2i, new, entry)
            voff += self.cs

    def _maybe_release(self) -> None:
        if len(self.refcounts.pending) > MAX_PENDING_FREES:
            self._flush()

    # -- durability --------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            if not self.readonly:
                self._flush()

    def _flush(self) -> None:
        self._barrier()  # refcounts raised so far, and the data written so far
        self.l2.write_back()
        self.file.sync()  # every acknowledged write is durable here
        if self.refcounts.pending:
            self.refcounts.release_pending()
            self.refcounts.write_back()  # lowered refcounts: losing them leaks, never corrupts

    def close(self) -> None:
        with self._lock:
            if self.file.fd >= 0 and not self.readonly and hasattr(self, "l2"):
                try:
                    self._flush()
                    self.file.sync()
                except OSError as err:
                    LOG.warning("%s: flushing on close failed: %s", self.path, err)
            self.file.close()
            if self.backing is not None:
                self.backing.close()
                self.backing = None


def _cluster_bits(head: bytes) -> int:
    """The header's cluster_bits, clamped, to know how much of the file is the header's cluster."""
    if len(head) < 24:
        return 9
    bits: int = struct.unpack_from(">I", head, 20)[0]
    return min(MAX_CLUSTER_BITS, max(9, bits))


def _zero(views: list[memoryview], zeros: memoryview) -> None:
    for v in views:
        pos = 0
        while pos < len(v):
            n = min(len(zeros), len(v) - pos)
            v[pos:pos + n] = zeros[:n]
            pos += n
