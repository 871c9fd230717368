"""``vmsh run FILE.vmsh`` and ``vmsh -c "CMD; CMD"``: the command language without a prompt."""

from __future__ import annotations

import sys

from vmsh.script.session import run_commands, run_script


def main(argv: list[str]) -> int:
    """``vmsh run FILE``: exits 1 at the first failing command, naming file and line."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write("usage: vmsh run FILE.vmsh\n")
        return 0 if argv else 2
    return run_script(argv[0])


def run_inline(argv: list[str]) -> int:
    """``vmsh -c TEXT``."""
    if len(argv) != 1:
        sys.stderr.write("usage: vmsh -c 'CMD; CMD'\n")
        return 2
    return run_commands(argv[0])
