"""Fixtures for the engine tests: tiny guests in a real KVM VM (no Linux).

Every test here needs /dev/kvm; without it each fails in CI and is skipped elsewhere, as the
guest tests are (:mod:`vmsh.harness.requirements`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

from vmsh.engine.boot import regs as bootregs
from vmsh.engine.bus import Bus
from vmsh.engine.kvm import Kvm, VmFd
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.vcpu import Vcpu
from vmsh.harness.requirements import KVM_REASON, kvm_available, require

#: where test code is loaded and started
CODE_ADDR = 0x100000
#: top of the test stack
STACK_TOP = 0x200000
#: a 64-bit IDT for tests that take exceptions
IDT_ADDR = 0x3000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/engine" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)


@pytest.fixture(scope="session", autouse=True)
def _kvm_required() -> None:
    """Every engine test needs KVM: fail in CI without it, skip elsewhere (autouse and
    session-scoped, so it runs before the session's ``kvm`` fixture opens the device)."""
    require(kvm_available(), f"engine tests {KVM_REASON}")


class Recorder:
    """A PIO/MMIO device that records accesses and answers reads from a queue."""

    thread_safe = True

    def __init__(self, read_value: bytes = b"") -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        self.read_value = read_value

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return (self.read_value + bytes(8))[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


class TinyVm:
    """One VM with 4 MiB of RAM, one vCPU, empty buses."""

    def __init__(self, kvm: Kvm, mem_size: int = 4 << 20) -> None:
        self.vm: VmFd = kvm.create_vm()
        self.mem = GuestMemoryMmap.create(mem_size)
        self.mem.register(self.vm)
        self.fd: VcpuFd = self.vm.create_vcpu(0)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.vcpu = Vcpu(self.fd, self.pio, self.mmio)

    def real_mode(self, code: bytes, addr: int = 0x1000) -> None:
        """Start ``code`` in real mode at ``addr`` (CS base 0)."""
        self.mem.write(addr, code)
        sregs = self.fd.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        self.fd.set_sregs(sregs)
        regs = self.fd.get_regs()
        regs.rip, regs.rflags = addr, 2
        self.fd.set_regs(regs)

    def long_mode(self, code: bytes, **gprs: int) -> None:
        """Start ``code`` in 64-bit mode at CODE_ADDR, low 1 GiB identity-mapped."""
        self.mem.write(CODE_ADDR, code)
        self.fd.set_sregs(bootregs.long_mode_sregs(self.fd.get_sregs(), self.mem))
        regs = bootregs.Regs(rip=CODE_ADDR, rsp=STACK_TOP, rflags=2, **gprs)
        self.fd.set_regs(regs)

    def set_idt_gate(self, vector: int, handler: int) -> None:
        """Install a 64-bit interrupt gate (SDM vol. 3A §6.14.1) and point IDTR at the table."""
        gate = struct.pack("<HHHHII", handler & 0xFFFF, bootregs.GDT_CODE_SELECTOR, 0x8E00,
                           (handler >> 16) & 0xFFFF, handler >> 32, 0)
        self.mem.write(IDT_ADDR + vector * 16, gate)
        sregs = self.fd.get_sregs()
        sregs.idt.base, sregs.idt.limit = IDT_ADDR, 256 * 16 - 1
        self.fd.set_sregs(sregs)

    def close(self) -> None:
        self.fd.close()
        self.vm.close()
        self.mem.close()


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


@pytest.fixture
def tiny(kvm: Kvm) -> Iterator[TinyVm]:
    vm = TinyVm(kvm)
    yield vm
    vm.close()


def run_now(work: Callable[[], None]) -> None:
    """A VM's ``post`` for tests without a control loop: the work runs at once, on the calling
    thread (these tests drive the VM from one thread)."""
    work()
