"""``KVM_SET_GUEST_DEBUG``: single step, hardware breakpoints and watchpoints, software
breakpoint exits (Linux Documentation/virt/kvm/api.rst, "KVM_SET_GUEST_DEBUG"; the debug
register layout is Intel SDM vol. 3B §18.2).

KVM then ends ``KVM_RUN`` with ``KVM_EXIT_DEBUG`` (``struct kvm_debug_exit_arch``: exception
vector, pc, DR6, DR7) where it would otherwise deliver #DB or #BP to the guest.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import struct
from dataclasses import dataclass, field

from vmsh.engine.kvm_ioctl import KvmIoctlError

LOG = logging.getLogger(__name__)

# <linux/kvm.h>
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
#: no interrupt injected while single-stepping (Linux 5.16+), so a step does not land in the
#: timer interrupt's handler (QEMU's gdb stub masks interrupts during a step the same way)
KVM_GUESTDBG_BLOCKIRQ = 0x100000
#: _IOW(KVMIO, 0x9b, struct kvm_guest_debug): control u32, pad u32, debugreg[8] u64 (72 bytes)
KVM_SET_GUEST_DEBUG = 0x4048AE9B
_GUEST_DEBUG = struct.Struct("<II8Q")

#: the debug address registers DR0-DR3
MAX_HW_BREAKPOINTS = 4
#: DR7 R/W field values (SDM vol. 3B §18.2.4): instruction, write, I/O, read or write
RW_EXECUTE, RW_WRITE, RW_ACCESS = 0b00, 0b01, 0b11
#: DR7 LEN field values for 1, 2, 8 and 4 bytes
_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
#: DR7 GE (bit 9) and the reserved bit 10 that reads as 1
_DR7_FIXED = 1 << 9 | 1 << 10


@dataclass(frozen=True, slots=True)
class HwBreakpoint:
    """One debug-register breakpoint: address, kind (RW_*), length in bytes."""

    addr: int
    rw: int = RW_EXECUTE
    length: int = 1


@dataclass(slots=True)
class GuestDebug:
    """What one vCPU's guest debugging is set to."""

    single_step: bool = False
    #: with ``single_step``: keep interrupts out of the step (KVM_GUESTDBG_BLOCKIRQ)
    block_irq: bool = True
    sw_breakpoints: bool = False
    hw: list[HwBreakpoint] = field(default_factory=list)

    def control(self) -> int:
        ctl = 0
        if self.single_step:
            ctl |= KVM_GUESTDBG_SINGLESTEP
            if self.block_irq:
                ctl |= KVM_GUESTDBG_BLOCKIRQ
        if self.sw_breakpoints:
            ctl |= KVM_GUESTDBG_USE_SW_BP
        if self.hw:
            ctl |= KVM_GUESTDBG_USE_HW_BP
        return ctl | KVM_GUESTDBG_ENABLE if ctl else 0

    def debugregs(self) -> list[int]:
        """DR0-DR3, (DR4, DR5 unused), DR6, DR7 as ``debugreg[8]`` wants them."""
        regs = [0] * 8
        dr7 = _DR7_FIXED if self.hw else 0
        for i, bp in enumerate(self.hw[:MAX_HW_BREAKPOINTS]):
            regs[i] = bp.addr
            length = 1 if bp.rw == RW_EXECUTE else bp.length
            # G<i> (global enable, bit 2i+1), R/W<i> at 16+4i, LEN<i> at 18+4i
            dr7 |= 1 << (2 * i + 1) | bp.rw << (16 + 4 * i) | _LEN[length] << (18 + 4 * i)
        regs[7] = dr7
        return regs


def encode(debug: GuestDebug) -> bytes:
    """The ``struct kvm_guest_debug`` for ``debug``."""
    return _GUEST_DEBUG.pack(debug.control(), 0, *debug.debugregs())


def set_guest_debug(vcpu_fd: int, debug: GuestDebug) -> None:
    """Apply ``debug`` to a vCPU that is not in ``KVM_RUN``; a kernel without
    KVM_GUESTDBG_BLOCKIRQ (EINVAL) steps with interrupts instead.

    :raises KvmIoctlError: when KVM refuses it (no KVM_CAP_SET_GUEST_DEBUG, a bad DR7).
    """
    try:
        fcntl.ioctl(vcpu_fd, KVM_SET_GUEST_DEBUG, encode(debug))
        return
    except OSError as err:
        if not (err.errno == errno.EINVAL and debug.single_step and debug.block_irq):
            raise KvmIoctlError("KVM_SET_GUEST_DEBUG", err.errno or 0) from err
    LOG.info("KVM_GUESTDBG_BLOCKIRQ refused: single steps may enter interrupt handlers")
    try:
        fcntl.ioctl(vcpu_fd, KVM_SET_GUEST_DEBUG, encode(dataclasses.replace(debug, block_irq=False)))
    except OSError as err:
        raise KvmIoctlError("KVM_SET_GUEST_DEBUG", err.errno or 0) from err
