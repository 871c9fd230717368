"""Benchmark: memory per idle clone, vmsh beside QEMU, in one run.

vmsh restores N clones of one snapshot of the default guest (256 MiB by default), each in its own
``vmsh launch --restore ...,resume=on`` process; the snapshot's memory file is mapped
copy-on-write, so the clones share its unchanged pages. Once each has answered a command, the
proportional set size (PSS, ``/proc/PID/smaps_rollup``) of every VMM is read: PSS divides a
shared page among its sharers, so the sum over the clones is what they add to the host. Printed:
that sum per clone, and an idle ``vmsh launch --api-socket`` process's PSS (the Python interpreter
and vmsh's modules, before any VM).

QEMU restores M instances from one migration file of the same guest (``-incoming``; its RAM is
read into anonymous memory, nothing is shared) and the same figure is printed.

Usage: ``python ci/bench/density.py [--clones 16] [--qemu 4] [--size 256]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pexpect
from snapshot import CMDLINE, answer_time, qemu_snapshot, resume_when_migrated

from vmsh.harness.guest import Guest
from vmsh.harness.pool import VmmPool
from vmsh.harness.snapshots import SnapshotCache, restore_guest
from vmsh.images import image_path

MIB = 1 << 20


def pss(pid: int) -> int:
    """The proportional set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for {pid}")


def vmsh_clones(tmp: Path, size_mib: int, count: int) -> tuple[float, float]:
    flags = ["--kernel", str(image_path("vmlinux")), "--initramfs", str(image_path("initramfs")), "--cmdline", CMDLINE,
             "--serial", "tty", "--console", "off", "--memory", f"size={size_mib}M"]
    snap = SnapshotCache(tmp / "snapshots", boot_timeout=600).get(flags)
    clones: list[Guest] = []
    try:
        for i in range(count):
            clones.append(restore_guest(snap, tmp / f"clone{i}", timeout=120))
        for clone in clones:
            clone.check_output("true")
        time.sleep(1)
        per_clone = sum(pss(clone.pid) for clone in clones) / count
    finally:
        for clone in clones:
            clone.close()
    pool = VmmPool(tmp / "pool", size=1)
    try:
        pool.wait_ready()
        idle = pss(pool.idle_pids()[0])
    finally:
        pool.close()
    return per_clone, idle


def qemu_instances(tmp: Path, size_mib: int, count: int, accel: str) -> float:
    argv, state, _ = qemu_snapshot(tmp, size_mib, accel)
    children: list[pexpect.spawn] = []
    monitors = []
    try:
        for i in range(count):
            monitor = tmp / f"qemu-monitor-{i}.sock"
            start = time.monotonic()
            child = pexpect.spawn(argv[0], [*argv[1:], "-monitor", f"unix:{monitor},server,nowait",
                                            "-incoming", f"exec:cat {state}"], echo=False)
            children.append(child)
            monitors.append(resume_when_migrated(monitor, start + 120))
            answer_time(child, start, 120)
        time.sleep(1)
        return sum(pss(child.pid) for child in children) / count
    finally:
        for mon in monitors:
            mon.close()
        for child in children:
            child.close(force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clones", type=int, default=16)
    parser.add_argument("--qemu", type=int, default=4, help="QEMU instances (they share nothing)")
    parser.add_argument("--size", type=int, default=256, help="guest RAM in MiB")
    args = parser.parse_args(argv)
    accel = "tcg" if os.path.isdir("/sys/module/kvm_pvm") else "kvm"
    with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp:
        per_clone, idle = vmsh_clones(Path(tmp), args.size, args.clones)
    with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp:
        qemu = qemu_instances(Path(tmp), args.size, args.qemu, accel)
    print(f"idle clones of a {args.size} MiB guest, PSS per instance (QEMU: {accel.upper()}):")
    print(f"  vmsh, {args.clones} clones: {per_clone / MIB:7.1f} MiB  (an idle VMM process before any VM: "
          f"{idle / MIB:.1f} MiB)")
    print(f"  QEMU, {args.qemu} instances: {qemu / MIB:7.1f} MiB  (ratio vmsh/QEMU {per_clone / qemu:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
