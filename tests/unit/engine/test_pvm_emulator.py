"""The x86 decoder and emulator (what the PVM handler runs) on byte strings, and the page walker on fake memory."""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakePhysMemory
from vmsh.engine.kvm_types import Fpu, Regs
from vmsh.engine.paging import PTE_P, PTE_PS, PTE_RW, PageFault, PagingMode, read_virt, translate
from vmsh.engine.x86.decode import MODE_32, MODE_64, UnknownInstruction, decode
from vmsh.engine.x86.emulate import RFLAGS_AC, RFLAGS_CF, RFLAGS_SF, RFLAGS_ZF, Emulator

LONG_MODE = PagingMode(cr0=0x80000011, cr3=0x1000, cr4=0x20, efer=0x500)


class FakeAccess:
    """Flat guest: virtual == physical, with an FPU and MXCSR."""

    def __init__(self) -> None:
        self.mem = FakePhysMemory(0x10000)
        self.fpu = Fpu(fsw=0x80FF, ftwx=0xFF)
        self.mxcsr = 0x1F80

    def read_virt(self, gva: int, length: int) -> bytes:
        return self.mem.read(gva, length)

    def write_virt(self, gva: int, data: bytes) -> None:
        self.mem.write(gva, data)

    def get_fpu(self) -> Fpu:
        return self.fpu

    def set_fpu(self, fpu: Fpu) -> None:
        self.fpu = fpu

    def get_mxcsr(self) -> int:
        return self.mxcsr

    def set_mxcsr(self, value: int) -> None:
        self.mxcsr = value


def run(hexbytes: str, mode: int = MODE_64, access: FakeAccess | None = None,
        **gprs: int) -> tuple[Regs, str, FakeAccess]:
    access = access or FakeAccess()
    gprs.setdefault("rflags", 2)
    regs = Regs(rip=0x1000, **gprs)
    code = bytes.fromhex(hexbytes)
    kind = Emulator(regs, mode, access, {"fs": 0x8000, "gs": 0x9000}).execute(decode(code + bytes(15), mode))
    return regs, kind, access


# -- decoder -------------------------------------------------------------------------------

@pytest.mark.parametrize("hexbytes,length", [
    ("cc", 1), ("9b", 1), ("dbe2", 2), ("0f77", 2), ("0f01ca", 3), ("0f01cb", 3),
    ("f30fb8d8", 4), ("f3480fb81c24", 6), ("f3410fb8c0", 5), ("66f30fb8c0", 5),
    ("db0424", 3), ("db8424 78563412", 7), ("0fae1424", 4), ("0fae5c2410", 5),
    ("c4e271f7d8", 5), ("c4e2f3f77c2408", 7), ("c4e37bf0c105", 6), ("c4e2f3f71d 00100000", 9),
    ("64f30fb80425 10000000", 10), ("c5f8ae1424", 5),
])
def test_decoder_lengths(hexbytes: str, length: int) -> None:
    assert decode(bytes.fromhex(hexbytes) + bytes(8), MODE_64).length == length


def test_decoder_sib_with_index_scale_and_disp32() -> None:
    insn = decode(bytes.fromhex("f34a0fb89cc8 44332211"), MODE_64)  # popcnt rbx, [rax+r9*8+0x11223344]
    assert insn.rm is not None
    assert (insn.rm.base, insn.rm.index, insn.rm.scale, insn.rm.disp) == (0, 9, 8, 0x11223344)
    assert insn.opsize == 64 and insn.reg == 3


def test_decoder_rsp_base_has_no_index() -> None:
    insn = decode(bytes.fromhex("f30fb80c24"), MODE_64)
    assert insn.rm is not None and insn.rm.base == 4 and insn.rm.index is None


def test_decoder_unknown_opcode_raises() -> None:
    with pytest.raises(UnknownInstruction):
        decode(bytes.fromhex("0fa2") + bytes(8), MODE_64)  # cpuid: not a handled opcode


def test_known_opcode_with_unhandled_form_raises_on_execute() -> None:
    with pytest.raises(UnknownInstruction):
        run("480fae2c24")  # xrstor shares 0f ae with ldmxcsr/stmxcsr


def test_decoder_truncated_raises() -> None:
    with pytest.raises(UnknownInstruction, match="truncated"):
        decode(bytes.fromhex("f30fb8"), MODE_64)


# -- emulator ------------------------------------------------------------------------------

def test_popcnt_32_zero_extends_and_clears_flags() -> None:
    regs, kind, _ = run("f30fb8d8", rax=0xF0F0, rbx=0xFFFF_FFFF_0000_0000)
    assert (kind, regs.rbx, regs.rip) == ("popcnt", 8, 0x1004)
    assert not regs.rflags & (RFLAGS_ZF | RFLAGS_CF)


def test_popcnt_16_merges_low_word() -> None:
    regs, _, _ = run("66f30fb8d8", rax=0xFFFF_0003, rbx=0xAAAA_BBBB_CCCC_DDDD)
    assert regs.rbx == 0xAAAA_BBBB_CCCC_0002


