"""Benchmark: in-guest disk and network throughput, vmsh beside QEMU, in one run (issue #6).

The default kernel and initramfs boot once under each VMM with one raw virtio-blk disk
(a host file, filled with data first, on tmpfs or in ``--dir``; both VMMs go through the host's
page cache: vmsh's ``direct=off``, QEMU's ``cache=writeback``; vmsh serves a file on tmpfs
synchronously and one elsewhere through io_uring, or what ``--vmsh-disk-keys`` such as
``,_disable_io_uring=on`` leave it) and one virtio-net device on a
tap with a host address; QEMU gets ``virtio-blk-pci`` and ``virtio-net-pci`` on ``-M microvm,pcie=on``
(KVM where QEMU can boot Linux, TCG on PVM hosts, detected as ``boot.py`` does). In each
guest, for ``--seconds`` each:

* sequential write and read of 1 MiB blocks and 4 KiB random reads, all ``O_DIRECT`` on
  ``/dev/vda``, one request at a time: ``/bin/randread`` (``guest-images/tools/randread.c``),
  which times itself (busybox ``dd`` would pay for ``/dev/zero`` in the guest kernel, and
  for its own fork and exec inside the timing);
* TCP guest -> host (busybox ``nc`` from ``/dev/zero`` to a host listener; the host counts
  what arrives in a window that opens at the first byte) and host -> guest (the host
  sends to ``nc -l`` for the window, then half-closes; the time runs until the guest's
  ``nc`` has read everything and closed).

Around each transfer the VMM process's CPU time is read (utime + stime, at nanosecond
resolution through the process's CPU-time clock) and reported per GiB moved (per I/O for
random reads): once for the whole process and once without the vCPU threads (their
``schedstat``), which is the VMM's own device work (with TCG the vCPU thread is the whole
guest; on PVM its system time is the guest kernel's emulated instructions, whose count per
MiB is printed for vmsh). One short TCP connection before the timed ones keeps one-time
costs out. Target: vmsh at least QEMU's throughput on each row.

Per device request (a virtio-blk request, a virtio-net frame either way: vmsh's device
counters) it prints, for vmsh, the guest instructions KVM emulated, the VMM's CPU without
the vCPU threads, the CPU of the busiest of those threads (the I/O thread) and the wall time.
Measured (load 4-6 on 2 cores), a 4 KiB random read on tmpfs (synchronous: the disk queue's
native server thread) costs 52 us of VMM CPU without the vCPU threads, as QEMU-TCG's 53 us in
the same run, 33 us of it on the queue's thread; it was 184-215 us with the I/O loop serving
every kick (README, Benchmarks).
On a PVM host the emulated instructions bound the in-guest rows: every
guest kernel instruction costs about a microsecond there, and the VMM's share is small.
So the run ends with ``io_device.py``'s measurement of the device models themselves,
driven in process without a guest (what bounds vmsh where the guest runs natively, on
hardware KVM), beside QEMU's in-guest figures from the same run.

Usage: ``python ci/bench/io.py [--seconds 5] [--disk-mib 64] [--memory 128]
[--qemu-accel kvm|tcg] [--device-seconds 2]`` as root: it creates the taps ``vmshio0`` (10.79.1.0/24) and
``qemuio0`` (10.79.2.0/24), names and subnets no test uses.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import io_device
from boot import pvm_host
from vmsh_boot import _UnixHTTPConnection

from vmsh.harness import Guest
from vmsh.harness.snapshots import launch_argv
from vmsh.images import image_path
from vmsh.images.qemu import BootSpec

CMDLINE = "console=ttyS0 quiet"
QEMU_TAP = "qemuio0"
GiB = 1 << 30
MiB = 1 << 20
#: randread's report line
_RANDREAD = re.compile(r"randread: (\d+) (?:reads|writes) of (\d+) bytes in ([\d.]+) s")
#: ioctl(fd, KVM_RUN) in /proc/<pid>/task/<tid>/syscall: syscall 16, request 0xae80
_KVM_RUN = re.compile(r"^16 0x[0-9a-f]+ 0xae80 ")


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the whole process ``pid``, threads that ended included.

    It is utime + stime of ``/proc/<pid>/stat``, read at nanosecond resolution instead of
    in 10 ms ticks, through the process's CPU-time clock (the clock id the C library's
    ``clock_getcpuclockid`` computes: ``~pid << 3 | CPUCLOCK_SCHED``).
    """
    return time.clock_gettime((~pid << 3) | 2)


