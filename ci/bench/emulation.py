"""Benchmark: what one guest-kernel instruction costs on this host, by kind.

On PVM hosts every instruction a guest runs at CPL0 is emulated by KVM, so a boot's time is
its instruction count times a cost that depends on the mix. This runs small loops in a tiny
64-bit guest (no Linux; the low 4 GiB identity-mapped with 2 MiB pages) and prints, per
loop, the wall time per iteration and per counted instruction (KVM's ``insn_emulation``).

A ``rep movs``/``rep stos`` counts as one instruction per 1,024 elements but every element
is emulated: its rows show the cost per element. In a Linux guest, whose page tables KVM
shadows, stores and string elements cost more than here (each write is checked against the
shadowed page tables: ``mmu_pte_write``).

Usage: ``python ci/bench/emulation.py [--iterations N]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmsh.engine.boot import regs as bootregs
from vmsh.engine.bus import Bus
from vmsh.engine.kvm import Kvm
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.pvm import PvmHandler, is_pvm_host
from vmsh.engine.stats import KvmStats
from vmsh.engine.vcpu import Vcpu, VcpuStop

CODE = 0x100000
STACK_TOP = 0x200000
DATA = 0x300000
MEM_SIZE = 8 << 20
HLT = b"\xf4"


def run_loop(kvm: Kvm, code: bytes, **gprs: int) -> tuple[float, int]:
    """Run ``code`` then HLT in a fresh one-vCPU VM; (seconds, emulated instructions)."""
    vm = kvm.create_vm()
    mem = GuestMemoryMmap.create(MEM_SIZE)
    try:
        mem.register(vm)
        fd = vm.create_vcpu(0)
        vcpu = Vcpu(fd, Bus("pio"), Bus("mmio"))
        vcpu.on_internal_error = PvmHandler(mem)
        stats = KvmStats(fd.stats_fd())
        mem.write(CODE, code + HLT)
        fd.set_sregs(bootregs.long_mode_sregs(fd.get_sregs(), mem))
        fd.set_regs(bootregs.Regs(rip=CODE, rsp=STACK_TOP, rflags=2, **gprs))
        before = stats.read_counters().get("insn_emulation", 0)
        start = time.perf_counter()
        stop = vcpu.run()
        seconds = time.perf_counter() - start
        counted = stats.read_counters().get("insn_emulation", 0) - before
        stats.close()
        fd.close()
        if stop is not VcpuStop.HLT:
            raise SystemExit(f"the loop stopped with {stop}")
        return seconds, counted
    finally:
        vm.close()
        mem.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    args = parser.parse_args(argv)
    n, size = args.iterations, 1 << 20
    loops = [
        # name, machine code, iterations, registers
        ("dec rcx; jnz", "48ffc9 75fb", n, {"rcx": n}),
        ("4 x add reg,reg; dec; jnz", "4801d8 4801d8 4801d8 4801d8 48ffc9 75f2", n, {"rcx": n}),
        ("store; dec; jnz", "488907 48ffc9 75f8", n, {"rcx": n, "rdi": DATA}),
        ("load; dec; jnz", "488b07 48ffc9 75f8", n, {"rcx": n, "rdi": DATA}),
        ("rep stosb (per byte)", "f3aa", size, {"rcx": size, "rdi": DATA}),
        ("rep stosq (per 8 bytes)", "f348ab", size // 8, {"rcx": size // 8, "rdi": DATA}),
        ("rep movsb (per byte)", "f3a4", size, {"rcx": size, "rdi": DATA, "rsi": DATA + size}),
        ("rep movsq (per 8 bytes)", "f348a5", size // 8, {"rcx": size // 8, "rdi": DATA, "rsi": DATA + size}),
    ]
    kvm = Kvm()
    print(f"guest loop costs ({'PVM' if is_pvm_host() else 'hardware KVM'} host)")
    print(f"  {'loop':28s} {'per iteration':>14s} {'counted insns':>14s} {'per counted insn':>17s}")
    for name, hexcode, iterations, gprs in loops:
        seconds, counted = run_loop(kvm, bytes.fromhex(hexcode.replace(" ", "")), **gprs)
        per_insn = f"{seconds / counted * 1e9:,.0f} ns" if counted else "-"
        print(f"  {name:28s} {seconds / iterations * 1e9:11,.0f} ns {counted:14,d} {per_insn:>17s}")
    kvm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
