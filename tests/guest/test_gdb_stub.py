"""The gdb stub (``--gdb path=``) on a real Linux guest, driven by the real gdb in batch mode
with the default kernel's vmlinux: attach (the VM stops), registers and a kernel variable,
a breakpoint on a kernel function the guest shell triggers, a backtrace, a step, continue,
a hardware breakpoint, detach (the VM runs on and the guest keeps working); Ctrl-C through
the raw protocol; watchpoints where the host's KVM has them."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmsh.engine.gdb import packets
from vmsh.engine.pvm import is_pvm_host
from vmsh.images import image_path

pytestmark = pytest.mark.needs(shutil.which("gdb") is not None, "gdb is not installed (apt-get install gdb)")

#: the guest calls sync(2) once a second: ksys_sync and __x64_sys_sync run in a vCPU
SYNC_LOOP = "while true; do sync; sleep 1; done &\n"


def gdb_batch(sock: Path, commands: list[str], timeout: float = 120) -> str:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote {sock}"]
    for c in commands:
        argv += ["-ex", c]
    argv.append(str(image_path("vmlinux")))
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"gdb timed out; it printed:\n{_text(err.stdout)}{_text(err.stderr)}") from None
    return result.stdout + result.stderr


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def symbol(name: str) -> int:
    for line in image_path("system-map").read_text().splitlines():
        addr, _kind, sym = line.split()
        if sym == name:
            return int(addr, 16)
    raise AssertionError(f"{name} is not in System.map")


def test_gdb_reads_registers_memory_and_threads_then_detaches(vmsh_clone, tmp_path: Path) -> None:
    sock = tmp_path / "gdb.sock"
    guest = vmsh_clone("--cpus", "boot=2", restore_flags=["--gdb", f"path={sock}"])
    wait_for(sock)
    guest.check_output("echo hello > /tmp/before")
    out = gdb_batch(sock, ["info registers rip rsp eflags cs ss cr0 cr3 cr4 efer fs_base gs_base",
                           "x/s &linux_banner", "print *(unsigned long *)&jiffies",
                           "info threads", "thread 2", "info registers rip", "x/4xb 0x10", "detach"])
    assert "Linux version 6." in out, out
    for reg in ("rip", "rsp", "eflags", "cs", "cr0", "cr3", "cr4", "efer", "gs_base"):
        assert f"\n{reg} " in "\n" + out, (reg, out)
    cr0 = int(out.split("\ncr0", 1)[1].split()[0], 16)
    assert cr0 & 0x8000_0001 == 0x8000_0001, out  # paging and protected mode: a running kernel
    # jiffies read from the guest: a kernel that has ticked for a while
    jiffies = int(out.split("$1 = ", 1)[1].split()[0])
    assert jiffies > 0, out
    # both vCPUs are threads, stopped in the kernel
    threads = [line for line in out.splitlines() if "(vCPU " in line]
    assert len(threads) == 2 and all("0xffffffff" in t for t in threads), out
    assert "Switching to thread 2" in out, out
    # an address the kernel's page tables do not map is an error, not a crash
    assert "Cannot access memory at address 0x10" in out, out
    assert "detached" in out, out
    assert guest.check_output("cat /tmp/before; echo after") == "hello\nafter"


def test_gdb_breaks_in_a_kernel_function_steps_and_continues(vmsh_clone, tmp_path: Path) -> None:
    sock = tmp_path / "gdb.sock"
    guest = vmsh_clone(restore_flags=["--gdb", f"path={sock}"])
    wait_for(sock)
    guest.send(SYNC_LOOP)
    guest.check_output("true")
    ksys_sync, sys_sync = symbol("ksys_sync"), symbol("__x64_sys_sync")
    out = gdb_batch(sock, ["break ksys_sync", "continue", "bt 4", "print/x $pc", "stepi", "print/x $pc",
                           "continue", "print/x $pc", "delete", "hbreak __x64_sys_sync", "continue",
                           "print/x $pc", "delete", "detach"])
    assert "Breakpoint 1, " in out and "in ksys_sync ()" in out, out
    # the backtrace: ksys_sync called from the system call
    frames = [line for line in out.splitlines() if line.startswith("#")]
    assert "ksys_sync" in frames[0] and "__x64_sys_sync" in frames[1] and "do_syscall_64" in frames[2], out
    pcs = [int(line.split("= ", 1)[1], 16) for line in out.splitlines() if line.startswith("$")]
    # stopped at the breakpoint, one instruction further after stepi, there again after continue
    assert pcs[0] == ksys_sync and ksys_sync < pcs[1] <= ksys_sync + 15 and pcs[2] == ksys_sync, out
    # the hardware breakpoint on the caller
    assert "Hardware assisted breakpoint 2" in out and pcs[3] == sys_sync, out
    assert "detached" in out, out
    # the INT3 is gone: with no debugger attached it would be the guest's own #BP (an oops)
    assert guest.check_output("sync; echo synced") == "synced"
    assert "int3" not in guest.check_output("dmesg | tail -5").lower()


class RawClient:
    """The remote protocol by hand, for what gdb's batch mode cannot do (Ctrl-C)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(60)
        self.decoder = packets.Decoder()
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(packets.frame(data))

    def reply(self) -> bytes:
        while not self.pending:
            chunk = self.sock.recv(4096)
            assert chunk, "the stub closed the connection"
            self.pending += [e.data for e in self.decoder.feed(chunk) if isinstance(e, packets.Packet)]
        return self.pending.pop(0)

    def ask(self, data: bytes) -> bytes:
        self.send(data)
        return self.reply()


