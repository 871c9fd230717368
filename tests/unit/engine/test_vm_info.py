"""``vm.info`` of a VM with a balloon: ``memory_actual_size`` is the RAM less what the guest has put
into the balloon (cloud-hypervisor's ``vm_info`` subtracts ``Vm::balloon_size``), following the
guest's inflate and deflate, its own deflate on OOM included. No KVM: the balloon is driven through
its virtio-pci transport the way Linux's virtio_balloon driver does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver
from vmsh.config import model as m
from vmsh.devices.virtio.balloon import VirtioBalloon
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.engine.control_requests import ControlRequests
from vmsh.engine.events import EventMonitor
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.virtio_devices import BALLOON_ID
from vmsh.engine.vm import Vm

RAM = 64 << 20
PAGE = 4096
#: struct virtio_balloon_config: num_pages, then actual (the driver's)
ACTUAL = 4


class _Entry:
    def __init__(self, transport: VirtioPciDevice) -> None:
        self.transport = transport
        self.lock = threading.Lock()


class _Devices:
    """The part of a DeviceManager ``Vm.info`` reads."""

    def __init__(self, balloon: VirtioPciDevice | None) -> None:
        self.devices: dict[str, Any] = {BALLOON_ID: _Entry(balloon)} if balloon is not None else {}

    def device_tree(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def mem() -> Iterator[GuestMemoryMmap]:
    memory = GuestMemoryMmap.create(16 << 20)
    yield memory
    memory.close()


def make_vm(balloon: m.BalloonConfig | None) -> Vm:
    config = m.VmConfig(memory=m.MemoryConfig(size=RAM), balloon=balloon)
    return Vm(config, EventMonitor(None), lambda kind, detail: None, ControlRequests(lambda fn: None))


def test_memory_actual_size_follows_the_balloon(mem: GuestMemoryMmap) -> None:
    vm = make_vm(m.BalloonConfig(size=0, deflate_on_oom=True))
    balloon = VirtioBalloon.from_config(vm.config.balloon)  # type: ignore[arg-type]  # set just above
    transport = VirtioPciDevice(balloon, mem, FakeRouter())
    vm.devices = _Devices(transport)  # type: ignore[assignment]  # the part info() reads
    driver = PciDriver(transport, mem, Allocator(0x1000, 16 << 20))
    driver.probe()
    assert vm.info()["memory_actual_size"] == RAM

    vm.resize_balloon(16 << 20)  # vm.resize desired_balloon: only a request ...
    assert vm.info()["memory_actual_size"] == RAM
    # ... until the driver has inflated and says so in ``actual``
    driver.write(driver.caps[4][1] + ACTUAL, (16 << 20) // PAGE, 4)
    assert vm.info()["memory_actual_size"] == RAM - (16 << 20)
    # deflate: asked by the host, or by the guest itself on OOM (deflate_on_oom): ``actual`` drops
    driver.write(driver.caps[4][1] + ACTUAL, (4 << 20) // PAGE, 4)
    assert vm.info()["memory_actual_size"] == RAM - (4 << 20)
    driver.write(driver.caps[4][1] + ACTUAL, 0, 4)
    assert vm.info()["memory_actual_size"] == RAM
    # a guest that claims more than its RAM does not make the size negative
    driver.write(driver.caps[4][1] + ACTUAL, 2 * RAM // PAGE, 4)
    assert vm.info()["memory_actual_size"] == 0
    transport.close()


def test_memory_actual_size_without_a_balloon_is_the_ram() -> None:
    vm = make_vm(None)
    vm.devices = _Devices(None)  # type: ignore[assignment]  # the part info() reads
    assert vm.info()["memory_actual_size"] == RAM