def threads_cpu_seconds(pid: int, tids: frozenset[int]) -> float:
    """CPU time of some threads of ``pid`` (``schedstat``'s nanoseconds on the CPU)."""
    total = 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):
            continue  # the vCPU threads live as long as the VM: only at its end
    return total


def kvm_run_threads(pid: int, samples: int = 40) -> frozenset[int]:
    """vmsh's vCPU threads: those seen blocked in KVM_RUN while the guest idles at its prompt."""
    seen: set[int] = set()
    for _ in range(samples):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                if _KVM_RUN.match(Path(f"/proc/{pid}/task/{tid}/syscall").read_text()):
                    seen.add(int(tid))
            except OSError:
                continue
        time.sleep(0.025)
    return frozenset(seen)


def named_threads(pid: int, pattern: str) -> frozenset[int]:
    """QEMU's vCPU threads (``-name ...,debug-threads=on`` names them ``CPU 0/TCG``)."""
    return frozenset(int(tid) for tid in os.listdir(f"/proc/{pid}/task")
                     if re.match(pattern, Path(f"/proc/{pid}/task/{tid}/comm").read_text()))


#: the device counters that count requests: virtio-blk requests, virtio-net frames
_REQUEST_COUNTERS = ("read_ops", "write_ops", "flush_ops", "discard_ops", "write_zeroes_ops", "tx_frames", "rx_frames")


def api_counters(api_socket: str) -> tuple[int | None, int | None]:
    """KVM's emulated-instruction count summed over vCPUs, and the device requests served
    (``vm.counters``); None where unknown."""
    try:
        conn = _UnixHTTPConnection(api_socket)
        conn.request("GET", "/api/v1/vm.counters")
        counters = json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException):
        return None, None
    insns = [v["insn_emulation"] for k, v in counters.items() if k.startswith("__vcpu") and "insn_emulation" in v]
    requests = sum(int(v.get(name, 0)) for k, v in counters.items() if not k.startswith("__")
                   for name in _REQUEST_COUNTERS)
    return (sum(insns) if insns else None), requests


@dataclass(frozen=True)
class Usage:
    """The VMM's counters at one moment: CPU seconds (all threads, without the vCPU threads),
    wall time, and, where known, the guest's emulated-instruction count and the device
    requests served."""

    cpu_all: float
    cpu_dev: float
    emulated: int | None
    requests: int | None = None
    wall: float = 0.0
    #: CPU seconds of each thread but the vCPUs' (tid -> seconds)
    threads: dict[int, float] = field(default_factory=dict)

    @property
    def busiest(self) -> float:
        """CPU seconds of the busiest thread but the vCPUs' (vmsh's I/O thread during I/O)."""
        return max(self.threads.values(), default=0.0)

    def __sub__(self, other: Usage) -> Usage:
        emulated = requests = None
        if self.emulated is not None and other.emulated is not None:
            emulated = self.emulated - other.emulated
        if self.requests is not None and other.requests is not None:
            requests = self.requests - other.requests
        threads = {tid: t - other.threads[tid] for tid, t in self.threads.items() if tid in other.threads}
        return Usage(self.cpu_all - other.cpu_all, self.cpu_dev - other.cpu_dev, emulated, requests,
                     self.wall - other.wall, threads)


@dataclass(frozen=True)
class Row:
    """One measured transfer: its rate, the bytes (or I/Os) it moved, and the VMM's usage for it."""

    rate: float
    moved: float
    usage: Usage


@dataclass
class Vm:
    """A booted guest and what the measurements need to know about its VMM."""

    name: str
    guest: Guest
    host_ip: str
    guest_ip: str
    vcpus: frozenset[int]
    api: str | None = None
    rows: dict[str, Row] = field(default_factory=dict)
    #: CPU seconds per second without the vCPU threads, the guest idle at its prompt
    idle: float = 0.0

    def usage(self, start: bool) -> Usage:
        """The counters now; the API request for the instruction count goes outside the window
        (before the CPU times at its ``start``, after them at its end): it costs vmsh CPU."""
        emulated, requests = api_counters(self.api) if self.api and start else (None, None)
        pid = self.guest.pid
        wall = time.monotonic()
        cpu_all = process_cpu_seconds(pid)
        cpu_dev = cpu_all - threads_cpu_seconds(pid, self.vcpus)
        others = frozenset(int(t) for t in os.listdir(f"/proc/{pid}/task")) - self.vcpus
        threads = {tid: threads_cpu_seconds(pid, frozenset((tid,))) for tid in others}
        if self.api and not start:
            emulated, requests = api_counters(self.api)
        return Usage(cpu_all, cpu_dev, emulated, requests, wall, threads)


