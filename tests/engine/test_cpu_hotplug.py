"""CPU hotplug at the VMM level, on KVM with a tiny kernel (no guest ACPI involved): a resize
up creates, configures and starts vCPUs (threads ``vcpuN``) and announces them through the
controller and the GED; a resize down marks the highest ones removing, and when the "guest"
(this test, through the MMIO bus, as the AML's ``CEJ0`` does) ejects one, its thread ends and it
is parked; a later resize up reuses it; a snapshot keeps the vCPU count and the controller's
state; bad requests are refused."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.devices.acpi import GED_CPU_CHANGE
from vmsh.devices.cpu_hotplug import EJECT, ENABLED, INSERTING, REMOVING, STATUS_OFFSET
from vmsh.engine.builder import build_for_boot, build_from_snapshot
from vmsh.engine.describe import describe
from vmsh.engine.events import EventMonitor
from vmsh.engine.platform_devices import CPU_HOTPLUG_ADDRESS, GED_ADDRESS
from vmsh.engine.state import VmState
from vmsh.errors import BusyError, SnapshotError, VmshError


def _build(tmp_path: Path, cpus: str):
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(tiny_kernel.kernel(tiny_kernel.SPIN))
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--cpus", cpus, "--serial", "null",
                                         "--console", "off"]))
    return build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)


@pytest.fixture
def vm(tmp_path: Path):
    machine = _build(tmp_path, "boot=1,max=3")
    yield machine
    machine.shutdown()


def status(vm, index: int) -> int:
    vm.mmio.write(CPU_HOTPLUG_ADDRESS, struct.pack("<I", index))
    return vm.mmio.read(CPU_HOTPLUG_ADDRESS + STATUS_OFFSET, 1)[0]


def eject(vm, index: int) -> None:
    vm.mmio.write(CPU_HOTPLUG_ADDRESS, struct.pack("<I", index))
    vm.mmio.write(CPU_HOTPLUG_ADDRESS + STATUS_OFFSET, bytes([EJECT]))


def live_vcpu_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("vcpu") and t.is_alive()}


def test_resize_up_then_down_then_up_again(vm) -> None:
    vm.boot()
    assert [status(vm, i) for i in range(3)] == [ENABLED, 0, 0]
    assert vm.resize_vcpus(3)
    assert [v.index for v in vm.vcpus] == [0, 1, 2]
    # KVM ids are the topology's APIC ids, as for boot vCPUs
    assert [v.fd.vcpu_id for v in vm.vcpus] == [0, 1, 2]
    assert {"vcpu0", "vcpu1", "vcpu2"} <= live_vcpu_threads()
    assert vm.config.cpus.boot_vcpus == 3
    assert vm.mmio.read(GED_ADDRESS, 1)[0] & GED_CPU_CHANGE
    assert [status(vm, i) for i in range(3)] == [ENABLED, ENABLED | INSERTING, ENABLED | INSERTING]
    vm.mmio.write(CPU_HOTPLUG_ADDRESS + STATUS_OFFSET, bytes([INSERTING]))  # the guest's ack of vCPU 2
    assert status(vm, 2) == ENABLED

    assert vm.resize_vcpus(1)
    assert vm.config.cpus.boot_vcpus == 1
    assert [status(vm, i) & REMOVING for i in range(3)] == [0, REMOVING, REMOVING]
    assert vm.mmio.read(GED_ADDRESS, 1)[0] & GED_CPU_CHANGE
    with pytest.raises(BusyError, match="removal is still pending"):
        vm.resize_vcpus(2)
    vcpu2 = vm.vcpus[2]
    eject(vm, 2)
    eject(vm, 1)
    assert [v.index for v in vm.vcpus] == [0]
    assert sorted(vm.parked) == [1, 2] and vm.parked[2] is vcpu2
    assert vcpu2.join(0)
    assert "vcpu1" not in live_vcpu_threads() and "vcpu2" not in live_vcpu_threads()
    assert [status(vm, i) for i in range(3)] == [ENABLED, 0, 0]

    # up again: the parked vCPU (and its KVM fd) comes back, started in a new thread
    assert vm.resize_vcpus(3)
    assert vm.vcpus[2] is vcpu2 and not vm.parked
    assert {"vcpu1", "vcpu2"} <= live_vcpu_threads()
    assert not vm.resize_vcpus(3)  # nothing to do


@pytest.mark.parametrize(("desired", "message"), [(0, "at least 1"), (4, "exceeds the maximum")])
def test_bad_resizes_are_refused(vm, desired: int, message: str) -> None:
    vm.boot()
    with pytest.raises(VmshError, match=message):
        vm.resize_vcpus(desired)
    assert len(vm.vcpus) == 1 and vm.config.cpus.boot_vcpus == 1


def test_guest_cannot_eject_what_was_not_asked_for(vm) -> None:
    vm.boot()
    vm.resize_vcpus(2)
    eject(vm, 0)
    eject(vm, 1)
    assert [v.index for v in vm.vcpus] == [0, 1] and not vm.parked
    assert status(vm, 0) == ENABLED and status(vm, 1) & ENABLED


def test_resize_while_paused_starts_on_resume(vm) -> None:
    vm.boot()
    vm.pause()
    assert vm.resize_vcpus(2)
    assert "vcpu1" not in live_vcpu_threads()
    # the machine description follows; the new vCPU has the boot vCPU's CPUID leaves, its own
    # x2APIC id in leaf 0xB
    vcpus = describe(vm)["vcpus"]
    assert [v["id"] for v in vcpus] == [0, 1]
    functions = [[(e["function"], e["index"]) for e in v["cpuid"]] for v in vcpus]
    assert functions[0] == functions[1]
    assert {int(e["edx"], 16) for e in vcpus[1]["cpuid"] if e["function"] == "0x0000000b"} == {1}
    vm.resume()
    assert "vcpu1" in live_vcpu_threads()


def test_snapshot_after_resize_restores_the_vcpus(vm, tmp_path: Path) -> None:
    vm.boot()
    vm.resize_vcpus(2)
    vm.pause()
    snap = tmp_path / "snap"
    snap.mkdir()
    vm.snapshot(str(snap))
    saved_state = vm.cpu_hotplug.state()
    vm.shutdown()
    restored = build_from_snapshot(str(snap), m.RestoreConfig(source_url=f"file://{snap}"), EventMonitor(None),
                                   lambda kind, detail: None, run_now)
    try:
        assert restored.state is VmState.PAUSED
        assert [v.index for v in restored.vcpus] == [0, 1]
        assert restored.config.cpus.boot_vcpus == 2 and restored.config.cpus.max_vcpus == 3
        assert restored.cpu_hotplug.state() == saved_state
        restored.resume()
        assert restored.resize_vcpus(3)  # the restored VM can still grow
        assert [v.fd.vcpu_id for v in restored.vcpus] == [0, 1, 2]
    finally:
        restored.shutdown()


def test_no_controller_with_one_possible_vcpu(tmp_path: Path) -> None:
    machine = _build(tmp_path, "boot=1")
    try:
        assert machine.cpu_hotplug is None
        assert machine.mmio.read(CPU_HOTPLUG_ADDRESS + STATUS_OFFSET, 1) == b"\xff"  # nothing mapped there
        machine.boot()
        with pytest.raises(VmshError, match="exceeds the maximum"):
            machine.resize_vcpus(2)
    finally:
        machine.shutdown()


def test_snapshot_is_refused_while_a_removal_is_pending(vm, tmp_path: Path) -> None:
    vm.boot()
    vm.resize_vcpus(2)
    vm.resize_vcpus(1)
    vm.pause()
    snap = tmp_path / "snap"
    snap.mkdir()
    with pytest.raises(SnapshotError, match="removal is pending"):
        vm.snapshot(str(snap))
    assert not list(snap.iterdir())
    vm.resume()
    eject(vm, 1)
    vm.pause()
    vm.snapshot(str(snap))  # once the guest has ejected it
    assert (snap / "state.json").exists()
