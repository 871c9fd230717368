"""The one protocol by which every stateful device saves and restores its state (snapshots).

Modelled on Firecracker's ``Persist`` trait (``src/vmm/src/snapshot/persist.rs``): a device
produces a typed plain-data state and is restored from one, and a restore *returns an error*
for a state that does not fit; it never ignores it and never half-applies it.

The protocol (:class:`Stateful`)::

    class Serial16550:
        state_type = SerialState               # the frozen plain-data dataclass
        def state(self) -> SerialState: ...    # take it (with the VM paused)
        def restore(self, state: SerialState) -> None: ...

- ``state_type`` is a frozen dataclass of plain data only: ints, bools, strings, bytes,
  tuples, ``X | None`` and nested state dataclasses (the engine's ``to_plain``/``from_plain``
  turn it into JSON and back). A field added later has a default, so that older snapshots
  still decode. Integer fields that have a register width say so with :data:`U8`,
  :data:`U16`, :data:`U32` or :data:`U64` (``typing.Annotated`` with an :class:`IntRange`,
  defined in ``vmsh.state_types`` and re-exported here): :func:`expect_state` checks them, and
  the snapshot decoder rejects them too.
- ``restore`` works **in place**, on a device already built from the VM's config with its host
  resources (fds, sockets, triggers, backends): the state holds only what the guest changed.
  It first checks everything - the state's class (:func:`expect_state`), every register
  against its width, sizes against maxima, indexes against table sizes, enum values against
  their choices - and only then changes the device, so a refused state leaves the device as
  it was. A refusal raises :class:`~vmsh.errors.DeviceStateError` naming the dotted path of the
  field inside the state (``queues[1].size``); the engine prefixes the device id and raises a
  ``SnapshotError``. A part restoring a nested part wraps the call in :func:`within`, which
  prefixes the path.
- Guest-visible side effects that a restored state implies (an interrupt that was pending is
  raised again) are the device's business in ``restore``.
- A state class that older releases saved as JSON ``null`` (a device that had no state then)
  sets the class attribute ``fresh_when_null = True``: the decoder turns ``null`` into the
  default state, i.e. the device as freshly built.
- A device with nothing to save (a port that only logs, a clock derived from the host) has no
  ``state``/``restore`` at all and says so in its docstring; a test walks ``vmsh.devices`` and
  fails for a class with ``state()`` but without ``state_type``/``restore``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Protocol, TypeVar

from vmsh.errors import DeviceStateError

# The width types belong to this protocol, so device states import them from here ("X as X"
# marks the re-export); they are defined in the bottom layer, which the KVM mirrors use too.
from vmsh.state_types import IntRange

S = TypeVar("S")


class Stateful(Protocol[S]):
    """A part of the machine that saves a typed plain-data state and is restored from it in place.

    ``state_type`` is a class attribute (typing does not allow ``ClassVar`` over a type variable).
    """

    state_type: type[S]

    def state(self) -> S:
        """The current state as plain data (taken while the VM is paused)."""
        ...

    def restore(self, state: S) -> None:
        """Load ``state`` (untrusted) in place.

        :raises DeviceStateError: for a state of another class or a field that does not fit;
            the device is then left unchanged.
        """
        ...


def expect_state(state: object, cls: type[S]) -> S:
    """``state`` if it is a ``cls`` whose annotated integer fields are in range.

    :raises DeviceStateError: naming the expected and the actual class, or the first field
        out of range.
    """
    if not isinstance(state, cls):
        raise DeviceStateError("", f"expected a {cls.__name__}, got {type(state).__name__}")
    check_ranges(state)
    return state


def check_ranges(state: object) -> None:
    """Check every integer field annotated with an :class:`IntRange`, nested states and tuples included.

    :raises DeviceStateError: naming the first field out of range.
    """
    _check(type(state), state)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _has_ranges(tp: Any) -> bool:
    """Whether a value of type ``tp`` holds any width-annotated integer (checked once a type)."""
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return any(isinstance(e, IntRange) for e in extras) or _has_ranges(base)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return any(_has_ranges(hint) for hint in _hints(tp).values())
    return any(_has_ranges(arg) for arg in typing.get_args(tp) if arg is not Ellipsis and arg is not type(None))


def prepare(cls: type) -> None:
    """Work out now which fields of a state class :func:`check_ranges` walks, as its first
    check would (for a VMM waiting for a restore)."""
    _checked_fields(cls)


@functools.cache
def _checked_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """A state class's fields that hold width-annotated integers, with their types."""
    hints = _hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if _has_ranges(hints[f.name]))


def _check(tp: Any, value: Any) -> None:
    # A restore checks every saved value, so this walks only the fields that can be out of
    # range, and builds a field's path only when it is (``DeviceStateError.within``).
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        for extra in extras:
            if isinstance(extra, IntRange) and isinstance(value, int) and not isinstance(value, bool):
                check_range("", value, extra.lo, extra.hi)
        _check(base, value)
        return
    if dataclasses.is_dataclass(tp) and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for name, hint in _checked_fields(type(value)):
            try:
                _check(hint, getattr(value, name))
            except DeviceStateError as err:
                raise err.within(name) from None
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and value is not None:
        for arg in typing.get_args(tp):
            if arg is not type(None):
                _check(arg, value)
        return
    if origin is tuple and isinstance(value, tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise DeviceStateError("", f"expected {len(args)} items, got {len(value)}")
        if not _has_ranges(tp):
            return
        for i, (arg, item) in enumerate(zip(args, value, strict=True)):
            try:
                _check(arg, item)
            except DeviceStateError as err:
                raise err.within(f"[{i}]") from None


def check_range(field: str, value: int, lo: int, hi: int) -> None:
    """:raises DeviceStateError: unless ``lo <= value <= hi``."""
    if not lo <= value <= hi:
        raise DeviceStateError(field, f"{value} is out of range {lo}..{hi}")


def check_choice(field: str, value: object, choices: Collection[object]) -> None:
    """:raises DeviceStateError: unless ``value`` is one of ``choices``."""
    if value not in choices:
        shown = ", ".join(sorted(str(c) for c in choices))
        raise DeviceStateError(field, f"{value!r} is not one of {shown}")


def check_bits(field: str, value: int, mask: int) -> None:
    """:raises DeviceStateError: if ``value`` has bits outside ``mask`` (a register's defined bits)."""
    if value & ~mask:
        raise DeviceStateError(field, f"{value:#x} has bits outside {mask:#x}")


def check_length(field: str, value: Collection[object], expected: int) -> None:
    """:raises DeviceStateError: unless ``value`` has exactly ``expected`` items (or bytes)."""
    if len(value) != expected:
        raise DeviceStateError(field, f"has {len(value)} entries, expected {expected}")


def check_max_length(field: str, value: Collection[object], maximum: int) -> None:
    """:raises DeviceStateError: if ``value`` has more than ``maximum`` items (or bytes)."""
    if len(value) > maximum:
        raise DeviceStateError(field, f"has {len(value)} entries, at most {maximum} fit")


@contextmanager
def within(prefix: str) -> Iterator[None]:
    """Prefix the field of a :class:`DeviceStateError` raised inside with ``prefix``.

    Example::

        with within(f"queues[{i}]"):
            queue.restore(saved)      # a bad size reads "queues[1].size: ..."
    """
    try:
        yield
    except DeviceStateError as err:
        raise err.within(prefix) from err.__cause__
