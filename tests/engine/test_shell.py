"""The command language against a real engine (tiny PVH kernels on KVM), in this process and
through a remote ``vmsh launch --api-socket``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from vmsh.api.client import ApiClient, ApiError
from vmsh.harness.waiting import wait_until
from vmsh.script.session import ScriptError


def kernel(tmp_path: Path, image: bytes) -> str:
    path = tmp_path / "k.elf"
    path.write_bytes(image)
    return str(path)


def test_local_lifecycle_console_and_inspection(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.echo_poweroff())
    session.execute(f"create --kernel {k} --serial tty --console off --memory size=64M")
    session.execute("info state")
    assert session.captured[-1] == '"Created"'
    session.execute("boot; expect got: timeout=20; pause")
    session.execute("regs 0")
    assert "rip" in session.captured[-1] and "cr0" in session.captured[-1]
    session.execute("x 0x1000000 16")
    assert session.captured[-1].startswith("0000000001000000  ba f8 03 00 00")  # mov edx, 0x3f8
    session.execute("counters")
    assert "__vcpu0" in session.captured[-1]
    session.execute("resume; send q; expect 'q\\r?\\n' timeout=20")
    session.execute("wait Created timeout=20")  # the guest powered off; the config stays
    assert any("powered off" in m for m in session.messages)
    session.execute("boot; expect got: timeout=20; send z; expect z timeout=20; wait Created timeout=20")


def test_local_errors_keep_the_session(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.echo_poweroff())
    with pytest.raises(ScriptError, match="VM is not created"):
        session.execute("boot")
    session.execute(f"create --kernel {k} --serial tty --console off")
    with pytest.raises(ScriptError, match="Error parsing --disk"):
        session.execute("add-disk path=/a,bogus=1")
    with pytest.raises(ScriptError, match="VM is not booted"):
        session.execute("regs")
    with pytest.raises(ScriptError, match="VM is not booted"):
        session.execute("x 0x1000000")
    session.execute("boot")
    with pytest.raises(ScriptError, match="Invalid transition from Running to Running"):
        session.execute("resume")
    with pytest.raises(ScriptError, match=r"vm.registers needs a paused VM \(it is Running\): pause first"):
        session.execute("regs")
    with pytest.raises(ScriptError, match=r"timeout after 0\.2s"):
        session.execute("expect never-printed timeout=200ms")
    session.execute("pause")
    with pytest.raises(ScriptError, match=r"No vCPU 1 \(the VM has 1\)"):
        session.execute("regs 1")
    with pytest.raises(ScriptError, match=r"Cannot read 16 bytes at 0xffffffff0000: .*is not RAM"):
        session.execute("x 0xffffffff0000 16")
    with pytest.raises(ScriptError, match="between 1 and 1 MiB"):
        session.execute("x 0x1000000 0x100001")
    with pytest.raises(ScriptError, match="The profiler is not running"):
        session.execute("profile stop")
    session.execute("delete")


def test_profile_commands(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.echo_poweroff())
    session.execute(f"create --kernel {k} --serial tty --console off; boot; profile start hz=500; sleep 300ms")
    session.execute("profile stop")
    assert "samples" in session.captured[-1]
    session.execute("profile report")


def test_remote_vm_through_the_api_and_serial_socket(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.echo_poweroff())
    api, serial = tmp_path / "api.sock", tmp_path / "serial.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vmsh", "launch", "--api-socket", str(api)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(api.exists, 30, f"the VMM's API socket {api}", process=proc)
        session.execute(f"connect {api}; ping")
        session.execute(f"create --kernel {k} --serial socket={serial} --console off; boot")
        session.execute("info state")
        assert session.captured[-1] == '"Running"'
        session.execute("profile start hz=500; sleep 200ms; profile stop")
        assert "samples" in session.captured[-1]
        with pytest.raises(ScriptError, match=r"vm.registers needs a paused VM \(it is Running\)"):
            session.execute("regs")
        # the inspection commands read the remote VM as they read a local one
        session.execute("pause; regs 0")
        assert "rip" in session.captured[-1] and "cr0" in session.captured[-1]
        assert int(session.variables["rip"], 16) >= tiny_kernel.LOAD_ADDR
        session.execute("x 0x1000000 16")
        assert session.captured[-1].startswith("0000000001000000  ba f8 03 00 00")  # mov edx, 0x3f8
        with pytest.raises(ScriptError, match=r"status 400: Error from API: No vCPU 3 \(the VM has 1\)"):
            session.execute("regs 3")
        with pytest.raises(ScriptError, match=r"status 400: .*Cannot read 16 bytes at 0xffffffff0000: .*is not RAM"):
            session.execute("x 0xffffffff0000 16")
        with ApiClient(str(api)) as client:  # the action's own bound, past the shell's
            with pytest.raises(ApiError) as err:
                client.put("vm.read-memory", {"address": tiny_kernel.LOAD_ADDR, "length": (1 << 20) + 1})
            assert err.value.status == 400 and "between 1 and 1048576 bytes" in str(err.value)
            reply = client.put("vm.read-memory", {"address": tiny_kernel.LOAD_ADDR, "length": 5})
            assert reply == {"address": tiny_kernel.LOAD_ADDR, "data": "baf8030000"}
        remote = subprocess.run([sys.executable, "-m", "vmsh", "remote", "--api-socket", str(api), "registers", "0"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert remote.returncode == 0 and json.loads(remote.stdout)["regs"]["rip"] == int(session.variables["rip"], 16)
        session.execute("resume; send w; expect 'w\\r?\\n' timeout=20")
        assert proc.wait(30) == 0  # the guest powered off, so the launched VMM ended
    finally:
        proc.terminate()
        proc.wait(30)


def test_local_snapshot_and_restore_keep_the_console_in_the_session(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.letters())
    snap = tmp_path / "snap"
    session.execute(f"create --kernel {k} --serial tty --console off; boot; expect c timeout=20; pause")
    session.execute(f"snapshot {snap}; delete; restore {snap} resume=on")
    session.execute("info state")
    assert session.captured[-1] == '"Running"'
    # the restored guest's --serial tty is the session's console, as the booted one's was
    session.execute("expect '[a-z]' timeout=20")


def test_send_waits_for_a_guest_that_reads_its_console_late(session, tmp_path: Path) -> None:
    """Input beyond the serial FIFO (64 bytes) waits until the guest reads it, within send's own
    timeout: longer than the 10 s the shell once allowed, and a short timeout still fails."""
    k = kernel(tmp_path, tiny_kernel.late_echo(12))
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    session.execute(f"create --kernel {k} --serial tty --console off --memory size=64M; boot; expect ready timeout=20")
    with pytest.raises(ScriptError, match=r"The guest did not read its console input within 0\.5s \(36 bytes left\)"):
        session.execute(f"send {text[:64]}{text[:36]} timeout=500ms")  # 64 fit the FIFO, 36 cannot
    started = time.monotonic()
    session.execute(f"send {text}")
    assert time.monotonic() - started > 10  # it did wait (the guest reads after 12 s)
    session.execute(f"expect reading timeout=20; expect {text[-20:]} timeout=20")


def test_a_paused_or_stopped_vm_is_an_error_at_once(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.letters())
    session.execute(f"create --kernel {k} --serial tty --console off --memory size=64M")
    for line in ("send x", "run true", "expect a timeout=60"):
        with pytest.raises(ScriptError, match=r"The VM is not running \(it is Created\)"):
            session.execute(line)
    session.execute("boot; expect b timeout=20; pause")
    for line in ("send x", "run true", "expect never timeout=60", "send " + "y" * 200):
        started = time.monotonic()
        with pytest.raises(ScriptError, match="The VM is paused: resume it first"):
            session.execute(line)
        assert time.monotonic() - started < 5
    session.execute("resume; expect '[a-z]' timeout=20")
    # output the VM printed before it stopped still matches; the rest fails at once
    session.execute("pause; shutdown")
    with pytest.raises(ScriptError, match=r"The VM is not running \(it is Created\).*while waiting for 'never'"):
        session.execute("expect never timeout=60")


def test_a_vm_paused_while_it_is_sent_input_is_an_error_at_once(session, tmp_path: Path) -> None:
    k = kernel(tmp_path, tiny_kernel.late_echo(60))
    session.execute(f"create --kernel {k} --serial tty --console off --memory size=64M; boot; expect ready timeout=20")
    timer = threading.Timer(1.0, lambda: session.target.call("vm.pause"))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ScriptError, match="The VM is paused: resume it first"):
            session.execute("send " + "z" * 100)
    finally:
        timer.join()
    assert time.monotonic() - started < 5
