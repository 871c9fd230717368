"""Thin typed layer over the KVM ioctls: ``Kvm``, ``VmFd`` and ``VcpuFd``, one method per ioctl.

The ioctl numbers and struct layouts come from ``<linux/kvm.h>`` through the cffi module
``vmsh._native`` (built from ``native/build_kvm.py``). This module is policy-free: it does
not decide which CPUID bits a guest sees or where memory goes; the callers (``cpuid.py``,
``memory.py``, ``boot/``) do. Register sets cross this boundary as plain dataclasses so they
can be logged, compared and stored in snapshots.

Example::

    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    regs = vcpu.get_regs()
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import operator
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from vmsh.errors import KvmError

try:
    from vmsh._native import ffi, lib
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "vmsh._native is missing: reinstall with `pip install -e .` (needs gcc and the kernel headers)"
    ) from err

LOG = logging.getLogger(__name__)

KVM_PATH = "/dev/kvm"

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


class KvmIoctlError(KvmError):
    """An ioctl failed; ``errno`` holds the error number."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {os.strerror(err)} (errno {err})")
        #: the positive errno of the failed call
        self.errno = err


def _fill(cobj: Any, raw: bytes, what: str) -> None:
    buf = ffi.buffer(cobj)
    if len(raw) != len(buf):
        raise KvmError(f"{what}: {len(raw)} bytes given, the struct has {len(buf)}")
    buf[:] = raw


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise KvmIoctlError(what, -ret)
    return ret


# ---------------------------------------------------------------------------------------------
# Plain-data mirrors of the uapi structs


def _to_c(obj: Any, cobj: Any) -> None:
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        if dataclasses.is_dataclass(val):
            _to_c(val, getattr(cobj, f.name))
        elif isinstance(val, (bytes, tuple)):
            dst = getattr(cobj, f.name)
            for i, v in enumerate(val):
                dst[i] = v
        else:
            setattr(cobj, f.name, val)


@dataclass(slots=True)
class Regs:
    """``struct kvm_regs``: the general-purpose registers, rip and rflags."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


#: kvm_regs field order (not the x86 encoding order: see ``vmsh.engine.x86.emulate.GPR_NAMES``)
REG_FIELDS = tuple(f.name for f in dataclasses.fields(Regs))


@dataclass(slots=True)
class Segment:
    """``struct kvm_segment``: a segment register with its hidden descriptor cache."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the uapi field name
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass(slots=True)
class DTable:
    """``struct kvm_dtable``: GDTR or IDTR."""

    base: int = 0
    limit: int = 0


@dataclass(slots=True)
class Sregs:
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER, APIC base."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(slots=True)
class Fpu:
    """``struct kvm_fpu`` (FXSAVE layout): x87 registers, control/status words, XMM, MXCSR."""

    fpr: bytes = bytes(128)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: bytes = bytes(256)
    mxcsr: int = 0x1F80


@dataclass(slots=True)
class CpuidEntry:
    """``struct kvm_cpuid_entry2``: one CPUID leaf/subleaf."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


@dataclass(slots=True)
class VcpuEvents:
    """``struct kvm_vcpu_events``: pending/injected exception, interrupt, NMI and SMI state."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_smm_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0


def _seg_from_c(c: Any) -> Segment:
    return Segment(c.base, c.limit, c.selector, c.type, c.present, c.dpl, c.db, c.s, c.l, c.g,
                   c.avl, c.unusable)


def _cpuid_from_c(c: Any) -> CpuidEntry:
    return CpuidEntry(c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx)


# ---------------------------------------------------------------------------------------------


