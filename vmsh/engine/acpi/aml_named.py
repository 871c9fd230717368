"""AML namespace modifiers and named objects: ``Name``, ``Scope``, ``Device``, ``Method``, ``Mutex``,
``OperationRegion``, ``Field``, ``CreateDWordField`` and ``CreateQWordField`` (ACPI 6.4 §20.2.5.1, §20.2.5.2).

Part of the AML encoder described in :mod:`vmsh.engine.acpi.aml`; the region-space and field
flag values the builders take are defined here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vmsh.engine.acpi.aml import (
    CREATE_DWORD_FIELD_OP,
    CREATE_QWORD_FIELD_OP,
    DEVICE_OP,
    EXT_OP_PREFIX,
    FIELD_OP,
    METHOD_OP,
    MUTEX_OP,
    NAME_OP,
    OP_REGION_OP,
    SCOPE_OP,
    NameSeg,
    Path,
    Term,
    encode_length,
    operand,
    with_pkg_length,
)

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


def Name(name: str, value: Term) -> bytes:
    """``Name(name, value)`` (§20.2.5.1 DefName)."""
    return bytes([NAME_OP]) + Path(name) + operand(value)


def Scope(name: str, body: Iterable[bytes]) -> bytes:
    """``Scope(name) { body }`` (§20.2.5.1 DefScope)."""
    return with_pkg_length(bytes([SCOPE_OP]), Path(name) + b"".join(body))


def Device(name: str, body: Iterable[bytes]) -> bytes:
    """``Device(name) { body }`` (§20.2.5.2 DefDevice)."""
    return with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), Path(name) + b"".join(body))


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
    return with_pkg_length(bytes([METHOD_OP]), Path(name) + bytes([flags]) + b"".join(body))


def Mutex(name: str, sync_level: int = 0) -> bytes:
    """``Mutex(name, sync)`` (§20.2.5.2 DefMutex)."""
    return bytes([EXT_OP_PREFIX, MUTEX_OP]) + Path(name) + bytes([sync_level & 0x0F])


def OperationRegion(name: str, space: int, offset: Term, length: Term) -> bytes:
    """``OperationRegion(name, space, offset, length)`` (§20.2.5.2 DefOpRegion)."""
    return bytes([EXT_OP_PREFIX, OP_REGION_OP]) + Path(name) + bytes([space]) + operand(offset) + operand(length)


class FieldUnit:
    """One element of a Field list (§20.2.5.2 FieldList)."""

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded


def Named(name: str, bits: int) -> FieldUnit:
    """A named field of ``bits`` bits: NameSeg then its width in PkgLength form."""
    return FieldUnit(NameSeg(name) + encode_length(bits))


def Reserved(bits: int) -> FieldUnit:
    """An unnamed gap of ``bits`` bits (``Offset()``/``, n`` in ASL): 0x00 then the width."""
    return FieldUnit(b"\x00" + encode_length(bits))


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
    return with_pkg_length(bytes([EXT_OP_PREFIX, FIELD_OP]), body)


def _create_field(op: int, source: Term, index: Term, name: str) -> bytes:
    return bytes([op]) + operand(source) + operand(index) + Path(name)


def CreateDWordField(source: Term, byte_index: Term, name: str) -> bytes:
    """``CreateDWordField(source, index, name)`` (§20.2.5.2 DefCreateDWordField)."""
    return _create_field(CREATE_DWORD_FIELD_OP, source, byte_index, name)


def CreateQWordField(source: Term, byte_index: Term, name: str) -> bytes:
    """``CreateQWordField(source, index, name)`` (§20.2.5.2 DefCreateQWordField)."""
    return _create_field(CREATE_QWORD_FIELD_OP, source, byte_index, name)
