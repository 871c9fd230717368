"""``vmsh launch``'s threads carry names the kernel shows (``/proc/PID/task/*/comm``), with
cloud-hypervisor's names where vmsh has the same thread, with or without seccomp filters: tools
and test suites find vCPU threads by name to check or set their affinity."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.engine import tiny_kernel
from vmsh.harness.waiting import wait_until

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]


def thread_names(pid: int) -> Counter[str]:
    """How many threads of ``pid`` carry each kernel name."""
    names: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[(task / "comm").read_text().strip()] += 1
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return names


def test_threads_have_cloud_hypervisors_names(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(tiny_kernel.echo_poweroff())
    api = tmp_path / "api.sock"
    proc = subprocess.Popen([*LAUNCH, "--kernel", str(kernel), "--cpus", "boot=2", "--serial", "pty",
                             "--console", "pty", "--api-socket", str(api), "--seccomp", "false",
                             "--gdb", f"path={tmp_path}/gdb.sock"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    expected = {"vcpu0": 1, "vcpu1": 1, "http-server": 1, "http-conn": 1, "serial-manager": 1, "__console": 1,
                "vmsh-io": 1, "gdb": 1}
    try:
        from vmsh.api.client import ApiClient

        wait_until(api.exists, 30, f"the VMM's API socket {api}", process=proc)
        with ApiClient(str(api)) as client:  # holds a connection, and so its thread, open
            pty_path = client.get("vm.info")["config"]["serial"]["file"]

            def named() -> Counter[str] | None:
                names = thread_names(proc.pid)
                return names if all(names[n] == count for n, count in expected.items()) else None

            names = wait_until(named, 15, f"the VMM's threads to be named {sorted(expected)}", process=proc)
        # the main thread runs the control loop and keeps the process's name (ps, pgrep); KVM
        # may add a kernel worker of its own (kvm-nx-lpage-recovery); no thread is left unnamed
        main = Path(sys.executable).name[:15]
        others = {n: c for n, c in names.items() if n not in expected and n != main and not n.startswith("kvm")}
        assert names[main] == 1 and not others, names
        fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"q")
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()
