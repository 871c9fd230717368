"""A debugger attached to a VMM's VM: stop it, resume it (or step one vCPU), wait for the next
stop and say why it stopped, detach. The gdb stub (:mod:`.stub`) and the shell's debugging
commands (:mod:`vmsh.script.debug_commands`) are two faces of this one session.

Stopping and resuming are the VMM's ``vm.pause`` and ``vm.resume`` actions (run with
:meth:`Vmm.do`, holding ``Vmm.lock``); everything else (registers, guest RAM, debug registers)
happens while the VM is paused, in the caller's thread. A vCPU that stops at a breakpoint or
after a step only writes a byte to this session's pipe (:attr:`Vm.debug_listener`); its
other vCPUs are stopped by the pause that follows (docs/threading.md).
"""

from __future__ import annotations

import logging
import os
import select
from dataclasses import dataclass
from typing import Any, Protocol

from vmsh.engine.gdb.guest_debug import RW_ACCESS, RW_WRITE
from vmsh.engine.gdb.target import DebugTarget
from vmsh.engine.state import VmState
from vmsh.engine.vcpu import InternalErrorExit, Vcpu, VcpuStop
from vmsh.errors import VmshError

LOG = logging.getLogger(__name__)

#: DR6 bits (SDM vol. 3B §18.2.3): B0-B3 (a breakpoint condition met), BS (single step)
DR6_B_MASK, DR6_BS = 0xF, 1 << 14
VECTOR_DB, VECTOR_BP = 1, 3


class Control(Protocol):
    """What a debugger needs of the VMM (:class:`vmsh.engine.vmm.Vmm`)."""

    @property
    def lock(self) -> Any: ...
    @property
    def vm(self) -> Any: ...
    def do(self, endpoint: str, body: Any = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class Stop:
    """Why the VM stopped: ``kind`` is ``swbreak``, ``hwbreak``, ``watch``, ``awatch``,
    ``step``, or ``interrupt`` (the debugger stopped it); ``tid`` the gdb thread (vCPU index
    + 1); ``addr`` the watched address of a watchpoint."""

    tid: int
    kind: str
    addr: int = 0


class DebugSession:
    """One debugger's hold on the VM of ``control``."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.vm: Any = None
        self.target: DebugTarget | None = None
        self.running = False
        #: the thread being single-stepped (None: continuing)
        self.stepping: int | None = None
        #: detaching lets the VM run: it ran when the debugger came, or the debugger resumed it
        #: (a VM paused through the API before the debugger came stays paused, as in
        #: cloud-hypervisor, whose stub resumes only what it stopped)
        self._resume_on_detach = False
        self._wake_r, self._wake_w = os.pipe()

    @property
    def wake_fd(self) -> int:
        """Readable when a vCPU has stopped at a breakpoint or after a step."""
        return self._wake_r

    def attach(self) -> DebugTarget:
        """Take the VM and stop it.

        :raises VmshError: when there is no running or paused VM.
        """
        with self.control.lock:
            vm = self.control.vm
            if vm is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                raise VmshError("There is no running VM to debug")
            if getattr(vm, "debug_listener", None) is not None:
                raise VmshError("Another debugger is attached to this VM")
            self.vm = vm
            self.target = DebugTarget(vm)
            vm.debug_listener = self._wake
            for vcpu in vm.vcpus:
                vcpu.debug_filter = self._filter
            if vm.state is VmState.RUNNING:
                self._resume_on_detach = True
                self.control.do("vm.pause")
        return self.target

    @property
    def attached(self) -> bool:
        return self.vm is not None and self.control.vm is self.vm

    def _wake(self, _vcpu: Vcpu) -> None:
        # on a vCPU thread: the stop itself (pausing the other vCPUs) is the debugger's work
        os.write(self._wake_w, b"x")

    def _filter(self, vcpu: Vcpu, err: InternalErrorExit) -> bool:
        target = self.target
        return target is not None and target.is_breakpoint(vcpu, err.insn_bytes)

    def stop(self, default_tid: int = 1) -> Stop:
        """Pause the VM (if it runs) and say why it stopped."""
        with self.control.lock:
            if self.vm.state is VmState.RUNNING:
                self.control.do("vm.pause")
        while select.select([self._wake_r], [], [], 0)[0]:
            os.read(self._wake_r, 64)
        self.running = False
        return self.why(default_tid)

    def why(self, default_tid: int) -> Stop:
        """The stop of the vCPU that hit something (a breakpoint, a step), or an interrupt of
        ``default_tid``."""
        assert self.target is not None
        for vcpu in self.vm.vcpus:
            if vcpu.stop_reason is not VcpuStop.DEBUG:
                continue
            tid = vcpu.index + 1
            info = vcpu.debug_exit
            if info is None:  # an INT3 of ours that the PVM emulator failed on
                return Stop(tid, "swbreak")
            vector, _pc, dr6, _dr7 = info
            if vector == VECTOR_BP:
                return Stop(tid, "swbreak")
            if vector == VECTOR_DB and dr6 & DR6_B_MASK and not (self.stepping == tid and dr6 & DR6_BS):
                index = (dr6 & DR6_B_MASK).bit_length() - 1
                if index < len(self.target.hw):
                    bp = self.target.hw[index]
                    if bp.rw == RW_WRITE:
                        return Stop(tid, "watch", bp.addr)
                    if bp.rw == RW_ACCESS:
                        return Stop(tid, "awatch", bp.addr)
                    return Stop(tid, "hwbreak")
            return Stop(tid, "step")
        return Stop(default_tid, "interrupt")

    def resume(self, step_tid: int | None = None) -> None:
        """Arm the breakpoints (and single step on ``step_tid``) and let the VM run.

        :raises VmshError: when KVM refuses the debug state.
        """
        assert self.target is not None
        self.target.arm(step_tid)
        self.stepping = step_tid
        self._resume_on_detach = True
        with self.control.lock:
            if self.vm.state is VmState.PAUSED:
                self.control.do("vm.resume")
        self.running = True

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for a vCPU to stop; True if one did."""
        return bool(select.select([self._wake_r], [], [], timeout)[0])

    def detach(self) -> None:
        """Remove every breakpoint, switch guest debugging off, and let the VM run (safe to
        call twice)."""
        vm = self.vm
        if vm is None:
            return
        with self.control.lock:
            if self.control.vm is vm and vm.state is VmState.RUNNING:
                self.control.do("vm.pause")
            vm.debug_listener = None
            for vcpu in vm.vcpus:
                vcpu.debug_filter = None
            if self.control.vm is vm and vm.state is VmState.PAUSED:
                assert self.target is not None
                self.target.clear()
                if self._resume_on_detach:
                    self.control.do("vm.resume")
        self.vm = None
        self.running = False

    def close(self) -> None:
        """Detach, and release the pipe."""
        try:
            self.detach()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
