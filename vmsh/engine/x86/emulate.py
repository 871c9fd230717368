"""Execution of decoded x86 instructions on a register file and a guest-access interface.

The handled set (what a PVM host's in-kernel emulator lacks, see ``vmsh/engine/pvm.py``):

==========================  ================================================================
``cc``                      INT3: rip += 1 (the caller delivers #BP)
``0f 01 ca`` / ``cb``       CLAC / STAC: clear / set RFLAGS.AC
``f3 [REX] 0f b8 /r``       POPCNT
``9b``, ``db e2``, ``0f 77``  FWAIT (no-op), FNCLEX (clear FSW exceptions), EMMS (tags empty)
``db /0``                   FILD m32: skipped (x87 not modelled)
``0f ae /2``, ``/3``        LDMXCSR / STMXCSR, and their VEX forms
VEX ``0f38 f7``             SHLX / SARX / SHRX / BEXTR
VEX ``0f38 f5/f6/f2/f3``    BZHI, PDEP, PEXT, MULX, ANDN, BLSR/BLSMSK/BLSI
VEX ``0f3a f0``             RORX
==========================  ================================================================

Semantics: Intel SDM vol. 2 (POPCNT, BMI1/BMI2 in ch. 3-5), vol. 1 §3.4.3 (RFLAGS), §10.5.1 (the
abridged FXSAVE tag byte).
"""

from __future__ import annotations

from typing import Protocol

from vmsh.engine.x86.decode import MODE_64, Insn, Operand, UnknownInstruction, sign_extend

# RFLAGS bits (SDM vol. 1 §3.4.3)
RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18  # alignment check / SMAP override (CLAC/STAC)
_ARITH_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

# FSW exception bits cleared by FNCLEX: IE..PE (bits 0-5), SF (6), ES (7), B (15)
FSW_EXCEPTION_MASK = 0x80FF