class Kvm:
    """An open ``/dev/kvm``: system ioctls and VM creation."""

    def __init__(self, path: str = KVM_PATH) -> None:
        """:raises KvmError: when the device cannot be opened or its API version is wrong."""
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmError(f"cannot open {path}") from err
        version = self.api_version()
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"KVM API version {version}, expected {lib.KVM_API_VERSION}")

    def close(self) -> None:
        """Close the fd (VMs created from it stay valid)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd; 0 when absent."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap), "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run plus PIO data)."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID, retried with a larger buffer on E2BIG."""
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            # INVARIANTS: buf holds nent entries, as the ioctl requires.
            ret = lib.vmsh_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if ret == -errno.E2BIG and max_entries < 4096:
                max_entries *= 2
                continue
            _check(ret, "KVM_GET_SUPPORTED_CPUID")
            return [_cpuid_from_c(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self, feature: bool = False) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (or the FEATURE list): the MSRs KVM saves/knows."""
        req = lib.KVM_GET_MSR_FEATURE_INDEX_LIST if feature else lib.KVM_GET_MSR_INDEX_LIST
        n = 1024
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        # INVARIANTS: buf holds nmsrs indices.
        _check(lib.vmsh_ioctl(self.fd, req, buf), "KVM_GET_MSR_INDEX_LIST")
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM (default machine type)."""
        fd = _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        os.set_inheritable(fd, False)
        return VmFd(fd, self.vcpu_mmap_size())

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VmFd:
    """A VM fd: memory slots, vCPU creation, irqchip, interrupts and event fds."""

    def __init__(self, fd: int, run_size: int) -> None:
        self.fd = fd
        self._run_size = run_size

    def close(self) -> None:
        """Close the VM fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap), "KVM_CHECK_EXTENSION")

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """KVM_CREATE_VCPU, then mmap its ``kvm_run`` page."""
        fd = _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id), f"KVM_CREATE_VCPU {vcpu_id}")
        os.set_inheritable(fd, False)
        return VcpuFd(fd, vcpu_id, self._run_size)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (``memory_size`` 0 deletes the slot)."""
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size, "userspace_addr": userspace_addr})
        # INVARIANTS: userspace_addr..+memory_size is a mapping the caller keeps alive for as
        # long as the slot exists (GuestMemory owns it).
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
               f"KVM_SET_USER_MEMORY_REGION slot {slot}")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM needs below 4 GiB on Intel."""
        _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr), "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR."""
        buf = ffi.new("uint64_t *", addr)
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, buf), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs."""
        _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254."""
        cfg = ffi.new("struct kvm_pit_config *", {"flags": flags})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg), "KVM_CREATE_PIT2")

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises ``gsi`` without a trip through user space."""
        req = ffi.new("struct kvm_irqfd *", {
            "fd": fd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_IRQFD, req), "KVM_IRQFD")

    def set_gsi_routing(self, irqchip: list[tuple[int, int, int]], msi: list[tuple[int, int, int]]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI table.

        ``irqchip`` holds (gsi, chip, pin) routes to the in-kernel PIC/IOAPIC, ``msi`` holds
        (gsi, address, data) MSI messages. The table replaces KVM's default one, so the
        irqchip routes must be repeated every time.
        """
        entries = len(irqchip) + len(msi)
        table = ffi.new("struct kvm_irq_routing *", {"nr": entries, "entries": entries})
        for i, (gsi, chip, pin) in enumerate(irqchip):
            e = table.entries[i]
            e.gsi, e.type = gsi, lib.KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
        for i, (gsi, address, data) in enumerate(msi, start=len(irqchip)):
            e = table.entries[i]
            e.gsi, e.type = gsi, lib.KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo, e.u.msi.address_hi = address & 0xFFFF_FFFF, address >> 32
            e.u.msi.data = data
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, table), "KVM_SET_GSI_ROUTING")

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals eventfd ``fd`` instead of exiting."""
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_IOEVENTFD, req), "KVM_IOEVENTFD")

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM."""
        req = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args) + [0] * (4 - len(args))})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_ENABLE_CAP, req), f"KVM_ENABLE_CAP {cap}")

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the raw ``struct kvm_irqchip`` (PIC master 0, slave 1, IOAPIC 2)."""
        c = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_IRQCHIP, c), "KVM_GET_IRQCHIP")
        return bytes(ffi.buffer(c))

    def set_irqchip(self, raw: bytes) -> None:
        """KVM_SET_IRQCHIP with bytes from ``get_irqchip``."""
        c = ffi.new("struct kvm_irqchip *")
        _fill(c, raw, "kvm_irqchip")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_IRQCHIP, c), "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: the raw ``struct kvm_pit_state2``."""
        c = ffi.new("struct kvm_pit_state2 *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_PIT2, c), "KVM_GET_PIT2")
        return bytes(ffi.buffer(c))

    def set_pit2(self, raw: bytes) -> None:
        """KVM_SET_PIT2 with bytes from ``get_pit2``."""
        c = ffi.new("struct kvm_pit_state2 *")
        _fill(c, raw, "kvm_pit_state2")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_PIT2, c), "KVM_SET_PIT2")

    def get_clock(self) -> tuple[int, int]:
        """KVM_GET_CLOCK: ``(kvmclock ns, flags)``."""
        c = ffi.new("struct kvm_clock_data *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_CLOCK, c), "KVM_GET_CLOCK")
        return int(c.clock), int(c.flags)

    def set_clock(self, clock: int) -> None:
        """KVM_SET_CLOCK: set kvmclock to ``clock`` ns."""
        c = ffi.new("struct kvm_clock_data *", {"clock": clock})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_CLOCK, c), "KVM_SET_CLOCK")

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a new fd with the VM's binary statistics (see ``stats.py``)."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_STATS_FD, 0), "KVM_GET_STATS_FD")


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
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_REGS, c), "KVM_GET_REGS")
        # One unpack of the 18 u64s is several times cheaper than 18 cffi attribute reads,
        # and the PVM instruction handler does this on every emulation failure.
        return Regs(*_REGS.unpack(ffi.buffer(c)))

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS."""
        c = ffi.new("struct kvm_regs *")
        ffi.buffer(c)[:] = _REGS.pack(*_regs_values(regs))
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_REGS, c), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS."""
        c = ffi.new("struct kvm_sregs *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_SREGS, c), "KVM_GET_SREGS")
        segs = {n: _seg_from_c(getattr(c, n)) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")}
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
        _to_c(sregs, c)
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_SREGS, c), "KVM_SET_SREGS")

    def get_fpu(self) -> Fpu:
        """KVM_GET_FPU."""
        c = ffi.new("struct kvm_fpu *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_FPU, c), "KVM_GET_FPU")
        return Fpu(bytes(ffi.buffer(c.fpr)), c.fcw, c.fsw, c.ftwx, c.last_opcode, c.last_ip,
                   c.last_dp, bytes(ffi.buffer(c.xmm)), c.mxcsr)

    def set_fpu(self, fpu: Fpu) -> None:
        """KVM_SET_FPU."""
        c = ffi.new("struct kvm_fpu *")
        for name in ("fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "mxcsr"):
            setattr(c, name, getattr(fpu, name))
        ffi.buffer(c.fpr)[:] = fpu.fpr
        ffi.buffer(c.xmm)[:] = fpu.xmm
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_FPU, c), "KVM_SET_FPU")

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the XSAVE image in the standard (uabi) format.

        Unlike KVM_GET_FPU this reports MXCSR correctly when the SSE state is in its init
        state (on the PVM host KVM_GET_FPU reads MXCSR as 0 and KVM_SET_FPU does not keep it).
        """
        # 4 KiB, the fixed KVM_GET_XSAVE size: vmsh never grants AMX's dynamic state, so the
        # guest's XSAVE image always fits (Documentation/virt/kvm/api.rst, KVM_GET_XSAVE2).
        buf = ffi.new("uint32_t[]", 1024)
        # INVARIANTS: buf is the 4096 bytes struct kvm_xsave has.
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_XSAVE, buf), "KVM_GET_XSAVE")
        return bytes(ffi.buffer(buf))

    def set_xsave(self, image: bytes) -> None:
        """KVM_SET_XSAVE with an image from ``get_xsave``."""
        buf = ffi.new("uint32_t[]", 1024)
        ffi.buffer(buf)[:min(len(image), 4096)] = image[:4096]
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_XSAVE, buf), "KVM_SET_XSAVE")

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
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_ENABLE_CAP, req), f"KVM_ENABLE_CAP {cap}")

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            _to_c(e, c.entries[i])
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_CPUID2, c), "KVM_SET_CPUID2")

    def get_cpuid2(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID the vCPU actually has (PVM re-forces bits; see pvm.py)."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_CPUID2, c), "KVM_GET_CPUID2")
        return [_cpuid_from_c(c.entries[i]) for i in range(c.nent)]

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs KVM does not know are left out of the result."""
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            c.entries[i].index = idx
        n = _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_MSRS, c), "KVM_GET_MSRS")
        return {c.entries[i].index: c.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it rejects)."""
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for i, (idx, val) in enumerate(msrs.items()):
            c.entries[i].index = idx
            c.entries[i].data = val
        return _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_MSRS, c), "KVM_SET_MSRS")

    # -- events, LAPIC ------------------------------------------------------------------------

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS."""
        c = ffi.new("vmsh_vcpu_events *")
        _check(lib.vmsh_get_vcpu_events(self.fd, c), "KVM_GET_VCPU_EVENTS")
        return VcpuEvents(*(getattr(c, f.name) for f in dataclasses.fields(VcpuEvents)))

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS."""
        c = ffi.new("vmsh_vcpu_events *")
        _to_c(events, c)
        _check(lib.vmsh_set_vcpu_events(self.fd, c), "KVM_SET_VCPU_EVENTS")

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1 KiB local APIC register page."""
        c = ffi.new("struct kvm_lapic_state *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_LAPIC, c), "KVM_GET_LAPIC")
        return bytes(ffi.buffer(c))

    def set_lapic(self, regs: bytes) -> None:
        """KVM_SET_LAPIC."""
        c = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(c)[:] = regs
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_LAPIC, c), "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (KVM_MP_STATE_RUNNABLE, _UNINITIALIZED, _HALTED, ...)."""
        c = ffi.new("struct kvm_mp_state *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_MP_STATE, c), "KVM_GET_MP_STATE")
        return int(c.mp_state)

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        c = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_MP_STATE, c), "KVM_SET_MP_STATE")

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS: extended control registers (XCR0) by index."""
        c = ffi.new("struct kvm_xcrs *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_XCRS, c), "KVM_GET_XCRS")
        return {int(c.xcrs[i].xcr): int(c.xcrs[i].value) for i in range(min(c.nr_xcrs, 16))}

    def set_xcrs(self, xcrs: dict[int, int]) -> None:
        """KVM_SET_XCRS."""
        c = ffi.new("struct kvm_xcrs *", {"nr_xcrs": len(xcrs)})
        for i, (idx, value) in enumerate(xcrs.items()):
            c.xcrs[i].xcr = idx
            c.xcrs[i].value = value
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_XCRS, c), "KVM_SET_XCRS")

    def get_debugregs(self) -> bytes:
        """KVM_GET_DEBUGREGS: the raw ``struct kvm_debugregs``."""
        c = ffi.new("struct kvm_debugregs *")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_GET_DEBUGREGS, c), "KVM_GET_DEBUGREGS")
        return bytes(ffi.buffer(c))

    def set_debugregs(self, raw: bytes) -> None:
        """KVM_SET_DEBUGREGS with bytes from ``get_debugregs``."""
        c = ffi.new("struct kvm_debugregs *")
        _fill(c, raw, "kvm_debugregs")
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_SET_DEBUGREGS, c), "KVM_SET_DEBUGREGS")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0), "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ."""
        _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz), "KVM_SET_TSC_KHZ")

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI on this vCPU (needs the in-kernel irqchip)."""
        _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_NMI, 0), "KVM_NMI")

    def translate(self, gva: int) -> tuple[int, bool]:
        """KVM_TRANSLATE: guest virtual to physical through the vCPU's current paging mode.

        :returns: ``(gpa, valid)``.
        """
        c = ffi.new("struct kvm_translation *", {"linear_address": gva})
        _check(lib.vmsh_ioctl(self.fd, lib.KVM_TRANSLATE, c), "KVM_TRANSLATE")
        return c.physical_address, bool(c.valid)

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD for this vCPU."""
        return _check(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_STATS_FD, 0), "KVM_GET_STATS_FD")
