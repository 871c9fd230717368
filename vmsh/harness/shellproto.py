"""How a command is run in a guest's shell over a serial console, and its output found.

Shared by the pexpect harness and the shell's ``run`` command. The command goes out as one
input line: a begin marker, the command under ``eval`` (its own syntax and its effects on
the shell are kept), then an end marker with ``$?``. Each marker is printed from two quoted
halves, so the terminal's echo of the line never matches it.
"""

from __future__ import annotations

import re
import shlex

#: a prompt no program prints by accident
PROMPT = "vmsh-guest-prompt# "
READY_MARKER = "VMSH-READY"
#: the end of a root or user shell prompt (busybox may follow it with a cursor query)
SHELL_PROMPT = r"[#$] (?:\x1b\[6n)?"
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def setup_line(tag: str) -> tuple[str, str]:
    """The line that prepares the shell (prompt, no echo, quiet kernel) and the regex of its acknowledgement."""
    line = (
        f"\nexport PS1='{PROMPT}'; stty -echo 2>/dev/null; dmesg -n 1 2>/dev/null; "
        f"printf '%s_%s\\n' VMSH-SHELL {tag}\n"
    )
    return line, f"VMSH-SHELL_{tag}\r?\n"


def command_line(command: str, n: int) -> tuple[str, str, str]:
    """``(line, begin regex, end regex)`` for command number ``n``; the end regex's group 1 is the status."""
    begin, end = f"VMSH-B{n}", f"VMSH-E{n}"
    line = (
        f"printf '%s\\n' '{begin[:5]}''{begin[5:]}'; eval {shlex.quote(command)}; "
        f"printf '\\n%s:%s\\n' '{end[:5]}''{end[5:]}' \"$?\"\n"
    )
    return line, f"{begin}\r?\n", rf"\r?\n{end}:(\d+)\r?\n"


def clean(data: bytes | str) -> str:
    """Console bytes as text: escape sequences removed, CRLF folded, outer newlines stripped."""
    raw = data if isinstance(data, bytes) else data.encode()
    return _ANSI.sub(b"", raw).decode("utf-8", "replace").replace("\r\n", "\n").strip("\n")


def strip_escapes(data: bytes) -> bytes:
    return _ANSI.sub(b"", data)
