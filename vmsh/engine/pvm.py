"""PVM host support: detection, and completing the instructions PVM's emulator cannot run.

On a PVM host (``/dev/kvm`` from the ``kvm_pvm`` module, a software hypervisor) every guest
instruction at CPL0 goes through KVM's instruction emulator, and a few instructions are not
implemented there: ``KVM_RUN`` returns ``KVM_EXIT_INTERNAL_ERROR`` / emulation failure with the
instruction bytes, and re-entering fails again at the same rip. ``PvmHandler`` completes those
instructions in the VMM with the x86 decoder and emulator of ``vmsh/engine/x86/`` (its
``emulate.py`` lists them), and delivers what the emulator leaves to the CPU: #BP after INT3 and
#PF when a memory operand is not mapped. MXCSR goes through KVM_GET_XSAVE / KVM_SET_XSAVE, not
KVM_GET/SET_FPU: on this PVM host KVM_GET_FPU reads MXCSR as 0 and KVM_SET_FPU does not keep
it, while the XSAVE image carries it correctly (measured; tests/engine/test_kvm.py).

Memory operands are reached through the guest's page tables (``paging.py``). Each handled kind is
counted; an instruction not in the table stops the vCPU with a ``KvmError`` naming its bytes and
rip, so the loop never re-enters ``KVM_RUN`` on a rip that cannot make progress.

Also observed on this host (tests/engine/test_pvm.py, test_kvm.py document them): the XSAVE
family (XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS) and XGETBV fail emulation too, which
is why guests run with ``noxsave``; some SSE moves (``movq xmm, r64``) fail at CPL0 while
``movdqa xmm, xmm`` is emulated; KVM_SET_CPUID2 is accepted but most feature bits (POPCNT,
XSAVE, AVX, BMI1/2, SMAP) are re-forced on read-back, CX16 stays cleared. Each handled
instruction costs one exit plus two vCPU ioctls (about 7 us each here) and some Python:
70-150 us in all, so a kernel that executes many CLAC/STAC (SMAP) pays for it;
``clearcpuid=smap`` avoids it.

On hardware KVM none of this is installed (``is_pvm_host``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import TYPE_CHECKING

from vmsh._native import lib
from vmsh.engine.kvm_types import Fpu, Regs, Sregs, VcpuEvents
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.engine.paging import PageFault, PagingMode, read_virt, write_virt
from vmsh.engine.x86.decode import MODE_64, Insn, UnknownInstruction, cpu_mode, decode
from vmsh.engine.x86.emulate import Emulator, GuestAccess, X87State
from vmsh.errors import GuestMemoryError, KvmError
from vmsh.guest_memory import GuestMemory

if TYPE_CHECKING:
    from vmsh.engine.vcpu import InternalErrorExit, Vcpu

LOG = logging.getLogger(__name__)

PVM_MODULE_PATH = "/sys/module/kvm_pvm"

# Exception vectors (SDM vol. 3A Table 6-1)
VECTOR_BP = 3
VECTOR_PF = 14


def is_pvm_host() -> bool:
    """True when ``/dev/kvm`` is provided by the PVM module."""
    return os.path.exists(PVM_MODULE_PATH)


def _mode_of(sregs: Sregs) -> int:
    return cpu_mode(sregs.cr0, sregs.efer, sregs.cs.l, sregs.cs.db)


class _FpuAccess:
    """The FPU and MXCSR half of ``GuestAccess``, over a vCPU fd."""

    def __init__(self, fd: VcpuFd) -> None:
        self.fd = fd

    def get_fpu(self) -> X87State:
        return self.fd.get_fpu()

    def set_fpu(self, fpu: X87State) -> None:
        if not isinstance(fpu, Fpu):
            raise TypeError(f"expected the Fpu that get_fpu returned, not {type(fpu).__name__}")
        self.fd.set_fpu(fpu)

    def get_mxcsr(self) -> int:
        return self.fd.get_mxcsr()

    def set_mxcsr(self, value: int) -> None:
        self.fd.set_mxcsr(value)


class _VcpuAccess(_FpuAccess):
    """``GuestAccess`` over a vCPU fd and guest memory, walking the guest's page tables."""

    def __init__(self, fd: VcpuFd, mem: GuestMemory, sregs: Sregs) -> None:
        super().__init__(fd)
        self.mem = mem
        self.mode = PagingMode(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)

    def read_virt(self, gva: int, length: int) -> bytes:
        return read_virt(self.mode, gva, length, self.mem.read_u64, self.mem.read)

    def write_virt(self, gva: int, data: bytes) -> None:
        write_virt(self.mode, gva, data, self.mem.read_u64, self.mem.write)


