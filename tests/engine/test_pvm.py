"""The PVM instruction handler against real KVM: each instruction ``vmsh/engine/pvm.py`` completes.

On this project's PVM hosts each of these instructions ends KVM_RUN with an emulation failure
and the handler completes it; on hardware KVM they run natively and the same end state is
checked, only the handler counts differ.
"""

from __future__ import annotations

import struct

import pytest

from tests.engine.conftest import CODE_ADDR, STACK_TOP, TinyVm
from vmsh.engine.pvm import PvmHandler, is_pvm_host
from vmsh.engine.vcpu import VcpuStop
from vmsh.errors import KvmError

PVM = is_pvm_host()
RFLAGS_AC = 1 << 18
RFLAGS_ZF = 1 << 6


def run(tiny: TinyVm, code: bytes, **gprs: int) -> PvmHandler:
    handler = PvmHandler(tiny.mem)
    tiny.vcpu.on_internal_error = handler
    tiny.long_mode(code + b"\xf4", **gprs)
    assert tiny.vcpu.run() is VcpuStop.HLT
    return handler


def expect_counts(handler: PvmHandler, **counts: int) -> None:
    if PVM:
        assert dict(handler.counts) == counts


def test_popcnt_register(tiny: TinyVm) -> None:
    h = run(tiny, bytes.fromhex("f30fb8d8"), rax=0xFF00FF, rbx=0xDEAD_0000_0000_0000)  # popcnt ebx, eax
    regs = tiny.fd.get_regs()
    assert regs.rbx == 16  # 32-bit destination zero-extends
    assert not regs.rflags & RFLAGS_ZF
    expect_counts(h, popcnt=1)


def test_popcnt_memory_operand_through_page_tables(tiny: TinyVm) -> None:
    tiny.mem.write_u64(STACK_TOP + 8, 0xFFFF_FFFF_FFFF_FFFF)
    h = run(tiny, bytes.fromhex("f3480fb85c2408"))  # popcnt rbx, [rsp+8]
    assert tiny.fd.get_regs().rbx == 64
    expect_counts(h, popcnt=1)


def test_popcnt_of_zero_sets_zf(tiny: TinyVm) -> None:
    run(tiny, bytes.fromhex("f3480fb8d8"), rax=0, rbx=5)  # popcnt rbx, rax
    regs = tiny.fd.get_regs()
    assert regs.rbx == 0 and regs.rflags & RFLAGS_ZF


def test_int3_is_delivered_to_the_guest_as_bp(tiny: TinyVm) -> None:
    handler_addr = CODE_ADDR + 0x100
    # #BP handler: mov r8, [rsp] (the pushed rip); mov r9, 0x42; iretq
    tiny.mem.write(handler_addr, bytes.fromhex("4c8b0424 49c7c142000000 48cf"))
    handler = PvmHandler(tiny.mem)
    tiny.vcpu.on_internal_error = handler
    tiny.long_mode(bytes.fromhex("cc 49c7c207000000 f4"))  # int3; mov r10, 7; hlt
    tiny.set_idt_gate(3, handler_addr)
    assert tiny.vcpu.run() is VcpuStop.HLT
    regs = tiny.fd.get_regs()
    assert regs.r8 == CODE_ADDR + 1  # trap: the saved rip is after the cc byte
    assert regs.r9 == 0x42 and regs.r10 == 7
    expect_counts(handler, int3=1)


def test_stac_then_clac_flip_rflags_ac(tiny: TinyVm) -> None:
    h = run(tiny, bytes.fromhex("0f01cb 9c 58 0f01ca"))  # stac; pushfq; pop rax; clac
    regs = tiny.fd.get_regs()
    assert regs.rax & RFLAGS_AC
    assert not regs.rflags & RFLAGS_AC
    expect_counts(h, stac=1, clac=1)


def test_x87_housekeeping_instructions_are_completed(tiny: TinyVm) -> None:
    # fwait; fnclex; emms; fild dword [rsp]; mov r11, 1
    h = run(tiny, bytes.fromhex("9b dbe2 0f77 db0424 49c7c301000000"))
    assert tiny.fd.get_regs().r11 == 1
    expect_counts(h, fwait=1, fnclex=1, emms=1, fild=1)


