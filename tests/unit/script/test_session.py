"""Sessions without a VM: flow commands, errors with their location, scripts, ``vmsh -c``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmsh.script.commands import COMMANDS, parse_duration
from vmsh.script.session import ScriptError


def test_set_echo_and_assert(session) -> None:
    session.execute("set name world; echo hello $name; assert $name == world")
    assert session.captured == ["hello world"]


@pytest.mark.parametrize(
    "expr, ok",
    [("1 == 1", True), ("1 != 1", False), ("10 '>' 9", True), ("2 '<=' 1", False), ("abc =~ ^a.c$", True),
     ("'hello world' contains 'o w'", True), ("yes", True), ("0", False), ("'' ", False)],
)
def test_assert(session, expr: str, ok: bool) -> None:
    if ok:
        session.execute(f"assert {expr}")
    else:
        with pytest.raises(ScriptError, match="assertion failed"):
            session.execute(f"assert {expr}")


def test_error_names_location(session) -> None:
    with pytest.raises(ScriptError) as info:
        session.execute("frobnicate", where=None)
    assert "unknown command 'frobnicate'" in str(info.value)


def test_script_error_names_file_and_line(session, tmp_path: Path) -> None:
    script = tmp_path / "t.vmsh"
    script.write_text("echo one\n# comment\nassert 1 == 2\necho never\n")
    with pytest.raises(ScriptError) as info:
        session.run_file(str(script))
    assert info.value.where == f"{script}:3"
    assert session.captured == ["one"]


def test_source_and_help(session, tmp_path: Path) -> None:
    inc = tmp_path / "inc.vmsh"
    inc.write_text("set from_include yes\n")
    session.execute(f"source {inc}; assert $from_include == yes")
    session.execute("help")
    assert "lifecycle:" in session.captured[-1] and "  run " in session.captured[-1]
    session.execute("help expect")
    assert session.captured[-1].startswith("expect PATTERN")


def test_console_command_needs_the_shell(session) -> None:
    with pytest.raises(ScriptError, match="interactive shell"):
        session.execute("console")


def test_every_command_has_syntax_and_summary() -> None:
    required = {"create", "boot", "pause", "resume", "shutdown", "reboot", "power-button", "delete", "snapshot",
                "restore", "add-disk", "remove-device", "resize", "resize-zone", "info", "counters", "ping", "regs",
                "x", "profile", "send", "expect", "run", "set", "assert", "sleep", "wait", "source", "echo", "quit",
                "connect"}
    assert required <= set(COMMANDS)
    for cmd in COMMANDS.values():
        assert cmd.syntax.startswith(cmd.name) and cmd.summary


@pytest.mark.parametrize("text, seconds", [("10", 10), ("1.5s", 1.5), ("500ms", 0.5), ("2m", 120)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_vm_commands_without_a_vm_fail_clearly(session) -> None:
    with pytest.raises(ScriptError, match="VM is not created"):
        session.execute("info")
    with pytest.raises(ScriptError, match="x takes an address"):
        session.execute("x")


def vmsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsh", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_vmsh_c_and_run(tmp_path: Path) -> None:
    assert vmsh("-c", "echo a; echo b").stdout == "a\nb\n"
    bad = vmsh("-c", "echo a; assert 1 == 0")
    assert bad.returncode == 1 and "assertion failed" in bad.stderr and "Traceback" not in bad.stderr
    script = tmp_path / "s.vmsh"
    script.write_text("echo ok\nquit 3\necho never\n")
    result = vmsh("run", str(script))
    assert (result.returncode, result.stdout) == (3, "ok\n")
    assert vmsh("run", str(tmp_path / "missing.vmsh")).returncode == 1


class _RecordingTarget:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def call(self, endpoint: str, body: object = None, fds: object = None) -> None:
        self.calls.append((endpoint, body))

    def close(self) -> None:
        pass


def test_resize_commands_send_ch_remote_requests(session) -> None:
    target = _RecordingTarget()
    session._target = target  # the VMM's side is the API's (tests/unit/engine/test_memory_hotplug.py)
    session.execute("resize --memory 1G")
    session.execute("resize-zone --id z0 --size 768M")
    assert target.calls == [("vm.resize", {"desired_ram": 1 << 30}),
                            ("vm.resize-zone", {"id": "z0", "desired_ram": 768 << 20})]


def test_migration_commands_send_the_apis_bodies(session) -> None:
    target = _RecordingTarget()
    session._target = target
    session.execute("migrate /run/m.sock local=on")
    session.execute("migrate unix:/run/n.sock")
    session.execute("receive /run/r.sock")
    assert target.calls == [("vm.send-migration", {"destination_url": "unix:/run/m.sock", "local": True}),
                            ("vm.send-migration", {"destination_url": "unix:/run/n.sock", "local": False}),
                            ("vm.receive-migration", {"receiver_url": "unix:/run/r.sock"})]
