"""KVM layer and vCPU loop with tiny hand-assembled guests: exits, buses, registers, threads."""

from __future__ import annotations

import threading
import time

import pytest

from tests.engine.conftest import CODE_ADDR, Recorder, TinyVm
from vmsh.engine.kvm import Kvm
from vmsh.engine.kvm_types import Regs
from vmsh.engine.kvm_vcpu import EXIT_IO, EXIT_MMIO
from vmsh.engine.vcpu import VcpuStop, install_kick_handler
from vmsh.errors import KvmError


def test_kvm_reports_api_version_and_caps(kvm: Kvm) -> None:
    from vmsh._native import lib

    assert kvm.api_version() == 12
    assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY)
    assert kvm.vcpu_mmap_size() >= 4096


def test_pio_out_reaches_the_device_at_its_offset(tiny: TinyVm) -> None:
    dev, other = Recorder(), Recorder()
    tiny.pio.insert(dev, 0x3F8, 8)
    tiny.pio.insert(other, 0x80, 1)
    # mov dx, 0x3fb; mov al, 0x5a; out dx, al; mov al, 1; out 0x80, al; hlt
    tiny.real_mode(bytes.fromhex("bafb03 b05a ee b001 e680 f4"))
    assert tiny.vcpu.run() is VcpuStop.HLT
    assert dev.writes == [(3, b"\x5a")]
    assert other.writes == [(0, b"\x01")]


def test_pio_in_returns_the_device_value_to_the_guest(tiny: TinyVm) -> None:
    dev = Recorder(read_value=b"\x34\x12")
    tiny.pio.insert(dev, 0x500, 4)
    sink = Recorder()
    tiny.pio.insert(sink, 0xE9, 1)
    # mov dx, 0x502; in ax, dx; out 0xe9, al; mov al, ah; out 0xe9, al; hlt
    tiny.real_mode(bytes.fromhex("ba0205 ed e6e9 88e0 e6e9 f4"))
    assert tiny.vcpu.run() is VcpuStop.HLT
    assert dev.reads == [(2, 2)]
    assert sink.writes == [(0, b"\x34"), (0, b"\x12")]


def test_unmapped_port_reads_all_ones(tiny: TinyVm) -> None:
    sink = Recorder()
    tiny.pio.insert(sink, 0xE9, 1)
    # in al, 0x40 (nothing there); out 0xe9, al; hlt
    tiny.real_mode(bytes.fromhex("e440 e6e9 f4"))
    assert tiny.vcpu.run() is VcpuStop.HLT
    assert sink.writes == [(0, b"\xff")]


def test_rep_outsb_delivers_every_byte(tiny: TinyVm) -> None:
    dev = Recorder()
    tiny.pio.insert(dev, 0xE9, 1)
    tiny.mem.write(0x2000, b"abc")
    # mov si, 0x2000; mov cx, 3; mov dx, 0xe9; rep outsb; hlt
    tiny.real_mode(bytes.fromhex("be0020 b90300 bae900 f36e f4"))
    assert tiny.vcpu.run() is VcpuStop.HLT
    assert b"".join(d for _, d in dev.writes) == b"abc"


def test_mmio_write_and_read_reach_the_device(tiny: TinyVm) -> None:
    dev = Recorder(read_value=b"\xef\xbe\xad\xde")
    tiny.mmio.insert(dev, 0xD000_0000, 0x1000)
    code = bytes.fromhex(
        "bb000000d0"  # mov ebx, 0xd0000000
        "c70378563412"  # mov dword [rbx], 0x12345678
        "8b4308"  # mov eax, [rbx+8]
        "894310"  # mov [rbx+16], eax
        "f4")  # hlt
    tiny.long_mode(code)
    assert tiny.vcpu.run() is VcpuStop.HLT
    assert dev.writes == [(0, bytes.fromhex("78563412")), (16, bytes.fromhex("efbeadde"))]
    assert dev.reads == [(8, 4)]
    assert tiny.vcpu.exit_counts[EXIT_MMIO] == 3