def fill_disk(path: Path, mib: int) -> None:
    """A disk of data rather than holes, so reads cost the host what real data costs."""
    chunk = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(mib))


def boot_vmsh(tmp: Path, disk: Path, memory: int, disk_keys: str = "") -> Vm:
    host, guest_ip, api = "10.79.1.1", "10.79.1.2", str(tmp / "api.sock")
    argv = launch_argv(["--kernel", str(image_path("vmlinux")), "--initramfs", str(image_path("initramfs")),
                        "--cmdline", CMDLINE, "--memory", f"size={memory}M", "--serial", "tty", "--console", "off",
                        "--disk", f"path={disk}{disk_keys}", "--net", f"tap=vmshio0,ip={host},mask=255.255.255.0",
                        "--api-socket", f"path={api}"])
    guest = Guest(argv, workdir=tmp / "vmsh", boot_timeout=600).start()
    guest.wait_ready()
    return Vm("vmsh", guest, host, guest_ip, kvm_run_threads(guest.pid), api=api)


def boot_qemu(tmp: Path, disk: Path, memory: int, accel: str) -> Vm:
    host, guest_ip, tap = "10.79.2.1", "10.79.2.2", QEMU_TAP
    # a tap left behind by an interrupted run would make the add fail
    subprocess.run(["ip", "link", "del", tap], capture_output=True, check=False)
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "addr", "add", f"{host}/24", "dev", tap], check=True)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    spec = BootSpec(image_path("vmlinux"), image_path("initramfs"), machine="microvm,pcie=on,rtc=on",
                    cmdline=CMDLINE, memory_mb=memory, extra_args=[
                        "-name", "io-bench,debug-threads=on",
                        "-drive", f"file={disk},if=none,id=d0,format=raw",
                        "-device", "virtio-blk-pci,drive=d0",
                        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                        "-device", "virtio-net-pci,netdev=n0"])
    argv = spec.argv()
    argv[argv.index("tcg")] = accel
    # QEMU's stdio keeps the terminal's output processing, so the guest's CRLF would reach
    # the harness as CR CR LF: the terminal's newline translation goes first (exec: same pid)
    argv = ["sh", "-c", 'stty -onlcr && exec "$@"', "sh", *argv]
    guest = Guest(argv, workdir=tmp / "qemu", boot_timeout=600).start()
    guest.wait_ready()
    return Vm(f"QEMU ({accel.upper()})", guest, host, guest_ip, named_threads(guest.pid, r"CPU \d+/"))


def randread(vm: Vm, flags: str, seconds: int) -> Row:
    """Run /bin/randread: MiB/s and bytes for 1 MiB blocks, IOPS and I/Os for 4 KiB ones.

    The usage spans the whole command (the tool's fork and exec too: small next to the
    transfer), the rate only the tool's own timed loop.
    """
    before = vm.usage(start=True)
    out = vm.guest.check_output(f"randread {flags} -t {seconds} /dev/vda", timeout=seconds + 600)
    used = vm.usage(start=False) - before
    m = _RANDREAD.search(out)
    if m is None:
        raise RuntimeError(f"randread printed {out!r}")
    ops, size, elapsed = int(m[1]), int(m[2]), float(m[3])
    if size == 4096:
        return Row(ops / elapsed, ops, used)
    return Row(ops * size / elapsed / MiB, ops * size, used)


def tcp_to_host(vm: Vm, seconds: int, port: int = 5201) -> Row:
    """Guest -> host: ``nc`` sends /dev/zero; the host counts for ``seconds`` after the first chunk."""
    rows: list[Row] = []
    with socket.create_server((vm.host_ip, port)) as server:
        server.settimeout(120)

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                if not conn.recv(MiB):
                    return
                # the window (and the usage) starts once data flows, after the connection setup
                before, start, got = vm.usage(start=True), time.monotonic(), 0
                while (elapsed := time.monotonic() - start) < seconds:
                    chunk = conn.recv(MiB)
                    if not chunk:
                        break
                    got += len(chunk)
                rows.append(Row(got / elapsed / MiB, got, vm.usage(start=False) - before))

        thread = threading.Thread(target=receive)
        thread.start()
        # nc ends with an error when the host closes in the middle: its status says nothing
        vm.guest.run(f"nc {vm.host_ip} {port} < /dev/zero", timeout=seconds + 300)
        thread.join(60)
    if not rows:
        raise RuntimeError("the guest's nc sent nothing")
    return rows[0]


