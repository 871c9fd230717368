"""The seccomp filters without a VM: the lists, ``false`` installing nothing, and the SIGSYS
reporter and ``log`` mode on a plain thread (each case in a child process: a filter is for life)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from vmsh.engine import seccomp

#: Calls a VMM has no use for, which every list must leave out.
NEVER = {"execve", "execveat", "ptrace", "mount", "umount2", "bpf", "init_module", "finit_module",
         "delete_module", "kexec_load", "kexec_file_load", "reboot", "unshare", "setns", "chroot",
         "pivot_root", "perf_event_open", "process_vm_writev", "keyctl", "add_key", "swapon",
         "fork", "vfork", "personality", "userfaultfd"}


def _libseccomp() -> None:
    try:
        import vmsh._seccomp  # noqa: F401
    except ImportError:
        pytest.fail("vmsh._seccomp is not built (libseccomp-dev, setup.py build_ext)")


@pytest.mark.parametrize("kind", list(seccomp.ThreadKind))
def test_no_list_allows_what_a_vmm_never_needs(kind: seccomp.ThreadKind) -> None:
    assert not NEVER & seccomp.LISTS[kind]


def test_every_listed_name_is_a_system_call() -> None:
    _libseccomp()
    from vmsh._seccomp import lib

    unknown = sorted(n for n in seccomp.VMM | seccomp.VCPU | seccomp.IO | seccomp.CONSOLE
                     if lib.seccomp_syscall_resolve_name(n.encode()) == lib.__NR_SCMP_ERROR)
    assert unknown == []


def test_filters_stack_as_threads_start_threads() -> None:
    # A thread's filter is inherited: what the API threads start (vm.boot's vCPU and I/O threads)
    # can only do what the API list allows, so it must hold theirs.
    api = seccomp.LISTS[seccomp.ThreadKind.API_CONNECTION]
    for kind in (seccomp.ThreadKind.VCPU, seccomp.ThreadKind.IO, seccomp.ThreadKind.CONSOLE):
        assert seccomp.LISTS[kind] <= api, kind


def _child(mode: str, call_forbidden: bool) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(f"""
        import os, sys, threading
        from vmsh.engine import seccomp
        seccomp.configure({mode!r})
        if {call_forbidden!r}:
            os.environ[seccomp.FORBIDDEN_CALL_ENV] = "vcpu7"
        def body():
            print("installed", seccomp.apply(seccomp.ThreadKind.VCPU), flush=True)
            status = open(f"/proc/self/task/{{threading.get_native_id()}}/status").read()
            print([l for l in status.splitlines() if l.startswith("Seccomp:")][0], flush=True)
        t = threading.Thread(target=body, name="vcpu7")
        t.start(); t.join()
        print("still running", flush=True)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_false_installs_nothing() -> None:
    result = _child("false", call_forbidden=True)
    assert result.returncode == 0, result.stderr
    assert "installed False" in result.stdout and "Seccomp:\t0" in result.stdout


def test_true_installs_a_filter_and_a_forbidden_call_stops_the_process_naming_it() -> None:
    _libseccomp()
    ok = _child("true", call_forbidden=False)
    assert ok.returncode == 0, ok.stderr
    assert "installed True" in ok.stdout and "Seccomp:\t2" in ok.stdout
    bad = _child("true", call_forbidden=True)
    assert bad.returncode == -signal.SIGSYS, (bad.returncode, bad.stderr)
    assert "vmsh: seccomp: thread 'vcpu7' made the forbidden system call ptrace (101)" in bad.stderr
    assert "still running" not in bad.stdout


def test_log_lets_the_forbidden_call_through() -> None:
    _libseccomp()
    result = _child("log", call_forbidden=True)
    assert result.returncode == 0, result.stderr
    assert "Seccomp:\t2" in result.stdout and "still running" in result.stdout
