"""Decoding of the x86 instructions the emulator knows: prefixes, REX, VEX, ModRM, SIB.

Only the opcodes ``Emulator`` runs are decoded (anything else raises ``UnknownInstruction``), but
their operands are decoded in full: ModRM and SIB with displacements, RIP-relative addressing,
segment overrides, REX and both VEX forms (Intel SDM vol. 2 §2.1-2.3, Tables 2-2 and 2-3). 16-bit
addressing is not decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmsh.errors import KvmError

MODE_16, MODE_32, MODE_64 = 16, 32, 64

_EFER_LMA = 1 << 10
_CR0_PE = 1 << 0

_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))
_SEGMENT_PREFIX = {0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x26: "es", 0x64: "fs", 0x65: "gs"}


class UnknownInstruction(KvmError):
    """An instruction the emulator does not implement (or truncated instruction bytes).

    A ``KvmError`` because it surfaces as a vCPU that cannot run on.
    """


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

    @property
    def has_memory_operand(self) -> bool:
        """True when the r/m operand is in memory."""
        return self.rm is not None and self.rm.reg is None


def sign_extend(value: int, bits: int) -> int:
    """``value``'s low ``bits`` read as a two's complement number."""
    sign = 1 << (bits - 1)
    return (value & (sign - 1)) - (value & sign)


def cpu_mode(cr0: int, efer: int, cs_l: int, cs_db: int) -> int:
    """16, 32 or 64 from CR0.PE, EFER.LMA and the CS descriptor's L and D/B bits (SDM vol. 3A §5.2.1)."""
    if efer & _EFER_LMA and cs_l:
        return MODE_64
    if cr0 & _CR0_PE and cs_db:
        return MODE_32
    return MODE_16


def _needs_modrm(opmap: int, opcode: int) -> tuple[bool, int]:
    """(has ModRM, immediate bytes) for the opcodes the emulator knows; raises for the rest."""
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
    elif opmap == 2 and opcode in (0xF2, 0xF3, 0xF5, 0xF6, 0xF7):
        return True, 0
    elif opmap == 3 and opcode == 0xF0:
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
        # VEX.W is ignored outside 64-bit mode for the GPR forms
        opsize = 32 if vex else (48 - default if has_66 else default)
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
                    op.disp = sign_extend(int.from_bytes(code[pos:pos + 4], "little"), 32)
                    pos += 4
                else:
                    op.base = base | (rex_b << 3)
            elif rm == 5 and mod == 0:
                op.disp = sign_extend(int.from_bytes(code[pos:pos + 4], "little"), 32)
                pos += 4
                op.rip_relative = mode == MODE_64
            else:
                op.base = rm | (rex_b << 3)
            if mod == 1:
                op.disp = sign_extend(code[pos], 8)
                pos += 1
            elif mod == 2:
                op.disp = sign_extend(int.from_bytes(code[pos:pos + 4], "little"), 32)
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