def tcp_to_guest(vm: Vm, seconds: int, port: int = 5202) -> Row:
    """Host -> guest: the host sends for ``seconds`` to ``nc -l``; the time runs until the
    guest has read everything (its ``nc`` closes after the host's half-close)."""
    rows: list[Row] = []

    def send() -> None:
        deadline = time.monotonic() + 300
        while True:  # until the guest's nc listens
            try:
                conn = socket.create_connection((vm.guest_ip, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)
        chunk = b"\xa5" * MiB
        with conn:
            conn.settimeout(300)
            before, start, sent = vm.usage(start=True), time.monotonic(), 0
            while time.monotonic() - start < seconds:
                conn.sendall(chunk)
                sent += len(chunk)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):
                pass
            elapsed = time.monotonic() - start
            rows.append(Row(sent / elapsed / MiB, sent, vm.usage(start=False) - before))

    thread = threading.Thread(target=send)
    thread.start()
    vm.guest.check_output(f"nc -l -p {port} > /dev/null", timeout=seconds + 300)
    thread.join(60)
    if not rows:
        raise RuntimeError("could not connect to the guest's nc")
    return rows[0]


def warm_up_network(vm: Vm, port: int = 5200) -> None:
    """One short connection before anything is timed: the guest kernel's first TCP connect
    draws its first random numbers, about 10 s of ChaCha20 on a PVM host (once per boot)."""
    with socket.create_server((vm.host_ip, port)) as server:
        server.settimeout(300)
        thread = threading.Thread(target=lambda: server.accept()[0].close())
        thread.start()
        vm.guest.run(f"nc {vm.host_ip} {port} < /dev/null", timeout=300)
        thread.join(60)


#: key, label, unit
METRICS = (
    ("seq-write", "sequential write, 1 MiB O_DIRECT", "MiB/s"),
    ("seq-read", "sequential read, 1 MiB O_DIRECT", "MiB/s"),
    ("rand-read", "random read, 4 KiB O_DIRECT, QD1", "IOPS"),
    ("tcp-out", "TCP guest -> host", "MiB/s"),
    ("tcp-in", "TCP host -> guest", "MiB/s"),
)


def measure(vm: Vm, seconds: int) -> None:
    vm.guest.check_output(f"ip addr add {vm.guest_ip}/24 dev eth0 && ip link set eth0 up")
    # what the VMM spends with nothing moving: at the low rates of a PVM host it is a
    # visible part of the per-GiB figures
    before = vm.usage(start=True)
    time.sleep(seconds)
    vm.idle = (vm.usage(start=False) - before).cpu_dev / seconds
    vm.rows["seq-write"] = randread(vm, "-s -w -b 1048576", seconds)
    vm.rows["seq-read"] = randread(vm, "-s -b 1048576", seconds)
    vm.rows["rand-read"] = randread(vm, "", seconds)
    warm_up_network(vm)
    vm.rows["tcp-out"] = tcp_to_host(vm, seconds)
    vm.rows["tcp-in"] = tcp_to_guest(vm, seconds)


