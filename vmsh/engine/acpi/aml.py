"""A small ACPI Machine Language (AML) encoder for the DSDT that vmsh generates.

Every builder returns the encoded bytes of one AML term, so a namespace is written as nested
calls that read like the ASL they stand for::

    Scope("\\_SB_", [
        Device("COM1", [
            Name("_HID", EisaId("PNP0501")),
            Name("_UID", 1),
            Name("_CRS", ResourceTemplate([IO(0x3F8, 0x3F8, 1, 8), IRQNoFlags([4])])),
        ]),
    ])

The builders carry ASL's names (``Name``, ``Device``, ``If``, ...) on purpose: the code is then
checked line by line against ``iasl -d`` output. Wherever a builder takes an operand, a plain
Python ``int`` is accepted and encoded as the shortest integer constant; everything else is
``bytes`` produced by another builder (``String``, ``Path``, ``Local``, ``Arg``, ...).

Grammar references are to ACPI 6.4 chapter 20 ("ACPI Machine Language Specification"), operator
semantics to chapter 19, resource descriptors to §6.4.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence

#: an operand: a ready AML encoding or an integer to encode as a constant
Term = bytes | int

# --- opcodes (ACPI 6.4 §20.3, "AML Byte Stream Byte Values") ------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
NULL_NAME = 0x00
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
ADD_OP = 0x72
CONCAT_OP = 0x73
SUBTRACT_OP = 0x74
INCREMENT_OP = 0x75
DECREMENT_OP = 0x76
SHIFT_LEFT_OP = 0x79
SHIFT_RIGHT_OP = 0x7A
AND_OP = 0x7B
OR_OP = 0x7D
XOR_OP = 0x7F
NOT_OP = 0x80
DEREF_OF_OP = 0x83
NOTIFY_OP = 0x86
SIZE_OF_OP = 0x87
INDEX_OP = 0x88
CREATE_DWORD_FIELD_OP = 0x8A
CREATE_WORD_FIELD_OP = 0x8B
CREATE_BYTE_FIELD_OP = 0x8C
CREATE_QWORD_FIELD_OP = 0x8F
LAND_OP = 0x90
LOR_OP = 0x91
LNOT_OP = 0x92
LEQUAL_OP = 0x93
LGREATER_OP = 0x94
LLESS_OP = 0x95
IF_OP = 0xA0
ELSE_OP = 0xA1
WHILE_OP = 0xA2
NOOP_OP = 0xA3
RETURN_OP = 0xA4
BREAK_OP = 0xA5
# extended opcodes follow EXT_OP_PREFIX (§20.3)
MUTEX_OP = 0x01
ACQUIRE_OP = 0x23
RELEASE_OP = 0x27
SLEEP_OP = 0x22
OP_REGION_OP = 0x80
FIELD_OP = 0x81
DEVICE_OP = 0x82

#: the largest value a PkgLength can hold: 28 bits (§20.2.4)
PKG_LENGTH_MAX = (1 << 28) - 1

# --- region spaces (§19.6.100, OperationRegion) ---------------------------------------------------
SYSTEM_MEMORY = 0x00
SYSTEM_IO = 0x01
PCI_CONFIG = 0x02

# --- field flags (§19.6.48, Field; encoding §20.2.5.2 FieldFlags) -------------------------------
ANY_ACC = 0
BYTE_ACC = 1
WORD_ACC = 2
DWORD_ACC = 3
QWORD_ACC = 4
BUFFER_ACC = 5
NO_LOCK = 0
LOCK = 1
PRESERVE = 0
WRITE_AS_ONES = 1
WRITE_AS_ZEROS = 2

_NAME_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


# ==================================================================================================
# Lengths, names and data objects
# ==================================================================================================


def _encode_length(value: int) -> bytes:
    """Encode ``value`` in the PkgLength format (§20.2.4) without adding its own size.

    One byte holds values up to 63 in bits 0-5. Longer forms put the count of following bytes
    in bits 6-7 of the lead byte, the low nibble of the value in its bits 0-3 and the rest of
    the value, eight bits at a time, in up to three following bytes.
    """
    if value < 0 or value > PKG_LENGTH_MAX:
        raise ValueError(f"AML package length {value} out of range (0..{PKG_LENGTH_MAX})")
    if value < 0x40:
        return bytes([value])
    following = 1 if value < (1 << 12) else 2 if value < (1 << 20) else 3
    out = [(following << 6) | (value & 0x0F)]
    rest = value >> 4
    for _ in range(following):
        out.append(rest & 0xFF)
        rest >>= 8
    return bytes(out)


def pkg_length(content_len: int) -> bytes:
    """PkgLength for a package whose body is ``content_len`` bytes (§20.2.4).

    The encoded value counts the PkgLength bytes themselves, so the size of the encoding and
    the value depend on each other; try the shortest form first.
    """
    for size in (1, 2, 3, 4):
        total = content_len + size
        limit = 0x3F if size == 1 else (1 << (4 + 8 * (size - 1))) - 1
        if total <= limit:
            enc = _encode_length(total)
            assert len(enc) == size
            return enc
    raise ValueError(f"AML package of {content_len} bytes is too long")


def _package(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


def NameSeg(seg: str) -> bytes:
    """A 4-character NameSeg (§20.2.2): a lead letter or ``_``, then letters, digits, ``_``.

    Shorter names are padded with ``_`` the way ASL does (``PCI`` -> ``PCI_``).
    """
    if not _NAME_SEG_RE.match(seg):
        raise ValueError(f"invalid AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def Path(path: str) -> bytes:
    """A NameString (§20.2.2): optional ``\\`` root or ``^`` parent prefixes, then segments.

    ``"\\"`` alone is the root scope; an empty path is the NullName. Two segments use
    DualNamePrefix, three or more MultiNamePrefix with a count byte.
    """
    prefix = b""
    if path.startswith("\\"):
        prefix = bytes([ROOT_CHAR])
        path = path[1:]
    else:
        while path.startswith("^"):
            prefix += bytes([PARENT_PREFIX_CHAR])
            path = path[1:]
    if not path:
        return prefix + bytes([NULL_NAME])
    segs = [NameSeg(s) for s in path.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"AML name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def Integer(value: int) -> bytes:
    """An integer constant in its shortest form (§20.2.3 ComputationalData / ConstObj).

    0 and 1 are ZeroOp/OneOp; then Byte, Word, DWord and QWord prefixes. OnesOp is not used:
    its value depends on the table revision (§19.6.91).
    """
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer {value} out of range (0..2^64-1)")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def _t(term: Term) -> bytes:
    """Encode an operand: ints become integer constants, bytes pass through."""
    if isinstance(term, bool):
        return Integer(int(term))
    if isinstance(term, int):
        return Integer(term)
    if isinstance(term, (bytes, bytearray)):
        return bytes(term)
    raise TypeError(f"AML term must be bytes or int, not {type(term).__name__}")


def _terms(terms: Iterable[Term]) -> bytes:
    return b"".join(_t(t) for t in terms)


def String(text: str) -> bytes:
    """A String constant (§20.2.3): StringPrefix, ASCII characters 0x01-0x7F, NUL."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(f"AML string {text!r} is not ASCII") from err
    if b"\x00" in raw:
        raise ValueError(f"AML string {text!r} contains NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def EisaId(eisa: str) -> bytes:
    """A compressed EISA id such as ``PNP0A08`` as a DWord constant (§19.6.35, EISAID).

    Three upper-case letters (5 bits each, ``A`` = 1) and four hex digits are packed into 32
    bits, most significant first, and stored in that (big-endian) byte order.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", eisa):
        raise ValueError(f"invalid EISA id {eisa!r}")
    value = 0
    for ch in eisa[:3]:
        value = (value << 5) | (ord(ch) - 0x40)
    value = (value << 16) | int(eisa[3:], 16)
    # the 32-bit result is stored big-endian; as a little-endian integer that is a byte swap
    return bytes([DWORD_PREFIX]) + struct.pack(">I", value)


def Buffer(data: bytes) -> bytes:
    """A Buffer with its size and initial bytes (§20.2.5.4 DefBuffer)."""
    return _package(bytes([BUFFER_OP]), Integer(len(data)) + bytes(data))


def Package(elements: Sequence[Term]) -> bytes:
    """A Package of up to 255 elements (§20.2.5.4 DefPackage)."""
    if len(elements) > 255:
        raise ValueError("AML Package holds at most 255 elements; use VarPackage")
    return _package(bytes([PACKAGE_OP]), bytes([len(elements)]) + _terms(elements))


# ==================================================================================================
# Namespace modifiers and named objects
# ==================================================================================================


def Name(name: str, value: Term) -> bytes:
    """``Name(name, value)`` (§20.2.5.1 DefName)."""
    return bytes([NAME_OP]) + Path(name) + _t(value)


def Scope(name: str, body: Iterable[bytes]) -> bytes:
    """``Scope(name) { body }`` (§20.2.5.1 DefScope)."""
    return _package(bytes([SCOPE_OP]), Path(name) + b"".join(body))


def Device(name: str, body: Iterable[bytes]) -> bytes:
    """``Device(name) { body }`` (§20.2.5.2 DefDevice)."""
    return _package(bytes([EXT_OP_PREFIX, DEVICE_OP]), Path(name) + b"".join(body))


def Method(
    name: str, args: int, body: Iterable[bytes], serialized: bool = False, sync_level: int = 0
) -> bytes:
    """``Method(name, args, [Not]Serialized, sync) { body }`` (§20.2.5.2 DefMethod).

    MethodFlags: bits 0-2 argument count, bit 3 SerializeFlag, bits 4-7 SyncLevel.
    """
    if not 0 <= args <= 7:
        raise ValueError(f"AML method {name!r}: {args} arguments (0..7 allowed)")
    if not 0 <= sync_level <= 15:
        raise ValueError(f"AML method {name!r}: sync level {sync_level} (0..15 allowed)")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    return _package(bytes([METHOD_OP]), Path(name) + bytes([flags]) + b"".join(body))


def Mutex(name: str, sync_level: int = 0) -> bytes:
    """``Mutex(name, sync)`` (§20.2.5.2 DefMutex)."""
    return bytes([EXT_OP_PREFIX, MUTEX_OP]) + Path(name) + bytes([sync_level & 0x0F])


def Acquire(mutex: str, timeout: int = 0xFFFF) -> bytes:
    """``Acquire(mutex, timeout)`` (§20.2.5.3 DefAcquire); 0xFFFF waits forever."""
    return bytes([EXT_OP_PREFIX, ACQUIRE_OP]) + Path(mutex) + struct.pack("<H", timeout)


def Release(mutex: str) -> bytes:
    """``Release(mutex)`` (§20.2.5.3 DefRelease)."""
    return bytes([EXT_OP_PREFIX, RELEASE_OP]) + Path(mutex)


def OperationRegion(name: str, space: int, offset: Term, length: Term) -> bytes:
    """``OperationRegion(name, space, offset, length)`` (§20.2.5.2 DefOpRegion)."""
    return bytes([EXT_OP_PREFIX, OP_REGION_OP]) + Path(name) + bytes([space]) + _t(offset) + _t(length)


class FieldUnit:
    """One element of a Field list (§20.2.5.2 FieldList)."""

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded


def Named(name: str, bits: int) -> FieldUnit:
    """A named field of ``bits`` bits: NameSeg then its width in PkgLength form."""
    return FieldUnit(NameSeg(name) + _encode_length(bits))


def Reserved(bits: int) -> FieldUnit:
    """An unnamed gap of ``bits`` bits (``Offset()``/``, n`` in ASL): 0x00 then the width."""
    return FieldUnit(b"\x00" + _encode_length(bits))


def Field(
    region: str,
    units: Sequence[FieldUnit],
    access: int = ANY_ACC,
    lock: int = NO_LOCK,
    update: int = PRESERVE,
) -> bytes:
    """``Field(region, access, lock, update) { units }`` (§20.2.5.2 DefField).

    FieldFlags: bits 0-3 AccessType, bit 4 LockRule, bits 5-6 UpdateRule.
    """
    flags = (access & 0x0F) | ((lock & 1) << 4) | ((update & 3) << 5)
    body = Path(region) + bytes([flags]) + b"".join(u.encoded for u in units)
    return _package(bytes([EXT_OP_PREFIX, FIELD_OP]), body)


def _create_field(op: int, source: Term, index: Term, name: str) -> bytes:
    return bytes([op]) + _t(source) + _t(index) + Path(name)


def CreateDWordField(source: Term, byte_index: Term, name: str) -> bytes:
    """``CreateDWordField(source, index, name)`` (§20.2.5.2 DefCreateDWordField)."""
    return _create_field(CREATE_DWORD_FIELD_OP, source, byte_index, name)


# ==================================================================================================
# Statements and expressions (§20.2.5.3, §20.2.5.4)
# ==================================================================================================


def Local(n: int) -> bytes:
    """``LocalN`` (§20.2.6.2), N in 0..7."""
    if not 0 <= n <= 7:
        raise ValueError(f"AML Local{n} does not exist (0..7)")
    return bytes([LOCAL0_OP + n])


def Arg(n: int) -> bytes:
    """``ArgN`` (§20.2.6.1), N in 0..6."""
    if not 0 <= n <= 6:
        raise ValueError(f"AML Arg{n} does not exist (0..6)")
    return bytes([ARG0_OP + n])


def Call(method: str, *args: Term) -> bytes:
    """A method invocation (§20.2.7 MethodInvocation): the name then its arguments."""
    return Path(method) + _terms(args)


def If(predicate: Term, body: Iterable[bytes]) -> bytes:
    """``If (predicate) { body }`` (§20.2.5.3 DefIfElse)."""
    return _package(bytes([IF_OP]), _t(predicate) + b"".join(body))


def Else(body: Iterable[bytes]) -> bytes:
    """``Else { body }``; must directly follow an ``If`` (§20.2.5.3 DefElse)."""
    return _package(bytes([ELSE_OP]), b"".join(body))


def While(predicate: Term, body: Iterable[bytes]) -> bytes:
    """``While (predicate) { body }`` (§20.2.5.3 DefWhile)."""
    return _package(bytes([WHILE_OP]), _t(predicate) + b"".join(body))


def Return(value: Term) -> bytes:
    """``Return(value)`` (§20.2.5.3 DefReturn)."""
    return bytes([RETURN_OP]) + _t(value)


def Notify(target: Term | str, value: Term) -> bytes:
    """``Notify(object, value)`` (§20.2.5.3 DefNotify); ``target`` is a path string or bytes."""
    obj = Path(target) if isinstance(target, str) else _t(target)
    return bytes([NOTIFY_OP]) + obj + _t(value)


def _target(target: Term | str | None) -> bytes:
    """A Target operand: a SuperName or NullName when the result is not stored."""
    if target is None:
        return bytes([NULL_NAME])
    if isinstance(target, str):
        return Path(target)
    return _t(target)


def Store(value: Term, target: Term | str) -> bytes:
    """``Store(value, target)`` (§20.2.5.4 DefStore)."""
    return bytes([STORE_OP]) + _t(value) + _target(target)


def _binary(op: int, a: Term, b: Term, target: Term | str | None) -> bytes:
    return bytes([op]) + _t(a) + _t(b) + _target(target)


def Add(a: Term, b: Term, target: Term | str | None = None) -> bytes:
    """``Add(a, b, target)`` (§20.2.5.4 DefAdd)."""
    return _binary(ADD_OP, a, b, target)


def Subtract(a: Term, b: Term, target: Term | str | None = None) -> bytes:
    """``Subtract(a, b, target)`` (§20.2.5.4 DefSubtract)."""
    return _binary(SUBTRACT_OP, a, b, target)


def And(a: Term, b: Term, target: Term | str | None = None) -> bytes:
    """``And(a, b, target)`` (§20.2.5.4 DefAnd)."""
    return _binary(AND_OP, a, b, target)


def Or(a: Term, b: Term, target: Term | str | None = None) -> bytes:
    """``Or(a, b, target)`` (§20.2.5.4 DefOr)."""
    return _binary(OR_OP, a, b, target)


def ShiftLeft(a: Term, b: Term, target: Term | str | None = None) -> bytes:
    """``ShiftLeft(a, count, target)`` (§20.2.5.4 DefShiftLeft)."""
    return _binary(SHIFT_LEFT_OP, a, b, target)


def Increment(target: Term | str) -> bytes:
    """``Increment(target)`` (§20.2.5.4 DefIncrement)."""
    return bytes([INCREMENT_OP]) + _target(target)


def LEqual(a: Term, b: Term) -> bytes:
    """``LEqual(a, b)`` (§20.2.5.4 DefLEqual)."""
    return bytes([LEQUAL_OP]) + _t(a) + _t(b)


def LLess(a: Term, b: Term) -> bytes:
    """``LLess(a, b)`` (§20.2.5.4 DefLLess)."""
    return bytes([LLESS_OP]) + _t(a) + _t(b)


def LNot(a: Term) -> bytes:
    """``LNot(a)`` (§20.2.5.4 DefLNot)."""
    return bytes([LNOT_OP]) + _t(a)


# ==================================================================================================
# Resource descriptors (ACPI 6.4 §6.4) and ResourceTemplate
# ==================================================================================================

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