class _RegistersOnly(_FpuAccess):
    """``GuestAccess`` for instructions without memory operands: FPU state only."""

    def read_virt(self, gva: int, length: int) -> bytes:
        raise AssertionError("no memory operand expected")

    def write_virt(self, gva: int, data: bytes) -> None:
        raise AssertionError("no memory operand expected")


class PvmHandler:
    """The ``on_internal_error`` handler of a ``Vcpu`` on a PVM host.

    :param mem: guest memory, for memory operands and instruction fetch.

    ``counts`` holds how many instructions of each kind were completed (shared by all vCPUs
    the handler serves).
    """

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: last CPU mode seen per vCPU index (see __call__)
        self._modes: dict[int, int] = {}

    def __call__(self, vcpu: Vcpu, err: InternalErrorExit) -> bool:
        """Complete the failed instruction; True when the vCPU can run on.

        :raises KvmError: naming the bytes and rip when the instruction is not handled.
        """
        if err.suberror != lib.KVM_INTERNAL_ERROR_EMULATION:
            return False
        fd = vcpu.fd
        regs: Regs = fd.get_regs()
        # Each vCPU ioctl costs several microseconds on PVM, so KVM_GET_SREGS is skipped when
        # it is not needed: once a vCPU has been seen in 64-bit mode (a kernel does not leave
        # it), instructions without a memory operand decode and run on the registers alone.
        mode = self._modes.get(fd.vcpu_id)
        sregs: Sregs | None = None
        if mode != MODE_64:
            sregs = fd.get_sregs()
            mode = self._modes[fd.vcpu_id] = _mode_of(sregs)
        code = err.insn_bytes
        decoded_mode = mode
        insn: Insn | None
        try:
            insn = decode(code, mode) if code else None
        except UnknownInstruction:
            insn = None
        if (insn is None or insn.has_memory_operand) and sregs is None:
            sregs = fd.get_sregs()
            mode = self._modes[fd.vcpu_id] = _mode_of(sregs)
        access: GuestAccess
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
            # (tests/engine/test_pvm.py; SDM vol. 3A §6.5 "Trap").
            fd.set_vcpu_events(self._exception(fd, VECTOR_BP, None))
        with self._lock:
            self.counts[kind] += 1
        LOG.debug("vcpu%d: completed %s at %#x", fd.vcpu_id, kind, regs.rip - insn.length)
        return True

    @staticmethod
    def _exception(fd: VcpuFd, vector: int, error_code: int | None) -> VcpuEvents:
        events = fd.get_vcpu_events()
        events.exception_injected = 1
        events.exception_nr = vector
        events.exception_has_error_code = 1 if error_code is not None else 0
        events.exception_error_code = error_code or 0
        events.exception_pending = 0
        # Only the exception is being changed: leave NMI/SIPI/SMI/triple-fault state alone.
        events.flags = 0
        return events


def internal_error_handler(mem: GuestMemory, force: bool = False) -> PvmHandler | None:
    """The handler to install on each vCPU: a ``PvmHandler`` on PVM hosts, None elsewhere."""
    if force or is_pvm_host():
        return PvmHandler(mem)
    return None
