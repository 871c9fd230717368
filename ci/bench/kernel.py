"""Benchmark: time from start to /init's ready marker for each guest kernel.

For every kernel built by ``vmsh images build`` (the default kernel as PVH vmlinux on
QEMU ``-M microvm`` and as bzImage on ``-M pc``, and the same two forms of the Debian
cloud kernel), boots QEMU with TCG (pure emulation: QEMU-KVM does not work on this
project's PVM hosts) several times and prints the median seconds to ``VMSH-READY``.

The vmsh column is the same kernel under ``vmsh launch`` on KVM (PVH vmlinux only), with
the count of instructions KVM had to emulate (``insn_emulation``; on PVM hosts every guest
kernel instruction).

Usage: ``python ci/bench/kernel.py [--runs N] [--only NAME ...] [--timeout S]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmsh.errors import ImageError
from vmsh.images import image_path
from vmsh.images.qemu import BootSpec, boot_to_marker

#: name -> (kernel artifact, initramfs artifact, QEMU machine)
KERNELS: dict[str, tuple[str, str, str]] = {
    "default-pvh": ("vmlinux", "initramfs", "microvm"),
    "default-bzimage": ("kernel", "initramfs", "pc"),
    "full-pvh": ("vmlinux-full", "initramfs", "microvm"),
    "debian-pvh": ("debian-vmlinux", "debian-initramfs", "microvm"),
    "debian-bzimage": ("debian-kernel", "debian-initramfs", "pc"),
}
CMDLINE = "console=ttyS0 quiet"


def measure_qemu(kernel: Path, initrd: Path, machine: str, runs: int, timeout: float) -> list[float]:
    """Seconds to the ready marker for ``runs`` QEMU TCG boots."""
    spec = BootSpec(kernel, initrd, machine=machine, cmdline=CMDLINE)
    return [boot_to_marker(spec, timeout) for _ in range(runs)]


def measure_vmsh(kernel: Path, initrd: Path, runs: int, timeout: float) -> tuple[float, int] | None:
    """Median (seconds, emulated instructions) to the ready marker under vmsh with KVM."""
    from vmsh_boot import boot_to_marker

    results = [boot_to_marker(kernel, initrd, CMDLINE, timeout=timeout) for _ in range(runs)]
    seconds = statistics.median(r[0] for r in results)
    counts = [r[1] for r in results if r[1] is not None]
    return seconds, int(statistics.median(counts)) if counts else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per kernel (median)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per boot")
    parser.add_argument("--only", nargs="*", choices=list(KERNELS), help="kernels to measure")
    parser.add_argument("--no-vmsh", action="store_true", help="QEMU only")
    args = parser.parse_args(argv)

    print(f"QEMU TCG boot to ready marker, median of {args.runs}, host cpus {os.cpu_count()}")
    print(f"{'kernel':<17} {'qemu-tcg s':>10} {'min':>6} {'max':>6}  {'vmsh s':>8} {'emulated':>10}")
    status = 0
    for name in args.only or KERNELS:
        kname, iname, machine = KERNELS[name]
        try:
            kernel, initrd = image_path(kname), image_path(iname)
            times = measure_qemu(kernel, initrd, machine, args.runs, args.timeout)
        except ImageError as err:
            print(f"{name:<17} error: {str(err).splitlines()[0]}")
            status = 1
            continue
        wanted = machine == "microvm" and not args.no_vmsh
        vmsh = measure_vmsh(kernel, initrd, args.runs, args.timeout) if wanted else None
        vmsh_s, vmsh_n = (f"{vmsh[0]:.2f}", f"{vmsh[1]:,}") if vmsh else ("n/a", "n/a")
        print(f"{name:<17} {statistics.median(times):>10.2f} {min(times):>6.2f} {max(times):>6.2f}"
              f"  {vmsh_s:>8} {vmsh_n:>10}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