def test_popcnt_memory_with_sib_and_rex_extension() -> None:
    acc = FakeAccess()
    acc.mem.write(0x2000 + 3 * 4 + 0x10, (0x7).to_bytes(8, "little"))
    regs, _, _ = run("f34e0fb8449810", access=acc, rax=0x2000, r11=3)  # popcnt r8, [rax+r11*4+0x10]
    assert regs.r8 == 3


def test_popcnt_rip_relative() -> None:
    acc = FakeAccess()
    acc.mem.write(0x1000 + 8 + 0x100, (0xFF).to_bytes(4, "little"))
    regs, _, _ = run("f30fb80500010000", access=acc)  # popcnt eax, [rip+0x100]
    assert regs.rax == 8


def test_popcnt_fs_segment_override() -> None:
    acc = FakeAccess()
    acc.mem.write(0x8000 + 0x20, (0x3).to_bytes(8, "little"))
    regs, _, _ = run("64f3480fb80425 20000000", access=acc)  # popcnt rax, fs:[0x20]
    assert regs.rax == 2


def test_popcnt_zero_sets_zf() -> None:
    regs, _, _ = run("f3480fb8c3", rbx=0, rflags=0)  # popcnt rax, rbx
    assert regs.rflags & RFLAGS_ZF and regs.rax == 0


def test_int3_advances_rip_only() -> None:
    regs, kind, _ = run("cc")
    assert (kind, regs.rip) == ("int3", 0x1001)


def test_clac_stac() -> None:
    regs, kind, _ = run("0f01cb")
    assert kind == "stac" and regs.rflags & RFLAGS_AC and regs.rip == 0x1003
    regs, kind, _ = run("0f01ca", rflags=2 | RFLAGS_AC)
    assert kind == "clac" and not regs.rflags & RFLAGS_AC


def test_fnclex_emms_fwait_fild() -> None:
    regs, kind, acc = run("dbe2")
    assert kind == "fnclex" and acc.fpu.fsw == 0 and regs.rip == 0x1002
    _, kind, acc = run("0f77")
    assert kind == "emms" and acc.fpu.ftwx == 0
    regs, kind, _ = run("9b")
    assert kind == "fwait" and regs.rip == 0x1001
    regs, kind, _ = run("db442408")  # fild dword [rsp+8]
    assert kind == "fild" and regs.rip == 0x1004


def test_ldmxcsr_and_stmxcsr_memory() -> None:
    acc = FakeAccess()
    acc.mem.write(0x3000, (0x7F80).to_bytes(4, "little"))
    _, kind, _ = run("0fae10", access=acc, rax=0x3000)  # ldmxcsr [rax]
    assert kind == "ldmxcsr" and acc.mxcsr == 0x7F80
    _, kind, _ = run("0fae5808", access=acc, rax=0x3000)  # stmxcsr [rax+8]
    assert kind == "stmxcsr" and acc.mem.read(0x3008, 4) == (0x7F80).to_bytes(4, "little")


@pytest.mark.parametrize("hexbytes,gprs,reg,expect,kind", [
    ("c4e271f7d8", {"rax": 1, "rcx": 35}, "rbx", 1 << 3, "shlx"),  # 32-bit count masked to 5 bits
    ("c4e2f1f7d8", {"rax": 1, "rcx": 35}, "rbx", 1 << 35, "shlx"),  # 64-bit
    ("c4e272f7d8", {"rax": 0x8000_0000, "rcx": 4}, "rbx", 0xF800_0000, "sarx"),
    ("c4e2f2f7d8", {"rax": 1 << 63, "rcx": 63}, "rbx", (1 << 64) - 1, "sarx"),
    ("c4e273f7d8", {"rax": 0x8000_0000, "rcx": 4}, "rbx", 0x0800_0000, "shrx"),
    ("c4e3fbf0d804", {"rax": 0x1}, "rbx", 1 << 60, "rorx"),  # rorx rbx, rax, 4
    ("c4e270f5d8", {"rax": 0xFFFF, "rcx": 4}, "rbx", 0xF, "bzhi"),
    ("c4e2f3f5d8", {"rcx": 0b101, "rax": 0b11010}, "rbx", 0b10010, "pdep"),  # pdep rbx, rcx, rax
    ("c4e2f2f5d8", {"rcx": 0b10010, "rax": 0b11010}, "rbx", 0b101, "pext"),  # pext rbx, rcx, rax
    ("c4e270f2d8", {"rcx": 0xF0, "rax": 0xFF}, "rbx", 0x0F, "andn"),  # andn ebx, ecx, eax
    ("c4e270f7d8", {"rax": 0xABCD, "rcx": 0x0804}, "rbx", 0xBC, "bextr"),  # start 4, len 8
])
def test_bmi_register_forms(hexbytes: str, gprs: dict[str, int], reg: str, expect: int, kind: str) -> None:
    regs, k, _ = run(hexbytes, **gprs)
    assert k == kind
    assert getattr(regs, reg) == expect


