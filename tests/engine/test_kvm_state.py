"""Save a running tiny guest's KVM state and memory, restore it into a new VM, and continue."""

from __future__ import annotations

from tests.engine.conftest import CODE_ADDR, Recorder
from vmsh.engine.boot import layout
from vmsh.engine.boot import regs as bootregs
from vmsh.engine.bus import Bus
from vmsh.engine.kvm import Kvm, VmFd
from vmsh.engine.kvm_state import restore_vcpu, restore_vm, save_vcpu, save_vm, saveable_msrs
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.vcpu import Vcpu, VcpuStop

MEM = 4 << 20
#: r12 counts; every iteration outputs its low byte and uses the stack, then asks to stop
#: on port 0xf4 when r12 reaches 3 and again at 6 (each "out 0xf4" kicks the vCPU).
CODE = bytes.fromhex(
    "4d31e4"  # xor r12, r12
    "49ffc4"  # loop: inc r12
    "909090909090909090"  # nops (SSE such as movq xmm0, r12 is not emulated at CPL0 on PVM)
    "4154"  # push r12
    "415c"  # pop r12
    "4c89e0"  # mov rax, r12
    "e6e9"  # out 0xe9, al
    "4983fc03"  # cmp r12, 3
    "7406"  # je stop
    "4983fc06"  # cmp r12, 6
    "7502"  # jne skip
    "e6f4"  # stop: out 0xf4, al
    "ebdb"  # skip: jmp loop
)


from tests.engine.test_boot import Stopper as Kicker  # a port whose write stops the vCPU  # noqa: E402


def make_vm(kvm: Kvm) -> tuple[VmFd, GuestMemoryMmap, VcpuFd, Vcpu, Recorder]:
    vm = kvm.create_vm()
    vm.set_tss_addr(layout.KVM_TSS_START)
    vm.create_irqchip()
    vm.create_pit2()
    mem = GuestMemoryMmap.create(MEM)
    mem.register(vm)
    fd = vm.create_vcpu(0)
    pio = Bus("pio")
    rec, kicker = Recorder(), Kicker()
    pio.insert(rec, 0xE9, 1)
    pio.insert(kicker, 0xF4, 1)
    vcpu = Vcpu(fd, pio, Bus("mmio"))
    kicker.vcpu = vcpu
    return vm, mem, fd, vcpu, rec


def test_state_round_trip_continues_the_guest(kvm: Kvm) -> None:
    vm, mem, fd, vcpu, rec = make_vm(kvm)
    fd.set_cpuid2(kvm.supported_cpuid())
    mem.write(CODE_ADDR, CODE)
    fd.set_sregs(bootregs.long_mode_sregs(fd.get_sregs(), mem))
    fd.set_regs(bootregs.Regs(rip=CODE_ADDR, rsp=0x200000, rflags=2))
    fd.set_mxcsr(0x7F80)  # carried by the XSAVE image
    assert vcpu.run() is VcpuStop.KICKED
    assert [d[0] for _, d in rec.writes] == [1, 2, 3]

    vm_state = save_vm(vm)
    cpu_state = save_vcpu(fd, saveable_msrs(kvm, fd))
    ram = mem.read(0, MEM)
    assert cpu_state.regs.r12 == 3
    fd.close()
    vm.close()
    mem.close()

    vm2, mem2, fd2, vcpu2, rec2 = make_vm(kvm)
    try:
        mem2.write(0, ram)
        restore_vm(vm2, vm_state)
        restore_vcpu(fd2, cpu_state)
        assert fd2.get_regs() == cpu_state.regs
        assert vcpu2.run() is VcpuStop.KICKED
        assert [d[0] for _, d in rec2.writes] == [4, 5, 6]
        assert fd2.get_mxcsr() == 0x7F80
    finally:
        fd2.close()
        vm2.close()
        mem2.close()


def test_saveable_msrs_are_readable(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        fd = vm.create_vcpu(0)
        msrs = saveable_msrs(kvm, fd)
        assert 0x10 in msrs  # IA32_TSC
        assert len(fd.get_msrs(msrs)) == len(msrs)
        fd.close()
    finally:
        vm.close()