def test_ldmxcsr_and_stmxcsr(tiny: TinyVm) -> None:
    tiny.mem.write_u32(STACK_TOP, 0x7F80)
    # ldmxcsr [rsp]; stmxcsr [rsp+16]
    h = run(tiny, bytes.fromhex("0fae1424 0fae5c2410"))
    assert tiny.mem.read_u32(STACK_TOP + 16) == 0x7F80
    assert tiny.fd.get_mxcsr() == 0x7F80
    expect_counts(h, ldmxcsr=1, stmxcsr=1)


def test_bmi2_shifts_register_and_memory_forms(tiny: TinyVm) -> None:
    tiny.mem.write_u64(STACK_TOP + 8, 0x8000_0000_0000_0000)
    code = bytes.fromhex(
        "c4e271f7d8"  # shlx ebx, eax, ecx
        "c4e2f2f7f0"  # sarx rsi, rax, rcx
        "c4e2f3f77c2408")  # shrx rdi, [rsp+8], rcx
    h = run(tiny, code, rax=0xFFFF_FFFF_FFFF_FFF1, rcx=4)
    regs = tiny.fd.get_regs()
    assert regs.rbx == 0xFFFF_FF10
    assert regs.rsi == 0xFFFF_FFFF_FFFF_FFFF
    assert regs.rdi == 0x0800_0000_0000_0000
    expect_counts(h, shlx=1, sarx=1, shrx=1)


@pytest.mark.skipif(not PVM, reason="runs natively on hardware KVM")
def test_unknown_instruction_stops_with_bytes_and_rip(tiny: TinyVm) -> None:
    handler = PvmHandler(tiny.mem)
    tiny.vcpu.on_internal_error = handler
    tiny.long_mode(bytes.fromhex("480fae2c24 f4"))  # xrstor [rsp]
    with pytest.raises(KvmError, match=r"rip 0x100000: 48 0f ae 2c 24"):
        tiny.vcpu.run()
    assert tiny.fd.get_regs().rip == CODE_ADDR
    assert handler.counts["unknown"] == 1


@pytest.mark.skipif(not PVM, reason="runs natively on hardware KVM")
def test_without_handler_an_emulation_failure_is_fatal(tiny: TinyVm) -> None:
    tiny.long_mode(bytes.fromhex("f30fb8d8 f4"))
    with pytest.raises(KvmError, match=r"emulation failure at rip 0x100000, instruction bytes f3 0f b8 d8"):
        tiny.vcpu.run()


@pytest.mark.skipif(not PVM, reason="PVM only")
def test_bp_handler_counts_and_stack_frame(tiny: TinyVm) -> None:
    """The #BP frame: rip, cs, rflags, rsp, ss pushed on the current stack (SDM vol. 3A §6.14.2)."""
    handler_addr = CODE_ADDR + 0x100
    tiny.mem.write(handler_addr, bytes.fromhex("f4"))  # hlt inside the handler
    tiny.vcpu.on_internal_error = PvmHandler(tiny.mem)
    tiny.long_mode(bytes.fromhex("cc f4"))
    tiny.set_idt_gate(3, handler_addr)
    assert tiny.vcpu.run() is VcpuStop.HLT
    regs = tiny.fd.get_regs()
    rip, cs, _rflags, rsp, _ss = struct.unpack("<5Q", tiny.mem.read(regs.rsp, 40))
    assert (rip, cs, rsp) == (CODE_ADDR + 1, 0x08, STACK_TOP)


@pytest.mark.skipif(not PVM, reason="PVM only")
def test_pvm_does_not_emulate_some_sse_at_cpl0(tiny: TinyVm) -> None:
    """Found here: movq xmm0, r12 fails emulation (movdqa xmm0, xmm1 does not); the handler
    reports it rather than spinning. A kernel using SSE in kernel mode would stop on it."""
    tiny.vcpu.on_internal_error = PvmHandler(tiny.mem)
    tiny.long_mode(bytes.fromhex("664d0f6ec4 f4"))
    with pytest.raises(KvmError, match=r"66 4d 0f 6e c4"):
        tiny.vcpu.run()
