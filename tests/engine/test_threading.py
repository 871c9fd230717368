"""The threading rules of docs/threading.md, on KVM with tiny kernels.

The first three tests are the races a review found: an eject on a vCPU thread changed the device
set while API threads read it, a BAR move closed ioeventfds without the device's lock while the
I/O thread used them, and a pause reported Paused although a vCPU had not stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.test_hotplug import Events
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine import vm as vm_module
from vmsh.engine.builder import build_for_boot
from vmsh.engine.platform_devices import PCI_HOTPLUG_ADDRESS
from vmsh.engine.state import VmState
from vmsh.engine.vm import Vm
from vmsh.errors import VmshError

pytestmark = pytest.mark.kvm

#: the PCI configuration mechanism #1 address of BAR 0 of ``slot`` on bus 0 (PCI 3.0 §3.2.2.3.2)
BAR0 = 0x10


class ControlQueue:
    """A stand-in for the VMM's control loop: posted work waits until the test runs it."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def post(self, work: Callable[[], None]) -> None:
        with self.lock:
            self.pending.append(work)

    def run(self) -> int:
        with self.lock:
            work, self.pending = self.pending, []
        for item in work:
            item()
        return len(work)


def build(tmp_path: Path, control: ControlQueue, *argv: str, kernel: bytes | None = None) -> Vm:
    image = tmp_path / "kernel.elf"
    image.write_bytes(kernel or tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv(["--kernel", str(image), "--serial", "null", "--console", "off", *argv]))
    return build_for_boot(cfg, Events(), lambda kind, detail: None, control.post)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not predicate():
            assert not done.wait(0.01), what
    finally:
        deadline.cancel()


def test_an_eject_on_a_vcpu_thread_waits_for_the_control_loop(tmp_path: Path) -> None:
    control = ControlQueue()
    vm = build(tmp_path, control)
    try:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(1 << 20))
        disk = m.DiskConfig(path=str(image), id="hot0")
        slot = int(vm.hotplug_device("disks", disk)["bdf"][8:10], 16)
        vm.config.disks = [disk]
        assert vm.unplug_device("hot0")
        # the guest's _EJ0 writes B0EJ on a vCPU thread
        writer = threading.Thread(target=vm.mmio.write, args=(PCI_HOTPLUG_ADDRESS + 8, (1 << slot).to_bytes(4, "little")))
        writer.start()
        wait_for(lambda: control.pending, "the eject was not handed to the control loop")
        # until the control loop runs, what API threads read is unchanged and the vCPU waits
        assert "hot0" in vm.devices.devices and vm.config.disks == [disk]
        assert writer.is_alive()
        assert control.run() == 1
        writer.join(5)
        assert not writer.is_alive()
        assert "hot0" not in vm.devices.devices and vm.config.disks is None
    finally:
        vm.shutdown()


def test_a_bar_move_takes_the_device_lock_and_runs_on_the_control_loop(tmp_path: Path) -> None:
    control = ControlQueue()
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    vm = build(tmp_path, control, "--disk", f"path={image},id=disk0")
    try:
        entry = vm.devices.devices["disk0"]
        old, fds = entry.transport.bar_address(), list(entry.notify_fds)
        assert entry.queues and fds
        new = old + 16 * entry.transport.BAR_SIZE
        bus = vm.devices.buses[0]
        with entry.lock:  # the I/O thread is serving a kick
            writer = threading.Thread(target=bus.config_write, args=(0, entry.slot, 0, BAR0, new.to_bytes(4, "little")))
            writer.start()
            writer.join(0.3)
            # the configuration write waits for the device: nothing the I/O thread uses is gone
            assert writer.is_alive()
            assert entry.notify_fds == fds and entry.mapped is not None and entry.mapped.base == old
        wait_for(lambda: control.pending, "the BAR move was not handed to the control loop")
        assert entry.mapped is not None and entry.mapped.base == old and entry.notify_fds == fds
        assert control.run() == 1
        writer.join(5)
        assert not writer.is_alive()
        assert entry.mapped is not None and entry.mapped.base == new
        assert entry.notify_fds and all(guest >= new for _, guest in entry.notify_fds)
        assert sorted(entry.window.notify) == sorted(fd for fd, _ in entry.notify_fds)
    finally:
        vm.shutdown()


def test_a_pause_that_cannot_stop_a_vcpu_fails_and_the_vm_runs_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vm_module, "VCPU_STOP_TIMEOUT", 0.5)
    control = ControlQueue()
    vm = build(tmp_path, control, "--cpus", "boot=2", kernel=tiny_kernel.kernel(tiny_kernel.SPIN))
    try:
        vm.boot()
        gate = threading.Event()
        stuck = threading.Event()

        def block(vcpu: object) -> None:  # a vCPU thread held in a host call
            stuck.set()
            gate.wait(30)

        vm.vcpus[1].run_on_vcpu(block)
        assert stuck.wait(10), "vcpu1 did not run the call"
        with pytest.raises(VmshError, match=r"Cannot pause: vcpu1 did not stop .* the VM keeps running"):
            vm.pause()
        assert vm.state is VmState.RUNNING
        gate.set()
        # both vCPUs run on: the stopped one was started again, the stuck one's kick withdrawn
        wait_for(lambda: all(v._thread is not None and v._thread.is_alive() for v in vm.vcpus), "a vCPU is down")
        for vcpu in vm.vcpus:
            assert not vcpu.join(0.3), f"vcpu{vcpu.index} stopped after the failed pause"
        vm.pause()
        assert vm.state is VmState.PAUSED and all(v.join(0) for v in vm.vcpus)
    finally:
        vm.shutdown()
