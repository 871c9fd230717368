"""AML resource descriptors (ACPI 6.4 §6.4) and ``ResourceTemplate``, the buffer that holds them.

Part of the AML encoder described in :mod:`vmsh.engine.acpi.aml`: a ``_CRS`` object is
``Name("_CRS", ResourceTemplate([...]))`` with descriptors built here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from vmsh.engine.acpi.aml import Buffer

# small item tags: bits 6-3 item name, bits 2-0 length (§6.4.2)
_SMALL_IRQ = 0x04
_SMALL_IO = 0x08
_SMALL_END = 0x0F
# large item names; the tag byte is 0x80 | name (§6.4.3)
_LARGE_MEMORY32_FIXED = 0x06
_LARGE_DWORD_ADDRESS = 0x07
_LARGE_WORD_ADDRESS = 0x08
_LARGE_EXT_IRQ = 0x09
_LARGE_QWORD_ADDRESS = 0x0A

# address space resource types (§6.4.3.5, Table 6.44 "Resource Type")
RESOURCE_MEMORY = 0
RESOURCE_IO = 1
RESOURCE_BUS = 2

# memory type-specific flags (§6.4.3.5.1): bits 2-1 _MEM, bit 0 _RW
MEM_NON_CACHEABLE = 0
MEM_CACHEABLE = 1
MEM_WRITE_COMBINING = 2
MEM_PREFETCHABLE = 3
# I/O type-specific flags (§6.4.3.5.2): bits 1-0 _RNG (3 = ISA and non-ISA ranges)
IO_RANGE_ENTIRE = 3


def _small(name: int, payload: bytes) -> bytes:
    assert len(payload) <= 7
    return bytes([(name << 3) | len(payload)]) + payload


def _large(name: int, payload: bytes) -> bytes:
    return bytes([0x80 | name]) + struct.pack("<H", len(payload)) + payload


def IO(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """I/O port descriptor (§6.4.2.5), 8 bytes: info, min, max, alignment, length."""
    return _small(_SMALL_IO, struct.pack("<BHHBB", 1 if decode16 else 0, minimum, maximum, alignment, length))


def IRQNoFlags(irqs: Iterable[int]) -> bytes:
    """IRQ descriptor without flags (§6.4.2.1): a 16-bit mask; edge, active high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQNoFlags takes ISA IRQs 0..15, not {irq}")
        mask |= 1 << irq
    return _small(_SMALL_IRQ, struct.pack("<H", mask))


def Memory32Fixed(base: int, length: int, writeable: bool = True) -> bytes:
    """32-bit fixed memory range descriptor (§6.4.3.4), 12 bytes."""
    return _large(_LARGE_MEMORY32_FIXED, struct.pack("<BII", 1 if writeable else 0, base, length))


def Interrupt(
    irqs: Iterable[int],
    consumer: bool = True,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    wake: bool = False,
) -> bytes:
    """Extended interrupt descriptor (§6.4.3.6).

    Flags: bit 0 consumer, bit 1 edge-triggered, bit 2 active-low, bit 3 shared, bit 4 wake
    capable; then the interrupt count and one DWord per interrupt.
    """
    nums = list(irqs)
    if not 1 <= len(nums) <= 255:
        raise ValueError("Interrupt descriptor needs 1..255 interrupts")
    flags = (consumer << 0) | (edge << 1) | (active_low << 2) | (shared << 3) | (wake << 4)
    payload = bytes([flags, len(nums)]) + b"".join(struct.pack("<I", n) for n in nums)
    return _large(_LARGE_EXT_IRQ, payload)


def _general_flags(producer: bool, subtractive: bool, min_fixed: bool, max_fixed: bool) -> int:
    # §6.4.3.5.1 Table 6.44 "General Flags": bit 3 _MAF, bit 2 _MIF, bit 1 _DEC, bit 0 consumer
    return (max_fixed << 3) | (min_fixed << 2) | (subtractive << 1) | (0 if producer else 1)


