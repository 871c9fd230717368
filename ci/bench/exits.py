"""Benchmark: the cost of a port-I/O exit from a raw C ``KVM_RUN`` loop vs vmsh's Python vCPU loop.

Both drive the same guest (real mode at 0x1000: ``mov ecx,N; mov dx,0xe9; l: out dx,al;
loop l; hlt``), so each iteration is one PIO exit plus the same two emulated instructions. The
C program is compiled at run time with gcc into a temporary directory; the Python side is
``vmsh.engine.vcpu.Vcpu.run`` dispatching every exit through the PIO bus to a sink device.
Prints per-exit cost (median of several runs) and the ratio; the target is Python <= 1.3x C.

Usage: ``python ci/bench/exits.py [--exits N] [--runs R]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

GUEST_ADDR = 0x1000
PORT = 0xE9


def guest_code(n: int) -> bytes:
    """Real-mode loop doing ``n`` ``out dx, al`` then ``hlt``."""
    return (b"\x66\xb9" + n.to_bytes(4, "little")  # mov ecx, n
            + b"\xba" + PORT.to_bytes(2, "little")  # mov dx, PORT
            + b"\xee"  # l: out dx, al
            + b"\x67\xe2\xfc"  # loop l (ecx, address-size prefix)
            + b"\xf4")  # hlt


C_SOURCE = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <time.h>

static void die(const char *m) { perror(m); exit(1); }

int main(int argc, char **argv)
{
    unsigned long n = strtoul(argv[1], 0, 0);
    int runs = atoi(argv[2]);
    const char *code_hex = argv[3];
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    size_t run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    for (int r = 0; r < runs; r++) {
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0) die("KVM_CREATE_VM");
        size_t mem_size = 1 << 20;
        uint8_t *mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        size_t len = strlen(code_hex) / 2;
        for (size_t i = 0; i < len; i++) sscanf(code_hex + 2 * i, "%2hhx", &mem[0x1000 + i]);
        struct kvm_userspace_memory_region reg = {0, 0, 0, mem_size, (uint64_t)mem};
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &reg) < 0) die("SET_USER_MEMORY_REGION");
        int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
        struct kvm_sregs sregs; ioctl(vcpu, KVM_GET_SREGS, &sregs);
        sregs.cs.base = 0; sregs.cs.selector = 0; ioctl(vcpu, KVM_SET_SREGS, &sregs);
        struct kvm_regs regs; memset(&regs, 0, sizeof regs);
        regs.rip = 0x1000; regs.rflags = 2; ioctl(vcpu, KVM_SET_REGS, &regs);
        unsigned long exits = 0; volatile uint8_t sink = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (run->exit_reason == KVM_EXIT_IO) {
                /* the same work as a bus write: look at port and the data byte */
                if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0xe9)
                    sink ^= ((uint8_t *)run)[run->io.data_offset];
                exits++;
                continue;
            }
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (run->exit_reason != KVM_EXIT_HLT || exits != n) {
            fprintf(stderr, "unexpected end: reason %u after %lu exits\n", run->exit_reason, exits);
            return 1;
        }
        double dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("%.9f\n", dt / n);
        fflush(stdout);
        close(vcpu); close(vm); munmap(mem, mem_size); munmap(run, run_size);
    }
    return 0;
}
"""


def run_c(n: int, runs: int) -> list[float]:
    """Compile and run the C loop; per-exit seconds for each run."""
    with tempfile.TemporaryDirectory(prefix="vmsh-bench-", dir="/tmp") as tmp:
        src = os.path.join(tmp, "exits.c")
        exe = os.path.join(tmp, "exits")
        with open(src, "w") as f:
            f.write(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        out = subprocess.run([exe, str(n), str(runs), guest_code(n).hex()], check=True,
                             capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


class _Sink:
    """A PIO device that takes each byte, like the C loop does (the bus serializes it with a
    per-device lock, as it does the UART)."""

    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.last ^= data[0]


class _LockFreeSink(_Sink):
    """The same sink declared ``thread_safe``: the bus calls it without a lock (POST port,
    debug console)."""

    thread_safe = True


def run_python(n: int, runs: int, lock_free: bool = False) -> list[float]:
    """Drive the same guest through ``Vcpu.run``; per-exit seconds for each run."""
    from vmsh.engine.bus import Bus
    from vmsh.engine.kvm import Kvm
    from vmsh.engine.kvm_vcpu import EXIT_IO
    from vmsh.engine.memory import GuestMemoryMmap
    from vmsh.engine.vcpu import Vcpu, VcpuStop

    results = []
    kvm = Kvm()
    for _ in range(runs):
        vm = kvm.create_vm()
        mem = GuestMemoryMmap.create(1 << 20)
        mem.register(vm)
        mem.write(GUEST_ADDR, guest_code(n))
        fd = vm.create_vcpu(0)
        sregs = fd.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        fd.set_sregs(sregs)
        regs = fd.get_regs()
        regs.rip, regs.rflags = GUEST_ADDR, 2
        fd.set_regs(regs)
        pio = Bus("pio")
        pio.insert(_LockFreeSink() if lock_free else _Sink(), PORT, 1)
        vcpu = Vcpu(fd, pio, Bus("mmio"))
        t0 = time.perf_counter()
        stop = vcpu.run()
        dt = time.perf_counter() - t0
        if stop is not VcpuStop.HLT or vcpu.exit_counts.get(EXIT_IO) != n:
            raise SystemExit(f"unexpected end: {stop} {vcpu.exit_counts}")
        results.append(dt / n)
        fd.close()
        vm.close()
        mem.close()
    kvm.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run both loops interleaved and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exits", type=int, default=50_000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    c_times: list[float] = []
    py_times: list[float] = []
    free_times: list[float] = []
    # Interleave so that load from other processes hits all sides alike.
    for _ in range(args.runs):
        c_times += run_c(args.exits, 1)
        py_times += run_python(args.exits, 1)
        free_times += run_python(args.exits, 1, lock_free=True)
    c_med = statistics.median(c_times)
    py_med = statistics.median(py_times)
    free_med = statistics.median(free_times)
    print(f"exits per run: {args.exits}, runs: {args.runs}")
    print(f"C KVM_RUN loop                  : {c_med * 1e6:7.2f} us/exit  (min {min(c_times) * 1e6:.2f})")
    print(f"vmsh vCPU loop, locked device   : {py_med * 1e6:7.2f} us/exit  (min {min(py_times) * 1e6:.2f})")
    print(f"vmsh vCPU loop, lock-free device: {free_med * 1e6:7.2f} us/exit  (min {min(free_times) * 1e6:.2f})")
    print(f"ratio Python/C (locked)         : {py_med / c_med:7.3f}  (target <= 1.3)")
    print(f"ratio Python/C (lock-free)      : {free_med / c_med:7.3f}")
    print(f"Python overhead (locked)        : {(py_med - c_med) * 1e6:7.2f} us/exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
