"""Benchmark: live migration total time and downtime, vmsh beside QEMU, in one run.

For each guest size (``--sizes``, 256 MiB by default; the README's table also has 2048) and
workload (``--workloads``, both by default) the default kernel and initramfs boot once under
each VMM per run:

* ``idle``: the guest at its shell prompt, nothing started;
* ``writer``: a shell loop in the guest writing a file (so pages are dirtied during the copy).

Then:

* vmsh (``--memory shared=on``): a copying migration (``vm.send-migration``) to a VMM started
  with only ``--api-socket``, then a ``local=true`` one from there to a third; total time is the
  ``vm.send-migration`` call, downtime what the source logs (pause until the destination's Ok
  to Complete, the guest running there);
* QEMU: ``migrate unix:PATH`` on its monitor to a second QEMU started with ``-incoming
  unix:PATH`` (TCG on PVM hosts, KVM elsewhere); its ``info migrate`` gives total time and
  downtime.

Each destination must answer on its console afterwards. One table row per (size, workload),
the medians of ``--runs``. Usage: ``python ci/bench/migration.py [--sizes 256 2048] [--runs 3]
[--workloads idle writer]``
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pexpect

from vmsh.harness import Guest
from vmsh.harness.migrate import migrate_apis, start_receiver
from vmsh.harness.snapshots import launch_argv
from vmsh.images import image_path
from vmsh.images.qemu import QEMU, BootSpec

CMDLINE = "console=ttyS0 quiet"
WRITER = "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; done) >/dev/null 2>&1 &"
# Per workload: what the guest starts before the migration, and what its destination must answer.
WORKLOADS = {"idle": ("", "cat /proc/uptime"), "writer": (WRITER, "cat /tmp/count")}
_PAUSED = re.compile(r"guest paused ([0-9.]+) s")


def logged_downtime(log: Path) -> float:
    match = _PAUSED.findall(log.read_text())
    if not match:
        raise RuntimeError(f"no migration line in {log}")
    return float(match[-1])


def vmsh_round(tmp: Path, size_mib: int, workload: str) -> tuple[float, float, float, float]:
    """(copy total, copy downtime, local total, local downtime) in seconds."""
    start, check = WORKLOADS[workload]
    api = tmp / "src.sock"
    flags = ["--kernel", str(image_path("vmlinux")), "--initramfs", str(image_path("initramfs")), "--cmdline", CMDLINE,
             "--serial", "tty", "--console", "off", "--memory", f"size={size_mib}M,shared=on",
             "--api-socket", str(api), "-v", "--log-file", str(tmp / "src.log")]
    with Guest(launch_argv(flags), workdir=tmp / "src", boot_timeout=600) as source:
        source.wait_ready()
        if start:
            source.check_output(start)
        first, first_api = start_receiver(tmp, "first", ["-v", "--log-file", str(tmp / "first.log")])
        with first:
            t0 = time.monotonic()
            migrate_apis(api, first_api, tmp / "m1.sock")
            copy_s = time.monotonic() - t0
            first.check_output(check)
            second, second_api = start_receiver(tmp, "second")
            with second:
                t0 = time.monotonic()
                migrate_apis(first_api, second_api, tmp / "m2.sock", local=True)
                local_s = time.monotonic() - t0
                second.check_output(check)
    return copy_s, logged_downtime(tmp / "src.log"), local_s, logged_downtime(tmp / "first.log")


def qemu_round(tmp: Path, size_mib: int, workload: str, accel: str) -> tuple[float, float]:
    """(total, downtime) in seconds, as QEMU's ``info migrate`` reports them."""
    spec = BootSpec(image_path("vmlinux"), image_path("initramfs"), machine="microvm", cmdline=CMDLINE,
                    memory_mb=size_mib)
    argv = spec.argv()
    argv[argv.index("tcg")] = accel
    monitor, sock = tmp / "qemu-monitor.sock", tmp / "qemu-migrate.sock"
    source = pexpect.spawn(argv[0], [*argv[1:], "-monitor", f"unix:{monitor},server,nowait"], echo=False, timeout=600)
    dest = None
    try:
        source.expect("VMSH-READY", timeout=600)
        source.expect(r"[#$] ", timeout=600)
        source.send(WORKLOADS[workload][0] + "\n")
        time.sleep(1)  # the shell has started the workload (or echoed an empty line)
        dest = pexpect.spawn(argv[0], [*argv[1:], "-incoming", f"unix:{sock}"], echo=False, timeout=600)
        while not sock.exists():
            time.sleep(0.01)
        mon = socket.socket(socket.AF_UNIX)
        mon.connect(str(monitor))
        mon.settimeout(10)
        mon.sendall(f"migrate unix:{sock}\n".encode())
        reply = b""
        deadline = time.monotonic() + 600
        while b"Migration status: completed" not in reply:
            if time.monotonic() > deadline or b"Migration status: failed" in reply:
                raise RuntimeError(f"QEMU's migration did not complete: {reply[-500:]!r}")
            time.sleep(0.1)
            mon.sendall(b"info migrate\n")
            time.sleep(0.1)
            reply = mon.recv(1 << 20)
        total = int(re.search(rb"total time: (\d+) ms", reply).group(1))  # type: ignore[union-attr]  # in a completed report
        downtime = int(re.search(rb"downtime: (\d+) ms", reply).group(1))  # type: ignore[union-attr]  # likewise
        mon.close()
        tag = "MIGRATED-OK"
        dest.send(f"echo {tag[:5]}''{tag[5:]}\n")
        dest.expect(tag, timeout=120)
        return total / 1000, downtime / 1000
    finally:
        source.close(force=True)
        if dest is not None:
            dest.close(force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[256], help="guest RAM in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args(argv)
    accel = "tcg" if os.path.isdir("/sys/module/kvm_pvm") else "kvm"
    print(f"live migration, median of {args.runs} (QEMU: {QEMU} with {accel.upper()})")
    print(f"{'size':>6} {'workload':<8}  {'vmsh copy':>9} {'down':>7}  {'vmsh local':>10} {'down':>7}  "
          f"{'qemu':>7} {'down':>7}", flush=True)
    for size in args.sizes:
        for workload in args.workloads:
            v, q = [], []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp:
                    v.append(vmsh_round(Path(tmp), size, workload))
                with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp:
                    q.append(qemu_round(Path(tmp), size, workload, accel))
            med = [statistics.median(x[i] for x in v) for i in range(4)]
            qmed = [statistics.median(x[i] for x in q) for i in range(2)]
            print(f"{size:>5}M {workload:<8}  {med[0]:>8.3f}s {med[1]:>6.3f}s  {med[2]:>9.3f}s {med[3]:>6.3f}s  "
                  f"{qmed[0]:>6.3f}s {qmed[1]:>6.3f}s", flush=True)
    print("vmsh total: the vm.send-migration call; down: guest paused until the destination runs it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
