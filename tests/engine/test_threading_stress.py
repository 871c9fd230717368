"""Stress for docs/threading.md: a tiny guest moves a disk's BAR back and forth through 0xcf8/0xcfc
as fast as it can while one thread hotplugs and ejects disks through the VMM's actions and others
read ``info``, ``counters`` and ``describe``, for many rounds. Nothing may raise, the config and
the device set must agree whenever the VMM lock is held, and no file descriptor may leak."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.devices.virtio.pci import BAR_SIZE
from vmsh.engine.actions import RemoveDeviceRequest
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.events import EventMonitor
from vmsh.engine.pci_windows import MMIO32_START
from vmsh.engine.platform_devices import PCI_HOTPLUG_ADDRESS
from vmsh.errors import StateError
from vmsh.launcher import make_vmm

pytestmark = pytest.mark.kvm

ROUNDS = 100
#: BAR 0 of the first cold-plugged disk: slot 1, the first 32-bit BAR of segment 0's window
DISK_SLOT = 1
BAR_A = (MMIO32_START + BAR_SIZE - 1) & ~(BAR_SIZE - 1)
BAR_B = BAR_A + 16 * BAR_SIZE


def bar_mover() -> bytes:
    """A guest that writes BAR 0 of slot ``DISK_SLOT`` with ``BAR_B``, then ``BAR_A``, forever
    (PCI configuration mechanism #1: the address to 0xcf8, the dword to 0xcfc)."""
    address = 0x8000_0000 | DISK_SLOT << 11 | 0x10

    def write_bar(value: int) -> bytes:
        return (b"\xb8" + struct.pack("<I", address) + b"\xba" + struct.pack("<I", 0xCF8) + b"\xef"
                + b"\xb8" + struct.pack("<I", value) + b"\xba" + struct.pack("<I", 0xCFC) + b"\xef")

    body = write_bar(BAR_B) + write_bar(BAR_A)
    return tiny_kernel.kernel(body + b"\xe9" + struct.pack("<i", -(len(body) + 5)))


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def run_rounds(tmp_path: Path) -> tuple[int, list[BaseException]]:
    tmp_path.mkdir(exist_ok=True)
    kernel, image = tmp_path / "mover.elf", tmp_path / "disk.img"
    kernel.write_bytes(bar_mover())
    image.write_bytes(bytes(1 << 20))
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--serial", "null", "--console", "off",
                                         "--disk", f"path={image},id=disk0"]))
    events = EventMonitor(None)
    vmm = make_vmm(events)
    moves = 0
    follow = DeviceManager.follow_bar

    def counting_follow(self: DeviceManager, entry: object) -> None:
        nonlocal moves
        moves += 1
        follow(self, entry)  # type: ignore[arg-type]  # the entry the manager handed out

    errors: list[BaseException] = []
    stop = threading.Event()
    vmm.do("vm.create", cfg)
    DeviceManager.follow_bar = counting_follow  # type: ignore[method-assign]  # counted for this test
    try:
        vmm.do("vm.boot")
        vm = vmm.vm
        assert vm is not None and vm.devices.devices["disk0"].slot == DISK_SLOT
        control = threading.Thread(target=vmm.run_control_loop, kwargs={"until": stop.is_set, "poll": 0.05})
        control.start()

        def guarded(body):  # type: ignore[no-untyped-def]
            def run() -> None:
                try:
                    body()
                except BaseException as err:  # reported by the test
                    errors.append(err)
                    stop.set()
            return threading.Thread(target=run)

        def hotplug() -> None:
            for i in range(ROUNDS):
                info = vmm.do("vm.add-disk", m.DiskConfig(path=str(image), id=f"hot{i}"))
                slot = int(info["bdf"][8:10], 16)
                vmm.do("vm.remove-device", RemoveDeviceRequest(id=f"hot{i}"))
                # the guest's _EJ0: a write to B0EJ from a thread that is not the control loop
                vm.mmio.write(PCI_HOTPLUG_ADDRESS + 8, (1 << slot).to_bytes(4, "little"))
                with vmm.lock:
                    assert f"hot{i}" not in vm.devices.devices
            stop.set()

        def reader() -> None:
            while not stop.is_set():
                with vmm.lock:
                    disks = {d.id for d in vm.config.disks or []}
                    plugged = {k for k in vm.devices.devices if k.startswith(("disk", "hot"))}
                    assert disks == plugged, (disks, plugged)
                vmm.do("vm.info")
                vmm.do("vm.counters")
                with pytest.raises(StateError):
                    vmm.do("vm.describe")

        workers = [guarded(hotplug), guarded(reader), guarded(reader)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(300)
            assert not worker.is_alive(), "a worker hung"
        vmm.do("vm.pause")  # every vCPU stops although the guest keeps writing its BAR
        entry = vm.devices.devices["disk0"]
        assert entry.mapped is not None and entry.mapped.base in (BAR_A, BAR_B)
        stop.set()
        control.join(30)
        assert not control.is_alive()
    finally:
        DeviceManager.follow_bar = follow  # type: ignore[method-assign]
        stop.set()
        vmm.do("vmm.shutdown")
        events.close()
    return moves, errors


def test_hotplug_bar_moves_and_readers_side_by_side(tmp_path: Path) -> None:
    run_rounds(tmp_path / "warm-up")  # the first VM opens what a process keeps (cffi, KVM's files)
    before = open_fds()
    moves, errors = run_rounds(tmp_path)
    assert not errors, errors
    assert moves > ROUNDS, f"the guest moved its BAR only {moves} times"
    leaked = open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                        if os.path.exists(f"/proc/self/fd/{fd}")}
