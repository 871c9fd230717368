"""The boot path end to end with tiny kernels: loader + boot tables + vCPU setup, then KVM_RUN.

The "kernels" are a few bytes of 32-bit code wrapped as a PVH ELF or a bzImage; they report
what they find at their entry (hvm_start_info / boot_params, the command line) on port 0xe9
and stop through a port that kicks the vCPU (with an in-kernel irqchip HLT does not exit).
"""

from __future__ import annotations

import os

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import Recorder, run_now
from tests.kernel_images import make_bzimage, make_elf
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine.boot import layout
from vmsh.engine.boot.configure import BOOT_MSRS, configure_vcpu, write_boot_tables
from vmsh.engine.boot.loader import load_initramfs, load_kernel
from vmsh.engine.builder import KVM_CAP_HYPERV_SYNIC, build_for_boot
from vmsh.engine.bus import Bus
from vmsh.engine.cpuid import CpuTopology
from vmsh.engine.events import EventMonitor
from vmsh.engine.kvm import Kvm
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.pvm import internal_error_handler, is_pvm_host
from vmsh.engine.stats import KvmStats
from vmsh.engine.vcpu import Vcpu, VcpuStop
from vmsh.errors import VmshError

STOP_PORT = 0xF4


class Stopper:
    thread_safe = True

    def __init__(self) -> None:
        self.vcpu: Vcpu | None = None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        assert self.vcpu is not None
        self.vcpu.kick()


def boot(kvm: Kvm, image: bytes, cmdline: str, initrd: bytes | None = None) -> tuple[Recorder, Vcpu, GuestMemoryMmap]:
    vm = kvm.create_vm()
    vm.set_tss_addr(layout.KVM_TSS_START)
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
    vm.create_irqchip()
    vm.create_pit2()
    mem = GuestMemoryMmap.create(64 << 20)
    mem.register(vm)
    kernel = load_kernel(mem, image)
    rd = load_initramfs(mem, initrd, kernel) if initrd else None
    write_boot_tables(mem, kernel, cmdline, rd)
    fd = vm.create_vcpu(0)
    configure_vcpu(fd, mem, kernel, kvm.supported_cpuid(), CpuTopology.flat(1), pvm=is_pvm_host())
    pio = Bus("pio")
    rec, stopper = Recorder(), Stopper()
    pio.insert(rec, 0xE9, 1)
    pio.insert(stopper, STOP_PORT, 1)
    vcpu = Vcpu(fd, pio, Bus("mmio"), on_internal_error=internal_error_handler(mem))
    stopper.vcpu = vcpu
    assert vcpu.run() is VcpuStop.KICKED
    return rec, vcpu, mem


def test_pvh_entry_gets_start_info_in_ebx(kvm: Kvm) -> None:
    code = bytes.fromhex(
        "8b03"  # mov eax, [ebx]          hvm_start_info.magic
        "e6e9"  # out 0xe9, al
        "8b4318"  # mov eax, [ebx+24]     cmdline_paddr
        "8a00"  # mov al, [eax]
        "e6e9"  # out 0xe9, al
        "8b430c"  # mov eax, [ebx+12]     nr_modules
        "e6e9"  # out 0xe9, al
        "e6f4"  # out STOP_PORT, al
        "ebfe")  # jmp $
    image = make_elf(entry_note=0x1000000, paddr=0x1000000, code=code)
    rec, _, _ = boot(kvm, image, "Zcmd", initrd=b"initrd")
    assert [d for _, d in rec.writes] == [b"\x78", b"Z", b"\x01"]


def test_bzimage_entry_gets_boot_params_in_esi(kvm: Kvm) -> None:
    code = bytes.fromhex(
        "8b860202 0000"  # mov eax, [esi+0x202]   "HdrS"
        "e6e9"
        "8b862802 0000"  # mov eax, [esi+0x228]   cmd_line_ptr
        "8a00"  # mov al, [eax]
        "e6e9"
        "89e0"  # mov eax, esp
        "88e0"  # mov al, ah                    0x8ff0 >> 8
        "e6e9"
        "e6f4"
        "ebfe")
    rec, _, _ = boot(kvm, make_bzimage(payload=code), "Qx")
    assert [d for _, d in rec.writes] == [b"H", b"Q", b"\x8f"]


