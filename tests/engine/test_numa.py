"""--numa on a built VM: the SRAT in guest RAM (found through the RSDP as a guest would) gives
each node exactly the guest-physical regions its zones were mapped at, and the launcher refuses
a bad node with cloud-hypervisor's error."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine.builder import build_for_boot
from vmsh.engine.describe import walk_acpi
from vmsh.engine.events import EventMonitor
from vmsh.engine.memory_manager import hotplug_areas

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]


def test_srat_memory_is_where_the_zones_are(tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv([
        "--kernel", str(kernel), "--serial", "null", "--console", "off", "--cpus", "boot=2",
        "--memory", "size=0", "--memory-zone", "id=z0,size=64M", "id=z1,size=32M", "id=z2,size=32M",
        "--numa", "guest_numa_id=0,cpus=[1],memory_zones=[z0,z2]", "guest_numa_id=1,cpus=[0],memory_zones=[z1]"]))
    vm = build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)
    try:
        tables = {t["signature"]: bytes.fromhex(t["hex"]) for t in walk_acpi(vm.memory.read, 0xA0000)}
        srat = tables["SRAT"]
        memory, cpus = [], []
        off = 48
        while off < len(srat):
            kind, length = srat[off], srat[off + 1]
            if kind == 1:
                domain, base_lo, base_hi, len_lo, len_hi = struct.unpack_from("<I2xIIII", srat, off + 2)
                memory.append((domain, base_lo | base_hi << 32, len_lo | len_hi << 32))
            elif kind == 2:
                cpus.append(struct.unpack_from("<II", srat, off + 4))
            off += length
        regions = [(r.start, r.size) for r in vm.memory.regions]
        assert len(regions) == 3
        assert memory == [(0, *regions[0]), (0, *regions[2]), (1, *regions[1])]
        assert cpus == [(0, 1), (1, 0)]  # (domain, APIC id)
        assert list(tables["SLIT"][44:]) == [10, 20, 20, 10]
    finally:
        vm.shutdown()


def test_launcher_refuses_an_unknown_zone(tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    bad = subprocess.run([*LAUNCH, "--kernel", str(kernel), "--serial", "tty", "--console", "off",
                          "--numa", "guest_numa_id=0,memory_zones=[nope]"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "Invalid NUMA configuration: Unknown memory zone 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_srat_lists_a_zones_virtio_mem_region_as_hot_pluggable(tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv([
        "--kernel", str(kernel), "--serial", "null", "--console", "off", "--cpus", "boot=2",
        "--memory", "size=0,hotplug_method=virtio-mem", "--memory-zone", "id=z0,size=64M",
        "id=z1,size=64M,hotplug_size=256M",
        "--numa", "guest_numa_id=0,cpus=[0],memory_zones=[z0]", "guest_numa_id=1,cpus=[1],memory_zones=[z1]"]))
    vm = build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)
    try:
        srat = {t["signature"]: bytes.fromhex(t["hex"]) for t in walk_acpi(vm.memory.read, 0xA0000)}["SRAT"]
        memory = []
        off = 48
        while off < len(srat):
            if srat[off] == 1:
                domain, base_lo, base_hi, len_lo, len_hi, _, flags = struct.unpack_from("<I2xIIIIII", srat, off + 2)
                memory.append((domain, base_lo | base_hi << 32, len_lo | len_hi << 32, flags))
            off += srat[off + 1]
        (area,) = hotplug_areas(cfg.memory)
        assert area.zone == "z1" and area.size == 256 << 20
        # flags: enabled (bit 0), hot pluggable (bit 1) - ACPI 6.5 §5.2.16.2
        assert (1, area.base, area.size, 3) in memory
        assert [m for m in memory if m[3] != 1] == [(1, area.base, area.size, 3)]
    finally:
        vm.shutdown()
