"""PVM host support: detection, and the instructions PVM's emulator cannot run.

On a PVM host (``/dev/kvm`` from the ``kvm_pvm`` module, a software hypervisor) every guest
instruction at CPL0 goes through KVM's instruction emulator, and a few instructions are not
implemented there: ``KVM_RUN`` returns ``KVM_EXIT_INTERNAL_ERROR`` / emulation failure with the
instruction bytes, and re-entering fails again at the same rip (reference/pvm-host.md,
"Correctness"). ``PvmHandler`` completes those instructions in the VMM:

==========================  ================================================================
``cc``                      INT3: rip += 1, then #BP injected with KVM_SET_VCPU_EVENTS
``0f 01 ca`` / ``cb``       CLAC / STAC: clear / set RFLAGS.AC
``f3 [REX] 0f b8 /r``       POPCNT
``9b``, ``db e2``, ``0f 77``  FWAIT (no-op), FNCLEX (clear FSW exceptions), EMMS (tags empty)
``db /0``                   FILD m32: skipped (as observed to be survivable; x87 not modelled)
``0f ae /2``, ``/3``        LDMXCSR / STMXCSR through KVM_GET_XSAVE / KVM_SET_XSAVE (*)
VEX ``0f38 f7``             SHLX / SARX / SHRX / BEXTR
VEX ``0f38 f5/f6/f2/f3``    BZHI, PDEP, PEXT, MULX, ANDN, BLSR/BLSMSK/BLSI
VEX ``0f3a f0``             RORX
==========================  ================================================================

(*) Not KVM_GET/SET_FPU: on this PVM host KVM_GET_FPU reads MXCSR as 0 and KVM_SET_FPU does
not keep it, while the XSAVE image carries it correctly (measured; tests/engine/test_kvm.py).

Memory operands are decoded in full (ModRM, SIB, displacement, RIP-relative, FS/GS bases) and
reached through the guest's page tables (``paging.py``). Each handled kind is counted; an
instruction not in the table stops the vCPU with a ``KvmError`` naming its bytes and rip, so
the loop never re-enters ``KVM_RUN`` on a rip that cannot make progress.

Also observed on this host (tests/engine/test_pvm.py, test_kvm.py document them): the XSAVE
family (XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS) and XGETBV fail emulation too, which
is why guests run with ``noxsave``; some SSE moves (``movq xmm, r64``) fail at CPL0 while
``movdqa xmm, xmm`` is emulated; KVM_SET_CPUID2 is accepted but most feature bits (POPCNT,
XSAVE, AVX, BMI1/2, SMAP) are re-forced on read-back, CX16 stays cleared; KVM_GET_FPU reads
MXCSR as 0 and KVM_SET_FPU drops it. Each handled instruction costs one exit plus two vCPU
ioctls (about 7 us each here) and some Python: 70-150 us in all, so a kernel that executes
many CLAC/STAC (SMAP) pays for it; ``clearcpuid=smap`` avoids it.

On hardware KVM none of this is installed (``is_pvm_host``). Instruction semantics: Intel SDM
vol. 2 (POPCNT, BMI1/BMI2 in ch. 3-5; VEX encoding §2.3.5; ModRM/SIB Tables 2-2..2-3).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vmsh._native import lib
from vmsh.engine.kvm import GPR_NAMES, Fpu, Regs, Sregs, VcpuEvents
from vmsh.engine.paging import PageFault, PagingMode, read_virt, write_virt
from vmsh.errors import GuestMemoryError, KvmError

LOG = logging.getLogger(__name__)

PVM_MODULE_PATH = "/sys/module/kvm_pvm"

# RFLAGS bits (SDM vol. 1 §3.4.3)
RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18  # alignment check / SMAP override (CLAC/STAC)
_ARITH_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

# Exception vectors (SDM vol. 3A Table 6-1)
VECTOR_BP = 3
VECTOR_UD = 6
VECTOR_PF = 14

# FSW exception bits cleared by FNCLEX: IE..PE (bits 0-5), SF (6), ES (7), B (15)
FSW_EXCEPTION_MASK = 0x80FF

MODE_16, MODE_32, MODE_64 = 16, 32, 64


def is_pvm_host() -> bool:
    """True when ``/dev/kvm`` is provided by the PVM module."""
    return os.path.exists(PVM_MODULE_PATH)


class UnknownInstruction(KvmError):
    """An instruction the handler does not implement."""


class GuestAccess(Protocol):
    """What the emulator needs from the vCPU besides its general registers."""

    def read_virt(self, gva: int, length: int) -> bytes:
        """Read guest virtual memory."""
        ...

    def write_virt(self, gva: int, data: bytes) -> None:
        """Write guest virtual memory."""
        ...

    def get_fpu(self) -> Fpu:
        """The x87/SSE state."""
        ...

    def set_fpu(self, fpu: Fpu) -> None:
        """Replace the x87/SSE state."""
        ...

    def get_mxcsr(self) -> int:
        """MXCSR."""
        ...

    def set_mxcsr(self, value: int) -> None:
        """Replace MXCSR."""
        ...


# ---------------------------------------------------------------------------------------------
# Decoding


_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))
_SEGMENT_PREFIX = {0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x26: "es", 0x64: "fs", 0x65: "gs"}


@dataclass(slots=True)
class Operand:
    """A decoded ModRM r/m operand: a register number, or a memory address expression."""

    reg: int | None = None
    base: int | None = None
    index: int | None = None
    scale: int = 1
    disp: int = 0
    rip_relative: bool = False
    segment: str | None = None


@dataclass(slots=True)
class Insn:
    """One decoded instruction (only the fields the handled instructions need)."""

    length: int
    #: 0: one-byte map, 1: 0F, 2: 0F38, 3: 0F3A
    opmap: int
    opcode: int
    opsize: int  # 16, 32 or 64
    addrsize: int  # 32 or 64 (16-bit addressing is not decoded)
    rep: int  # 0, 0xF2 or 0xF3 (the mandatory prefix for legacy SSE-style encodings)
    has_66: bool
    lock: bool
    reg: int = 0  # ModRM.reg (+REX.R / VEX.R)
    rm: Operand | None = None
    vex: bool = False
    vex_w: int = 0
    vex_l: int = 0
    vex_pp: int = 0  # 0: none, 1: 66, 2: F3, 3: F2
    vvvv: int = 0
    imm: int = 0


def _sx(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return (value & (sign - 1)) - (value & sign)


def _needs_modrm(opmap: int, opcode: int) -> tuple[bool, int]:
    """(has ModRM, immediate bytes) for the opcodes the handler knows; raises for the rest."""
    if opmap == 0:
        if opcode in (0xCC, 0x9B):
            return False, 0
        if opcode == 0xDB:
            return True, 0
    elif opmap == 1:
        if opcode == 0x77:
            return False, 0
        if opcode in (0x01, 0xAE, 0xB8):
            return True, 0
    elif opmap == 2:
        if opcode in (0xF2, 0xF3, 0xF5, 0xF6, 0xF7):
            return True, 0
    elif opmap == 3:
        if opcode == 0xF0:
            return True, 1
    raise UnknownInstruction(f"opcode map {opmap} byte {opcode:#04x}")


def decode(code: bytes, mode: int) -> Insn:
    """Decode the instruction at the start of ``code`` in ``mode`` (16, 32 or 64).

    :raises UnknownInstruction: for anything outside the handled set, or truncated bytes.
    """
    try:
        return _decode(code, mode)
    except IndexError:
        raise UnknownInstruction("truncated instruction") from None


def _decode(code: bytes, mode: int) -> Insn:
    pos = 0
    has_66 = has_67 = lock = False
    rep = 0
    segment: str | None = None
    while code[pos] in _LEGACY_PREFIXES:
        b = code[pos]
        if b == 0x66:
            has_66 = True
        elif b == 0x67:
            has_67 = True
        elif b == 0xF0:
            lock = True
        elif b in (0xF2, 0xF3):
            rep = b
        else:
            segment = _SEGMENT_PREFIX[b]
        pos += 1
    rex_w = rex_r = rex_x = rex_b = 0
    if mode == MODE_64 and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        rex_w, rex_r, rex_x, rex_b = (rex >> 3) & 1, (rex >> 2) & 1, (rex >> 1) & 1, rex & 1
        pos += 1
    vex = False
    vex_w = vex_l = vex_pp = vvvv = 0
    b0 = code[pos]
    if b0 in (0xC4, 0xC5) and (mode == MODE_64 or code[pos + 1] >> 6 == 3):
        # VEX (SDM vol. 2 §2.3.5): R, X, B and vvvv are stored inverted.
        vex = True
        if b0 == 0xC5:
            p1 = code[pos + 1]
            rex_r = (~p1 >> 7) & 1
            vvvv = (~p1 >> 3) & 0xF
            vex_l = (p1 >> 2) & 1
            vex_pp = p1 & 3
            opmap = 1
            pos += 2
        else:
            p1, p2 = code[pos + 1], code[pos + 2]
            rex_r, rex_x, rex_b = (~p1 >> 7) & 1, (~p1 >> 6) & 1, (~p1 >> 5) & 1
            opmap = p1 & 0x1F
            vex_w = (p2 >> 7) & 1
            vvvv = (~p2 >> 3) & 0xF
            vex_l = (p2 >> 2) & 1
            vex_pp = p2 & 3
            pos += 3
        if mode != MODE_64:
            rex_r = rex_x = rex_b = 0
            vvvv &= 7
        rex_w = vex_w
        opcode = code[pos]
        pos += 1
    elif b0 == 0x0F:
        if code[pos + 1] == 0x38:
            opmap, opcode = 2, code[pos + 2]
            pos += 3
        elif code[pos + 1] == 0x3A:
            opmap, opcode = 3, code[pos + 2]
            pos += 3
        else:
            opmap, opcode = 1, code[pos + 1]
            pos += 2
    else:
        opmap, opcode = 0, b0
        pos += 1
    if vex and opmap not in (1, 2, 3):
        raise UnknownInstruction(f"VEX map {opmap}")
    if mode == MODE_64:
        opsize = 64 if rex_w else (16 if has_66 and not vex else 32)
        addrsize = 32 if has_67 else 64
    else:
        default = 32 if mode == MODE_32 else 16
        if vex:
            opsize = 32  # VEX.W is ignored outside 64-bit mode for the GPR forms
        else:
            opsize = 48 - default if has_66 else default
        addrsize = (48 - default) if has_67 else default
    has_modrm, imm_len = _needs_modrm(opmap, opcode)
    insn = Insn(length=0, opmap=opmap, opcode=opcode, opsize=opsize, addrsize=addrsize, rep=rep,
                has_66=has_66, lock=lock, vex=vex, vex_w=vex_w, vex_l=vex_l, vex_pp=vex_pp, vvvv=vvvv)
    if has_modrm:
        modrm = code[pos]
        pos += 1
        mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        insn.reg = reg | (rex_r << 3)
        if mod == 3:
            insn.rm = Operand(reg=rm | (rex_b << 3))
        else:
            if addrsize == 16:
                raise UnknownInstruction("16-bit addressing")
            op = Operand(segment=segment)
            if rm == 4:
                sib = code[pos]
                pos += 1
                scale, index, base = sib >> 6, ((sib >> 3) & 7) | (rex_x << 3), sib & 7
                op.scale = 1 << scale
                op.index = None if index == 4 else index  # index 100b (no REX.X) means none
                if base == 5 and mod == 0:
                    op.disp = _sx(int.from_bytes(code[pos:pos + 4], "little"), 32)
                    pos += 4
                else:
                    op.base = base | (rex_b << 3)
            elif rm == 5 and mod == 0:
                op.disp = _sx(int.from_bytes(code[pos:pos + 4], "little"), 32)
                pos += 4
                op.rip_relative = mode == MODE_64
            else:
                op.base = rm | (rex_b << 3)
            if mod == 1:
                op.disp = _sx(code[pos], 8)
                pos += 1
            elif mod == 2:
                op.disp = _sx(int.from_bytes(code[pos:pos + 4], "little"), 32)
                pos += 4
            if len(code) < pos:
                raise IndexError
            insn.rm = op
    if imm_len:
        insn.imm = int.from_bytes(code[pos:pos + imm_len], "little")
        if len(code) < pos + imm_len:
            raise IndexError
        pos += imm_len
    insn.length = pos
    return insn


# ---------------------------------------------------------------------------------------------
# Execution


def _mask(bits: int) -> int:
    return (1 << bits) - 1


class Emulator:
    """Executes one decoded instruction against ``Regs`` and a ``GuestAccess``.

    :param regs: modified in place (results, flags, rip).
    :param mode: 16, 32 or 64.
    :param segment_bases: base of each segment register by name (FS/GS matter in 64-bit mode).
    """

    def __init__(self, regs: Regs, mode: int, access: GuestAccess,
                 segment_bases: dict[str, int] | None = None) -> None:
        self.regs = regs
        self.mode = mode
        self.access = access
        self.segment_bases = segment_bases or {}

    # -- operands ----------------------------------------------------------------------------

    def gpr(self, n: int, bits: int = 64) -> int:
        """Read register number ``n`` (x86 encoding order) truncated to ``bits``."""
        return int(getattr(self.regs, GPR_NAMES[n])) & _mask(bits)

    def set_gpr(self, n: int, value: int, bits: int) -> None:
        """Write a register with x86 semantics: 32-bit writes zero-extend, 16-bit writes merge."""
        name = GPR_NAMES[n]
        if bits == 16:
            value = (getattr(self.regs, name) & ~0xFFFF) | (value & 0xFFFF)
        setattr(self.regs, name, value & (_mask(64) if bits == 64 or bits == 16 else _mask(32)))

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
        assert op is not None
        if op.reg is not None:
            return self.gpr(op.reg, bits)
        return int.from_bytes(self.access.read_virt(self.address(insn, op), bits // 8), "little")

    def write_rm_mem(self, insn: Insn, value: int, bits: int) -> None:
        """Store to a memory r/m operand."""
        op = insn.rm
        assert op is not None and op.reg is None
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
        """Carry out ``insn``, advance rip; returns the kind counted by the handler.

        :raises UnknownInstruction: if ``insn`` decodes but is not one the handler runs.
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
        if m == 0 and op == 0xDB:
            rm = insn.rm
            assert rm is not None
            if rm.reg is not None and rm.reg & 7 == 2 and insn.reg & 7 == 4:  # db e2
                fpu = self.access.get_fpu()
                fpu.fsw &= ~FSW_EXCEPTION_MASK
                self.access.set_fpu(fpu)
                return "fnclex"
            if rm.reg is None and insn.reg & 7 == 0:
                # FILD m32: observed only in boot paths that survive it being skipped; the
                # x87 stack is not modelled (reference/pvm-host.md).
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
        if m == 1 and op == 0xAE and insn.rm is not None and insn.rm.reg is None and not insn.rep:
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
        if m == 1 and op == 0xAE and pp == 0 and insn.rm is not None and insn.rm.reg is None:
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
                result = (_sx(src, bits) >> count) & mask
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
                result = _pext(src, sel) if pp == 2 else _pdep(src, sel)
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


