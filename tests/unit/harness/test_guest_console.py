"""The harness's console protocol against a stand-in guest: a local busybox shell on a
terminal that prints the ready marker, echoes input and mixes in "kernel" noise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmsh.harness import Guest, GuestError

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.needs(BUSYBOX is not None, "busybox is not installed (apt-get install busybox-static)")

FAKE_GUEST = """
echo 'Linux version 6.1 (fake)'
echo VMSH-READY
exec {busybox} sh -i
"""


@pytest.fixture
def guest(tmp_path: Path):
    script = tmp_path / "fake-guest.sh"
    script.write_text(FAKE_GUEST.format(busybox=BUSYBOX))
    with Guest([BUSYBOX, "sh", str(script)], workdir=tmp_path, boot_timeout=20) as g:
        g.wait_ready()
        yield g


def test_run_returns_output_and_status(guest: Guest) -> None:
    result = guest.run("echo hello; echo world")
    assert (result.output, result.status) == ("hello\nworld", 0)
    assert guest.run("exit_code() { return 3; }; exit_code").status == 3
    assert guest.run("false").status == 1


def test_output_is_exact_with_markers_in_it(guest: Guest) -> None:
    out = guest.check_output("printf 'VMSH-B99\\nline two'")
    assert out == "VMSH-B99\nline two"


def test_shell_state_persists(guest: Guest, tmp_path: Path) -> None:
    guest.check_output(f"cd {tmp_path}; X=42")
    assert guest.check_output("pwd; echo $X") == f"{tmp_path}\n42"


def test_comment_and_quotes(guest: Guest) -> None:
    assert guest.check_output("echo \"a 'b'\" # trailing comment") == "a 'b'"


def test_timeout_reports_command_and_console(guest: Guest) -> None:
    with pytest.raises(GuestError) as info:
        guest.run("echo started; sleep 5", timeout=1)
    text = str(info.value)
    assert "sleep 5" in text and "started" in text and "console tail" in text


def test_check_raises_with_output(guest: Guest) -> None:
    with pytest.raises(GuestError, match="status 2"):
        guest.run("echo oops; exit_with() { return 2; }; exit_with").check()


def test_console_log_kept(guest: Guest) -> None:
    guest.run("echo logged-line")
    assert "Linux version 6.1 (fake)" in guest.console_tail()
    assert "logged-line" in guest.log_path.read_text(errors="replace")


def test_exit_status_of_vmm(tmp_path: Path) -> None:
    with Guest([BUSYBOX, "sh", "-c", "echo VMSH-READY; exec busybox sh -i"], workdir=tmp_path) as g:
        g.wait_ready()
        g.send("exit 7\n")
        assert g.wait_exit(timeout=10) == 7


def test_missing_marker_fails_with_tail(tmp_path: Path) -> None:
    with Guest([BUSYBOX, "sh", "-c", "echo booting...; sleep 30"], workdir=tmp_path, boot_timeout=1) as g:
        with pytest.raises(GuestError) as info:
            g.wait_ready()
        assert "booting..." in str(info.value)
