"""``vmsh launch --seccomp``: every thread of a running VMM has its filter, a forbidden system
call from a vCPU thread stops the VMM naming the call and the thread (``true``) or is logged by
the kernel while the VMM goes on (``log``), and ``false`` installs nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from vmsh.api.client import ApiClient, ApiError
from vmsh.engine.seccomp import FORBIDDEN_CALL_ENV
from vmsh.harness.waiting import wait_until

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]
#: the named threads of a VMM with a vCPU, a pty serial port, an API connection and a gdb socket
THREADS = ("vcpu0", "vmsh-io", "http-server", "http-conn", "serial-manager", "gdb")


def _kernel(tmp_path: Path, image: bytes) -> str:
    path = tmp_path / "kernel.elf"
    path.write_bytes(image)
    return str(path)


def _threads(pid: int) -> dict[str, list[tuple[int, int]]]:
    """comm -> [(Seccomp, Seccomp_filters)] for each thread of ``pid``."""
    found: dict[str, list[tuple[int, int]]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
                          if ":\t" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        found.setdefault(comm, []).append((int(status["Seccomp"]), int(status["Seccomp_filters"])))
    return found


def _serial_file(client: ApiClient) -> str | None:
    """The serial port's pty, or None while the VM is not created yet."""
    try:
        path: str = client.get("vm.info")["config"]["serial"]["file"]
    except ApiError as err:
        if "VM is not created" not in str(err):
            raise
        return None
    return path


def _threads_of_running_vmm(tmp_path: Path, *flags: str) -> dict[str, list[tuple[int, int]]]:
    """Boot a guest that waits for a console byte with a pty serial port, the API and a gdb
    socket, hold an API connection open, and read every thread's seccomp state."""
    from vmsh.api.client import ApiClient

    k = _kernel(tmp_path, tiny_kernel.echo_poweroff())
    api = tmp_path / "api.sock"
    proc = subprocess.Popen([*LAUNCH, "--kernel", k, "--serial", "pty", "--console", "off", "--api-socket",
                             str(api), "--gdb", f"path={tmp_path}/gdb.sock", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(api.exists, 30, f"the VMM's API socket {api}", process=proc)
        with ApiClient(str(api)) as client:
            # the API answers from when it listens, the VM exists once the launcher created it
            pty_path = wait_until(lambda: _serial_file(client), 30, "the VM to be created", process=proc)
            # Threads name themselves when they start and install their filter just after (the
            # I/O thread may still be starting): wait until each named thread and the main thread
            # are there and, with seccomp, have their filter; one that never gets it times out.
            filtered = "false" not in flags

            def settled() -> dict[str, list[tuple[int, int]]] | None:
                found = _threads(proc.pid)
                if not set(THREADS) <= set(found):
                    return None
                # The main thread (the process's name) installs its filter once the VM is
                # booted, which may be after the API already answers.
                states = [state for comm, group in found.items() if comm in THREADS or comm.startswith("python")
                          for state in group]
                on = all(mode == 2 and filters >= 1 for mode, filters in states)
                return found if on or not filtered else None

            threads = wait_until(settled, 10, "every thread of the VMM to be named and have its filter",
                                 process=proc)
        fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"q")
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()
    return threads


def test_every_thread_has_its_filter(tmp_path: Path) -> None:
    threads = _threads_of_running_vmm(tmp_path)
    for name in THREADS:
        assert name in threads, sorted(threads)
        for mode, filters in threads[name]:
            assert mode == 2 and filters >= 1, (name, mode, filters)
    # The main thread keeps the process's name; it runs the control loop under the VMM's filter.
    main = [state for comm, states in threads.items() if comm.startswith("python") for state in states]
    assert main and all(mode == 2 and filters >= 1 for mode, filters in main), threads
    # A connection's thread is started by the server's and stacks its own filter on the server's.
    assert all(filters >= 2 for _, filters in threads["http-conn"])


def test_false_installs_nothing(tmp_path: Path) -> None:
    threads = _threads_of_running_vmm(tmp_path, "--seccomp", "false")
    assert set(THREADS) <= set(threads)  # named all the same
    assert all(mode == 0 and filters == 0 for states in threads.values() for mode, filters in states), threads


def _launch_with_forbidden_call(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    k = _kernel(tmp_path, tiny_kernel.hello_poweroff())
    env = dict(os.environ, **{FORBIDDEN_CALL_ENV: "vcpu0"})
    return subprocess.run([*LAUNCH, "--kernel", k, "--serial", "tty", "--console", "off", *flags], env=env,
                          capture_output=True, timeout=60, check=False)


def test_forbidden_call_from_a_vcpu_stops_the_vmm_naming_call_and_thread(tmp_path: Path) -> None:
    result = _launch_with_forbidden_call(tmp_path)
    assert result.returncode == -signal.SIGSYS, result.stderr
    assert b"vmsh: seccomp: thread 'vcpu0' made the forbidden system call ptrace (101)" in result.stderr
    assert b"hello" not in result.stdout  # the guest never ran


def _kernel_log() -> str:
    try:
        return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"the kernel log cannot be read here: {err}")


def test_forbidden_call_under_log_is_logged_and_the_vmm_goes_on(tmp_path: Path) -> None:
    k = _kernel(tmp_path, tiny_kernel.hello_poweroff())
    proc = subprocess.Popen([*LAUNCH, "--kernel", k, "--serial", "tty", "--console", "off", "--seccomp", "log"],
                            env=dict(os.environ, **{FORBIDDEN_CALL_ENV: "vcpu0"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == b"hello\n"
    # SECCOMP_RET_LOG: the kernel's audit line names the process, the thread and the call.
    line = re.compile(rf'type=1326 .* pid={proc.pid} comm="vcpu0" .* syscall=101 ')
    wait_until(lambda: line.search(_kernel_log()) is not None, 10, "the kernel's seccomp audit line")
