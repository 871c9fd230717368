"""Conversion between the config dataclasses and JSON values, as serde does it.

Deserialization follows the field declarations in :mod:`vmsh.config.model`: absent fields
take their defaults, required fields must be present, integers must fit their Rust type,
unknown keys are ignored (except where a class sets ``DENY_UNKNOWN_FIELDS``), and every
error names the path of the offending value (``disks[0].queue_size: invalid type: ...``).
Serialization writes every field, ``None`` as ``null``, enums by their JSON spelling.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from vmsh.config import options
from vmsh.config.model import JsonEnum
from vmsh.errors import OptionParseError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class JsonValueError(OptionParseError):
    """A JSON value that does not fit the config model; the message names its path."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def prepare(cls: type) -> None:
    """Evaluate a config class's field types now, as its first :func:`from_json_value` would
    (for a VMM waiting for a restore)."""
    _hints(cls)


def _describe(value: Any) -> str:
    """How serde_json names an unexpected value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "a sequence"
    return "a map"


def _fail(path: str, message: str) -> JsonValueError:
    return JsonValueError(f"{path}: {message}" if path else message)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _decode(tp: Any, value: Any, kind: str | None, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise _fail(path, f"invalid type: null, expected {_expected(tp, kind)}")
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(path, f"invalid type: {_describe(value)}, expected a sequence")
        (elem,) = typing.get_args(tp)
        return [_decode(elem, item, kind, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_json_value(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, JsonEnum):
        if not isinstance(value, str):
            raise _fail(path, f"invalid type: {_describe(value)}, expected enum {tp.__name__}")
        for member in tp:
            if member.value == value:
                return member
        expected = ", ".join(f"`{m.value}`" for m in tp)
        raise _fail(path, f"unknown variant `{value}`, expected one of {expected}")
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"invalid type: {_describe(value)}, expected a boolean")
        return value
    if tp is int:
        if kind == "fd":
            # File descriptors never travel in JSON: they come as SCM_RIGHTS on the API
            # socket, so a number here is a placeholder for "a descriptor was here".
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(path, f"invalid type: {_describe(value)}, expected i32")
            low, high = options.INT_RANGES["i32"]
            if not low <= value <= high:  # cloud-hypervisor's fds are i32s: serde refuses the rest
                raise _fail(path, f"invalid value: integer `{value}`, expected i32")
            return -1
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"invalid type: {_describe(value)}, expected {kind}")
        low, high = options.INT_RANGES[kind or "u64"]
        if not low <= value <= high:
            raise _fail(path, f"invalid value: integer `{value}`, expected {kind}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, f"invalid type: {_describe(value)}, expected a string")
        if kind == "ipv4":
            try:
                return str(ipaddress.IPv4Address(value))
            except ValueError:
                raise _fail(path, "invalid IP address syntax") from None
        if kind == "mac":
            try:
                return options.mac_address(value)
            except ValueError:
                raise _fail(path, f"invalid MAC address: {value}") from None
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in the model, not user input


def _expected(tp: Any, kind: str | None) -> str:
    if tp is bool:
        return "a boolean"
    if tp is int:
        return kind or "u64"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list:
        return "a sequence"
    return f"struct {getattr(tp, '__name__', tp)}"


def from_json_value(cls: type[T], value: Any, path: str = "") -> T:
    """Build a ``cls`` dataclass from a decoded JSON value.

    :raises JsonValueError: naming the path of the first value that does not fit.
    """
    if not isinstance(value, dict):
        raise _fail(path, f"invalid type: {_describe(value)}, expected struct {cls.__name__}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    known: set[str] = set()
    for f in dataclasses.fields(cls):
        name = f.metadata.get("json") or f.name
        names = (name, *f.metadata.get("aliases", ()))
        known.update(names)
        present = [n for n in names if n in value]
        if len(present) > 1:
            raise _fail(path, f"duplicate field `{present[1]}`")
        sub = f"{path}.{name}" if path else name
        if present:
            kwargs[f.name] = _decode(hints[f.name], value[present[0]], f.metadata.get("kind"), sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(path, f"missing field `{name}`")
    if getattr(cls, "DENY_UNKNOWN_FIELDS", False):
        for key in value:
            if key not in known:
                expected = ", ".join(f"`{f.name}`" for f in dataclasses.fields(cls))
                raise _fail(path, f"unknown field `{key}`, expected one of {expected}")
    return cls(**kwargs)


def to_json_value(obj: Any) -> Any:
    """The JSON value of a config dataclass (every field written, None as null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            name = f.metadata.get("json") or f.name
            item = getattr(obj, f.name)
            if f.metadata.get("kind") == "fd" and item is not None:
                item = [-1] * len(item)
            out[name] = to_json_value(item)
        return out
    if isinstance(obj, list):
        return [to_json_value(item) for item in obj]
    if isinstance(obj, JsonEnum):
        return obj.value
    return obj
