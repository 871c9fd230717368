"""Compressed qcow2 clusters: decompressing one cluster (raw deflate, or zstd where a zstd module
is installed), QEMU's docs/interop/qcow2.txt "Compressed Clusters Descriptor"."""

from __future__ import annotations

import errno
import importlib
import zlib
from typing import Any

from vmsh.devices.storage.qcow2.header import COMPRESSION_ZSTD


def _zstd_module() -> Any:
    for name in ("compression.zstd", "zstandard"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def zstd_available() -> bool:
    """Whether this host's Python can decompress zstd clusters."""
    return _zstd_module() is not None


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """The cluster compressed in ``data`` (which may run past the compressed stream).

    :raises OSError: EIO if the stream is corrupt or does not fill exactly one cluster.
    """
    try:
        if compression_type == COMPRESSION_ZSTD:
            out = _zstd_decompress(data, cluster_size)
        else:
            # QEMU writes raw deflate (no zlib header); -15 accepts any window size it used.
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
    except (zlib.error, ValueError) as err:
        raise OSError(errno.EIO, f"qcow2: corrupt compressed cluster ({err})") from err
    if len(out) != cluster_size:
        raise OSError(errno.EIO, "qcow2: compressed cluster does not decompress to one cluster")
    return out


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    mod = _zstd_module()
    if mod is None:  # refused at open already; kept for a module that vanished
        raise OSError(errno.EIO, "qcow2: no zstd module")
    if hasattr(mod, "ZstdDecompressor") and hasattr(mod.ZstdDecompressor(), "decompressobj"):
        out: bytes = mod.ZstdDecompressor().decompressobj().decompress(data)
        return out[:cluster_size]
    dec = mod.ZstdDecompressor()
    result: bytes = dec.decompress(data, max_length=cluster_size)
    return result
