"""The ``key=value,...`` option grammar of cloud-hypervisor's launcher, and its value types.

Every launcher option string (``--disk path=/a,readonly=on``) goes through
:class:`OptionParser`. The rules follow cloud-hypervisor's ``option_parser`` crate:

* the input is split on ``,`` only outside ``[...]`` and outside ``"..."``;
* each item is split on its *first* ``=``; values are trimmed;
* ``key=`` (an empty value) counts as unset;
* registered valueless keys (console modes such as ``tty``) are set by their presence;
* an unregistered key is an error, and a later duplicate overwrites an earlier one.

The converters (:func:`toggle`, :func:`byte_sized`, :func:`integer`, :func:`integer_list`,
:func:`string_list`, :func:`tuple_list`, ...) turn a dequoted value into a Python value or
raise :class:`ValueError`; :meth:`OptionParser.convert` reports that as
``Unable to convert <value> for <key>``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar

from vmsh.errors import OptionParseError

T = TypeVar("T")

#: Inclusive ranges of the Rust integer types the options use.
INT_RANGES: dict[str, tuple[int, int]] = {
    "u8": (0, 0xFF),
    "u16": (0, 0xFFFF),
    "u32": (0, 0xFFFF_FFFF),
    "u64": (0, 0xFFFF_FFFF_FFFF_FFFF),
    "usize": (0, 0xFFFF_FFFF_FFFF_FFFF),
    "i32": (-0x8000_0000, 0x7FFF_FFFF),
}

_UNSIGNED_RE = re.compile(r"\+?[0-9]+")
_SIGNED_RE = re.compile(r"[+-]?[0-9]+")
_BYTE_SIZED_RE = re.compile(r"\+?([0-9]+)([KMG]?)")
_MAC_RE = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")


def split_commas(text: str) -> list[str]:
    """Split ``text`` on commas that are outside brackets and quotes.

    :raises ValueError: on an unbalanced ``]``, an unclosed ``[`` or an unterminated quote.
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    for ch in text.strip():
        if quoted:
            # Inside quotes only the closing quote is special.
            if ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "[":
            depth += 1
        elif ch == "]":
            if depth == 0:
                raise ValueError(text)
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted or depth != 0:
        raise ValueError(text)
    items.append("".join(current))
    return items


def dequote(value: str) -> str:
    """Remove the double quotes of a value; ``""`` inside a quoted part is a literal quote."""
    out: list[str] = []
    i = 0
    quoted = False
    while i < len(value):
        ch = value[i]
        if ch == '"':
            if quoted and value[i + 1 : i + 2] == '"':
                out.append('"')
                i += 2
                continue
            quoted = not quoted
        else:
            out.append(ch)
        i += 1
    return "".join(out)


class OptionParser:
    """Parser for one option string with a fixed set of keys.

    Example::

        p = OptionParser("path", "readonly")
        p.parse("path=/img,readonly=on")
        p.get("path")                      # '/img'
        p.convert("readonly", toggle)      # True
    """

    def __init__(self, *keys: str, valueless: tuple[str, ...] = ()) -> None:
        self._values: dict[str, str | None] = {}
        self._requires_value: dict[str, bool] = {}
        for key in keys:
            self._requires_value[key] = True
        for key in valueless:
            self._requires_value[key] = False

    def add(self, *keys: str) -> OptionParser:
        """Register more value-taking keys."""
        for key in keys:
            self._requires_value[key] = True
        return self

    @property
    def keys(self) -> tuple[str, ...]:
        """Every registered key, in registration order."""
        return tuple(self._requires_value)

    def parse(self, text: str) -> OptionParser:
        """Parse ``text``; every key found must be registered.

        :raises OptionParseError: ``Unknown option: <key>`` or ``Invalid syntax: <text>``.
        """
        if not text.strip():
            return self
        try:
            items = split_commas(text)
        except ValueError:
            raise OptionParseError(f"Invalid syntax: {text}") from None
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            if key not in self._requires_value:
                raise OptionParseError(f"Unknown option: {key}")
            if sep:
                self._values[key] = value.strip()
            elif self._requires_value[key]:
                raise OptionParseError(f"Invalid syntax: {text}")
            else:
                self._values[key] = ""
        return self

    def is_set(self, key: str) -> bool:
        """Whether ``key`` appeared (a valueless key, or any value, empty included)."""
        return key in self._values

    def get(self, key: str) -> str | None:
        """The dequoted value of ``key``, or None when it is unset or empty."""
        raw = self._values.get(key)
        if not raw:
            return None
        return dequote(raw)

    def convert(self, key: str, converter: Callable[[str], T]) -> T | None:
        """Convert the raw value of ``key``; None when unset or empty.

        The value is handed over with its quotes, so that list converters can keep a
        quoted comma inside one item.

        :raises OptionParseError: ``Unable to convert <value> for <key>``.
        """
        value = self._values.get(key)
        if not value:
            return None
        try:
            return converter(value)
        except (ValueError, OverflowError):
            raise OptionParseError(f"Unable to convert {value} for {key}") from None


# --- converters ---------------------------------------------------------------------------


def toggle(value: str) -> bool:
    """``on``/``true`` and ``off``/``false``, case-insensitively."""
    low = value.lower()
    if low in ("on", "true"):
        return True
    if low in ("off", "false", ""):
        return False
    raise ValueError(value)


def integer(kind: str) -> Callable[[str], int]:
    """A decimal integer of the Rust type ``kind`` (``u8``, ``u16``, ``u32``, ``u64``, ``usize``, ``i32``)."""
    low, high = INT_RANGES[kind]
    pattern = _SIGNED_RE if low < 0 else _UNSIGNED_RE

    def convert(value: str) -> int:
        if not pattern.fullmatch(value):
            raise ValueError(value)
        number = int(value)
        if not low <= number <= high:
            raise ValueError(value)
        return number

    return convert


def byte_sized(value: str) -> int:
    """Bytes with an optional binary suffix ``K``, ``M`` or ``G`` (uppercase only)."""
    match = _BYTE_SIZED_RE.fullmatch(value.strip())
    if not match:
        raise ValueError(value)
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]
    number = int(match.group(1)) << shift
    if number > INT_RANGES["u64"][1]:
        raise ValueError(value)
    return number


