"""The command language's lexical rules: lines, words, quoting and ``$`` expansion.

A line holds commands separated by ``;``; ``#`` at the start of a word begins a comment.
Words are split on blanks. ``'single quotes'`` keep everything literally; ``"double
quotes"`` keep blanks and ``;`` but expand ``$NAME`` and ``${NAME}``; a backslash escapes
the next character outside single quotes. A variable's value is always one word (it is
never split on blanks, so paths with spaces need no care). A name is looked up in the session's variables
first, then in the environment; an unknown name is an error rather than an empty string, so
a typo never passes silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping

from vmsh.errors import VmshError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ScriptSyntaxError(VmshError):
    """A line that cannot be split into commands and words."""


def _lookup(name: str, variables: Mapping[str, str]) -> str:
    if name in variables:
        return variables[name]
    if name in os.environ:
        return os.environ[name]
    raise ScriptSyntaxError(f"${name} is not set")


def _expand_at(text: str, i: int, variables: Mapping[str, str]) -> tuple[str, int]:
    """Expand the ``$`` at ``text[i]``; returns (value, index after the reference)."""
    if text.startswith("${", i):
        end = text.find("}", i + 2)
        if end < 0:
            raise ScriptSyntaxError(f"unterminated ${{ in: {text}")
        name = text[i + 2 : end]
        if not _NAME.fullmatch(name):
            raise ScriptSyntaxError(f"bad variable name ${{{name}}}")
        return _lookup(name, variables), end + 1
    match = _NAME.match(text, i + 1)
    if not match:
        return "$", i + 1  # a lone dollar is literal (regexes use it)
    return _lookup(match.group(), variables), match.end()


def split_commands(line: str, variables: Mapping[str, str]) -> list[list[str]]:
    """Split ``line`` into commands, each a list of expanded words."""
    return list(iter_commands(line, variables))


def iter_commands(line: str, variables: Mapping[str, str] | Callable[[], Mapping[str, str]]) -> Iterator[list[str]]:
    """Yield the commands of ``line`` one by one, each expanded just before it is yielded,
    so that ``set x 1; echo $x`` sees the new value (``variables`` may be a callable)."""
    for raw in _split_raw(line):
        env = variables() if callable(variables) else variables
        words = _words(raw, env)
        if words:
            yield words


def _split_raw(line: str) -> list[str]:
    """Split on ``;`` outside quotes, and drop a ``#`` comment."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    at_word_start = True
    while i < len(line):
        ch = line[i]
        if quote:
            current.append(ch)
            if ch == "\\" and quote == '"' and i + 1 < len(line):
                current.append(line[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "\\" and i + 1 < len(line):
            current.append(line[i : i + 2])
            i += 2
            at_word_start = False
            continue
        elif ch == "#" and at_word_start:
            break
        elif ch == ";":
            parts.append("".join(current))
            current = []
            at_word_start = True
            i += 1
            continue
        else:
            current.append(ch)
        at_word_start = ch in " \t"
        i += 1
    if quote:
        raise ScriptSyntaxError(f"unterminated {quote} quote in: {line}")
    parts.append("".join(current))
    return parts


def _words(raw: str, variables: Mapping[str, str]) -> list[str]:
    words: list[str] = []
    current: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(raw):
        ch = raw[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                current.append(ch)
            i += 1
            continue
        if quote == '"':
            if ch == '"':
                quote = ""
                i += 1
            elif ch == "\\" and i + 1 < len(raw) and raw[i + 1] in '"\\$':
                current.append(raw[i + 1])
                i += 2
            elif ch == "$":
                value, i = _expand_at(raw, i, variables)
                current.append(value)
            else:
                current.append(ch)
                i += 1
            continue
        if ch in " \t":
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
            i += 1
            continue
        in_word = True
        if ch in "'\"":
            quote = ch
            i += 1
        elif ch == "\\" and i + 1 < len(raw):
            current.append(raw[i + 1])
            i += 2
        elif ch == "$":
            value, i = _expand_at(raw, i, variables)
            current.append(value)
        else:
            current.append(ch)
            i += 1
    if in_word:
        words.append("".join(current))
    return words


_UNESCAPES = {"n": "\n", "r": "\r", "t": "\t", "e": "\x1b", "\\": "\\", "0": "\0"}
_ESCAPES = {v: f"\\{k}" for k, v in _UNESCAPES.items()}
_HEX2 = re.compile(r"[0-9a-fA-F]{2}")


def unescape(text: str) -> str:
    r"""Turn ``\n``, ``\r``, ``\t``, ``\e``, ``\xHH`` and ``\\`` into their characters (for ``send``)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _UNESCAPES:
            out.append(_UNESCAPES[text[i + 1]])
            i += 2
        elif text[i] == "\\" and text[i + 1 : i + 2] == "x" and _HEX2.fullmatch(text[i + 2 : i + 4]):
            out.append(chr(int(text[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def escape(text: str) -> str:
    """The inverse of :func:`unescape`: control characters as escapes, so ``send`` text fits on one line."""
    return "".join(_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                   for ch in text)


def quote(text: str) -> str:
    """``text`` as one word of the language, taken literally (single quotes; ``'`` as ``\\'``)."""
    return "\\'".join(f"'{part}'" if part else "" for part in text.split("'")) or "''"
