"""The example scripts parse: every line splits into known commands (running them needs the images)."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmsh.script.session  # noqa: F401 - the session registers the debugging commands too
from vmsh.script.commands import COMMANDS
from vmsh.script.lexer import split_commands

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.vmsh"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_uses_known_commands(path: Path) -> None:
    names = {"vmlinux": "/k", "initramfs": "/i", "disk": "/d", "raw": "/r", "dir": "/tmp/x", "output": "o",
             "system_map": "/m", "stop": "f"}
    for line in path.read_text().splitlines():
        for words in split_commands(line, names):
            assert words[0] in COMMANDS, f"{path.name}: unknown command {words[0]}"


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"boot-and-check.vmsh", "snapshot-restore.vmsh", "two-disks.vmsh"}