def _strip_brackets(value: str) -> str:
    value = value.strip()
    if value.startswith("["):
        value = value[1:]
    if value.endswith("]"):
        value = value[:-1]
    return value


def integer_list(kind: str) -> Callable[[str], list[int]]:
    """``[a,b-c,...]`` (brackets optional), ranges inclusive with ``a < b``."""
    element = integer(kind)

    def convert(value: str) -> list[int]:
        result: list[int] = []
        for part in _strip_brackets(value).split(","):
            part = part.strip()
            if "-" in part:
                first, _, last = part.partition("-")
                start, end = element(first.strip()), element(last.strip())
                if start >= end:
                    raise ValueError(value)
                result.extend(range(start, end + 1))
            else:
                result.append(element(part))
        return result

    return convert


def string_list(value: str) -> list[str]:
    """``[s1,s2,...]`` (brackets optional), items split with the same comma rules."""
    return [dequote(item.strip()) for item in split_commas(_strip_brackets(value))]


def tuple_list(key_conv: Callable[[str], Any],
               value_conv: Callable[[str], Any]) -> Callable[[str], list[tuple[Any, Any]]]:
    """``[k1@v1,k2@v2,...]``; the outer brackets are required, ``@`` splits each pair."""

    def convert(value: str) -> list[tuple[Any, Any]]:
        value = value.strip()
        if not (value.startswith("[") and value.endswith("]")):
            raise ValueError("Expected a single pair of enclosing brackets")
        pairs: list[tuple[Any, Any]] = []
        for item in split_commas(value[1:-1]):
            key, sep, val = item.partition("@")
            if not sep or not key.strip():
                raise ValueError(item)
            pairs.append((key_conv(dequote(key.strip())), value_conv(val.strip())))
        return pairs

    return convert


def ipv4(value: str) -> str:
    """A dotted-quad IPv4 address, returned in canonical form."""
    return str(ipaddress.IPv4Address(value))


def mac_address(value: str) -> str:
    """A MAC address ``xx:xx:xx:xx:xx:xx``, returned lowercase with two digits per byte."""
    if not _MAC_RE.fullmatch(value):
        raise ValueError(value)
    return ":".join(f"{int(part, 16):02x}" for part in value.split(":"))


def choice(mapping: dict[str, T]) -> Callable[[str], T]:
    """One of the words of ``mapping``, matched case-insensitively."""

    def convert(value: str) -> T:
        try:
            return mapping[value.lower()]
        except KeyError:
            raise ValueError(value) from None

    return convert