def test_serial_prints_a_string_written_by_the_guest(tiny: TinyVm) -> None:
    from tests.unit.fakes import FakeTrigger
    from vmsh.devices.legacy.serial import Serial16550

    out: list[bytes] = []
    tiny.pio.insert(Serial16550(FakeTrigger(), out.append), 0x3F8, 8, name="__serial")
    tiny.mem.write(0x2000, b"Hello, vmsh!\n\x00")
    # A polling console driver: wait for LSR.THRE, then write the next byte.
    code = bytes.fromhex(
        "be0020"  # mov si, 0x2000
        "bafd03"  # next: mov dx, 0x3fd (LSR)
        "ec"  # wait: in al, dx
        "a820"  # test al, 0x20
        "74fb"  # jz wait
        "ac"  # lodsb
        "84c0"  # test al, al
        "7406"  # jz done
        "baf803"  # mov dx, 0x3f8
        "ee"  # out dx, al
        "ebed"  # jmp next
        "f4")  # done: hlt
    tiny.real_mode(code)
    assert tiny.vcpu.run() is VcpuStop.HLT
    assert b"".join(out) == b"Hello, vmsh!\n"


def test_registers_round_trip(tiny: TinyVm) -> None:
    tiny.long_mode(b"\xf4")
    regs = Regs(*(0x1111_0000_0000_0000 + i for i in range(16)), rip=CODE_ADDR + 0x10, rflags=0x202)
    tiny.fd.set_regs(regs)
    assert tiny.fd.get_regs() == regs
    sregs = tiny.fd.get_sregs()
    sregs.cr2 = 0xDEAD_B000
    tiny.fd.set_sregs(sregs)
    back = tiny.fd.get_sregs()
    assert back.cr2 == 0xDEAD_B000
    assert back.cs == sregs.cs and back.efer == sregs.efer and back.cr3 == sregs.cr3
    fpu = tiny.fd.get_fpu()
    fpu.fcw = 0x27F
    fpu.fsw = 0x1
    tiny.fd.set_fpu(fpu)
    back_fpu = tiny.fd.get_fpu()
    assert (back_fpu.fcw, back_fpu.fsw) == (0x27F, 0x1)
    tiny.fd.set_mxcsr(0x1F80 | 0x6000)  # rounding control: toward zero
    assert tiny.fd.get_mxcsr() == 0x7F80
    tiny.fd.set_msrs({0x174: 0x10, 0xC000_0082: 0xFFFF_FFFF_8100_0000})  # SYSENTER_CS, LSTAR
    assert tiny.fd.get_msrs([0x174, 0xC000_0082]) == {0x174: 0x10, 0xC000_0082: 0xFFFF_FFFF_8100_0000}


def test_registers_set_by_the_guest_are_read_back(tiny: TinyVm) -> None:
    # mov rax, 0x1122334455667788; mov r15, rax; hlt
    tiny.long_mode(bytes.fromhex("48b88877665544332211 4989c7 f4"))
    assert tiny.vcpu.run() is VcpuStop.HLT
    regs = tiny.fd.get_regs()
    assert regs.r15 == 0x1122334455667788
    assert regs.rip == CODE_ADDR + 14  # after the hlt


def test_kvm_run_releases_the_gil_and_kick_stops_the_vcpu(tiny: TinyVm) -> None:
    install_kick_handler()
    tiny.long_mode(b"\xeb\xfe")  # jmp $ (emulated on PVM, native elsewhere: never exits)
    done = threading.Event()
    tiny.vcpu.start(on_stop=lambda _v: done.set())
    # If KVM_RUN held the GIL this thread would not get to count at all.
    n = 0
    t_end = time.monotonic() + 0.3
    while time.monotonic() < t_end:
        n += 1
    assert n > 1000
    tiny.vcpu.kick()
    assert done.wait(5), "kick did not bring the vCPU out of KVM_RUN"
    assert tiny.vcpu.stop_reason is VcpuStop.KICKED and tiny.vcpu.error is None


