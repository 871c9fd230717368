"""AML statements and expressions: control flow (``If``, ``Else``, ``While``, ``Return``), method
calls, locals and arguments, ``Store``, arithmetic and logic, ``Notify``, ``Acquire``/``Release``
(ACPI 6.4 §20.2.5.3, §20.2.5.4, §20.2.6, §20.2.7).

Part of the AML encoder described in :mod:`vmsh.engine.acpi.aml`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from vmsh.engine.acpi.aml import (
    ACQUIRE_OP,
    ADD_OP,
    AND_OP,
    ARG0_OP,
    ELSE_OP,
    EXT_OP_PREFIX,
    IF_OP,
    INCREMENT_OP,
    LEQUAL_OP,
    LLESS_OP,
    LNOT_OP,
    LOCAL0_OP,
    NOTIFY_OP,
    NULL_NAME,
    OR_OP,
    RELEASE_OP,
    RETURN_OP,
    SHIFT_LEFT_OP,
    STORE_OP,
    SUBTRACT_OP,
    WHILE_OP,
    Path,
    Term,
    operand,
    operands,
    with_pkg_length,
)


def Acquire(mutex: str, timeout: int = 0xFFFF) -> bytes:
    """``Acquire(mutex, timeout)`` (§20.2.5.3 DefAcquire); 0xFFFF waits forever."""
    return bytes([EXT_OP_PREFIX, ACQUIRE_OP]) + Path(mutex) + struct.pack("<H", timeout)


def Release(mutex: str) -> bytes:
    """``Release(mutex)`` (§20.2.5.3 DefRelease)."""
    return bytes([EXT_OP_PREFIX, RELEASE_OP]) + Path(mutex)


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
    return Path(method) + operands(args)


def If(predicate: Term, body: Iterable[bytes]) -> bytes:
    """``If (predicate) { body }`` (§20.2.5.3 DefIfElse)."""
    return with_pkg_length(bytes([IF_OP]), operand(predicate) + b"".join(body))


def Else(body: Iterable[bytes]) -> bytes:
    """``Else { body }``; must directly follow an ``If`` (§20.2.5.3 DefElse)."""
    return with_pkg_length(bytes([ELSE_OP]), b"".join(body))


def While(predicate: Term, body: Iterable[bytes]) -> bytes:
    """``While (predicate) { body }`` (§20.2.5.3 DefWhile)."""
    return with_pkg_length(bytes([WHILE_OP]), operand(predicate) + b"".join(body))


def Return(value: Term) -> bytes:
    """``Return(value)`` (§20.2.5.3 DefReturn)."""
    return bytes([RETURN_OP]) + operand(value)


def Notify(target: Term | str, value: Term) -> bytes:
    """``Notify(object, value)`` (§20.2.5.3 DefNotify); ``target`` is a path string or bytes."""
    obj = Path(target) if isinstance(target, str) else operand(target)
    return bytes([NOTIFY_OP]) + obj + operand(value)


def _target(target: Term | str | None) -> bytes:
    """A Target operand: a SuperName or NullName when the result is not stored."""
    if target is None:
        return bytes([NULL_NAME])
    if isinstance(target, str):
        return Path(target)
    return operand(target)


def Store(value: Term, target: Term | str) -> bytes:
    """``Store(value, target)`` (§20.2.5.4 DefStore)."""
    return bytes([STORE_OP]) + operand(value) + _target(target)


def _binary(op: int, a: Term, b: Term, target: Term | str | None) -> bytes:
    return bytes([op]) + operand(a) + operand(b) + _target(target)


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
    return bytes([LEQUAL_OP]) + operand(a) + operand(b)


def LLess(a: Term, b: Term) -> bytes:
    """``LLess(a, b)`` (§20.2.5.4 DefLLess)."""
    return bytes([LLESS_OP]) + operand(a) + operand(b)


def LNot(a: Term) -> bytes:
    """``LNot(a)`` (§20.2.5.4 DefLNot)."""
    return bytes([LNOT_OP]) + operand(a)
