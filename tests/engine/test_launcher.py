"""``vmsh launch`` end to end on KVM with tiny PVH kernels: serial modes both ways, the
debug console, poweroff and reset, events, and bad input that must fail cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from tests.engine import tiny_kernel

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]


def write_kernel(tmp_path: Path, image: bytes, name: str = "kernel.elf") -> str:
    path = tmp_path / name
    path.write_bytes(image)
    return str(path)


def launch(*args: str, timeout: float = 60, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*LAUNCH, *args], input=stdin, capture_output=True, timeout=timeout, check=False)


def events(path: Path) -> list[str]:
    return [f"{r['source']} {r['event']}" for r in (json.loads(t) for t in path.read_text().split("\n\n") if t.strip())]


def test_poweroff_exits_zero_with_serial_on_stdout(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.hello_poweroff())
    ev = tmp_path / "events"
    result = launch("--kernel", k, "--serial", "tty", "--console", "off", "--event-monitor", f"path={ev}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello\n"
    assert events(ev) == ["vmm starting", "vm booting", "vm booted", "vm shutdown", "vm deleted", "vmm shutdown"]


def test_serial_file_and_debug_console_file(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.hello_poweroff())
    serial, dbg = tmp_path / "serial.log", tmp_path / "debug.log"
    result = launch("--kernel", k, "--serial", f"file={serial}", "--console", "off", "--debug-console", f"file={dbg}")
    assert result.returncode == 0, result.stderr
    assert serial.read_bytes() == b"hello\n"
    assert dbg.read_bytes() == b"dbg"
    assert oct(serial.stat().st_mode & 0o777) == "0o600"  # umask 077


def test_debug_console_custom_port_and_off(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.hello_poweroff())
    dbg = tmp_path / "debug.log"
    result = launch("--kernel", k, "--serial", "null", "--console", "off", "--debug-console",
                    f"file={dbg},iobase=0x402")
    assert result.returncode == 0 and dbg.read_bytes() == b""  # the guest writes 0xe9, not 0x402
    result = launch("--kernel", k, "--serial", "off", "--console", "off")
    assert result.returncode == 0 and result.stdout == b""


def test_serial_tty_input(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.echo_poweroff())
    child = pexpect.spawn(LAUNCH[0], [*LAUNCH[1:], "--kernel", k, "--serial", "tty", "--console", "off"], timeout=30)
    child.expect("got:")
    child.send("x")
    child.expect("x\r?\n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_serial_socket_both_ways(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.echo_poweroff())
    sock_path = tmp_path / "serial.sock"
    proc = subprocess.Popen([*LAUNCH, "--kernel", k, "--serial", f"socket={sock_path}", "--console", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock_path))
        client.sendall(b"z")
        received = b""
        while b"z\n" not in received:
            chunk = client.recv(100)
            if not chunk:
                break
            received += chunk
        assert received.endswith(b"z\n")
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not sock_path.exists()


def test_serial_pty_via_api_info(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.echo_poweroff())
    api = tmp_path / "api.sock"
    proc = subprocess.Popen([*LAUNCH, "--kernel", k, "--serial", "pty", "--console", "off", "--api-socket", str(api)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from vmsh.api.client import ApiClient

        deadline = time.monotonic() + 30
        while not api.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with ApiClient(str(api)) as client:
            pty_path = client.get("vm.info")["config"]["serial"]["file"]
        assert pty_path.startswith("/dev/pts/")
        fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"q")
            assert proc.wait(30) == 0
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()
    assert not api.exists()


def test_reset_reboots(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.reset_loop())
    ev = tmp_path / "events"
    proc = subprocess.Popen([*LAUNCH, "--kernel", k, "--serial", "tty", "--console", "off", "--event-monitor",
                             f"path={ev}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (ev.exists() and events(ev).count("vm rebooted") >= 2):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None and proc.stdout.read().startswith(b"boot\nboot\nboot\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux"),
        (["--kernel", "GARBAGE"], "neither an elf vmlinux nor a bzimage"),
        (["--kernel", "KERNEL", "--memory", "size=65536G"], "more than this host has"),
        (["--kernel", "KERNEL", "--disk", "path=/tmp/x"], "--disk"),
        (["--kernel", "KERNEL", "--platform", "uuid=not-a-uuid"], "uuid"),
    ],
)
def test_bad_input_fails_cleanly(tmp_path: Path, args: list[str], message: str) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(4096))
    k = write_kernel(tmp_path, tiny_kernel.hello_poweroff())
    args = [{"GARBAGE": str(garbage), "KERNEL": k}.get(a, a) for a in args]
    before = set(os.listdir(tmp_path))
    result = launch(*args, "--serial", "null", "--console", "off")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert message.encode() in result.stderr.lower() or message.encode() in result.stderr
    assert set(os.listdir(tmp_path)) == before


def test_busy_serial_socket(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.hello_poweroff())
    path = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(path))
    holder.listen(1)
    try:
        result = launch("--kernel", k, "--serial", f"socket={path}", "--console", "off")
        assert result.returncode == 1
        assert b"in use" in result.stderr and b"Traceback" not in result.stderr
    finally:
        holder.close()


def test_affinity_pins_and_bad_host_cpu_is_refused(tmp_path: Path) -> None:
    k = write_kernel(tmp_path, tiny_kernel.hello_poweroff())
    cpu = sorted(os.sched_getaffinity(0))[-1]
    assert launch("--kernel", k, "--serial", "null", "--console", "off", "--cpus",
                  f"boot=1,affinity=[0@[{cpu}]]").returncode == 0
    result = launch("--kernel", k, "--serial", "null", "--console", "off", "--cpus", "boot=1,affinity=[0@[4095]]")
    assert result.returncode == 1 and b"host CPU 4095" in result.stderr