def test_shlx_memory_operand_and_no_flag_change() -> None:
    acc = FakeAccess()
    acc.mem.write(0x4010, (3).to_bytes(8, "little"))
    regs, kind, _ = run("c4e2f1f75c2410", access=acc, rsp=0x4000, rcx=2, rflags=2 | RFLAGS_CF)
    assert kind == "shlx" and regs.rbx == 12 and regs.rflags & RFLAGS_CF


def test_mulx_writes_high_and_low() -> None:
    regs, kind, _ = run("c4e2f3f6d8", rdx=1 << 63, rax=4)  # mulx rbx, rcx, rax
    assert kind == "mulx" and regs.rbx == 2 and regs.rcx == 0


def test_blsr_blsmsk_blsi_write_vvvv_and_flags() -> None:
    regs, kind, _ = run("c4e2f0f3c8", rax=0b1100)  # blsr rcx, rax
    assert kind == "blsr" and regs.rcx == 0b1000
    regs, kind, _ = run("c4e2f0f3d0", rax=0b1100)  # blsmsk rcx, rax
    assert kind == "blsmsk" and regs.rcx == 0b0111 and not regs.rflags & RFLAGS_ZF
    regs, kind, _ = run("c4e2f0f3d8", rax=0b1100)  # blsi rcx, rax
    assert kind == "blsi" and regs.rcx == 0b0100 and regs.rflags & RFLAGS_CF


def test_bzhi_index_past_width_sets_cf() -> None:
    regs, _, _ = run("c4e2f0f5d8", rax=1 << 63, rcx=64)
    assert regs.rbx == 1 << 63 and regs.rflags & RFLAGS_CF and regs.rflags & RFLAGS_SF


def test_32bit_mode_popcnt_and_shlx() -> None:
    regs, kind, _ = run("f30fb8d8", mode=MODE_32, rax=0xFF)
    assert (kind, regs.rbx, regs.rip) == ("popcnt", 8, 0x1004)
    regs, kind, _ = run("c4e271f7d8", mode=MODE_32, rax=1, rcx=4)
    assert (kind, regs.rbx) == ("shlx", 16)


def test_unknown_vex_opcode_raises() -> None:
    with pytest.raises(UnknownInstruction):
        run("c4e279f0d8")  # movbe-like slot, not handled


# -- page walker ---------------------------------------------------------------------------

def build_tables(mem: FakePhysMemory) -> None:
    # CR3 0x1000 -> PML4[0] -> PDPT 0x2000; PDPT[0] -> PD 0x3000; PD[0] -> PT 0x4000;
    # PT[5] -> page 0x7000 (read-only); PD[1] -> 2 MiB page at 0x200000; PDPT[1] -> 1 GiB page at 0.
    mem.write_u64(0x1000, 0x2000 | PTE_P | PTE_RW)
    mem.write_u64(0x2000, 0x3000 | PTE_P | PTE_RW)
    mem.write_u64(0x2008, 0x0 | PTE_P | PTE_RW | PTE_PS)
    mem.write_u64(0x3000, 0x4000 | PTE_P | PTE_RW)
    mem.write_u64(0x3008, 0x200000 | PTE_P | PTE_RW | PTE_PS)
    mem.write_u64(0x4000 + 5 * 8, 0x7000 | PTE_P)
    mem.write_u64(0x4000 + 6 * 8, 0x8000 | PTE_P | PTE_RW)


def test_walker_4k_2m_1g_pages() -> None:
    mem = FakePhysMemory(0x10000)
    build_tables(mem)
    assert translate(LONG_MODE, 0x5123, mem.read_u64) == 0x7123
    assert translate(LONG_MODE, 0x2ABCDE, mem.read_u64) == 0x2ABCDE
    assert translate(LONG_MODE, (1 << 30) + 0x1234, mem.read_u64) == 0x1234


def test_walker_not_present_and_read_only_fault() -> None:
    mem = FakePhysMemory(0x10000)
    build_tables(mem)
    with pytest.raises(PageFault) as exc:
        translate(LONG_MODE, 0x9000, mem.read_u64)
    assert exc.value.error_code == 0
    with pytest.raises(PageFault) as exc:
        translate(LONG_MODE, 0x5000, mem.read_u64, write=True)
    assert exc.value.error_code == 3


def test_walker_read_crossing_pages() -> None:
    mem = FakePhysMemory(0x10000)
    build_tables(mem)
    mem.write(0x7FFE, b"ab")
    mem.write(0x8000, b"cd")
    assert read_virt(LONG_MODE, 0x5FFE, 4, mem.read_u64, mem.read) == b"abcd"


def test_walker_paging_off_is_identity() -> None:
    mode = PagingMode(cr0=0x11, cr3=0, cr4=0, efer=0)
    assert translate(mode, 0x123456, lambda _a: 0) == 0x123456
