"""The x86-64 registers as gdb sees them: a target description (gdb manual, "Target
Descriptions", "i386 Features") and the ``g``/``G`` block in its order.

Features: ``org.gnu.gdb.i386.core`` (general registers, rip, eflags, segment selectors, x87),
``org.gnu.gdb.i386.sse`` (xmm0-15, mxcsr), ``org.gnu.gdb.i386.segments`` (fs_base,
gs_base) and ``org.gnu.gdb.i386.sys`` (cr0, cr2, cr3, cr4, cr8, efer, which gdb shows as
extra registers). The block is every register in that order, little endian, each as wide as
its ``bitsize``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmsh.engine.kvm_types import Fpu, Regs, Sregs

LOG = logging.getLogger(__name__)

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")


@dataclass(frozen=True, slots=True)
class Reg:
    name: str
    bits: int
    type: str
    feature: str


def _layout() -> tuple[Reg, ...]:
    core = "org.gnu.gdb.i386.core"
    regs = [Reg(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", core) for n in GPRS]
    regs += [Reg("rip", 64, "code_ptr", core), Reg("eflags", 32, "int32", core)]
    regs += [Reg(n, 32, "int32", core) for n in SEGMENTS]
    regs += [Reg(f"st{i}", 80, "i387_ext", core) for i in range(8)]
    regs += [Reg(n, 32, "int", core) for n in X87_CONTROL]
    sse = "org.gnu.gdb.i386.sse"
    regs += [Reg(f"xmm{i}", 128, "uint128", sse) for i in range(16)]
    regs += [Reg("mxcsr", 32, "int", sse)]
    regs += [Reg(n, 64, "int64", "org.gnu.gdb.i386.segments") for n in ("fs_base", "gs_base")]
    regs += [Reg(n, 64, "int64", "org.gnu.gdb.i386.sys") for n in SYS]
    return tuple(regs)


LAYOUT = _layout()
NUMBERS = {r.name: i for i, r in enumerate(LAYOUT)}


def target_xml() -> str:
    """The target description gdb reads with ``qXfer:features:read:target.xml``."""
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "<architecture>i386:x86-64</architecture>"]
    feature = None
    for i, reg in enumerate(LAYOUT):
        if reg.feature != feature:
            if feature is not None:
                parts.append("</feature>")
            feature = reg.feature
            parts.append(f'<feature name="{feature}">')
        parts.append(f'<reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" regnum="{i}"/>')
    parts += ["</feature>", "</target>"]
    return "\n".join(parts)


@dataclass(slots=True)
class RegisterFile:
    """One vCPU's registers as KVM gives them."""

    regs: Regs
    sregs: Sregs
    fpu: Fpu

    def value(self, name: str) -> int | bytes:
        """A register's value (an int, or the raw bytes of an x87/SSE register)."""
        r, s, f = self.regs, self.sregs, self.fpu
        if name in GPRS or name == "rip":
            return int(getattr(r, name))
        if name == "eflags":
            return r.rflags & 0xFFFF_FFFF
        if name in SEGMENTS:
            return int(getattr(s, name).selector)
        if name.startswith("st"):
            i = int(name[2:])
            return f.fpr[16 * i:16 * i + 10]
        if name.startswith("xmm"):
            i = int(name[3:])
            return f.xmm[16 * i:16 * i + 16]
        x87 = {"fctrl": f.fcw, "fstat": f.fsw, "ftag": f.ftwx, "fiseg": 0, "fioff": f.last_ip & 0xFFFF_FFFF,
               "foseg": 0, "fooff": f.last_dp & 0xFFFF_FFFF, "fop": f.last_opcode, "mxcsr": f.mxcsr}
        if name in x87:
            return int(x87[name])
        if name == "fs_base":
            return int(s.fs.base)
        if name == "gs_base":
            return int(s.gs.base)
        return int(getattr(s, name))

    def encode(self, name: str) -> bytes:
        """One register in the block's encoding (little endian, its width)."""
        reg = LAYOUT[NUMBERS[name]]
        value = self.value(name)
        if isinstance(value, bytes):
            return value.ljust(reg.bits // 8, b"\0")
        return (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little")

    def block(self) -> bytes:
        """Every register, the ``g`` reply's bytes."""
        return b"".join(self.encode(reg.name) for reg in LAYOUT)


#: registers a debugger may write (``G``, ``P``): what KVM_SET_REGS takes
WRITABLE = frozenset((*GPRS, "rip", "eflags"))


def set_register(regs: Regs, name: str, raw: bytes) -> None:
    """Put ``raw`` (the block encoding) into ``regs``; only :data:`WRITABLE` registers.

    :raises KeyError: for a register that cannot be written.
    """
    if name not in WRITABLE:
        raise KeyError(name)
    value = int.from_bytes(raw, "little")
    if name == "eflags":
        regs.rflags = (regs.rflags & ~0xFFFF_FFFF) | value
    else:
        setattr(regs, name, value)


def split_block(block: bytes) -> dict[str, bytes]:
    """A ``G`` block as ``{name: raw bytes}`` (a short block covers the first registers)."""
    out: dict[str, bytes] = {}
    pos = 0
    for reg in LAYOUT:
        n = reg.bits // 8
        if pos + n > len(block):
            break
        out[reg.name] = block[pos:pos + n]
        pos += n
    return out
