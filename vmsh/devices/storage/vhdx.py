"""VHDX images, fixed and dynamic ([MS-VHDX] v20160714, "Virtual Hard Disk v2 (VHDX) File Format").

The file starts with a 1 MiB header section: the file type identifier, two headers (the current
one has the valid checksum and the higher sequence number) and two copies of the region table,
which places the block allocation table (BAT) and the metadata region. Metadata gives the block
size, the virtual disk size and the sector sizes. The virtual disk is cut into payload blocks of
the block size; the BAT entry of a block says where the block lies in the file (a multiple of
1 MiB) and in which state it is: fully present blocks are read from the file, the others
(not present, undefined, zero, unmapped) read as zeros. Every ``chunk ratio`` data entries the BAT
holds one sector-bitmap entry, used by differencing images only.

As cloud-hypervisor v40 (``block/src/vhdx/``), vmsh reads and writes fixed and dynamic images and
allocates a block on its first write. Unlike v40 it refuses, at open, a differencing image (v40
fails every request on one) and an image whose log may hold entries to replay (v40 ignores the
log); it validates every BAT entry against the file and the metadata regions, so no guest request
reads or writes outside payload blocks.

Crash ordering of an allocation: grow the file (the new block reads as zeros), write the data, then
the BAT entry; a VMM killed in between leaves at most an unreferenced block at the end of the file.
Before the first write, both headers get new file and data write GUIDs, as the spec requires.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
import sys
import threading
import uuid
from array import array
from dataclasses import dataclass

from vmsh.devices.storage.crc32c import crc32c
from vmsh.devices.storage.raw import RawFile, file_size
from vmsh.devices.virtio.queue import window_views
from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

MiB = 1 << 20
SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * 1024, 128 * 1024)
HEADER_SIZE = 4096
REGION_TABLE_OFFSETS = (192 * 1024, 256 * 1024)
REGION_TABLE_SIZE = 64 * 1024
#: the header section: identifier, headers, region tables (and reserved space)
HEADER_SECTION = MiB
MAX_TABLE_ENTRIES = 2047

# header: signature, checksum, sequence number, file write, data write and log GUIDs, log version,
# version, log length, log offset (MS-VHDX 2.2.2)
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH20x")
_METADATA_ENTRY = struct.Struct("<16sIIII")

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
REQUIRED_METADATA = (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE)
METADATA_IS_REQUIRED = 0x4
REGION_IS_REQUIRED = 0x1
FILE_LEAVE_BLOCKS_ALLOCATED = 0x1
FILE_HAS_PARENT = 0x2

# payload block states (MS-VHDX 2.5.1.1); a sector bitmap entry is present in state 6 too
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_PRESENT = 6
ZERO_STATES = frozenset({PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_ZERO,
                         PAYLOAD_BLOCK_UNMAPPED})
STATE_MASK = 0x7
OFFSET_MASK = ~(MiB - 1) & 0xFFFFFFFFFFFFFFFF

MIN_BLOCK_SIZE = MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 << 40
#: a BAT larger than this is not held in memory (2^24 entries: a 16 TiB disk of 1 MiB blocks)
MAX_BAT_ENTRIES = 1 << 24


def _guid(raw: bytes) -> uuid.UUID:
    # GUIDs are stored as Windows lays them out: the first three fields little-endian.
    return uuid.UUID(bytes_le=bytes(raw))


def _checksum_ok(raw: bytes | bytearray) -> tuple[int, int]:
    """(stored, computed) CRC-32C of a structure whose checksum is its bytes 4..8."""
    stored = int.from_bytes(raw[4:8], "little")
    return stored, crc32c(bytes(raw[:4]) + bytes(4) + bytes(raw[8:]))


@dataclass
class VhdxHeader:
    """One of the two headers (MS-VHDX 2.2.2)."""

    slot: int
    sequence: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def pack(self) -> bytes:
        body = bytearray(HEADER_SIZE)
        _HEADER.pack_into(body, 0, b"head", 0, self.sequence, self.file_write_guid, self.data_write_guid,
                          self.log_guid, self.log_version, self.version, self.log_length, self.log_offset)
        body[4:8] = crc32c(body).to_bytes(4, "little")
        return bytes(body)


@dataclass(frozen=True)
class Region:
    """A region table entry: a range of the file holding metadata."""

    guid: uuid.UUID
    offset: int
    length: int


class VhdxFile:
    """A :class:`~vmsh.devices.storage.disk_file.DiskFile` over a fixed or dynamic VHDX image.

    :param fd: the open image (taken over: closed by :meth:`close`).
    :raises DeviceError: if the image is corrupt or uses what vmsh does not serve (a parent, a log
        to replay).
    :raises OSError: if the image cannot be read.
    """

    def __init__(self, path: str, fd: int, *, readonly: bool, direct: bool) -> None:
        self.path = path
        self.readonly = readonly
        # Payload data moves through a RawFile on ``fd`` (its O_DIRECT bounce path included);
        # metadata through a buffered descriptor, since its structures are not block-aligned.
        self._data = RawFile(path, fd, readonly=readonly, direct=direct)
        self.identity = self._data.identity
        self.block_size = self._data.block_size
        self._meta_fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC) if direct else fd
        #: serialises allocations (the BAT, the end of the file) and the first-write header update
        self._lock = threading.Lock()
        self._headers_updated = False
        try:
            self._open()
        except BaseException:
            if self._meta_fd != fd:
                os.close(self._meta_fd)
            raise

    # -- open --------------------------------------------------------------------------------

    def _fail(self, what: str) -> DeviceError:
        return DeviceError(f"VHDX image {self.path}: {what}")

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._meta_fd, length, offset)
        if len(data) != length:
            raise self._fail(f"{length} bytes at {offset} lie past the end of the file")
        return data

    def _open(self) -> None:
        self._file_end = file_size(self._meta_fd)
        if self._file_end < HEADER_SECTION:
            raise self._fail(f"{self._file_end} bytes is shorter than the 1 MiB header section")
        if self._pread(8, 0) != SIGNATURE:
            raise self._fail("no 'vhdxfile' signature")
        self._header = self._current_header()
        regions = self._region_table()
        bat = next((r for r in regions if r.guid == BAT_GUID), None)
        meta = next((r for r in regions if r.guid == METADATA_GUID), None)
        if bat is None or meta is None:
            raise self._fail("the region table lacks the BAT or the metadata region")
        self._read_metadata(meta)
        self._bat_offset = bat.offset
        # Ranges no payload block may touch: the header section, the log and every region.
        fixed = [(0, HEADER_SECTION)] + [(r.offset, r.length) for r in regions]
        if self._header.log_length:
            fixed.append((self._header.log_offset, self._header.log_length))
        self._read_bat(bat, fixed)

    def _current_header(self) -> VhdxHeader:
        headers: list[VhdxHeader] = []
        problems: list[str] = []
        for slot, offset in enumerate(HEADER_OFFSETS):
            raw = self._pread(HEADER_SIZE, offset)
            sig, _, seq, fwg, dwg, lg, log_version, version, log_length, log_offset = _HEADER.unpack_from(raw)
            stored, computed = _checksum_ok(raw)
            if sig != b"head":
                problems.append(f"header {slot + 1} has no 'head' signature")
            elif stored != computed:
                problems.append(f"header {slot + 1} checksum {stored:#010x} does not match ({computed:#010x})")
            else:
                headers.append(VhdxHeader(slot, seq, fwg, dwg, lg, log_version, version, log_length, log_offset))
        if not headers:
            raise self._fail("no valid header: " + "; ".join(problems))
        header = max(headers, key=lambda h: h.sequence)  # the first on a tie, as cloud-hypervisor
        if header.version != 1:
            raise self._fail(f"unknown header version {header.version}")
        if header.log_guid != bytes(16):
            raise self._fail(f"its log (GUID {_guid(header.log_guid)}) may hold entries to replay, which vmsh "
                             "does not do: the image was not closed cleanly; replay it with "
                             "'qemu-img check -r all' (or Hyper-V) first")
        if header.log_length and (header.log_offset % MiB or header.log_length % MiB
                                  or header.log_offset < HEADER_SECTION
                                  or header.log_offset + header.log_length > self._file_end):
            raise self._fail(f"log at {header.log_offset} ({header.log_length} bytes) is misplaced")
        return header

    def _region_table(self) -> list[Region]:
        problems: list[str] = []
        for copy, offset in enumerate(REGION_TABLE_OFFSETS):
            raw = self._pread(REGION_TABLE_SIZE, offset)
            sig, _, count, _reserved = _REGION_HEADER.unpack_from(raw)
            stored, computed = _checksum_ok(raw)
            if sig != b"regi":
                problems.append(f"region table {copy + 1} has no 'regi' signature")
            elif stored != computed:
                problems.append(f"region table {copy + 1} checksum {stored:#010x} does not match ({computed:#010x})")
            elif count > MAX_TABLE_ENTRIES:
                problems.append(f"region table {copy + 1} has {count} entries")
            else:
                return self._regions(raw, count)
        raise self._fail("no valid region table: " + "; ".join(problems))

    def _regions(self, raw: bytes, count: int) -> list[Region]:
        regions: list[Region] = []
        for i in range(count):
            guid, offset, length, flags = _REGION_ENTRY.unpack_from(raw, _REGION_HEADER.size + i * _REGION_ENTRY.size)
            region = Region(_guid(guid), offset, length)
            if region.guid not in (BAT_GUID, METADATA_GUID):
                if flags & REGION_IS_REQUIRED:
                    raise self._fail(f"unknown required region {region.guid}")
            elif any(r.guid == region.guid for r in regions):
                raise self._fail(f"region {region.guid} appears twice")
            if offset % MiB or length % MiB or not length or offset < HEADER_SECTION \
                    or offset + length > self._file_end:
                raise self._fail(f"region {region.guid} at {offset} ({length} bytes) is misplaced")
            for other in regions:
                if offset < other.offset + other.length and other.offset < offset + length:
                    raise self._fail(f"regions {other.guid} and {region.guid} overlap")
            regions.append(region)
        return regions

    def _read_metadata(self, meta: Region) -> None:
        table = self._pread(min(meta.length, 64 * 1024), meta.offset)
        sig, _reserved, count = _METADATA_HEADER.unpack_from(table)
        if sig != b"metadata":
            raise self._fail("no 'metadata' signature in the metadata region")
        if count > MAX_TABLE_ENTRIES:
            raise self._fail(f"metadata table has {count} entries")
        items: dict[uuid.UUID, bytes] = {}
        for i in range(count):
            guid, offset, length, flags, _ = _METADATA_ENTRY.unpack_from(
                table, _METADATA_HEADER.size + i * _METADATA_ENTRY.size)
            item = _guid(guid)
            if item in items:
                raise self._fail(f"metadata item {item} appears twice")
            if length and (offset < 64 * 1024 or offset + length > meta.length):
                raise self._fail(f"metadata item {item} at {offset} ({length} bytes) lies outside its region")
            if item == PARENT_LOCATOR:
                raise self._fail("it is a differencing image (it has a parent locator): vmsh does not serve "
                                 "differencing VHDX images")
            if item not in REQUIRED_METADATA and item != PAGE_83_DATA:
                if flags & METADATA_IS_REQUIRED:
                    raise self._fail(f"unknown required metadata item {item}")
                continue
            # The known items are a few bytes long: a hostile length is not read whole.
            items[item] = self._pread(min(length, 64), meta.offset + offset) if length else b""
        for item, need in ((FILE_PARAMETERS, 8), (VIRTUAL_DISK_SIZE, 8), (LOGICAL_SECTOR_SIZE, 4),
                           (PHYSICAL_SECTOR_SIZE, 4)):
            if len(items.get(item, b"")) < need:
                raise self._fail(f"metadata item {item} is missing or short")
        block_size, file_flags = struct.unpack_from("<II", items[FILE_PARAMETERS])
        (self.size,) = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])
        (self.logical_sector_size,) = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])
        (self.physical_sector_size,) = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])
        if file_flags & FILE_HAS_PARENT:
            raise self._fail("it is a differencing image (has a parent): vmsh does not serve differencing VHDX images")
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise self._fail(f"block size {block_size} is not a power of two from 1 MiB to 256 MiB")
        for name, value in (("logical", self.logical_sector_size), ("physical", self.physical_sector_size)):
            if value not in (512, 4096):
                raise self._fail(f"{name} sector size {value} is neither 512 nor 4096")
        if not 0 < self.size <= MAX_VIRTUAL_SIZE or self.size % self.logical_sector_size:
            raise self._fail(f"virtual disk size {self.size} is not a multiple of {self.logical_sector_size} "
                             "from one sector to 64 TiB")
        self.payload_block_size = block_size
        self.leave_blocks_allocated = bool(file_flags & FILE_LEAVE_BLOCKS_ALLOCATED)
        self.chunk_ratio = ((1 << 23) * self.logical_sector_size) // block_size

    def _read_bat(self, bat: Region, fixed: list[tuple[int, int]]) -> None:
        blocks = -(-self.size // self.payload_block_size)
        entries = blocks + (blocks - 1) // self.chunk_ratio
        if entries > MAX_BAT_ENTRIES:
            raise self._fail(f"{entries} BAT entries is more than vmsh holds ({MAX_BAT_ENTRIES})")
        if entries * 8 > bat.length:
            raise self._fail(f"the BAT region ({bat.length} bytes) cannot hold its {entries} entries")
        table = array("Q")
        table.frombytes(self._pread(entries * 8, bat.offset))
        if sys.byteorder != "little":
            table.byteswap()
        self._bat = table
        fixed.sort()
        starts = [s for s, _ in fixed]
        present: list[tuple[int, int]] = []  # (file offset, BAT index)
        block = self.payload_block_size
        for index, entry in enumerate(table):
            state, offset = entry & STATE_MASK, entry & OFFSET_MASK
            is_bitmap = index % (self.chunk_ratio + 1) == self.chunk_ratio
            if is_bitmap:
                if state == SB_BLOCK_PRESENT:
                    present.append((offset, index))
                continue
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                present.append((offset, index))
            elif state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                raise self._fail(f"BAT entry {index} is partially present, which only a differencing image may be")
            elif state not in ZERO_STATES:
                raise self._fail(f"BAT entry {index} has the invalid state {state}")
        present.sort()
        prev_end = 0
        for offset, index in present:
            length = MiB if index % (self.chunk_ratio + 1) == self.chunk_ratio else block
            if offset < HEADER_SECTION or offset + length > self._file_end:
                raise self._fail(f"BAT entry {index} points at {offset}, outside the file's payload "
                                 f"({HEADER_SECTION}..{self._file_end})")
            if offset < prev_end:
                raise self._fail(f"BAT entry {index} overlaps another block at {offset}")
            prev_end = offset + length
            i = bisect.bisect_right(starts, offset + length - 1) - 1
            if i >= 0 and fixed[i][0] + fixed[i][1] > offset:
                raise self._fail(f"BAT entry {index} at {offset} overlaps metadata at {fixed[i][0]}")
        # Allocations go past every block and region, whatever the file's length says.
        self._file_end = max([self._file_end, prev_end] + [s + n for s, n in fixed])

    # -- data --------------------------------------------------------------------------------

    def _segments(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(BAT index, offset in the block, position in the request, length) of each block's part."""
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EIO, f"VHDX {self.path}: request {offset}+{length} past the end of the disk")
        out = []
        block = self.payload_block_size
        pos = 0
        while pos < length:
            b, within = divmod(offset + pos, block)
            n = min(block - within, length - pos)
            out.append((b + b // self.chunk_ratio, within, pos, n))
            pos += n
        return out

    def _present(self, index: int) -> int | None:
        """The file offset of the block at BAT ``index``, or None if it reads as zeros."""
        entry = self._bat[index]
        state = entry & STATE_MASK
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            return entry & OFFSET_MASK
        if state in ZERO_STATES:
            return None
        raise OSError(errno.EIO, f"VHDX {self.path}: BAT entry {index} has the unserved state {state}")

    def read(self, views: list[memoryview], offset: int) -> None:
        total = sum(map(len, views))
        for index, within, pos, n in self._segments(offset, total):
            part = window_views(views, pos, n)
            where = self._present(index)
            if where is None:
                for v in part:
                    v[:] = bytes(len(v))
            else:
                self._data.read(part, where + within)

    def write(self, views: list[memoryview], offset: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"VHDX {self.path} is read-only")
        if not self._headers_updated:
            self._update_headers()
        total = sum(map(len, views))
        for index, within, pos, n in self._segments(offset, total):
            part = window_views(views, pos, n)
            where = self._present(index)
            if where is None:
                with self._lock:
                    where = self._present(index)
                    if where is None:
                        self._allocate(index, part, within)
                        continue
            self._data.write(part, where + within)

    def _allocate(self, index: int, part: list[memoryview], within: int) -> None:
        """Give BAT ``index`` a new block holding ``part`` at ``within`` (zeros elsewhere)."""
        where = -(-self._file_end // MiB) * MiB
        end = where + self.payload_block_size
        if end > OFFSET_MASK:
            raise OSError(errno.EFBIG, f"VHDX {self.path}: the file cannot grow past {self._file_end}")
        # Order for a kill at any point: the grown file reads as zeros, the data lands, and only
        # then does the BAT entry point at it (until then the block is unreferenced space).
        os.ftruncate(self._meta_fd, end)
        self._file_end = end
        self._data.write(part, where + within)
        entry = where | PAYLOAD_BLOCK_FULLY_PRESENT
        self._pwrite(entry.to_bytes(8, "little"), self._bat_offset + 8 * index)
        self._bat[index] = entry

    def _pwrite(self, data: bytes, offset: int) -> None:
        if os.pwrite(self._meta_fd, data, offset) != len(data):
            raise OSError(errno.EIO, f"VHDX {self.path}: short metadata write at {offset}")

    def _update_headers(self) -> None:
        """Before the first write, both headers get new file and data write GUIDs (MS-VHDX 2.2.2:
        a writer changes them before its first change to the file / to user data)."""
        with self._lock:
            if self._headers_updated:
                return
            header = self._header
            header.file_write_guid = uuid.uuid4().bytes_le
            header.data_write_guid = uuid.uuid4().bytes_le
            # The other slot first, so that a valid header with the new GUIDs exists before the
            # current one is overwritten; each write is durable before the next.
            for _ in range(2):
                header.slot ^= 1
                header.sequence += 1
                self._pwrite(header.pack(), HEADER_OFFSETS[header.slot])
                os.fdatasync(self._meta_fd)
            self._headers_updated = True

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self._meta_fd)

    def discard(self, offset: int, length: int) -> None:
        # A hint: holes are punched inside present blocks; the BAT is left as it is.
        for index, within, _, n in self._segments(offset, length):
            where = self._present(index)
            if where is not None and not self.leave_blocks_allocated:
                self._data.discard(where + within, n)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if not self._headers_updated:
            self._update_headers()
        for index, within, _, n in self._segments(offset, length):
            where = self._present(index)
            if where is not None:  # blocks in the other states already read as zeros
                self._data.write_zeroes(where + within, n, unmap and not self.leave_blocks_allocated)

    def close(self) -> None:
        if self._meta_fd >= 0 and self._meta_fd != self._data.fd:
            os.close(self._meta_fd)
        self._meta_fd = -1
        self._data.close()
