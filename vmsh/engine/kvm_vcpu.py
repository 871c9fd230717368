"""Thin typed layer over the KVM vCPU ioctls: ``VcpuFd``, one method per ioctl, and the exit reasons.

A vCPU fd comes from ``vmsh.engine.kvm.VmFd.create_vcpu``; its ``kvm_run`` page is mapped
here and ``KVM_RUN`` is entered with the GIL released. Registers cross this boundary as the
plain dataclasses of ``vmsh.engine.kvm_types``; the LAPIC page, XSAVE image and debug
registers as the raw bytes of their ``<linux/kvm.h>`` structs.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import operator
import os
import struct

from vmsh.engine.kvm_ioctl import KvmIoctlError, checked, ffi, fill_struct, lib
from vmsh.engine.kvm_types import (
    REG_FIELDS,
    CpuidEntry,
    DTable,
    Fpu,
    Regs,
    Sregs,
    VcpuEvents,
    copy_to_c,
    cpuid_entry_from_c,
    segment_from_c,
)

# Exit reasons re-exported for callers that must not touch the cffi module.
EXIT_IO: int = lib.KVM_EXIT_IO
EXIT_MMIO: int = lib.KVM_EXIT_MMIO
EXIT_HLT: int = lib.KVM_EXIT_HLT
EXIT_SHUTDOWN: int = lib.KVM_EXIT_SHUTDOWN
EXIT_FAIL_ENTRY: int = lib.KVM_EXIT_FAIL_ENTRY
EXIT_INTR: int = lib.KVM_EXIT_INTR
EXIT_INTERNAL_ERROR: int = lib.KVM_EXIT_INTERNAL_ERROR
EXIT_SYSTEM_EVENT: int = lib.KVM_EXIT_SYSTEM_EVENT
EXIT_DEBUG: int = lib.KVM_EXIT_DEBUG
EXIT_IO_IN: int = lib.KVM_EXIT_IO_IN
EXIT_IO_OUT: int = lib.KVM_EXIT_IO_OUT

#: exit reason number -> name, for messages
EXIT_NAMES: dict[int, str] = {
    getattr(lib, n): n[len("KVM_EXIT_"):]
    for n in dir(lib)
    if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}

_U32 = struct.Struct("<I")
#: struct kvm_regs: 18 u64 in REG_FIELDS order (checked against the header at import below)
_REGS = struct.Struct("<18Q")
_regs_values = operator.attrgetter(*REG_FIELDS)
assert ffi.sizeof("struct kvm_regs") == _REGS.size and ffi.offsetof("struct kvm_regs", "rip") == 16 * 8


class VcpuFd:
    """A vCPU fd with its mmap'd ``kvm_run`` page."""

    def __init__(self, fd: int, vcpu_id: int, run_size: int) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        # INVARIANTS: the vCPU fd's mmap at offset 0 is the kvm_run page plus the PIO data
        # area, run_size bytes as KVM_GET_VCPU_MMAP_SIZE says; it lives as long as this object.
        self.run_mmap = mmap.mmap(fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        #: writable view of the kvm_run page, read with the VMSH_RUN_* offsets
        self.run_page = memoryview(self.run_mmap)

    def close(self) -> None:
        """Unmap the run page and close the fd."""
        if self.fd >= 0:
            self.run_page.release()
            self.run_mmap.close()
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """KVM_RUN with the GIL released; returns the exit reason.

        EINTR (a signal kicked the thread out, or ``immediate_exit`` was set) comes back as
        ``EXIT_INTR``.

        :raises KvmIoctlError: on any other failure.
        """
        ret = lib.vmsh_kvm_run(self.fd)
        if ret < 0:
            if ret == -errno.EINTR or ret == -errno.EAGAIN:
                return EXIT_INTR
            raise KvmIoctlError("KVM_RUN", -ret)
        return int(_U32.unpack_from(self.run_mmap, lib.VMSH_RUN_EXIT_REASON)[0])

    def set_immediate_exit(self, value: bool) -> None:
        """Set ``kvm_run.immediate_exit``: the next KVM_RUN returns EINTR at once."""
        self.run_mmap[lib.VMSH_RUN_IMMEDIATE_EXIT] = 1 if value else 0

    # -- registers ------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        """KVM_GET_REGS."""
        c = ffi.new("struct kvm_regs *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_REGS, c), "KVM_GET_REGS")
        # One unpack of the 18 u64s is several times cheaper than 18 cffi attribute reads,
        # and the PVM instruction handler does this on every emulation failure.
        return Regs(*_REGS.unpack(ffi.buffer(c)))

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS."""
        c = ffi.new("struct kvm_regs *")
        ffi.buffer(c)[:] = _REGS.pack(*_regs_values(regs))
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_REGS, c), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS."""
        c = ffi.new("struct kvm_sregs *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_SREGS, c), "KVM_GET_SREGS")
        segs = {n: segment_from_c(getattr(c, n)) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")}
        bitmap = tuple(int(x) for x in c.interrupt_bitmap)
        return Sregs(
            **segs,
            gdt=DTable(c.gdt.base, c.gdt.limit), idt=DTable(c.idt.base, c.idt.limit),
            cr0=c.cr0, cr2=c.cr2, cr3=c.cr3, cr4=c.cr4, cr8=c.cr8, efer=c.efer, apic_base=c.apic_base,
            interrupt_bitmap=(bitmap[0], bitmap[1], bitmap[2], bitmap[3]),
        )

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS."""
        c = ffi.new("struct kvm_sregs *")
        copy_to_c(sregs, c)
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_SREGS, c), "KVM_SET_SREGS")

    def get_fpu(self) -> Fpu:
        """KVM_GET_FPU."""
        c = ffi.new("struct kvm_fpu *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_FPU, c), "KVM_GET_FPU")
        return Fpu(bytes(ffi.buffer(c.fpr)), c.fcw, c.fsw, c.ftwx, c.last_opcode, c.last_ip,
                   c.last_dp, bytes(ffi.buffer(c.xmm)), c.mxcsr)

    def set_fpu(self, fpu: Fpu) -> None:
        """KVM_SET_FPU."""
        c = ffi.new("struct kvm_fpu *")
        for name in ("fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "mxcsr"):
            setattr(c, name, getattr(fpu, name))
        ffi.buffer(c.fpr)[:] = fpu.fpr
        ffi.buffer(c.xmm)[:] = fpu.xmm
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_FPU, c), "KVM_SET_FPU")

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the XSAVE image in the standard (uabi) format.

        Unlike KVM_GET_FPU this reports MXCSR correctly when the SSE state is in its init
        state (on the PVM host KVM_GET_FPU reads MXCSR as 0 and KVM_SET_FPU does not keep it).
        """
        # 4 KiB, the fixed KVM_GET_XSAVE size: vmsh never grants AMX's dynamic state, so the
        # guest's XSAVE image always fits (Documentation/virt/kvm/api.rst, KVM_GET_XSAVE2).
        buf = ffi.new("uint32_t[]", 1024)
        # INVARIANTS: buf is the 4096 bytes struct kvm_xsave has.
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_XSAVE, buf), "KVM_GET_XSAVE")
        return bytes(ffi.buffer(buf))

    def set_xsave(self, image: bytes) -> None:
        """KVM_SET_XSAVE with an image from ``get_xsave``."""
        buf = ffi.new("uint32_t[]", 1024)
        ffi.buffer(buf)[:min(len(image), 4096)] = image[:4096]
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_XSAVE, buf), "KVM_SET_XSAVE")

    def get_mxcsr(self) -> int:
        """MXCSR, from the XSAVE image (legacy area offset 24, SDM vol. 1 §13.4.1)."""
        return int(int.from_bytes(self.get_xsave()[24:28], "little"))

    def set_mxcsr(self, value: int) -> None:
        """Set MXCSR through KVM_SET_XSAVE, marking the SSE component live (XSTATE_BV bit 1)
        so that XRSTOR loads it instead of the init value."""
        image = bytearray(self.get_xsave())
        image[24:28] = value.to_bytes(4, "little")
        xstate_bv = int.from_bytes(image[512:520], "little") | 0x2
        image[512:520] = xstate_bv.to_bytes(8, "little")
        self.set_xsave(bytes(image))

    # -- CPUID and MSRs ---------------------------------------------------------------------

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the vCPU."""
        req = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args) + [0] * (4 - len(args))})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_ENABLE_CAP, req), f"KVM_ENABLE_CAP {cap}")

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            copy_to_c(e, c.entries[i])
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_CPUID2, c), "KVM_SET_CPUID2")

    def get_cpuid2(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID the vCPU actually has (PVM re-forces bits; see pvm.py)."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_CPUID2, c), "KVM_GET_CPUID2")
        return [cpuid_entry_from_c(c.entries[i]) for i in range(c.nent)]

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs KVM does not know are left out of the result."""
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            c.entries[i].index = idx
        n = checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_MSRS, c), "KVM_GET_MSRS")
        return {c.entries[i].index: c.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it rejects)."""
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for i, (idx, val) in enumerate(msrs.items()):
            c.entries[i].index = idx
            c.entries[i].data = val
        return checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_MSRS, c), "KVM_SET_MSRS")

    # -- events, LAPIC ------------------------------------------------------------------------

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS."""
        c = ffi.new("vmsh_vcpu_events *")
        checked(lib.vmsh_get_vcpu_events(self.fd, c), "KVM_GET_VCPU_EVENTS")
        return VcpuEvents(*(getattr(c, f.name) for f in dataclasses.fields(VcpuEvents)))

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS."""
        c = ffi.new("vmsh_vcpu_events *")
        copy_to_c(events, c)
        checked(lib.vmsh_set_vcpu_events(self.fd, c), "KVM_SET_VCPU_EVENTS")

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1 KiB local APIC register page."""
        c = ffi.new("struct kvm_lapic_state *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_LAPIC, c), "KVM_GET_LAPIC")
        return bytes(ffi.buffer(c))

    def set_lapic(self, regs: bytes) -> None:
        """KVM_SET_LAPIC."""
        c = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(c)[:] = regs
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_LAPIC, c), "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (KVM_MP_STATE_RUNNABLE, _UNINITIALIZED, _HALTED, ...)."""
        c = ffi.new("struct kvm_mp_state *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_MP_STATE, c), "KVM_GET_MP_STATE")
        return int(c.mp_state)

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        c = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_MP_STATE, c), "KVM_SET_MP_STATE")

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS: extended control registers (XCR0) by index."""
        c = ffi.new("struct kvm_xcrs *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_XCRS, c), "KVM_GET_XCRS")
        return {int(c.xcrs[i].xcr): int(c.xcrs[i].value) for i in range(min(c.nr_xcrs, 16))}

    def set_xcrs(self, xcrs: dict[int, int]) -> None:
        """KVM_SET_XCRS."""
        c = ffi.new("struct kvm_xcrs *", {"nr_xcrs": len(xcrs)})
        for i, (idx, value) in enumerate(xcrs.items()):
            c.xcrs[i].xcr = idx
            c.xcrs[i].value = value
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_XCRS, c), "KVM_SET_XCRS")

    def get_debugregs(self) -> bytes:
        """KVM_GET_DEBUGREGS: the raw ``struct kvm_debugregs``."""
        c = ffi.new("struct kvm_debugregs *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_DEBUGREGS, c), "KVM_GET_DEBUGREGS")
        return bytes(ffi.buffer(c))

    def set_debugregs(self, raw: bytes) -> None:
        """KVM_SET_DEBUGREGS with bytes from ``get_debugregs``."""
        c = ffi.new("struct kvm_debugregs *")
        fill_struct(c, raw, "kvm_debugregs")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_DEBUGREGS, c), "KVM_SET_DEBUGREGS")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0), "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ."""
        checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz), "KVM_SET_TSC_KHZ")

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI on this vCPU (needs the in-kernel irqchip)."""
        checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_NMI, 0), "KVM_NMI")

    def translate(self, gva: int) -> tuple[int, bool]:
        """KVM_TRANSLATE: guest virtual to physical through the vCPU's current paging mode.

        :returns: ``(gpa, valid)``.
        """
        c = ffi.new("struct kvm_translation *", {"linear_address": gva})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_TRANSLATE, c), "KVM_TRANSLATE")
        return c.physical_address, bool(c.valid)

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD for this vCPU."""
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_STATS_FD, 0), "KVM_GET_STATS_FD")
