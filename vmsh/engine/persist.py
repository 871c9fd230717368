"""Snapshot files: the plain-data states of a VM's parts, written to and read from a directory.

A snapshot directory holds cloud-hypervisor's three files:

* ``config.json`` - the VmConfig, canonical JSON;
* ``state.json`` - a tree of nodes ``{"snapshots": {id: node}, "snapshot_data": {"state": "<JSON>"}}``:
  the root (``vm``: vmsh's format version and the in-kernel irqchip, PIT and clock), then
  ``cpu-manager`` (one child per vCPU), ``memory-manager`` (the RAM range table) and
  ``device-manager`` (one child per device id: ``__serial``, ``__cmos``, ...);
* ``memory-ranges`` - guest RAM, the ranges of the table concatenated in order.

:func:`to_plain` and :func:`from_plain` convert the frozen state dataclasses (ints, bools,
strings, bytes as base64, tuples, nested dataclasses) to JSON values and back. A snapshot is
untrusted input: every value is type-checked, an integer field declared with a register width
(``vmsh.state_types.U8`` ... ``U64``) is range-checked, and every failure names its path. A
state class with ``fresh_when_null = True`` decodes JSON ``null`` (what an older release wrote
for a device without state) as its default state. The devices check the rest of their
restore rules themselves (``vmsh.devices.state``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vmsh.errors import SnapshotError
from vmsh.state_types import IntRange

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MEMORY_FILE",
    "STATE_FILE",
    "SnapshotError",
    "from_plain",
    "node",
    "node_children",
    "node_data",
    "prepare",
    "read_snapshot",
    "to_plain",
    "write_snapshot",
]

T = TypeVar("T")

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
MEMORY_FILE = "memory-ranges"
#: bumped whenever the meaning of a saved state changes
FORMAT_VERSION = 1


def to_plain(obj: Any) -> Any:
    """A JSON value for a state object (bytes become base64 strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (tuple, list)):
        return [to_plain(item) for item in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(cls: type[T], value: Any, path: str = "") -> T:
    """Rebuild a ``cls`` state object from a JSON value, checking every type.

    :raises SnapshotError: naming the path of the first value that does not fit.
    """
    return _decode(cls, value, path or cls.__name__)  # type: ignore[no-any-return]  # _decode builds a cls


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A state class's field types (evaluating its string annotations is what costs: once)."""
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


def prepare(cls: type) -> None:
    """Evaluate a state class's field types now, as its first :func:`from_plain` would (for a
    VMM waiting for a restore: ``vmsh.engine.warmup``)."""
    _hints(cls)
    _fields(cls)


def _decode(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        # A field whose type depends on something else (a device's own state): the owner
        # decodes it once it knows the type.
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        decoded = _decode(base, value, path)
        for extra in extras:
            if isinstance(extra, IntRange) and not extra.lo <= decoded <= extra.hi:
                raise SnapshotError(f"{path}: {decoded} is out of range {extra.lo}..{extra.hi}")
        return decoded
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _decode(args[0], value, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        cls: type = tp
        if value is None and getattr(cls, "fresh_when_null", False):
            return cls()  # every field of such a class has a default
        if not isinstance(value, dict):
            raise SnapshotError(f"{path}: expected an object")
        hints = _hints(cls)
        kwargs = {}
        for f in _fields(cls):
            if f.name not in value:
                if f.default is not dataclasses.MISSING:  # a field newer than the snapshot
                    continue
                raise SnapshotError(f"{path}: missing {f.name}")
            kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{path}.{f.name}")
        return cls(**kwargs)
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list):
            raise SnapshotError(f"{path}: expected a list")
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_decode(items[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(value) != len(items):
            raise SnapshotError(f"{path}: expected {len(items)} items")
        return tuple(_decode(a, item, f"{path}[{i}]") for i, (a, item) in enumerate(zip(items, value, strict=True)))
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SnapshotError(f"{path}: expected a list")
        return [_decode(elem, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if tp is bytes:
        if not isinstance(value, str):
            raise SnapshotError(f"{path}: expected base64 text")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SnapshotError(f"{path}: invalid base64") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise SnapshotError(f"{path}: expected a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 64) < value < 1 << 64:
            raise SnapshotError(f"{path}: expected a 64-bit integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SnapshotError(f"{path}: expected a string")
        return value
    raise TypeError(f"no snapshot decoding for {tp!r}")  # a bug in a state class


# --- the state tree -------------------------------------------------------------------------------


def node(data: Any = None, children: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One tree node: its own state (a JSON value, stored as JSON text, as cloud-hypervisor does)."""
    return {
        "snapshots": children or {},
        "snapshot_data": None if data is None else {"state": json.dumps(data, separators=(",", ":"))},
    }


def node_data(tree: dict[str, Any], path: str) -> Any:
    """The decoded state of the node at ``a/b/c`` (``""`` is the root).

    :raises SnapshotError: when the node or its state is missing or malformed.
    """
    current: Any = tree
    for part in [p for p in path.split("/") if p]:
        children = current.get("snapshots") if isinstance(current, dict) else None
        if not isinstance(children, dict) or part not in children:
            raise SnapshotError(f"state.json has no {path or 'root'} node")
        current = children[part]
    data = current.get("snapshot_data") if isinstance(current, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise SnapshotError(f"state.json: node {path or 'root'} has no state")
    try:
        return json.loads(data["state"])
    except json.JSONDecodeError as err:
        raise SnapshotError(f"state.json: node {path or 'root'} has malformed state: {err}") from None
    except (RecursionError, ValueError) as err:
        raise SnapshotError(f"state.json: node {path or 'root'} has malformed state: {_json_limit(err)}") from None


def _json_limit(err: RecursionError | ValueError) -> str:
    """What ``json.loads`` hit besides a syntax error: its nesting or Python's digit limit."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return f"a number has more than {sys.get_int_max_str_digits()} digits"


def node_children(tree: dict[str, Any], path: str) -> list[str]:
    current: Any = tree
    for part in [p for p in path.split("/") if p]:
        current = (current.get("snapshots") or {}).get(part) if isinstance(current, dict) else None
    children = current.get("snapshots") if isinstance(current, dict) else None
    if not isinstance(children, dict):
        raise SnapshotError(f"state.json has no {path} node")
    return list(children)


# --- files -----------------------------------------------------------------------------------------


def write_snapshot(directory: str, config_json: str, tree: dict[str, Any],
                   ranges: list[tuple[memoryview, list[tuple[int, int]]]]) -> None:
    """Write the three files into ``directory`` (which must exist and hold none of them).

    ``ranges`` are the RAM regions in order, each with the runs ``(offset, length)`` that may
    hold data; the rest of each region is zeros and stays a hole in the memory file.

    Each file is written under a temporary name, flushed to disk, then renamed; on any
    failure every file written so far is removed, so no half snapshot is left.

    :raises SnapshotError: naming the directory and what failed.
    """
    target = Path(directory)
    if not target.is_dir():
        raise SnapshotError(f"Snapshot directory {directory} does not exist")
    for name in (CONFIG_FILE, STATE_FILE, MEMORY_FILE):
        if (target / name).exists():
            raise SnapshotError(f"{target / name} already exists: snapshot into an empty directory")
    done: list[Path] = []
    temps: list[Path] = []
    try:
        writers: tuple[tuple[str, Callable[[int], None]], ...] = (
            (MEMORY_FILE, lambda fd: _write_ranges(fd, ranges)),
            (STATE_FILE, lambda fd: _write_all(fd, json.dumps(tree, indent=1).encode())),
            (CONFIG_FILE, lambda fd: _write_all(fd, config_json.encode())),
        )
        for name, writer in writers:
            temp = target / f".{name}.tmp-{os.getpid()}"
            temps.append(temp)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                writer(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            # link() fails if the name appeared meanwhile, unlike rename(): never overwrite.
            os.link(temp, target / name)
            done.append(target / name)
            os.unlink(temp)
    except OSError as err:
        for path in done + temps:
            try:
                path.unlink()
            except OSError:
                pass
        raise SnapshotError(f"Cannot write the snapshot into {directory}") from err


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_ranges(fd: int, ranges: list[tuple[memoryview, list[tuple[int, int]]]]) -> None:
    base = 0
    for view, runs in ranges:
        for offset, length in runs:
            os.lseek(fd, base + offset, os.SEEK_SET)
            _write_all(fd, view[offset:offset + length])
        base += len(view)
    os.ftruncate(fd, base)


def read_snapshot(directory: str) -> tuple[str, dict[str, Any], Path]:
    """``(config.json text, the state tree, the memory file path)`` of a snapshot directory.

    :raises SnapshotError: when a file is missing, unreadable or not JSON.
    """
    base = Path(directory)
    try:
        config_text = (base / CONFIG_FILE).read_text(encoding="utf-8")
        tree = json.loads((base / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SnapshotError(f"{directory} is not a snapshot: {Path(err.filename).name} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SnapshotError(f"Cannot read the snapshot in {directory}") from err
    except json.JSONDecodeError as err:
        raise SnapshotError(f"{base / STATE_FILE} is not JSON: {err}") from None
    except (RecursionError, ValueError) as err:
        raise SnapshotError(f"{base / STATE_FILE} is not JSON: {_json_limit(err)}") from None
    if not isinstance(tree, dict):
        raise SnapshotError(f"{base / STATE_FILE} is not a snapshot tree")
    memory = base / MEMORY_FILE
    if not memory.is_file():
        raise SnapshotError(f"{directory} is not a snapshot: {MEMORY_FILE} is missing")
    return config_text, tree, memory
