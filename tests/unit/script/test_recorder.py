"""The recorder without a VM: answer patterns, quoting, and a console session fed by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmsh.script.console import ConsoleStream
from vmsh.script.lexer import escape, quote, split_commands, unescape
from vmsh.script.recorder import Recorder, answer_pattern


@pytest.mark.parametrize("text", ["a b", "it's", "'", "", "$x; #y", "a\\b", '"q"'])
def test_quote_makes_one_literal_word(text: str) -> None:
    assert split_commands("echo " + quote(text), {}) == [["echo", text]]


@pytest.mark.parametrize("text", ["echo $((6*7))\r", "a\x7f\x03\x1b[A\\z\tq\n\0", "x\\y"])
def test_escape_round_trips_through_unescape(text: str) -> None:
    escaped = escape(text)
    assert "\n" not in escaped and "\r" not in escaped and "\x1b" not in escaped
    assert unescape(escaped) == text


def test_unescape_hex() -> None:
    assert unescape(r"\x41\x7f\x4") == "A\x7f\\x4"


def test_answer_pattern_matches_the_raw_answer() -> None:
    raw = b"echo $((6 * 7))\r\n42\r\n/ # \x1b[6n"
    pattern = answer_pattern(raw)
    assert pattern is not None and re.search(pattern.encode(), raw)
    assert not re.search(pattern.encode(), raw.replace(b"42", b"48"))
    assert answer_pattern(b"VMSH-READY\r\n\r\n/ # ") == re.escape("/ # ")  # a blank line: the prompt only
    assert answer_pattern(b"\r\n\r\n") is None
    assert "'" not in (answer_pattern(b"it's\r\n$ ") or "'")


def test_recorder_writes_a_replayable_session(tmp_path: Path) -> None:
    stream = ConsoleStream()
    rec = Recorder(str(tmp_path / "r.vmsh"), {"kernel": "/k k", "output": "x", "note": "a\nb"})
    rec.command("create --kernel $kernel")
    rec.command("console")  # shell-only lines are not written
    stream.feed(b"boot log\r\n/ # ")
    rec.console_attached(stream.cursor())
    rec.console_typed(b"ech", stream)
    rec.console_typed(b"o hi\r", stream)
    stream.feed(b"echo hi\r\nhi\r\n/ # ")
    rec.console_typed(b"ls", stream)  # no Enter before Ctrl-]
    rec.console_detached(stream)
    rec.close()
    lines = (tmp_path / "r.vmsh").read_text().splitlines()
    assert lines[1:] == [
        "set expect_timeout 5m",
        "set kernel '/k k'",
        "# $note holds several lines and is not recorded",
        "create --kernel $kernel",
        "expect " + quote(answer_pattern(b"boot log\r\n/ # ") or "") + " timeout=$expect_timeout",
        r"send 'echo hi\r'",
        "expect " + quote(answer_pattern(b"echo hi\r\nhi\r\n/ # ") or "") + " timeout=$expect_timeout",
        "send 'ls'",
    ]
    assert unescape(split_commands(lines[-3], {})[0][1]) == "echo hi\r"
    expect = split_commands(lines[-2], {"expect_timeout": "5m"})[0]
    assert expect[2] == "timeout=5m" and re.search(expect[1].encode(), b"echo hi\r\nhi\r\n/ # \x1b[6n")