def test_boot_vcpu_state_matches_the_reference(kvm: Kvm) -> None:
    image = make_elf(entry_note=0x1000000, paddr=0x1000000, code=bytes.fromhex("e6f4ebfe"))
    _, vcpu, _ = boot(kvm, image, "")
    sregs = vcpu.fd.get_sregs()
    assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)  # protected mode, paging off
    assert (sregs.cs.selector, sregs.cs.db, sregs.cs.l, sregs.cs.limit) == (0x08, 1, 0, 0xFFFFFFFF)
    assert (sregs.ds.selector, sregs.ss.selector, sregs.tr.selector) == (0x10, 0x10, 0x18)
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.BOOT_GDT_START, 31)
    msrs = vcpu.fd.get_msrs(list(BOOT_MSRS))
    assert msrs[0x1A0] & 1 and msrs[0x2FF] == 0x806
    cpuid = {(e.function, e.index): e for e in vcpu.fd.get_cpuid2()}
    assert cpuid[(1, 0)].ecx & (1 << 31)  # hypervisor bit
    if is_pvm_host():
        assert not cpuid[(1, 0)].ecx & (1 << 13)  # CX16 stays cleared on PVM


def test_kvm_stats_count_the_exits(kvm: Kvm) -> None:
    image = make_elf(entry_note=0x1000000, paddr=0x1000000, code=bytes.fromhex("e6e9 e6e9 e6f4 ebfe"))
    _, vcpu, _ = boot(kvm, image, "")
    stats = KvmStats(vcpu.fd.stats_fd())
    try:
        counters = stats.read_counters()
        assert counters["exits"] >= 3
        if is_pvm_host():
            assert counters["insn_emulation"] >= 3  # CPL0 code is emulated here
    finally:
        stats.close()


@pytest.mark.skipif(not is_pvm_host(), reason="PVM only")
def test_pvm_host_cpuid_keeps_cx16_cleared_but_reforces_others(kvm: Kvm) -> None:
    """PVM hosts: SET_CPUID2 is accepted, most bits come back re-forced, CX16 stays off."""
    vm = kvm.create_vm()
    try:
        fd = vm.create_vcpu(0)
        sup = kvm.supported_cpuid()
        for e in sup:
            if e.function == 1:
                e.ecx &= ~((1 << 13) | (1 << 23))  # CX16, POPCNT
        fd.set_cpuid2(sup)
        leaf1 = next(e for e in fd.get_cpuid2() if e.function == 1)
        assert not leaf1.ecx & (1 << 13)
        fd.close()
    finally:
        vm.close()


def kvm_fds() -> dict[str, str]:
    """This process's KVM descriptors (``/dev/kvm``, VMs, vCPUs) by fd number."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor
            continue
        if "kvm" in target:
            found[name] = target
    return found


def test_kvm_hyperv_needs_the_host_kvm_hyper_v_emulation(tmp_path) -> None:
    """``kvm_hyperv=on`` gives each vCPU Hyper-V's CPUID leaves and KVM's SynIC; a host whose
    KVM cannot emulate Hyper-V (PVM) refuses it with a clear error instead."""
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--serial", "null", "--console", "off",
                                         "--cpus", "boot=1,kvm_hyperv=on"]))
    kvm = Kvm()
    try:
        supported = kvm.check_extension(KVM_CAP_HYPERV_SYNIC)
    finally:
        kvm.close()
    if not supported:
        before = kvm_fds()
        with pytest.raises(VmshError, match="kvm_hyperv=on: this host's KVM has no Hyper-V emulation"):
            build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)
        # the refused VM's vCPU is closed too (earlier tests' descriptors may close meanwhile)
        assert not set(kvm_fds().items()) - set(before.items())
        return
    vm = build_for_boot(cfg, EventMonitor(None), lambda kind, detail: None, run_now)
    try:
        cpuid = vm.vcpus[0].fd.get_cpuid2()
        assert next(e for e in cpuid if e.function == 0x4000_0001).eax.to_bytes(4, "little") == b"Hv#1"
    finally:
        vm.shutdown()