def _pext(src: int, sel: int) -> int:
    out, k = 0, 0
    while sel:
        low = sel & -sel
        if src & low:
            out |= 1 << k
        k += 1
        sel ^= low
    return out


def _pdep(src: int, sel: int) -> int:
    out, k = 0, 0
    while sel:
        low = sel & -sel
        if src >> k & 1:
            out |= low
        k += 1
        sel ^= low
    return out


def cpu_mode(sregs: Sregs) -> int:
    """16, 32 or 64 from CS and EFER.LMA (SDM vol. 3A §5.2.1)."""
    if sregs.efer & (1 << 10) and sregs.cs.l:
        return MODE_64
    if sregs.cr0 & 1 and sregs.cs.db:
        return MODE_32
    return MODE_16


# ---------------------------------------------------------------------------------------------
# The KVM_EXIT_INTERNAL_ERROR handler


class _VcpuAccess:
    """``GuestAccess`` over a vCPU fd and guest memory, walking the guest's page tables."""

    def __init__(self, fd: object, mem: object, sregs: Sregs) -> None:
        self.fd = fd
        self.mem = mem
        self.mode = PagingMode(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)

    def read_virt(self, gva: int, length: int) -> bytes:
        return read_virt(self.mode, gva, length, self.mem.read_u64, self.mem.read)  # type: ignore[attr-defined]

    def write_virt(self, gva: int, data: bytes) -> None:
        write_virt(self.mode, gva, data, self.mem.read_u64, self.mem.write)  # type: ignore[attr-defined]

    def get_fpu(self) -> Fpu:
        return self.fd.get_fpu()  # type: ignore[attr-defined, no-any-return]

    def set_fpu(self, fpu: Fpu) -> None:
        self.fd.set_fpu(fpu)  # type: ignore[attr-defined]

    def get_mxcsr(self) -> int:
        return self.fd.get_mxcsr()  # type: ignore[attr-defined, no-any-return]

    def set_mxcsr(self, value: int) -> None:
        self.fd.set_mxcsr(value)  # type: ignore[attr-defined]