def _address_length(minimum: int, maximum: int) -> int:
    if maximum < minimum:
        raise ValueError(f"address range max {maximum:#x} below min {minimum:#x}")
    return maximum - minimum + 1


def _mem_flags(cacheable: int, writeable: bool) -> int:
    return ((cacheable & 3) << 1) | (1 if writeable else 0)


def WordBusNumber(minimum: int, maximum: int, producer: bool = True) -> bytes:
    """Word address space descriptor for a bus-number range (§6.4.3.5.3), min/max fixed."""
    payload = struct.pack(
        "<BBBHHHHH",
        RESOURCE_BUS,
        _general_flags(producer, False, True, True),
        0,
        0,
        minimum,
        maximum,
        0,
        _address_length(minimum, maximum),
    )
    return _large(_LARGE_WORD_ADDRESS, payload)


def WordIO(minimum: int, maximum: int, producer: bool = True, translation: int = 0) -> bytes:
    """Word address space descriptor for an I/O range (§6.4.3.5.3), min/max fixed."""
    payload = struct.pack(
        "<BBBHHHHH",
        RESOURCE_IO,
        _general_flags(producer, False, True, True),
        IO_RANGE_ENTIRE,
        0,
        minimum,
        maximum,
        translation,
        _address_length(minimum, maximum),
    )
    return _large(_LARGE_WORD_ADDRESS, payload)


def DWordIO(minimum: int, maximum: int, producer: bool = True, translation: int = 0) -> bytes:
    """DWord address space descriptor for an I/O range (§6.4.3.5.2), min/max fixed."""
    payload = struct.pack(
        "<BBBIIIII",
        RESOURCE_IO,
        _general_flags(producer, False, True, True),
        IO_RANGE_ENTIRE,
        0,
        minimum,
        maximum,
        translation,
        _address_length(minimum, maximum),
    )
    return _large(_LARGE_DWORD_ADDRESS, payload)


def DWordMemory(
    minimum: int,
    maximum: int,
    producer: bool = True,
    cacheable: int = MEM_NON_CACHEABLE,
    writeable: bool = True,
    translation: int = 0,
) -> bytes:
    """DWord address space descriptor for a memory range (§6.4.3.5.2), min/max fixed."""
    payload = struct.pack(
        "<BBBIIIII",
        RESOURCE_MEMORY,
        _general_flags(producer, False, True, True),
        _mem_flags(cacheable, writeable),
        0,
        minimum,
        maximum,
        translation,
        _address_length(minimum, maximum),
    )
    return _large(_LARGE_DWORD_ADDRESS, payload)


def QWordMemory(
    minimum: int,
    maximum: int,
    producer: bool = True,
    cacheable: int = MEM_NON_CACHEABLE,
    writeable: bool = True,
    translation: int = 0,
) -> bytes:
    """QWord address space descriptor for a memory range (§6.4.3.5.1), min/max fixed."""
    payload = struct.pack(
        "<BBBQQQQQ",
        RESOURCE_MEMORY,
        _general_flags(producer, False, True, True),
        _mem_flags(cacheable, writeable),
        0,
        minimum,
        maximum,
        translation,
        _address_length(minimum, maximum),
    )
    return _large(_LARGE_QWORD_ADDRESS, payload)


def EndTag(descriptors: bytes = b"", checksum: bool = True) -> bytes:
    """End tag (§6.4.2.9) closing ``descriptors``.

    With ``checksum`` the second byte makes the whole template sum to zero; a zero byte
    would also be accepted ("treated as if the checksum operation succeeded").
    """
    if not checksum:
        return bytes([(_SMALL_END << 3) | 1, 0])
    tag = (_SMALL_END << 3) | 1
    return bytes([tag, (-(sum(descriptors) + tag)) & 0xFF])


def ResourceTemplate(descriptors: Iterable[bytes], checksum: bool = True) -> bytes:
    """``ResourceTemplate() { descriptors }``: a Buffer of descriptors ending in an EndTag."""
    body = b"".join(descriptors)
    return Buffer(body + EndTag(body, checksum))
