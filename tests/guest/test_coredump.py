"""Guest core dumps on a real Linux guest: ``vm.coredump`` of the paused clone is an ELF core that
readelf accepts and gdb, given the kernel's vmlinux, reads (each vCPU a thread stopped in a kernel
function, kernel variables readable); the guest resumes unharmed. Also the refusals: a running
VM, a URL that is not ``file://``, a file that cannot be created (nothing left behind)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient
from vmsh.errors import VmshError
from vmsh.images import image_path

pytestmark = pytest.mark.needs(shutil.which("gdb") is not None and shutil.which("readelf") is not None,
                                "gdb or readelf is not installed (apt-get install gdb binutils)")


def remote(api: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsh", "remote", "--api-socket", str(api), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def read_core_with_gdb(core: Path) -> tuple[str, str, list[list[str]]]:
    """gdb's output for the core read with the guest's vmlinux, its stderr, and each thread's
    backtrace as function names (``??`` where gdb found none)."""
    system_map = image_path("system-map")
    banner_addr = next(line.split()[0] for line in system_map.read_text().splitlines()
                       if line.endswith(" linux_banner"))
    gdb = subprocess.run(["gdb", "-nx", "-batch", "-ex", "info threads", "-ex", "thread apply all bt 5",
                          "-ex", f"x/s 0x{banner_addr}", str(image_path("vmlinux")), str(core)],
                         capture_output=True, text=True, timeout=120, check=False)
    stacks = [re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+)", stack, re.MULTILINE)
              for stack in gdb.stdout.split("\nThread ")[1:]]
    return gdb.stdout, gdb.stderr, stacks


def test_core_dump_of_a_paused_guest_is_read_by_readelf_and_gdb(vmsh_clone, tmp_path: Path) -> None:
    api = tmp_path / "api.sock"
    # two vCPUs: one NT_PRSTATUS note and one gdb thread each
    guest = vmsh_clone("--cpus", "boot=2", restore_flags=["--api-socket", f"path={api}"])
    guest.check_output("echo hello > /tmp/before")
    core = tmp_path / "guest.core"

    # refused while the guest runs, and nothing is created
    result = remote(api, "coredump", f"file://{core}")
    assert result.returncode != 0 and "Trying to coredump while VM is running" in result.stderr, result
    assert not core.exists()

    # gdb unwinds this kernel (built without frame pointers or DWARF) by prologue analysis alone,
    # which reads a vCPU stopped in the middle of a function that keeps data in %rbp (a timer
    # softirq, say) as garbage frames. That is where the guest happened to be, not a fault of the
    # dump, so the guest is paused again, up to a few times, until both vCPUs are where an idle
    # guest mostly is: somewhere gdb can name the function and its caller.
    for attempt in range(5):
        if attempt:
            assert remote(api, "resume").returncode == 0
            core.unlink()
        assert remote(api, "pause").returncode == 0
        result = remote(api, "coredump", f"file://{core}")
        assert result.returncode == 0, result.stderr
        out, err, stacks = read_core_with_gdb(core)
        if all(len(frames) >= 2 and "??" not in frames[:2] for frames in stacks):
            break
    with ApiClient(str(api)) as client:
        info = client.get("vm.info")
    vcpus = info["config"]["cpus"]["boot_vcpus"]
    # each vCPU a gdb thread stopped in a named kernel function, with its caller read from the
    # kernel stack in the dump
    assert vcpus == 2 and len(stacks) == vcpus, out + err
    for frames in stacks:
        assert len(frames) >= 2 and "??" not in frames[:2], out

    header = subprocess.run(["readelf", "-h", "-l", "-n", "-W", str(core)], capture_output=True, text=True,
                            check=True).stdout
    assert "CORE (Core file)" in header and "Advanced Micro Devices X86-64" in header, header
    assert "NT_PRSTATUS" in header and "QEMU" in header, header
    assert header.count("NT_PRSTATUS") == vcpus, header
    ram = info["config"]["memory"]["size"]
    loads = [line.split() for line in header.splitlines() if line.strip().startswith("LOAD")]
    # cloud-hypervisor's physical segments (p_vaddr 0) hold all of guest RAM
    assert sum(int(f[5], 16) for f in loads if int(f[2], 16) == 0) >= ram, header
    assert "Linux version" in out, out + err

    # the file exists now: a second dump to it is refused and leaves it as it was
    size = core.stat().st_size
    result = remote(api, "coredump", f"file://{core}")
    assert result.returncode != 0 and core.stat().st_size == size
    assert remote(api, "resume").returncode == 0
    assert guest.check_output("cat /tmp/before; echo after") == "hello\nafter"


def test_core_dump_refuses_bad_urls_and_paths(vmsh_clone, tmp_path: Path) -> None:
    api = tmp_path / "api.sock"
    guest = vmsh_clone(restore_flags=["--api-socket", f"path={api}"])
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        with pytest.raises(VmshError, match="Unsupported URL"):
            client.put("vm.coredump", {"destination_url": f"http://{tmp_path}/core"})
        locked = tmp_path / "locked"
        locked.mkdir()
        os.chmod(locked, 0o500)
        # root writes anywhere: for root a directory that does not exist is the unwritable path
        target = tmp_path / "missing" / "core" if os.geteuid() == 0 else locked / "core"
        with pytest.raises(VmshError, match="Cannot create the core dump file"):
            client.put("vm.coredump", {"destination_url": f"file://{target}"})
        assert not target.exists()
        client.put("vm.resume")
    assert guest.check_output("echo alive") == "alive"
