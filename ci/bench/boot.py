"""Benchmark: boot the same kernel and initramfs to the ready marker with vmsh and with QEMU.

vmsh runs on /dev/kvm; QEMU runs with KVM where it can boot Linux and with TCG otherwise
(on PVM hosts QEMU-KVM dies on the first instruction its emulator lacks, so only TCG works
there). Both are measured in the same run, several times each; the table gives medians, the
ratio vmsh/QEMU, and vmsh's emulated-instruction count (KVM's ``insn_emulation``).

Usage: ``python ci/bench/boot.py [--runs N] [--kernel vmlinux|kernel|vmlinux-full|kernel-full]
[--memory MIB] [--qemu-accel kvm|tcg]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmsh_boot import boot_to_marker

from vmsh.images import image_path
from vmsh.images.qemu import BootSpec
from vmsh.images.qemu import boot_to_marker as qemu_boot

CMDLINE = "console=ttyS0 quiet"


class KvmBootSpec(BootSpec):
    """The same QEMU boot with KVM instead of TCG."""

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("tcg")] = "kvm"
        return argv


def pvm_host() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kernel", default="vmlinux",
                        choices=["vmlinux", "kernel", "vmlinux-full", "kernel-full"])
    parser.add_argument("--memory", type=int, default=128, help="guest RAM in MiB")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--qemu-accel", choices=["kvm", "tcg"], default="tcg" if pvm_host() else "kvm")
    args = parser.parse_args(argv)

    kernel, initrd = image_path(args.kernel), image_path("initramfs")
    machine = "microvm" if args.kernel == "vmlinux" else "pc"
    vmsh_times, vmsh_insns, qemu_times = [], [], []
    for _ in range(args.runs):
        seconds, insns = boot_to_marker(kernel, initrd, CMDLINE, args.memory, args.timeout)
        vmsh_times.append(seconds)
        if insns is not None:
            vmsh_insns.append(insns)
        spec_cls = KvmBootSpec if args.qemu_accel == "kvm" else BootSpec
        spec = spec_cls(kernel, initrd, machine=machine, cmdline=CMDLINE, memory_mb=args.memory)
        qemu_times.append(qemu_boot(spec, args.timeout))
    v, q = statistics.median(vmsh_times), statistics.median(qemu_times)
    print(f"boot to ready marker: {args.kernel}, {args.memory} MiB, median of {args.runs}"
          f"{' (PVM host)' if pvm_host() else ''}")
    print(f"  vmsh (KVM)          {v:8.2f} s   (min {min(vmsh_times):.2f}, max {max(vmsh_times):.2f})")
    print(f"  qemu ({args.qemu_accel.upper():<3})          {q:8.2f} s   "
          f"(min {min(qemu_times):.2f}, max {max(qemu_times):.2f})")
    print(f"  ratio vmsh/qemu     {v / q:8.2f}")
    if vmsh_insns:
        print(f"  vmsh emulated instructions (median) {int(statistics.median(vmsh_insns)):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