def number(x: float | None) -> str:
    """Three significant digits or more, thousands separated."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def report(a: Vm, b: Vm) -> None:
    """The table: one line per metric, then the VMM's usage per unit moved."""
    print(f"\n{'metric':<46}{a.name:>14}{b.name:>14}{'ratio':>9}")

    def line(label: str, x: float | None, y: float | None) -> None:
        ratio = number(x / y) if x is not None and y else "-"
        print(f"{label:<46}{number(x):>14}{number(y):>14}{ratio:>9}")

    line("idle guest: VMM CPU % without vCPU threads", a.idle * 100, b.idle * 100)
    for key, label, unit in METRICS:
        ra, rb = a.rows[key], b.rows[key]
        line(f"{label} ({unit})", ra.rate, rb.rate)
        # per I/O for the random reads (their bytes are few), per GiB for the rest
        per, scale = ("ms/IO", 1e3) if unit == "IOPS" else ("s/GiB", GiB)
        line(f"  VMM CPU {per}, all threads", ra.usage.cpu_all / ra.moved * scale,
             rb.usage.cpu_all / rb.moved * scale)
        line(f"  VMM CPU {per}, without vCPU threads", ra.usage.cpu_dev / ra.moved * scale,
             rb.usage.cpu_dev / rb.moved * scale)
        for vm, row in ((a, ra), (b, rb)):
            if row.usage.emulated is not None:
                what, size = ("IO", 1) if unit == "IOPS" else ("MiB", MiB)
                x = row.usage.emulated / row.moved * size
                line(f"  {vm.name} guest instr. emulated/{what}", x if vm is a else None, x if vm is b else None)
            u = row.usage
            if u.requests:
                # per device request: a virtio-blk request or a virtio-net frame (either way)
                def pick(v: float, mine: bool = vm is a) -> tuple[float | None, float | None]:
                    return (v, None) if mine else (None, v)
                if u.emulated is not None:
                    line(f"  {vm.name} per request: guest instr. emulated", *pick(u.emulated / u.requests))
                line(f"  {vm.name} per request: VMM CPU us, no vCPU threads", *pick(u.cpu_dev / u.requests * 1e6))
                line(f"  {vm.name} per request: CPU us of the busiest such thread", *pick(u.busiest / u.requests * 1e6))
                line(f"  {vm.name} per request: wall us ({u.requests:,} requests)", *pick(u.wall / u.requests * 1e6))
    print(f"\nratio = {a.name} / {b.name}: above 1 is better for rates, below 1 for CPU time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each transfer")
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--memory", type=int, default=128, help="guest RAM in MiB")
    parser.add_argument("--qemu-accel", choices=["kvm", "tcg"], default="tcg" if pvm_host() else "kvm")
    parser.add_argument("--dir", help="where the disk image goes (default /dev/shm, tmpfs: vmsh serves "
                        "files in memory synchronously; a disk file system's page cache gets io_uring)")
    parser.add_argument("--vmsh-disk-keys", default="",
                        help="more --disk keys for vmsh, e.g. ',_disable_io_uring=on,_disable_aio=on'")
    parser.add_argument("--device-seconds", type=float, default=2.0,
                        help="length of each device-capacity workload (io_device.py; 0: none)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("io.py creates tap devices: run it as root")

    # tmpfs where there is one: the host side of the disk should not wait for a real disk
    base = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    vms: list[Vm] = []
    with tempfile.TemporaryDirectory(prefix="vmsh-io-bench-", dir=base) as tmpdir:
        tmp = Path(tmpdir)
        for boot in (lambda d: boot_vmsh(tmp, d, args.memory, args.vmsh_disk_keys),
                     lambda d: boot_qemu(tmp, d, args.memory, args.qemu_accel)):
            disk = tmp / "disk.raw"
            fill_disk(disk, args.disk_mib)
            t0 = time.monotonic()
            try:
                vm = boot(disk)
                print(f"{vm.name}: booted in {time.monotonic() - t0:.1f} s, vCPU threads {sorted(vm.vcpus)}",
                      flush=True)
                try:
                    measure(vm, args.seconds)
                finally:
                    vm.guest.close()
            finally:
                # vmsh removes the tap it created; QEMU's was made here
                subprocess.run(["ip", "link", "del", QEMU_TAP], capture_output=True, check=False)
                disk.unlink()
            vms.append(vm)
    host = "PVM host" if pvm_host() else "KVM host"
    print(f"\nin-guest I/O, default kernel, {args.memory} MiB, {args.seconds} s per transfer, "
          f"{args.disk_mib} MiB disk on {base or tempfile.gettempdir()} ({host})")
    report(*vms)
    if args.device_seconds > 0:
        qemu = vms[1]
        beside = {f"blk-{key}": (qemu.name, qemu.rows[key].rate, unit)
                  for key, _, unit in METRICS if key in ("seq-write", "seq-read", "rand-read")}
        beside["net-tx-65536"] = (qemu.name + " TCP guest -> host", qemu.rows["tcp-out"].rate, "MiB/s")
        beside["net-rx-65536"] = (qemu.name + " TCP host -> guest", qemu.rows["tcp-in"].rate, "MiB/s")
        io_device.report(io_device.measure(args.device_seconds, base=args.dir), beside)
        print("(on hardware KVM the guest's own instructions run natively and this capacity bounds vmsh's "
              "rows; on a PVM host the guest kernel's emulated instructions do)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
