"""The inspection actions (vmsh extensions) against a stand-in VM, directly and over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.api.fake_vm import FakeVm
from vmsh.api.client import ApiClient, ApiError
from vmsh.api.http import ApiServer
from vmsh.engine import inspect
from vmsh.engine.kvm_types import Regs, Segment, Sregs
from vmsh.engine.vmm import Vmm
from vmsh.errors import GuestMemoryError, ValidationError, VmshError

RAM_BASE, RAM = 0x1000, bytes(range(256)) * 16


class FakeFd:
    def __init__(self, rip: int) -> None:
        self.rip = rip

    def get_regs(self) -> Regs:
        return Regs(rax=1, rip=self.rip, rflags=2)

    def get_sregs(self) -> Sregs:
        return Sregs(cs=Segment(selector=0x10, l=1), cr0=0x80050033, efer=0x500)


class FakeVcpu:
    def __init__(self, rip: int) -> None:
        self.fd = FakeFd(rip)


class FakeMemory:
    def read(self, addr: int, length: int) -> bytes:
        if addr < RAM_BASE or addr + length > RAM_BASE + len(RAM):
            raise GuestMemoryError(f"{addr:#x}+{length:#x} is not RAM")
        return RAM[addr - RAM_BASE:addr - RAM_BASE + length]


class InspectableFakeVm(FakeVm):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.vcpus = [FakeVcpu(0x1000000), FakeVcpu(0x2000000)]
        self.memory = FakeMemory()
        self.sampling: int | None = None

    def start_profiler(self, hz: int) -> None:
        if self.sampling is not None:
            raise VmshError("The profiler is already running")
        self.sampling = hz

    def stop_profiler(self, system_map: str | None = None, top: int = 40) -> str:
        if self.sampling is None:
            raise VmshError("The profiler is not running")
        self.sampling = None
        return f"0 samples (map {system_map}, top {top})"


def test_registers_are_plain_json() -> None:
    vm = InspectableFakeVm(None, None, None)
    reply = inspect.registers(vm, 1)
    assert reply["cpu_id"] == 1 and reply["regs"]["rip"] == 0x2000000 and reply["regs"]["rax"] == 1
    assert reply["sregs"]["cr0"] == 0x80050033 and reply["sregs"]["cs"]["selector"] == 0x10
    assert isinstance(reply["sregs"]["interrupt_bitmap"], list)
    with pytest.raises(ValidationError, match=r"No vCPU 2 \(the VM has 2\)"):
        inspect.registers(vm, 2)


def test_read_memory_bounds() -> None:
    vm = InspectableFakeVm(None, None, None)
    assert inspect.read_memory(vm, RAM_BASE + 1, 3) == {"address": RAM_BASE + 1, "data": "010203"}
    with pytest.raises(ValidationError, match="between 1 and 1048576 bytes") as info:
        inspect.read_memory(vm, RAM_BASE, inspect.MAX_READ + 1)
    with pytest.raises(ValidationError, match="between 1 and"):
        inspect.read_memory(vm, RAM_BASE, 0)
    with pytest.raises(ValidationError, match="Cannot read 2 bytes at 0xfff") as info:
        inspect.read_memory(vm, RAM_BASE - 1, 2)
    assert isinstance(info.value.__cause__, GuestMemoryError)


@pytest.fixture
def client(tmp_path: Path):
    vmm = Vmm(vm_factory=InspectableFakeVm)
    server = ApiServer(vmm, path=str(tmp_path / "api.sock")).start()
    with ApiClient(str(tmp_path / "api.sock")) as c:
        c.put("vm.create", {"payload": {"kernel": "/k"}})
        c.put("vm.boot")
        yield c
    server.close()


def status(call: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        call()
    return info.value.status, info.value.messages[-1]


def test_actions_over_http(client: ApiClient) -> None:
    assert status(lambda: client.put("vm.registers", {})) == (
        500, "vm.registers needs a paused VM (it is Running): pause first")
    client.put("vm.pause")
    assert client.put("vm.registers", {"cpu_id": 0})["regs"]["rip"] == 0x1000000
    assert status(lambda: client.put("vm.registers", {"cpu_id": 7})) == (400, "No vCPU 7 (the VM has 2)")
    assert status(lambda: client.put("vm.registers", {"cpu": 0}))[0] == 400  # unknown field
    assert client.put("vm.read-memory", {"address": RAM_BASE, "length": 2}) == {"address": RAM_BASE, "data": "0001"}
    assert client.put("vm.read-memory", {"address": RAM_BASE})["data"] == RAM[:64].hex()  # 64 by default
    assert status(lambda: client.put("vm.read-memory", {"address": 0, "length": 16})) == (400, "0x0+0x10 is not RAM")
    assert status(lambda: client.put("vm.read-memory", {"address": RAM_BASE, "length": 1 << 21}))[0] == 400
    assert status(lambda: client.put("vm.read-memory", {"address": -1}))[0] == 400
    assert status(lambda: client.put("vm.profile-start", {"hz": 0}))[0] == 400
    assert client.put("vm.profile-start", {}) is None
    assert status(lambda: client.put("vm.profile-start", {"hz": 100})) == (500, "The profiler is already running")
    reply = client.put("vm.profile-stop", {"system_map": "/boot/System.map", "top": 5})
    assert reply == {"report": "0 samples (map /boot/System.map, top 5)"}
    assert status(lambda: client.put("vm.profile-stop", {})) == (500, "The profiler is not running")
