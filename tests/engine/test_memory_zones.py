"""--memory-zone: RAM made of zones laid out in order, a file-backed shared zone writes its
file, and the launcher boots a tiny kernel on zones alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine.builder import build_for_boot
from vmsh.engine.events import EventMonitor

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]


def test_zones_are_laid_out_in_order_and_a_shared_file_zone_is_the_file(tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    backing = tmp_path / "zone1.ram"
    cfg = normalize(vm_config_from_argv([
        "--kernel", str(kernel), "--serial", "null", "--console", "off", "--memory", "size=0",
        "--memory-zone", "id=z0,size=64M", f"id=z1,size=32M,file={backing},shared=on"]))
    vm = build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)
    try:
        assert [(r.start, r.size) for r in vm.memory.regions] == [(0, 64 << 20), (64 << 20, 32 << 20)]
        vm.memory.write((64 << 20) + 4096, b"zone-one")
        with open(backing, "rb") as f:
            f.seek(4096)
            assert f.read(8) == b"zone-one"
    finally:
        vm.shutdown()


def test_launcher_boots_on_zones_and_refuses_size_with_zones(tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    base = [*LAUNCH, "--kernel", str(kernel), "--serial", "tty", "--console", "off"]
    ok = subprocess.run([*base, "--memory", "size=0", "--memory-zone", "id=a,size=32M", "id=b,size=32M"],
                        capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr.decode()
    assert b"hello" in ok.stdout, ok.stdout
    bad = subprocess.run([*base, "--memory", "size=64M", "--memory-zone", "id=a,size=32M"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "--memory size must be 0 when the RAM comes from --memory-zone" in bad.stderr
    assert "Traceback" not in bad.stderr
