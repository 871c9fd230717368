"""The interactive shell with prompt_toolkit's pipe input and a dummy output."""

from __future__ import annotations

from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from vmsh.repl import Shell, VmshCompleter, option_keys


def complete(text: str) -> list[str]:
    return [c.text for c in VmshCompleter().get_completions(Document(text), CompleteEvent())]


def test_completes_command_names() -> None:
    assert "pause" in complete("pa") and "power-button" in complete("po")
    assert complete("snap") == ["snapshot"]


def test_completes_launcher_flags_and_keys() -> None:
    assert "--disk" in complete("create --di")
    assert "path=" in complete("create --kernel k --disk ")
    assert "readonly=" in complete("create --disk path=/a,read")
    assert complete("create --disk path=/a,readonly=o") == ["on", "off"]
    assert "mac=" in complete("add-net ")
    assert "ex" not in complete("help e") and "expect" in complete("help e")


def test_option_keys_from_syntax() -> None:
    keys = option_keys("path=<p>,readonly=on|off,vhost_mode=client|server")
    assert keys == {"path": [], "readonly": ["on", "off"], "vhost_mode": ["client", "server"]}


@pytest.fixture
def run_shell(tmp_path: Path):
    def run(text: str) -> tuple[int, list[str], Path]:
        history = tmp_path / "history"
        printed: list[str] = []
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            pipe.send_text(text)
            shell = Shell(history=FileHistory(str(history)), input=pipe, output=DummyOutput())
            shell.print = printed.append  # type: ignore[method-assign]  # capture what the shell prints
            shell.session.out = printed.append
            errors: list[str] = []
            shell.error = errors.append  # type: ignore[method-assign]  # capture what the shell prints
            try:
                status = shell.loop()
            finally:
                shell.session.close()
        return status, printed + [f"error: {e}" for e in errors], history

    return run


def test_lines_run_and_errors_do_not_end_the_session(run_shell) -> None:
    status, printed, _ = run_shell("echo one\nfrobnicate\nassert 1 == 2\necho two\nquit 4\n")
    assert status == 4
    assert printed[:2] == ["one", "two"]
    assert any("unknown command 'frobnicate'" in p for p in printed)
    assert any("assertion failed" in p for p in printed)


def test_history_is_persistent(run_shell) -> None:
    _, _, history = run_shell("echo remembered\nquit\n")
    assert "echo remembered" in history.read_text()


def test_help(run_shell) -> None:
    _, printed, _ = run_shell("help\nhelp x\nquit\n")
    assert any("inspection:" in p for p in printed)
    assert any(p.startswith("x ADDR [LEN]") for p in printed)


def test_end_of_input_leaves(run_shell) -> None:
    status, _, _ = run_shell("echo last\n\x04")  # Ctrl-D on an empty line
    assert status == 0


def test_toolbar_shows_state(tmp_path: Path) -> None:
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        shell = Shell(history=FileHistory(str(tmp_path / "h")), input=pipe, output=DummyOutput())
        try:
            assert "VM: none" in shell.toolbar()
        finally:
            shell.session.close()


def test_record_writes_the_lines_that_succeeded(run_shell, tmp_path: Path) -> None:
    script = tmp_path / "rec.vmsh"
    status, printed, _ = run_shell(f"set who world\nrecord {script}\necho hello $who\nfrobnicate\n"
                                   "set n 2\nhelp\nrecord stop\necho after\nrecord stop\nquit\n")
    assert status == 0
    assert f"[recorded 5 lines to {script}]" in printed
    assert "error: nothing is being recorded" in printed
    lines = script.read_text().splitlines()
    assert lines[1:] == ["set expect_timeout 5m", "set who 'world'", "echo hello $who", "set n 2"]
    # the recording replays on its own
    out: list[str] = []
    from vmsh.script.session import run_script

    assert run_script(str(script), out=out.append) == 0 and out == ["hello world"]


def test_record_needs_a_file(run_shell, tmp_path: Path) -> None:
    _, printed, _ = run_shell(f"record\nrecord {tmp_path}/no/such/dir/x.vmsh\nquit\n")
    assert "error: record takes a file name, or stop" in printed
    assert any(p.startswith(f"error: Cannot write the recording {tmp_path}/no/such/dir/x.vmsh: ") for p in printed)
