"""``record FILE``: an interactive shell session written down as a script ``vmsh run`` replays.

From ``record FILE`` to ``record stop`` (or the end of the shell) the recorder writes:

* the variables set before recording began (``set NAME VALUE``), so the script stands alone;
* every command line that succeeded, as typed (``$variables`` unexpanded);
* what is typed in ``console`` mode, one ``send`` per line (Enter included), each after an
  ``expect`` for the guest's answer that the user saw before typing it: the last line of
  output and the prompt line after it (``42`` then ``~ # ``), tolerant of the escape sequences
  and carriage returns a terminal adds between lines. The replay so waits for the guest as the
  user did, and fails where the guest answers differently: the recording is a regression test.

The expects use ``timeout=$expect_timeout`` (set at the top of the file, 5 minutes: the first
one waits for a boot).
"""

from __future__ import annotations

import datetime
import logging
import re
from typing import TextIO

from vmsh.errors import VmshError
from vmsh.harness.shellproto import clean
from vmsh.script.console import ConsoleStream
from vmsh.script.lexer import escape, quote

LOG = logging.getLogger(__name__)

#: what the session and its commands set for themselves: not carried into a recording
INTERNAL_VARIABLES = frozenset({"status", "output", "match", "rip", "profile", "expect_timeout"})
EXPECT_TIMEOUT = "5m"
#: commands the recorder does not write (the shell handles them, or they end the session)
NOT_RECORDED = frozenset({"record", "console", "quit", "exit", "help"})
#: escape sequences and carriage returns a terminal may put around a line break
_LINE_BREAK = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\r)*\n(?:\x1b\[[0-9;?]*[A-Za-z]|\r)*"
_ENTER = (b"\r", b"\n")


def answer_pattern(output: bytes) -> str | None:
    """A regex for the end of the guest's answer ``output``: its last line (the prompt) and the
    line before it, each only if it appears in ``output`` as is (no escape sequence inside)."""
    lines = [line.rsplit("\r", 1)[-1] for line in clean(output).split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    prompt = lines[-1]
    if prompt.encode() not in output:
        return None
    pattern = re.escape(prompt)
    if len(lines) > 1 and lines[-2].strip() and lines[-2].encode() in output:
        pattern = re.escape(lines[-2]) + _LINE_BREAK + pattern
    return pattern.replace("'", r"\x27")


class Recorder:
    """Writes one recording; the shell calls :meth:`command` after each line that succeeded and
    the ``console_*`` methods from console mode."""

    def __init__(self, path: str, variables: dict[str, str]) -> None:
        self.path = path
        try:
            self._file: TextIO = open(path, "w", encoding="utf-8")  # noqa: SIM115 - open until record stop
        except OSError as err:
            raise VmshError(f"Cannot write the recording {path}") from err
        self.lines = 0
        self._answer_from = 0  # absolute stream offset where the answer to the last input starts
        self._typed = bytearray()  # the console line being typed (not sent with Enter yet)
        self._sent_since_attach = False
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self._write(f"# recorded by vmsh's shell on {stamp}; replay: vmsh run {path}")
        self._write(f"set expect_timeout {EXPECT_TIMEOUT}")
        for name, value in variables.items():
            if name in INTERNAL_VARIABLES:
                continue
            if "\n" in value or "\r" in value:
                self._write(f"# ${name} holds several lines and is not recorded")
                continue
            self._write(f"set {name} {quote(value)}")

    def _write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        self.lines += 1

    def command(self, line: str) -> None:
        """A command line that succeeded."""
        text = line.strip()
        if text and text.split()[0] not in NOT_RECORDED:
            self._write(text)

    # --- console mode --------------------------------------------------------------------------

    def console_attached(self, start: int) -> None:
        """Console mode begins; what the user sees first is the output from ``start`` on."""
        self._answer_from = start
        self._typed.clear()
        self._sent_since_attach = False

    def console_typed(self, data: bytes, stream: ConsoleStream) -> None:
        """Bytes typed in console mode, before they are sent to the guest."""
        for byte in data:
            char = bytes([byte])
            if not self._typed:
                self._expect_answer(stream)
            self._typed += char
            if char in _ENTER:
                self._send()
                self._answer_from = stream.position()

    def console_detached(self, stream: ConsoleStream) -> None:
        """Console mode ends: a line typed without Enter is sent as is; the replay waits for the
        answer to the last line before it goes on."""
        if self._typed:
            self._send()
        elif self._sent_since_attach:
            self._expect_answer(stream)

    def _expect_answer(self, stream: ConsoleStream) -> None:
        pattern = answer_pattern(stream.since(self._answer_from))
        if pattern is not None:
            self._write(f"expect {quote(pattern)} timeout=$expect_timeout")

    def _send(self) -> None:
        self._write(f"send {quote(escape(self._typed.decode('utf-8', 'replace')))}")
        self._typed.clear()
        self._sent_since_attach = True

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