class _RegistersOnly:
    """``GuestAccess`` for instructions without memory operands: FPU state only."""

    def __init__(self, fd: object) -> None:
        self.fd = fd

    def read_virt(self, gva: int, length: int) -> bytes:
        raise AssertionError("no memory operand expected")

    def write_virt(self, gva: int, data: bytes) -> None:
        raise AssertionError("no memory operand expected")

    def get_fpu(self) -> Fpu:
        return self.fd.get_fpu()  # type: ignore[attr-defined, no-any-return]

    def set_fpu(self, fpu: Fpu) -> None:
        self.fd.set_fpu(fpu)  # type: ignore[attr-defined]

    def get_mxcsr(self) -> int:
        return self.fd.get_mxcsr()  # type: ignore[attr-defined, no-any-return]

    def set_mxcsr(self, value: int) -> None:
        self.fd.set_mxcsr(value)  # type: ignore[attr-defined]


class PvmHandler:
    """The ``on_internal_error`` handler of a ``Vcpu`` on a PVM host.

    :param mem: guest memory (``GuestMemory``), for memory operands and instruction fetch.

    ``counts`` holds how many instructions of each kind were completed (shared by all vCPUs
    the handler serves).
    """

    def __init__(self, mem: object) -> None:
        self.mem = mem
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: last CPU mode seen per vCPU index (see __call__)
        self._modes: dict[int, int] = {}

    def forget_modes(self) -> None:
        """Drop the per-vCPU mode cache (call after resetting vCPUs to their boot state)."""
        self._modes.clear()

    def __call__(self, vcpu: object, err: object) -> bool:
        """Complete the failed instruction; True when the vCPU can run on.

        :raises KvmError: naming the bytes and rip when the instruction is not handled.
        """
        if err.suberror != lib.KVM_INTERNAL_ERROR_EMULATION:  # type: ignore[attr-defined]
            return False
        fd = vcpu.fd  # type: ignore[attr-defined]
        regs: Regs = fd.get_regs()
        # Each vCPU ioctl costs several microseconds on PVM, so KVM_GET_SREGS is skipped when
        # it is not needed: once a vCPU has been seen in 64-bit mode (a kernel does not leave
        # it), instructions without a memory operand decode and run on the registers alone.
        mode = self._modes.get(fd.vcpu_id)
        sregs: Sregs | None = None
        if mode != MODE_64:
            sregs = fd.get_sregs()
            mode = self._modes[fd.vcpu_id] = cpu_mode(sregs)
        code: bytes = err.insn_bytes  # type: ignore[attr-defined]
        decoded_mode = mode
        insn: Insn | None
        try:
            insn = decode(code, mode) if code else None
        except UnknownInstruction:
            insn = None
        if insn is None or (insn.rm is not None and insn.rm.reg is None):
            if sregs is None:
                sregs = fd.get_sregs()
                self._modes[fd.vcpu_id] = cpu_mode(sregs)
                mode = cpu_mode(sregs)
        if sregs is None:
            emu = Emulator(regs, mode, _RegistersOnly(fd))
        else:
            access = _VcpuAccess(fd, self.mem, sregs)
            if not code:
                try:
                    code = access.read_virt(regs.rip + (sregs.cs.base if mode != MODE_64 else 0), 15)
                except GuestMemoryError as gerr:
                    raise KvmError(f"vcpu{fd.vcpu_id}: emulation failure at rip {regs.rip:#x}, "
                                   "instruction not readable") from gerr
            bases = {name: getattr(sregs, name).base for name in ("cs", "ds", "es", "fs", "gs", "ss")}
            emu = Emulator(regs, mode, access, bases)
        try:
            if insn is None or mode != decoded_mode:
                insn = decode(code, mode)
            kind = emu.execute(insn)
        except UnknownInstruction as uerr:
            with self._lock:
                self.counts["unknown"] += 1
            raise UnknownInstruction(
                f"vcpu{fd.vcpu_id}: instruction the PVM host cannot emulate at rip {regs.rip:#x}: "
                f"{code.hex(' ')} ({uerr})") from None
        except PageFault as pf:
            # The operand is not mapped: deliver #PF to the guest at the faulting instruction
            # (rip not advanced: the half-updated regs object is dropped; CR2 = address,
            # SDM vol. 3A §4.7).
            assert sregs is not None  # memory operands always fetch sregs
            sregs.cr2 = pf.gva
            fd.set_sregs(sregs)
            fd.set_vcpu_events(self._exception(fd, VECTOR_PF, pf.error_code))
            with self._lock:
                self.counts["page_fault"] += 1
            return True
        fd.set_regs(regs)
        if kind == "int3":
            # INT3 is a trap: #BP is delivered with rip already past the cc byte
            # (reference/pvm-host.md; SDM vol. 3A §6.5 "Trap").
            fd.set_vcpu_events(self._exception(fd, VECTOR_BP, None))
        with self._lock:
            self.counts[kind] += 1
        LOG.debug("vcpu%d: completed %s at %#x", fd.vcpu_id, kind, regs.rip - insn.length)
        return True

    @staticmethod
    def _exception(fd: object, vector: int, error_code: int | None) -> VcpuEvents:
        events: VcpuEvents = fd.get_vcpu_events()  # type: ignore[attr-defined]
        events.exception_injected = 1
        events.exception_nr = vector
        events.exception_has_error_code = 1 if error_code is not None else 0
        events.exception_error_code = error_code or 0
        events.exception_pending = 0
        # Only the exception is being changed: leave NMI/SIPI/SMI/triple-fault state alone.
        events.flags = 0
        return events


def internal_error_handler(mem: object, force: bool = False) -> PvmHandler | None:
    """The handler to install on each vCPU: a ``PvmHandler`` on PVM hosts, None elsewhere."""
    if force or is_pvm_host():
        return PvmHandler(mem)
    return None


#: for typing of callers that store the handler
Handler = Callable[[object, object], bool]
