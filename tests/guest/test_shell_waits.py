"""The shell and the harness wait for a guest as a person would: a script that boots and runs a
command with no wait in between passes on a loaded host (where a boot takes longer than the 10 s
the shell once allowed its console input), ``Guest.run`` waits for a guest still booting, and a
paused VM is an error at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsh.harness.guest import GuestError
from vmsh.harness.pytest_plugin import DEFAULT_CMDLINE

BURN = "while True: pass"


@pytest.fixture
def loaded_host() -> Iterator[None]:
    """One CPU-burning process per host CPU for the test's duration."""
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()


def test_a_script_boots_and_runs_without_waiting_on_a_loaded_host(vmsh_image, tmp_path: Path, loaded_host) -> None:
    script = tmp_path / "boot-run.vmsh"
    script.write_text(
        f"create --kernel {vmsh_image('vmlinux')} --initramfs {vmsh_image('initramfs')} "
        f'--cmdline "{DEFAULT_CMDLINE}" --memory size=256M --serial tty --console off\n'
        "boot\n"
        "run echo $((6 * 7))\n"
        "assert $output == 42\n"
        "run cat /proc/cmdline\n"
        f'assert "$output" == "{DEFAULT_CMDLINE}"\n'
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vmsh", "run", str(script)], capture_output=True, text=True,
                            timeout=600, check=False)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    # the case the shell once failed: the guest did not read its console for more than 10 s
    assert took > 10, f"the boot took {took:.1f}s: the host was not loaded enough to test the wait"


def test_guest_run_waits_for_a_booting_guest(vmsh_guest) -> None:
    guest = vmsh_guest(ready=False)
    assert guest.check_output("echo $((6 * 7))") == "42"  # no wait_ready() first


def test_guest_run_on_a_paused_vm_fails_at_once(vmsh_clone, tmp_path: Path) -> None:
    from vmsh.api.client import ApiClient

    api = tmp_path / "clone-api.sock"
    guest = vmsh_clone(restore_flags=["--api-socket", str(api)])
    assert guest.check_output("echo up") == "up"
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        started = time.monotonic()
        with pytest.raises(GuestError, match="the VM is paused: resume it first"):
            guest.run("true", timeout=60)
        assert time.monotonic() - started < 10
        client.put("vm.resume")
    assert guest.check_output("echo again") == "again"
    guest.close()
    with pytest.raises(GuestError, match="the VMM has exited"):
        guest.run("true")
