"""The shell's debugger on a real Linux guest, restored in the shell's own process and behind a
VMM's API and gdb sockets (after ``connect``): ``break`` on a kernel function the guest then
runs, ``continue`` to it, ``bt``, ``step``, ``regs``, ``vx`` of a kernel variable, ``delete``,
``detach``, and the guest runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsh.harness.snapshots import private_disks
from vmsh.images import image_path
from vmsh.script.session import ScriptError


def test_shell_stops_the_guest_in_a_kernel_function_and_goes_on(vmsh_guest, vmsh_snapshots, session,
                                                                  tmp_path: Path) -> None:
    snapshot = private_disks(vmsh_snapshots.get(vmsh_guest.flags()), tmp_path / "snapshot")
    out = session.captured
    session.execute(f"restore {snapshot} resume=on")
    session.execute("run echo ready")
    assert session.variables["output"] == "ready"
    session.execute(f"set system_map {image_path('system-map')}")
    # the guest calls sync(2) a little later, once the breakpoint is set
    session.execute(r'send "sleep 2 && sync\n"')
    session.execute("break ksys_sync")
    assert out[-1].startswith("breakpoint 1 at 0xffffffff") and "<ksys_sync>" in out[-1], out
    session.execute("break")
    assert out[-1].startswith("1: "), out
    session.execute("continue timeout=120")
    assert out[-1].startswith("breakpoint 1: vcpu0 at ") and out[-1].endswith("<ksys_sync>"), out
    assert session.variables["stop"] == "ksys_sync"
    session.execute("bt")
    frames = out[-1].splitlines()
    assert "<ksys_sync>" in frames[0] and any("__x64_sys_sync" in f for f in frames[1:4]), out[-1]
    session.execute("step 2")
    assert out[-1].startswith("step: vcpu0 at ") and "<ksys_sync+0x" in out[-1], out
    session.execute("regs")
    assert f"rip {session.variables['pc']}" in " ".join(out[-1].split()), out[-1]
    session.execute("vx linux_banner 13")
    assert out[-1].endswith("Linux version"), out[-1]
    session.execute("delete all")
    session.execute("break")
    assert out[-1] == "no breakpoints"
    session.execute("detach")
    session.execute("run echo after")
    assert session.variables["output"] == "after"
    # the shell's coredump of the paused guest
    session.execute("pause")
    session.execute(f"coredump {tmp_path}/guest.core")
    assert out[-1] == f"core dump written to {tmp_path}/guest.core"
    assert (tmp_path / "guest.core").read_bytes()[:4] == b"\x7fELF"
    session.execute("resume")
    session.execute("run echo resumed")
    assert session.variables["output"] == "resumed"


def test_shell_debugs_a_connected_vmm_through_its_gdb_stub(vmsh_clone, session, tmp_path: Path) -> None:
    api, sock = tmp_path / "api.sock", tmp_path / "gdb.sock"
    guest = vmsh_clone(restore_flags=["--api-socket", f"path={api}", "--gdb", f"path={sock}"])
    out = session.captured
    session.execute(f"connect {api}")
    session.execute(f"set system_map {image_path('system-map')}")
    with pytest.raises(ScriptError, match="set gdb_socket PATH"):
        session.execute("break ksys_sync")
    session.execute(f"set gdb_socket {sock}")
    guest.send("sleep 2 && sync\n")
    session.execute("break ksys_sync")
    session.execute("continue timeout=120")
    assert out[-1].startswith("breakpoint 1: vcpu0 at ") and out[-1].endswith("<ksys_sync>"), out
    session.execute("bt")
    assert any("__x64_sys_sync" in f for f in out[-1].splitlines()[1:4]), out[-1]
    session.execute("step")
    assert out[-1].startswith("step: vcpu0 at ") and "<ksys_sync+0x" in out[-1], out
    session.execute("regs")  # the API's vm.registers: the VM is paused while stopped
    assert f"rip {session.variables['pc']}" in " ".join(out[-1].split()), out[-1]
    session.execute("vx linux_banner 13")
    assert out[-1].endswith("Linux version"), out[-1]
    session.execute("delete 1")
    session.execute("detach")
    assert guest.check_output("echo after") == "after"
