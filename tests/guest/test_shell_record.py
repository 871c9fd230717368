"""``record``: an interactive shell session (driven through a pseudo-terminal, as a person types)
is written down as a script that ``vmsh run`` replays, and the replay checks the guest's answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TextIO

import pexpect

from vmsh.harness.pytest_plugin import DEFAULT_CMDLINE

PROMPT = "vmsh> "


def _record_a_session(cwd: Path, log: TextIO) -> None:
    """image, record, create (and a failing line), boot, console: type a command, Ctrl-], shutdown."""
    # TERM=dumb: prompt_toolkit asks no cursor positions the pseudo-terminal would not answer
    env = {**os.environ, "VMSH_HISTORY": str(cwd / "history"), "TERM": "dumb"}
    shell = pexpect.spawn(sys.executable, ["-m", "vmsh"], env=env, cwd=str(cwd), timeout=60, encoding="utf-8",
                          logfile=log, dimensions=(40, 200))
    try:
        shell.expect(PROMPT)
        for line in ("image vmlinux", "image initramfs", "record session.vmsh",
                     f'create --kernel $vmlinux --initramfs $initramfs --cmdline "{DEFAULT_CMDLINE}" '
                     "--memory size=256M --serial tty --console off",
                     "frobnicate", "boot"):
            shell.sendline(line)
            shell.expect(PROMPT)
        shell.sendline("console")
        shell.expect(r"\[console: Ctrl-\]")
        shell.expect("VMSH-READY", timeout=600)
        shell.expect(r"[#$] ", timeout=120)
        shell.send("echo $((6 * 7))\r")
        shell.expect(r"42\r\n", timeout=120)
        shell.expect(r"[#$] ", timeout=120)
        shell.send("\x1d")  # Ctrl-]
        shell.expect(r"\[detached\]")
        for line in ("shutdown", "record stop"):
            shell.sendline(line)
            shell.expect(PROMPT)
        shell.sendline("quit")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)


def _replay(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsh", "run", str(script)], cwd=script.parent, capture_output=True,
                          text=True, timeout=900, check=False)


def test_a_recorded_session_replays(vmsh_image, tmp_path: Path) -> None:
    vmlinux = vmsh_image("vmlinux")
    with open(tmp_path / "shell.log", "w") as log:
        _record_a_session(tmp_path, log)

    recorded = (tmp_path / "session.vmsh").read_text()
    lines = recorded.splitlines()
    assert lines[0].startswith("# recorded by vmsh's shell") and lines[1] == "set expect_timeout 5m"
    assert f"set vmlinux '{vmlinux}'" in lines  # set before the recording began
    assert "frobnicate" not in recorded and "record" not in "\n".join(lines[1:])  # failed and shell-only lines
    boot = lines.index("boot")
    assert lines[boot - 1].startswith("create --kernel $vmlinux --initramfs $initramfs ")
    assert re.fullmatch(r"expect '.*[#$]\\ ' timeout=\$expect_timeout", lines[boot + 1])  # the prompt typed at
    assert lines[boot + 2] == "send 'echo $((6 * 7))\\r'"
    assert re.fullmatch(r"expect '42.*[#$]\\ ' timeout=\$expect_timeout", lines[boot + 3])  # its answer
    assert lines[boot + 4:] == ["shutdown"]

    replay = _replay(tmp_path / "session.vmsh")
    assert replay.returncode == 0, replay.stderr

    # The replay checks what the guest answers: another command gets another answer.
    lines[boot + 2] = lines[boot + 2].replace("6 * 7", "6 * 8")
    lines[boot + 3] = lines[boot + 3].replace("timeout=$expect_timeout", "timeout=20s")
    wrong = tmp_path / "wrong.vmsh"
    wrong.write_text("\n".join(lines) + "\n")
    replay = _replay(wrong)
    assert replay.returncode == 1
    assert f"wrong.vmsh:{boot + 4}: timeout after 20s waiting for '42" in replay.stderr, replay.stderr
    assert "48" in replay.stderr  # the console tail shows what the guest said instead
