"""The qcow2 header: parsing and checking the fixed fields, the feature bits and the header
extensions (QEMU's docs/interop/qcow2.txt, "Header" and "Header extensions").

Anything this implementation does not serve is refused here, naming the feature, before a single
guest request reaches the image.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from vmsh.errors import DeviceError

MAGIC = 0x514649FB  # "QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU's limits (block/qcow2.h QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE): larger tables are refused
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
#: virtual sizes above this are refused (an L2 entry holds 56-bit host offsets)
MAX_VIRTUAL_SIZE = 1 << 56
MAX_BACKING_NAME = 1023

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

_FIXED = struct.Struct(">IIQIIQIIQQIIQ")  # magic .. snapshots_offset (72 bytes)
_V3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear, refcount_order, header_length

#: builds the error for one defect of the image
Bad = Callable[[str], DeviceError]


@dataclasses.dataclass
class Header:
    """The fields of a qcow2 header this implementation uses, checked."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    #: (offset, length) of the bitmap directory, if the image has persistent bitmaps
    bitmap_directory: tuple[int, int] | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def parse_header(path: str, data: bytes, file_size: int, *, readonly: bool) -> Header:
    """The header in ``data`` (the image's first cluster, or its first bytes if shorter).

    :raises DeviceError: naming what is wrong or not served.
    """
    def bad(why: str) -> DeviceError:
        return DeviceError(f"qcow2 image {path}: {why}")

    if len(data) < V2_HEADER_LENGTH:
        raise bad("header truncated")
    (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise bad("bad magic")
    if version not in (2, 3):
        raise bad(f"version {version} is not served (versions 2 and 3 are)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cs = 1 << cluster_bits
    if crypt != 0:
        raise bad(f"encryption (method {crypt}) is not supported")
    incompat = compat = autoclear = 0
    refcount_order, header_length, compression = 4, V2_HEADER_LENGTH, COMPRESSION_ZLIB
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise bad("header truncated")
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(data, V2_HEADER_LENGTH)
        if header_length < V3_HEADER_LENGTH or header_length % 8 or header_length > min(cs, len(data)):
            raise bad(f"header_length {header_length} invalid")
        if header_length > V3_HEADER_LENGTH:
            compression = data[V3_HEADER_LENGTH]
    _check_features(bad, incompat, autoclear, compression)
    if refcount_order > 6:
        raise bad(f"refcount_order {refcount_order} out of range 0..6")
    if size > MAX_VIRTUAL_SIZE:
        raise bad(f"virtual size {size} too large")
    l2_entries = cs // 8
    needed_l1 = -(-size // (cs * l2_entries))
    if l1_size < needed_l1:
        raise bad(f"L1 table of {l1_size} entries too small for the virtual size {size}")
    if l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table of {l1_size} entries too large")
    if l1_size:  # an empty disk may have no L1 table at all
        _check_range(bad, "L1 table", l1_off, l1_size * 8, cs, file_size)
    if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_BYTES:
        raise bad(f"refcount table of {rt_clusters} clusters invalid")
    _check_range(bad, "refcount table", rt_off, rt_clusters * cs, cs, file_size)
    if nb_snap:
        _check_range(bad, "snapshot table", snap_off, 1, cs, file_size)
    backing_file = None
    if backing_off:
        if backing_len == 0 or backing_len > MAX_BACKING_NAME or backing_off + backing_len > len(data):
            raise bad("backing file name out of the first cluster or too long")
        try:
            backing_file = data[backing_off:backing_off + backing_len].decode()
        except UnicodeDecodeError as err:
            raise bad("backing file name is not UTF-8") from err
    ext_end = backing_off if backing_off else len(data)
    backing_format, bitmaps = _parse_extensions(bad, data, header_length, ext_end)
    if backing_format is not None and backing_format not in ("raw", "qcow2"):
        raise bad(f"backing file format {backing_format!r} is not served (raw and qcow2 are)")
    if not readonly:
        # Without lazy refcounts (which vmsh never sets) the dirty bit means refcounts need repair.
        if incompat & INCOMPAT_DIRTY:
            raise bad("image is marked dirty (refcounts need repair: qemu-img check -r all)")
        if incompat & INCOMPAT_CORRUPT:
            raise bad("image is marked corrupt (qemu-img check -r all)")
    return Header(version, cluster_bits, size, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off, incompat,
                  compat, autoclear, refcount_order, header_length, compression, backing_file, backing_format,
                  bitmaps)


def _check_features(mk: Bad, incompat: int, autoclear: int, compression: int) -> None:
    if incompat & INCOMPAT_DATA_FILE:
        raise mk("incompatible feature 'external data file' is not supported")
    if incompat & INCOMPAT_EXTL2:
        raise mk("incompatible feature 'extended L2 entries' is not supported")
    unknown = incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_DATA_FILE
                           | INCOMPAT_EXTL2)
    if unknown:
        raise mk(f"unknown incompatible feature bits {unknown:#x}")
    if compression not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise mk(f"compression type {compression} is not supported")
    if bool(incompat & INCOMPAT_COMPRESSION) != (compression != COMPRESSION_ZLIB):
        raise mk("compression type and its incompatible feature bit disagree")
    unknown_auto = autoclear & ~(AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW)
    if unknown_auto:
        raise mk(f"unknown autoclear feature bits {unknown_auto:#x}")


def _check_range(bad: Bad, what: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise bad(f"{what} offset {offset:#x} not cluster-aligned")
    if offset == 0:
        raise bad(f"{what} overlaps the header")
    if offset + length > file_size:
        raise bad(f"{what} at {offset:#x} extends past the end of the file")


def _parse_extensions(bad: Bad, data: bytes, pos: int, end: int) -> tuple[str | None, tuple[int, int] | None]:
    backing_format = None
    bitmaps = None
    while True:
        if pos + 8 > end:
            return backing_format, bitmaps  # v2 images may have none, without an end marker
        etype, elen = struct.unpack_from(">II", data, pos)
        pos += 8
        if etype == EXT_END:
            return backing_format, bitmaps
        if pos + elen > end:
            raise bad(f"header extension {etype:#x} extends past the header")
        body = data[pos:pos + elen]
        if etype == EXT_BACKING_FORMAT:
            backing_format = body.decode(errors="replace")
        elif etype == EXT_ENCRYPTION:
            raise bad("full disk encryption header present: encryption is not supported")
        elif etype == EXT_DATA_FILE:
            raise bad("external data file is not supported")
        elif etype == EXT_BITMAPS and elen >= 24:
            _nb, _res, dir_size, dir_off = struct.unpack_from(">IIQQ", body)
            bitmaps = (dir_off, dir_size)
        pos += (elen + 7) & ~7
