"""A small ACPI Machine Language (AML) encoder for the DSDT that vmsh generates: the basics.

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

The encoder is four modules:

- this one: the opcode values, PkgLength, names and paths, the data objects (``Integer``,
  ``String``, ``EisaId``, ``Buffer``, ``Package``) and the operand encoding the others share;
- ``aml_named``: namespace modifiers and named objects (``Name``, ``Scope``, ``Device``,
  ``Method``, ``Mutex``, ``OperationRegion``, ``Field``, ``CreateDWordField``);
- ``aml_ops``: statements and expressions (``If``, ``While``, ``Store``, ``Add``, ``Notify``,
  ``Acquire``, ...);
- ``aml_resources``: resource descriptors and ``ResourceTemplate``.

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

_NAME_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


def encode_length(value: int) -> bytes:
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
            enc = encode_length(total)
            assert len(enc) == size
            return enc
    raise ValueError(f"AML package of {content_len} bytes is too long")


def with_pkg_length(op: bytes, body: bytes) -> bytes:
    """``op``, then the PkgLength of ``body``, then ``body``: the shape of every package term."""
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


def operand(term: Term) -> bytes:
    """Encode an operand: ints become integer constants, bytes pass through."""
    if isinstance(term, bool):
        return Integer(int(term))
    if isinstance(term, int):
        return Integer(term)
    if isinstance(term, (bytes, bytearray)):
        return bytes(term)
    raise TypeError(f"AML term must be bytes or int, not {type(term).__name__}")


def operands(terms: Iterable[Term]) -> bytes:
    """The operands encoded one after the other."""
    return b"".join(operand(t) for t in terms)


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
    return with_pkg_length(bytes([BUFFER_OP]), Integer(len(data)) + bytes(data))


def Package(elements: Sequence[Term]) -> bytes:
    """A Package of up to 255 elements (§20.2.5.4 DefPackage)."""
    if len(elements) > 255:
        raise ValueError("AML Package holds at most 255 elements; use VarPackage")
    return with_pkg_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + operands(elements))
