"""CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of VHDX headers and tables.

The standard library has only the zlib CRC-32 polynomial, so this is a table-driven software CRC:
slow per byte, but VHDX checksums cover a few 4 KiB and 64 KiB structures, read at open and
written on the first write.
"""

from __future__ import annotations

_POLY = 0x82F63B78


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-32C of ``data``, continuing from ``crc`` (the CRC of the bytes before it)."""
    table = _TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