#: general-purpose register names in x86 encoding order (ModRM reg/rm values 0..15)
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class RegisterFile(Protocol):
    """The general-purpose registers, rip and rflags (KVM's ``struct kvm_regs`` has this shape)."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


class X87State(Protocol):
    """The part of the FXSAVE image the emulator changes."""

    fsw: int
    #: abridged tag byte (one bit per register, 1 = valid)
    ftwx: int


class GuestAccess(Protocol):
    """What the emulator needs from the CPU besides its general registers."""

    def read_virt(self, gva: int, length: int) -> bytes:
        """Read guest virtual memory."""
        ...

    def write_virt(self, gva: int, data: bytes) -> None:
        """Write guest virtual memory."""
        ...

    def get_fpu(self) -> X87State:
        """The x87/SSE state."""
        ...

    def set_fpu(self, fpu: X87State) -> None:
        """Replace the x87/SSE state with ``fpu``, an object ``get_fpu`` returned."""
        ...

    def get_mxcsr(self) -> int:
        """MXCSR."""
        ...

    def set_mxcsr(self, value: int) -> None:
        """Replace MXCSR."""
        ...


def _mask(bits: int) -> int:
    return (1 << bits) - 1


class Emulator:
    """Executes one decoded instruction against a ``RegisterFile`` and a ``GuestAccess``.

    :param regs: modified in place (results, flags, rip).
    :param mode: 16, 32 or 64.
    :param segment_bases: base of each segment register by name (FS/GS matter in 64-bit mode).
    """

    def __init__(self, regs: RegisterFile, mode: int, access: GuestAccess,
                 segment_bases: dict[str, int] | None = None) -> None:
        self.regs = regs
        self.mode = mode
        self.access = access
        self.segment_bases = segment_bases or {}

    # -- operands ----------------------------------------------------------------------------

    def gpr(self, n: int, bits: int = 64) -> int:
        """Read register number ``n`` (x86 encoding order) truncated to ``bits``."""
        value: int = getattr(self.regs, GPR_NAMES[n])
        return value & _mask(bits)

    def set_gpr(self, n: int, value: int, bits: int) -> None:
        """Write a register with x86 semantics: 32-bit writes zero-extend, 16-bit writes merge."""
        name = GPR_NAMES[n]
        if bits == 16:
            old: int = getattr(self.regs, name)
            value = (old & ~0xFFFF) | (value & 0xFFFF)
        setattr(self.regs, name, value & (_mask(64) if bits in (64, 16) else _mask(32)))

    def address(self, insn: Insn, op: Operand) -> int:
        """The linear address of memory operand ``op``."""
        ea = op.disp
        if op.base is not None:
            ea += self.gpr(op.base)
        if op.index is not None:
            ea += self.gpr(op.index) * op.scale
        if op.rip_relative:
            ea += self.regs.rip + insn.length
        ea &= _mask(insn.addrsize)
        segment = op.segment
        if segment is None:
            segment = "ss" if op.base in (4, 5) else "ds"
        if self.mode == MODE_64 and segment not in ("fs", "gs"):
            return ea  # 64-bit mode ignores the other segment bases (SDM vol. 1 §3.3.7.1)
        return (ea + self.segment_bases.get(segment, 0)) & _mask(64)

    def read_rm(self, insn: Insn, bits: int) -> int:
        """The value of the r/m operand."""
        op = insn.rm
        if op is None:
            raise UnknownInstruction("no r/m operand")
        if op.reg is not None:
            return self.gpr(op.reg, bits)
        return int.from_bytes(self.access.read_virt(self.address(insn, op), bits // 8), "little")

    def write_rm_mem(self, insn: Insn, value: int, bits: int) -> None:
        """Store to a memory r/m operand."""
        op = insn.rm
        if op is None or op.reg is not None:
            raise UnknownInstruction("a register where a memory operand is required")
        self.access.write_virt(self.address(insn, op), (value & _mask(bits)).to_bytes(bits // 8, "little"))

    def set_flags(self, value: int, bits: int, cf: bool = False) -> None:
        """Logical-result flags: ZF and SF from ``value``, CF as given, OF/AF/PF cleared."""
        f = self.regs.rflags & ~_ARITH_FLAGS
        value &= _mask(bits)
        if value == 0:
            f |= RFLAGS_ZF
        if value >> (bits - 1):
            f |= RFLAGS_SF
        if cf:
            f |= RFLAGS_CF
        self.regs.rflags = f

    # -- the instructions ----------------------------------------------------------------------

    def execute(self, insn: Insn) -> str:
        """Carry out ``insn``, advance rip; returns the instruction's kind (``"popcnt"``, ...).

        :raises UnknownInstruction: if ``insn`` decodes but is not one the emulator runs.
        """
        kind = self._execute(insn)
        self.regs.rip = (self.regs.rip + insn.length) & (_mask(64) if self.mode == MODE_64 else _mask(32))
        return kind

    def _execute(self, insn: Insn) -> str:
        m, op = insn.opmap, insn.opcode
        if insn.vex:
            return self._vex(insn)
        if insn.lock:
            raise UnknownInstruction("LOCK prefix")
        if m == 0 and op == 0xCC:
            return "int3"
        if m == 0 and op == 0x9B:
            return "fwait"
        if m == 0 and op == 0xDB and insn.rm is not None:
            rm = insn.rm
            if rm.reg is not None and rm.reg & 7 == 2 and insn.reg & 7 == 4:  # db e2
                fpu = self.access.get_fpu()
                fpu.fsw &= ~FSW_EXCEPTION_MASK
                self.access.set_fpu(fpu)
                return "fnclex"
            if rm.reg is None and insn.reg & 7 == 0:
                # FILD m32: observed only in boot paths that survive it being skipped; the
                # x87 stack is not modelled (tests/engine/test_pvm.py).
                return "fild"
        if m == 1 and op == 0x77:
            fpu = self.access.get_fpu()
            fpu.ftwx = 0  # EMMS: all x87 tags empty (abridged FXSAVE tag byte, SDM vol. 1 §10.5.1)
            self.access.set_fpu(fpu)
            return "emms"
        if m == 1 and op == 0x01 and insn.rm is not None and insn.rm.reg is not None:
            # 0f 01 ca / cb: mod=3, reg=1, rm=2 / 3
            if insn.reg & 7 == 1 and insn.rm.reg & 7 == 2:
                self.regs.rflags &= ~RFLAGS_AC
                return "clac"
            if insn.reg & 7 == 1 and insn.rm.reg & 7 == 3:
                self.regs.rflags |= RFLAGS_AC
                return "stac"
        if m == 1 and op == 0xAE and insn.has_memory_operand and not insn.rep:
            if insn.reg & 7 == 2:
                self.access.set_mxcsr(self.read_rm(insn, 32))
                return "ldmxcsr"
            if insn.reg & 7 == 3:
                self.write_rm_mem(insn, self.access.get_mxcsr(), 32)
                return "stmxcsr"
        if m == 1 and op == 0xB8 and insn.rep == 0xF3:
            bits = insn.opsize
            src = self.read_rm(insn, bits)
            result = bin(src).count("1")
            self.set_gpr(insn.reg, result, bits)
            # POPCNT: ZF = (src == 0); CF, OF, SF, AF, PF cleared.
            self.regs.rflags = (self.regs.rflags & ~_ARITH_FLAGS) | (RFLAGS_ZF if src == 0 else 0)
            return "popcnt"
        raise UnknownInstruction(f"opcode map {m} byte {op:#04x}")

    def _vex(self, insn: Insn) -> str:
        m, op, pp = insn.opmap, insn.opcode, insn.vex_pp
        bits = 64 if insn.vex_w and self.mode == MODE_64 else 32
        mask = _mask(bits)
        if m == 1 and op == 0xAE and pp == 0 and insn.has_memory_operand:
            if insn.reg & 7 == 2:  # VLDMXCSR
                self.access.set_mxcsr(self.read_rm(insn, 32))
                return "ldmxcsr"
            if insn.reg & 7 == 3:  # VSTMXCSR
                self.write_rm_mem(insn, self.access.get_mxcsr(), 32)
                return "stmxcsr"
        if insn.vex_l:
            raise UnknownInstruction("VEX.L=1 form")
        if m == 2 and op == 0xF7:
            src = self.read_rm(insn, bits)
            ctl = self.gpr(insn.vvvv, bits)
            if pp == 0:  # BEXTR r, r/m, v: start = ctl[7:0], len = ctl[15:8]
                start, length = ctl & 0xFF, (ctl >> 8) & 0xFF
                result = (src >> start) & _mask(min(length, bits)) if start < bits else 0
                self.set_gpr(insn.reg, result, bits)
                self.set_flags(result, bits)
                self.regs.rflags &= ~RFLAGS_SF
                return "bextr"
            count = ctl & (bits - 1)
            if pp == 1:  # 66: SHLX
                result = (src << count) & mask
                kind = "shlx"
            elif pp == 2:  # F3: SARX
                result = (sign_extend(src, bits) >> count) & mask
                kind = "sarx"
            else:  # F2: SHRX
                result = src >> count
                kind = "shrx"
            self.set_gpr(insn.reg, result, bits)  # no flags change (SDM: "Flags Affected: None")
            return kind
        if m == 3 and op == 0xF0 and pp == 3:  # RORX r, r/m, imm8
            src = self.read_rm(insn, bits)
            count = insn.imm & (bits - 1)
            result = ((src >> count) | (src << (bits - count))) & mask
            self.set_gpr(insn.reg, result, bits)
            return "rorx"
        if m == 2 and op == 0xF5:
            if pp == 0:  # BZHI r, r/m, v
                src = self.read_rm(insn, bits)
                n = self.gpr(insn.vvvv, 8)
                if n < bits:
                    result, cf = src & _mask(n), False
                else:
                    result, cf = src, True
                self.set_gpr(insn.reg, result, bits)
                self.set_flags(result, bits, cf)
                return "bzhi"
            if pp in (2, 3):  # F3: PEXT, F2: PDEP   r, v(source), r/m(mask)
                src = self.gpr(insn.vvvv, bits)
                sel = self.read_rm(insn, bits)
                result = parallel_extract(src, sel) if pp == 2 else parallel_deposit(src, sel)
                self.set_gpr(insn.reg, result & mask, bits)
                return "pext" if pp == 2 else "pdep"
        if m == 2 and op == 0xF6 and pp == 3:  # MULX r_hi, v_lo, r/m  (times rdx/edx)
            product = self.gpr(2, bits) * self.read_rm(insn, bits)
            self.set_gpr(insn.vvvv, product & mask, bits)
            self.set_gpr(insn.reg, product >> bits, bits)  # high half wins when both are one register
            return "mulx"
        if m == 2 and op == 0xF2 and pp == 0:  # ANDN r, v, r/m
            result = ~self.gpr(insn.vvvv, bits) & self.read_rm(insn, bits) & mask
            self.set_gpr(insn.reg, result, bits)
            self.set_flags(result, bits)
            return "andn"
        if m == 2 and op == 0xF3 and pp == 0 and insn.reg & 7 in (1, 2, 3):  # BMI1 group 17 -> v
            src = self.read_rm(insn, bits)
            sub = insn.reg & 7
            if sub == 1:  # BLSR: reset lowest set bit
                result, cf, kind = (src - 1) & src & mask, src == 0, "blsr"
            elif sub == 2:  # BLSMSK: mask up to lowest set bit
                result, cf, kind = ((src - 1) ^ src) & mask, src == 0, "blsmsk"
            else:  # BLSI: isolate lowest set bit
                result, cf, kind = (-src) & src & mask, src != 0, "blsi"
            self.set_gpr(insn.vvvv, result, bits)
            self.set_flags(result, bits, cf)
            if kind == "blsmsk":
                self.regs.rflags &= ~RFLAGS_ZF  # BLSMSK: ZF always cleared
            return kind
        raise UnknownInstruction(f"VEX map {m} opcode {op:#04x} pp {pp}")


def parallel_extract(src: int, sel: int) -> int:
    """PEXT: the bits of ``src`` selected by ``sel``, packed from bit 0 up."""
    out, k = 0, 0
    while sel:
        low = sel & -sel
        if src & low:
            out |= 1 << k
        k += 1
        sel ^= low
    return out


def parallel_deposit(src: int, sel: int) -> int:
    """PDEP: the low bits of ``src`` scattered to the positions set in ``sel``."""
    out, k = 0, 0
    while sel:
        low = sel & -sel
        if src >> k & 1:
            out |= low
        k += 1
        sel ^= low
    return out