def test_ctrl_c_stops_a_running_guest_and_unmapped_memory_is_an_error(vmsh_clone, tmp_path: Path) -> None:
    sock = tmp_path / "gdb.sock"
    guest = vmsh_clone(restore_flags=["--gdb", f"path={sock}"])
    wait_for(sock)
    client = RawClient(sock)
    assert client.ask(b"?").startswith(b"T05")
    assert client.ask(b"m10,4") == b"E0e"
    banner = symbol("linux_banner")
    assert bytes.fromhex(client.ask(b"m%x,d" % banner).decode()) == b"Linux version"
    assert client.ask(b"qfThreadInfo") == b"m1"
    assert b"i386.sys" in client.ask(b"qXfer:features:read:target.xml:0,3fff")
    client.send(b"c")
    assert guest.check_output("echo running") == "running"  # the guest runs while gdb waits
    client.sock.sendall(b"\x03")
    assert client.reply().startswith(b"T02thread:1;")
    client.send(b"D")
    assert client.reply() == b"OK"
    client.sock.close()
    assert guest.check_output("echo after") == "after"


def test_gdb_watchpoint_on_a_kernel_variable(vmsh_clone, tmp_path: Path) -> None:
    """A watchpoint fires where the host's KVM raises data breakpoints; on PVM, whose
    instruction emulator never does, the stub refuses it and gdb says it cannot insert it."""
    sock = tmp_path / "gdb.sock"
    guest = vmsh_clone(restore_flags=["--gdb", f"path={sock}"])
    wait_for(sock)
    out = gdb_batch(sock, ["watch *(unsigned long *)&jiffies", "continue", "delete", "detach"])
    if is_pvm_host():
        assert "Could not insert hardware watchpoint 1" in out and "New value" not in out, out
    else:
        assert "Hardware watchpoint 1" in out and "New value" in out, out
    assert guest.check_output("echo alive") == "alive"


def test_a_vm_paused_through_the_api_stays_paused_after_gdb_detaches(vmsh_clone, tmp_path: Path) -> None:
    from vmsh.api.client import ApiClient

    sock, api = tmp_path / "gdb.sock", tmp_path / "api.sock"
    guest = vmsh_clone(restore_flags=["--gdb", f"path={sock}", "--api-socket", f"path={api}"])
    wait_for(sock)
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        client_gdb = RawClient(sock)
        assert client_gdb.ask(b"?").startswith(b"T05")
        assert client_gdb.ask(b"D") == b"OK"
        client_gdb.sock.close()
        time.sleep(0.5)
        assert client.get("vm.info")["state"] == "Paused"  # cloud-hypervisor's stub resumes only what it stopped
        client.put("vm.resume")
    assert guest.check_output("echo alive") == "alive"
