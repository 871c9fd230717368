"""Guest core dumps (``vm.coredump``): the paused guest as an ELF64 core file, as cloud-hypervisor
writes it (its ``vmm/src/coredump.rs``), readable by ``readelf``, gdb and ``crash``.

Layout (ELF-64 Object File Format; the System V ABI's core-file conventions):

1. the ELF header (``ET_CORE``, ``EM_X86_64``), program headers right behind it;
2. one ``PT_NOTE`` segment: an ``NT_PRSTATUS`` note (name ``CORE``) per vCPU with Linux's
   ``struct elf_prstatus`` (``pr_pid`` = the vCPU's index, the general registers in
   ``user_regs_struct`` order), then a ``QEMU`` note (type 0) per vCPU with QEMU's
   ``QEMUCPUState`` (general registers, segments with their descriptor caches, descriptor
   tables, control registers, KERNEL_GS_BASE), which ``crash`` reads;
3. one ``PT_LOAD`` per guest RAM region, in guest physical order, ``p_paddr`` = the region's
   guest physical address and ``p_vaddr`` 0, its contents back to back after the notes.

vmsh adds, after those, ``PT_LOAD`` headers for the kernel half of vCPU 0's page tables
(:mod:`vmsh.engine.page_map`): each maps a run of kernel virtual addresses onto the file bytes
of the RAM already written (no second copy). With them gdb, which knows the kernel's symbols
by virtual address, can read variables and unwind the vCPUs' kernel stacks from the dump;
tools that look up physical addresses see cloud-hypervisor's segments unchanged in front.

The file is created new (``O_EXCL``, as cloud-hypervisor's create-new); if anything fails
while writing it is removed, so no half-written core is left behind. Guest RAM the guest never
touched is left as a hole in the file (it reads as zeros), so a large idle guest dumps fast.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vmsh.engine.kvm_types import Regs, Segment, Sregs
from vmsh.engine.page_map import mapped_runs
from vmsh.engine.paging import PagingMode
from vmsh.errors import GuestMemoryError, KvmError, VmshError

LOG = logging.getLogger(__name__)

# ELF constants (ELF-64 Object File Format, "ELF Header" and "Program Header Table")
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
NT_PRSTATUS = 1
#: the type of QEMU's CPU-state note (name "QEMU")
NT_QEMU_CPUSTATE = 0
PF_R, PF_W, PF_X = 4, 2, 1

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
EHDR_SIZE = _EHDR.size  # 64
PHDR_SIZE = _PHDR.size  # 56

#: Linux x86-64 ``struct elf_prstatus``: 336 bytes, pr_pid at 32, pr_reg at 112 (27 u64)
PRSTATUS_SIZE = 336
PRSTATUS_PID = 32
PRSTATUS_REGS = 112
#: ``user_regs_struct`` order (arch/x86/include/asm/user_64.h)
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
             "gs_base", "ds", "es", "fs", "gs")

#: QEMU's ``QEMUCPUState`` (target/i386/arch_dump.c): version, size, 18 registers, 10 segments,
#: cr[5], kernel_gs_base
QEMU_CPUSTATE_VERSION = 1
_QEMU_SEGMENT = struct.Struct("<IIIIQ")
_QEMU_HEAD = struct.Struct("<II18Q")
QEMU_CPUSTATE_SIZE = _QEMU_HEAD.size + 10 * _QEMU_SEGMENT.size + 6 * 8  # 440

MSR_KERNEL_GS_BASE = 0xC000_0102


@dataclass(frozen=True, slots=True)
class CpuState:
    """What the core records of one vCPU."""

    index: int
    regs: Regs
    sregs: Sregs
    kernel_gs_base: int = 0


@dataclass(frozen=True, slots=True)
class RamRegion:
    """One guest RAM region: its guest physical address and its contents."""

    gpa: int
    data: memoryview | bytes
    #: ``(offset, length)`` runs that may hold non-zero bytes (``GuestRegion.data_runs``); the
    #: rest is left a hole in the file, which reads as zeros. None: all of it.
    runs: list[tuple[int, int]] | None = None


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    pad_name = (-len(name_z)) % 4
    pad_desc = (-len(desc)) % 4
    return _NHDR.pack(len(name_z), len(desc), kind) + name_z + bytes(pad_name) + desc + bytes(pad_desc)


def prstatus(cpu: CpuState) -> bytes:
    """The ``NT_PRSTATUS`` descriptor of one vCPU."""
    r, s = cpu.regs, cpu.sregs
    values = {name: getattr(r, name) for name in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
                                                  "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi", "rip", "rsp")}
    values.update(orig_rax=0, eflags=r.rflags, cs=s.cs.selector, ss=s.ss.selector, ds=s.ds.selector,
                  es=s.es.selector, fs=s.fs.selector, gs=s.gs.selector, fs_base=s.fs.base, gs_base=s.gs.base)
    desc = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<I", desc, PRSTATUS_PID, cpu.index)
    struct.pack_into(f"<{len(USER_REGS)}Q", desc, PRSTATUS_REGS, *(values[n] & (2**64 - 1) for n in USER_REGS))
    return bytes(desc)


def _segment_flags(seg: Segment) -> int:
    # QEMU's descriptor-flag encoding (DESC_TYPE_SHIFT 8, S 12, DPL 13, P 15, AVL 20, L 21, B 22, G 23)
    return (seg.type << 8 | seg.s << 12 | seg.dpl << 13 | seg.present << 15 | seg.avl << 20
            | seg.l << 21 | seg.db << 22 | seg.g << 23)


def qemu_cpustate(cpu: CpuState) -> bytes:
    """The ``QEMU`` note descriptor of one vCPU."""
    r, s = cpu.regs, cpu.sregs
    out = bytearray(_QEMU_HEAD.pack(
        QEMU_CPUSTATE_VERSION, QEMU_CPUSTATE_SIZE, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp,
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags))
    for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.ldt, s.tr):
        out += _QEMU_SEGMENT.pack(seg.selector, seg.limit, _segment_flags(seg), 0, seg.base)
    for table in (s.gdt, s.idt):
        out += _QEMU_SEGMENT.pack(0, table.limit, 0, 0, table.base)
    # cr[5] with CR8 in slot 1 (QEMU's array is indexed by CR number; cloud-hypervisor puts CR8 there)
    out += struct.pack("<6Q", s.cr0, s.cr8, s.cr2, s.cr3, s.cr4, cpu.kernel_gs_base)
    assert len(out) == QEMU_CPUSTATE_SIZE
    return bytes(out)


def notes(cpus: Sequence[CpuState]) -> bytes:
    """The ``PT_NOTE`` segment: every vCPU's NT_PRSTATUS, then every vCPU's QEMU note."""
    return (b"".join(_note(b"CORE", NT_PRSTATUS, prstatus(c)) for c in cpus)
            + b"".join(_note(b"QEMU", NT_QEMU_CPUSTATE, qemu_cpustate(c)) for c in cpus))


def layout(cpus: Sequence[CpuState], regions: Sequence[RamRegion],
           virtual_runs: Sequence[tuple[int, int, int]] = ()) -> tuple[bytes, list[tuple[int, memoryview | bytes]]]:
    """The headers and notes (one bytes object) and the RAM pieces to write after them.

    :param virtual_runs: ``(virtual, physical, size)`` runs to describe as extra ``PT_LOAD``
        segments aliasing the RAM bytes (a run not wholly inside one region is left out).
    """
    regions = sorted(regions, key=lambda r: r.gpa)
    note = notes(cpus)
    aliases = []
    for va, pa, size in virtual_runs:
        for reg in regions:
            if reg.gpa <= pa and pa + size <= reg.gpa + len(reg.data):
                aliases.append((va, pa, size, reg))
                break
    phnum = 1 + len(regions) + len(aliases)
    note_offset = EHDR_SIZE + PHDR_SIZE * phnum
    mem_offset = note_offset + len(note)
    ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, 0]) + bytes(8)
    head = bytearray(_EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, EHDR_SIZE, 0, 0, EHDR_SIZE, PHDR_SIZE,
                                phnum, 0, 0, 0))
    head += _PHDR.pack(PT_NOTE, 0, note_offset, 0, 0, len(note), len(note), 0)
    offsets = {}
    offset = mem_offset
    pieces: list[tuple[int, memoryview | bytes]] = []
    for reg in regions:
        size = len(reg.data)
        head += _PHDR.pack(PT_LOAD, 0, offset, 0, reg.gpa, size, size, 0)
        offsets[id(reg)] = offset
        if reg.runs is None:
            pieces.append((offset, reg.data))
        else:
            view = memoryview(reg.data).cast("B")
            pieces += [(offset + start, view[start:start + length]) for start, length in reg.runs]
        offset += size
    for va, pa, size, reg in aliases:
        file_off = offsets[id(reg)] + pa - reg.gpa
        head += _PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, file_off, va, pa, size, size, 0)
    head += note
    assert len(head) == mem_offset
    return bytes(head), pieces


def write_core(path: str, cpus: Sequence[CpuState], regions: Sequence[RamRegion],
               virtual_runs: Sequence[tuple[int, int, int]] = ()) -> None:
    """Write the core file at ``path`` (which must not exist).

    :raises VmshError: when the file cannot be created or written (a partly written file is
        removed).
    """
    head, pieces = layout(cpus, regions, virtual_runs)
    end = len(head) + sum(len(r.data) for r in regions)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise VmshError(f"Cannot create the core dump file {path}") from err
    try:
        _write_all(fd, head, 0)
        for offset, data in pieces:
            _write_all(fd, data, offset)
        os.ftruncate(fd, end)  # RAM left out (never touched) is a hole: zeros
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        _remove(path)
        raise VmshError(f"Cannot write the core dump file {path}") from err
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    os.close(fd)
    LOG.info("core dump written to %s (%d vCPUs, %d RAM regions)", path, len(cpus), len(regions))


def _write_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    chunk = 1 << 24
    pos = 0
    while pos < len(view):
        # large regions in slices: one pwrite per 16 MiB keeps each call bounded
        n = os.pwrite(fd, view[pos:pos + chunk], offset + pos)
        if n <= 0:
            raise OSError("short write")
        pos += n


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        LOG.warning("could not remove the partial core dump %s", path)


class DumpableVm(Protocol):
    """What :func:`dump_vm` reads of :class:`vmsh.engine.vm.Vm` (paused: no vCPU thread runs)."""

    @property
    def vcpus(self) -> Sequence[Any]: ...
    @property
    def memory(self) -> Any: ...


def dump_vm(vm: DumpableVm, path: str) -> None:
    """``vm.coredump``: write the paused ``vm``'s core to ``path``.

    The caller (the action's rule) made sure the VM is paused, so the vCPU fds are not in
    KVM_RUN and guest RAM does not change while it is written.
    """
    if vm.memory is None:
        raise VmshError("The VM has no guest RAM yet")
    cpus = []
    for vcpu in vm.vcpus:
        fd = vcpu.fd
        try:
            gs = fd.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE, 0)
        except KvmError:
            gs = 0  # crash wants it, gdb does not: not worth failing the dump for
        cpus.append(CpuState(vcpu.index, fd.get_regs(), fd.get_sregs(), gs))
    runs: list[tuple[int, int, int]] = []
    if cpus:
        s = cpus[0].sregs
        try:
            runs = mapped_runs(PagingMode(s.cr0, s.cr3, s.cr4, s.efer), vm.memory.read_u64,
                               is_ram=vm.memory.is_valid_range)
        except GuestMemoryError as err:  # paging the walker does not know: physical segments only
            LOG.info("core dump without virtual segments: %s", err)
    write_core(path, cpus, [RamRegion(r.start, r.view, r.data_runs()) for r in vm.memory.regions], runs)
