"""The stopped VM as a debugger sees it: threads (one per vCPU, gdb thread id = index + 1, as
cloud-hypervisor numbers them), registers, memory by guest virtual address, breakpoints.

Every method runs on the debugger's thread (the ``gdb`` thread, or the shell's) while the VM
is paused (no vCPU is in ``KVM_RUN``), so the vCPU ioctls and guest RAM are the caller's; only
:meth:`is_breakpoint` runs on a vCPU thread, and it reads an immutable set that the debugger's
thread replaces.

Memory is read and written through the page tables of the selected vCPU (its CR3,
``vmsh.engine.paging``); an address they do not map is a :class:`PageFault`. A debugger's
writes ignore the pages' write protection (that is how it patches kernel text).

Software breakpoints patch INT3 (0xCC) into guest memory and keep the byte they replaced. On
hardware KVM, ``KVM_GUESTDBG_USE_SW_BP`` turns the guest's #BP into a ``KVM_EXIT_DEBUG``; on a
PVM host INT3 never gets that far (KVM's emulator fails on it and ``KVM_RUN`` returns an
emulation failure), so the vCPU loop asks :meth:`is_breakpoint` about each such failure and
stops there instead. Hardware breakpoints and watchpoints go into the debug registers through
``KVM_SET_GUEST_DEBUG``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from vmsh.engine.gdb.guest_debug import MAX_HW_BREAKPOINTS, GuestDebug, HwBreakpoint, set_guest_debug
from vmsh.engine.gdb.registers import RegisterFile, set_register
from vmsh.engine.paging import PagingMode, read_virt, translate
from vmsh.errors import VmshError

LOG = logging.getLogger(__name__)

INT3 = 0xCC


class DebuggableVm(Protocol):
    """What the debugger uses of :class:`vmsh.engine.vm.Vm`."""

    @property
    def vcpus(self) -> Sequence[Any]: ...
    @property
    def memory(self) -> Any: ...


class DebugTarget:
    """Breakpoints, registers and memory of one VM, for one debugger connection."""

    def __init__(self, vm: DebuggableVm) -> None:
        self.vm = vm
        #: software breakpoints: virtual address -> (guest physical address, the byte replaced)
        self.sw: dict[int, tuple[int, int]] = {}
        self.hw: list[HwBreakpoint] = []
        self._sw_addrs: frozenset[int] = frozenset()

    # --- threads ---------------------------------------------------------------------------------

    def thread_ids(self) -> list[int]:
        return [v.index + 1 for v in self.vm.vcpus]

    def vcpu(self, tid: int) -> Any:
        """The vCPU of gdb thread ``tid`` (0 or -1: the first).

        :raises VmshError: for a thread that does not exist.
        """
        vcpus = self.vm.vcpus
        if tid <= 0:
            return vcpus[0]
        for v in vcpus:
            if v.index + 1 == tid:
                return v
        raise VmshError(f"No thread {tid}")

    # --- registers -------------------------------------------------------------------------------

    def registers(self, tid: int) -> RegisterFile:
        fd = self.vcpu(tid).fd
        return RegisterFile(fd.get_regs(), fd.get_sregs(), fd.get_fpu())

    def write_registers(self, tid: int, values: dict[str, bytes]) -> None:
        """Write the general registers, rip and eflags among ``values`` (others: KeyError)."""
        fd = self.vcpu(tid).fd
        regs = fd.get_regs()
        for name, raw in values.items():
            set_register(regs, name, raw)
        fd.set_regs(regs)

    # --- memory ----------------------------------------------------------------------------------

    def _mode(self, tid: int) -> PagingMode:
        s = self.vcpu(tid).fd.get_sregs()
        return PagingMode(s.cr0, s.cr3, s.cr4, s.efer)

    def read(self, tid: int, addr: int, length: int) -> bytes:
        """``length`` bytes at virtual ``addr``, breakpoints shown as the bytes they replaced.

        :raises GuestMemoryError: (a ``PageFault``) when a page is not mapped.
        """
        mem = self.vm.memory
        data = bytearray(read_virt(self._mode(tid), addr, length, mem.read_u64, mem.read))
        for va, (_gpa, orig) in self.sw.items():
            if addr <= va < addr + length:
                data[va - addr] = orig
        return bytes(data)

    def _physical(self, tid: int, addr: int, length: int) -> list[tuple[int, int, int]]:
        """``(gpa, offset, n)`` pieces of a virtual range, all translated before any is used."""
        mode = self._mode(tid)
        mem = self.vm.memory
        out = []
        pos = 0
        while pos < length:
            n = min(length - pos, 0x1000 - ((addr + pos) & 0xFFF))
            out.append((translate(mode, addr + pos, mem.read_u64), pos, n))
            pos += n
        return out

    def write(self, tid: int, addr: int, data: bytes) -> None:
        """Write ``data`` at virtual ``addr`` (read-only pages too); under a software
        breakpoint the saved byte is updated instead and the INT3 stays.

        :raises GuestMemoryError: when a page is not mapped (nothing is written then).
        """
        mem = self.vm.memory
        buf = bytearray(data)
        for va, (gpa, _orig) in list(self.sw.items()):
            if addr <= va < addr + len(buf):
                self.sw[va] = (gpa, buf[va - addr])
                buf[va - addr] = INT3
        for gpa, off, n in self._physical(tid, addr, len(buf)):
            mem.write(gpa, bytes(buf[off:off + n]))

    # --- breakpoints -----------------------------------------------------------------------------

    def insert_sw(self, tid: int, addr: int) -> None:
        if addr in self.sw:
            return
        ((gpa, _off, _n),) = self._physical(tid, addr, 1)
        mem = self.vm.memory
        orig = mem.read(gpa, 1)[0]
        mem.write(gpa, bytes((INT3,)))
        self.sw[addr] = (gpa, orig)
        self._sw_addrs = frozenset(self.sw)

    def remove_sw(self, addr: int) -> bool:
        entry = self.sw.pop(addr, None)
        if entry is None:
            return False
        gpa, orig = entry
        self.vm.memory.write(gpa, bytes((orig,)))
        self._sw_addrs = frozenset(self.sw)
        return True

    def insert_hw(self, bp: HwBreakpoint) -> bool:
        """False when the four debug registers are taken."""
        if bp in self.hw:
            return True
        if len(self.hw) >= MAX_HW_BREAKPOINTS:
            return False
        self.hw.append(bp)
        return True

    def remove_hw(self, bp: HwBreakpoint) -> bool:
        if bp not in self.hw:
            return False
        self.hw.remove(bp)
        return True

    def is_breakpoint(self, vcpu: Any, insn: bytes) -> bool:
        """On a vCPU thread, for an emulation failure: is this INT3 one of ours?"""
        if not self._sw_addrs or (insn and insn[0] != INT3):
            return False
        return int(vcpu.fd.get_regs().rip) in self._sw_addrs

    # --- resuming --------------------------------------------------------------------------------

    def arm(self, step_tid: int | None) -> None:
        """Set every vCPU's guest debugging before the VM resumes: the hardware breakpoints on
        all of them, single step on ``step_tid``'s only.

        :raises KvmIoctlError: when KVM refuses (the caller reports it to the debugger).
        """
        for v in self.vm.vcpus:
            debug = GuestDebug(single_step=step_tid is not None and v.index + 1 == step_tid,
                               sw_breakpoints=bool(self.sw), hw=list(self.hw))
            set_guest_debug(v.fd.fd, debug)

    def clear(self) -> None:
        """Remove every breakpoint and switch guest debugging off (detach)."""
        for addr in list(self.sw):
            self.remove_sw(addr)
        self.hw.clear()
        for v in self.vm.vcpus:
            try:
                set_guest_debug(v.fd.fd, GuestDebug())
            except VmshError as err:
                LOG.warning("vcpu%d: cannot switch guest debugging off: %s", v.index, err)