def test_failed_ioctl_raises_kvm_error(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        vm.create_vcpu(0)
        with pytest.raises(KvmError, match="KVM_CREATE_VCPU 0"):
            vm.create_vcpu(0)  # the same id twice: EEXIST
    finally:
        vm.close()


def test_io_exit_count_is_kept(tiny: TinyVm) -> None:
    tiny.pio.insert(Recorder(), 0xE9, 1)
    tiny.real_mode(bytes.fromhex("e6e9 e6e9 e6e9 f4"))
    tiny.vcpu.run()
    assert tiny.vcpu.exit_counts[EXIT_IO] == 3


@pytest.mark.skipif(not __import__("vmsh.engine.pvm", fromlist=["x"]).is_pvm_host(), reason="PVM-specific")
def test_pvm_get_fpu_does_not_carry_mxcsr(tiny: TinyVm) -> None:
    """Documents the PVM host quirk that makes the MXCSR handlers use the XSAVE image."""
    tiny.fd.set_mxcsr(0x7F80)
    assert tiny.fd.get_fpu().mxcsr == 0
    fpu = tiny.fd.get_fpu()
    fpu.mxcsr = 0x1F80
    tiny.fd.set_fpu(fpu)
    assert tiny.fd.get_mxcsr() == 0x7F80


def test_memory_above_the_32bit_hole_registers_as_two_slots(kvm: Kvm) -> None:
    from vmsh.engine.memory import GuestMemoryMmap

    vm = kvm.create_vm()
    mem = GuestMemoryMmap.create((3 << 30) + (64 << 20))  # MAP_NORESERVE: costs nothing until touched
    try:
        assert [(r.start, r.size) for r in mem.regions] == [(0, 3 << 30), (4 << 30, 64 << 20)]
        mem.register(vm)
        mem.write(4 << 30, b"high")
        assert mem.read(4 << 30, 4) == b"high"
        with pytest.raises(Exception, match="not RAM"):
            mem.read(3 << 30, 1)
    finally:
        vm.close()
        mem.close()


def test_run_on_vcpu_reads_registers_while_the_guest_runs(tiny: TinyVm) -> None:
    install_kick_handler()
    tiny.long_mode(b"\xeb\xfe")  # jmp $
    done = threading.Event()
    tiny.vcpu.start(on_stop=lambda _v: done.set())
    seen: list[int] = []
    got = threading.Event()

    def take(v: object) -> None:
        seen.append(tiny.fd.get_regs().rip)
        got.set()

    tiny.vcpu.run_on_vcpu(take)
    assert got.wait(5)
    assert seen == [CODE_ADDR] and not done.is_set()  # the vCPU went back into the guest
    tiny.vcpu.kick()
    assert done.wait(5) and tiny.vcpu.stop_reason is VcpuStop.KICKED


def test_triple_fault_ends_the_run_as_shutdown(tiny: TinyVm) -> None:
    tiny.long_mode(bytes.fromhex("0f0b"))  # ud2 with a zero-length IDT: #UD -> #DF -> triple fault
    sregs = tiny.fd.get_sregs()
    sregs.idt.limit = 0
    tiny.fd.set_sregs(sregs)
    assert tiny.vcpu.run() is VcpuStop.SHUTDOWN


def test_vcpu_thread_is_pinned_when_asked(tiny: TinyVm) -> None:
    import os

    install_kick_handler()
    cpu = sorted(os.sched_getaffinity(0))[-1]
    seen: list[set[int]] = []
    tiny.long_mode(b"\xeb\xfe")
    done = threading.Event()
    tiny.vcpu.start(on_stop=lambda _v: done.set(), affinity={cpu})
    got = threading.Event()
    tiny.vcpu.run_on_vcpu(lambda _v: (seen.append(os.sched_getaffinity(0)), got.set()))
    assert got.wait(5)
    tiny.vcpu.kick()
    assert done.wait(5)
    assert seen == [{cpu}]
