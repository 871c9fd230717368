"""Thin typed layer over the KVM system and VM ioctls: ``Kvm`` and ``VmFd``, one method per ioctl.

The ioctl numbers and struct layouts come from ``<linux/kvm.h>`` through the cffi module
``vmsh._native`` (reached through ``vmsh.engine.kvm_ioctl``). A VM creates its vCPUs, whose
fds are ``vmsh.engine.kvm_vcpu.VcpuFd``; the register structs they exchange are the plain
dataclasses of ``vmsh.engine.kvm_types``. This module is policy-free: it does not decide which
CPUID bits a guest sees or where memory goes; the callers (``cpuid.py``, ``memory.py``,
``boot/``) do.

Example::

    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    regs = vcpu.get_regs()
"""

from __future__ import annotations

import errno
import logging
import os

from vmsh.engine.kvm_ioctl import checked, ffi, fill_struct, lib
from vmsh.engine.kvm_types import CpuidEntry, cpuid_entry_from_c
from vmsh.engine.kvm_vcpu import VcpuFd
from vmsh.errors import KvmError

LOG = logging.getLogger(__name__)

KVM_PATH = "/dev/kvm"


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
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd; 0 when absent."""
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap), "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run plus PIO data)."""
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID, retried with a larger buffer on E2BIG."""
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            # INVARIANTS: buf holds nent entries, as the ioctl requires.
            ret = lib.vmsh_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if ret == -errno.E2BIG and max_entries < 4096:
                max_entries *= 2
                continue
            checked(ret, "KVM_GET_SUPPORTED_CPUID")
            return [cpuid_entry_from_c(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self, feature: bool = False) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (or the FEATURE list): the MSRs KVM saves/knows."""
        req = lib.KVM_GET_MSR_FEATURE_INDEX_LIST if feature else lib.KVM_GET_MSR_INDEX_LIST
        n = 1024
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        # INVARIANTS: buf holds nmsrs indices.
        checked(lib.vmsh_ioctl(self.fd, req, buf), "KVM_GET_MSR_INDEX_LIST")
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM (default machine type)."""
        fd = checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
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
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap), "KVM_CHECK_EXTENSION")

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """KVM_CREATE_VCPU, then mmap its ``kvm_run`` page."""
        fd = checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id), f"KVM_CREATE_VCPU {vcpu_id}")
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
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
               f"KVM_SET_USER_MEMORY_REGION slot {slot}")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM needs below 4 GiB on Intel."""
        checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr), "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR."""
        buf = ffi.new("uint64_t *", addr)
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, buf), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs."""
        checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254."""
        cfg = ffi.new("struct kvm_pit_config *", {"flags": flags})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg), "KVM_CREATE_PIT2")

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises ``gsi`` without a trip through user space."""
        req = ffi.new("struct kvm_irqfd *", {
            "fd": fd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_IRQFD, req), "KVM_IRQFD")

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
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, table), "KVM_SET_GSI_ROUTING")

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
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_IOEVENTFD, req), "KVM_IOEVENTFD")

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM."""
        req = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args) + [0] * (4 - len(args))})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_ENABLE_CAP, req), f"KVM_ENABLE_CAP {cap}")

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the raw ``struct kvm_irqchip`` (PIC master 0, slave 1, IOAPIC 2)."""
        c = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_IRQCHIP, c), "KVM_GET_IRQCHIP")
        return bytes(ffi.buffer(c))

    def set_irqchip(self, raw: bytes) -> None:
        """KVM_SET_IRQCHIP with bytes from ``get_irqchip``."""
        c = ffi.new("struct kvm_irqchip *")
        fill_struct(c, raw, "kvm_irqchip")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_IRQCHIP, c), "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: the raw ``struct kvm_pit_state2``."""
        c = ffi.new("struct kvm_pit_state2 *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_PIT2, c), "KVM_GET_PIT2")
        return bytes(ffi.buffer(c))

    def set_pit2(self, raw: bytes) -> None:
        """KVM_SET_PIT2 with bytes from ``get_pit2``."""
        c = ffi.new("struct kvm_pit_state2 *")
        fill_struct(c, raw, "kvm_pit_state2")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_PIT2, c), "KVM_SET_PIT2")

    def get_clock(self) -> tuple[int, int]:
        """KVM_GET_CLOCK: ``(kvmclock ns, flags)``."""
        c = ffi.new("struct kvm_clock_data *")
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_GET_CLOCK, c), "KVM_GET_CLOCK")
        return int(c.clock), int(c.flags)

    def set_clock(self, clock: int) -> None:
        """KVM_SET_CLOCK: set kvmclock to ``clock`` ns."""
        c = ffi.new("struct kvm_clock_data *", {"clock": clock})
        checked(lib.vmsh_ioctl(self.fd, lib.KVM_SET_CLOCK, c), "KVM_SET_CLOCK")

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a new fd with the VM's binary statistics (see ``stats.py``)."""
        return checked(lib.vmsh_ioctl_val(self.fd, lib.KVM_GET_STATS_FD, 0), "KVM_GET_STATS_FD")

