"""Internal entry point: boot a Linux kernel with the serial console on stdout.

Not the launcher (that is ``vmsh launch``, built on the config layer); this wires the engine's
lower layers together by hand so kernels can be tried while the rest is being built::

    python -m vmsh.engine.boot_demo --kernel vmlinux --initramfs initrd.cpio \\
        --cmdline "console=ttyS0 ..." --memory-mib 256 [--timeout 60] [--stats]

What it builds: a VM with in-kernel irqchip and PIT, RAM per the reference layout, the kernel
(ELF through PVH, or bzImage), the initramfs at the top of low RAM, a 16550A on 0x3f8/IRQ 4
(output to stdout, stdin to its FIFO), the i8042 reset port, the POST port and a debug console
on 0xe9 (to stderr). vCPU 0 runs; other vCPUs are created and wait for INIT/SIPI (without an
ACPI MADT Linux will not start them). On a PVM host the instruction handler is installed and
its counts are printed with ``--stats``, together with KVM's own statistics.

Exit status: 0 on guest poweroff/reset/HLT, 1 on an error, 2 on timeout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from vmsh.devices.legacy.debugcon import DebugConsole
from vmsh.devices.legacy.i8042 import I8042
from vmsh.devices.legacy.post import PostPort
from vmsh.devices.legacy.serial import Serial16550
from vmsh.engine.boot import layout
from vmsh.engine.boot.configure import configure_vcpu, write_boot_tables
from vmsh.engine.boot.loader import load_initramfs, load_kernel
from vmsh.engine.bus import Bus
from vmsh.engine.cpuid import CpuTopology
from vmsh.engine.interrupts import EventTrigger, IrqFdTrigger
from vmsh.engine.kvm import Kvm
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.profiler import RipSampler, Symbolizer
from vmsh.engine.pvm import internal_error_handler, is_pvm_host
from vmsh.engine.stats import KvmStats
from vmsh.engine.vcpu import Vcpu, VcpuStop, install_kick_handler
from vmsh.errors import VmshError, error_chain

LOG = logging.getLogger(__name__)

SERIAL_BASE = 0x3F8
SERIAL_IRQ = 4


def _write_stdout(data: bytes) -> None:
    os.write(1, data)


def main(argv: list[str] | None = None) -> int:
    """Boot and wait; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m vmsh.engine.boot_demo", description=__doc__.splitlines()[0])
    p.add_argument("--kernel", required=True)
    p.add_argument("--initramfs")
    p.add_argument("--cmdline", default="console=ttyS0")
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--timeout", type=float, default=0, help="seconds (0: none)")
    p.add_argument("--stats", action="store_true", help="print KVM and PVM-handler counters at the end")
    p.add_argument("--sample-hz", type=float, default=0,
                   help="sample vCPU rip at this rate and print a profile at the end")
    p.add_argument("--sample-delay", type=float, default=0, help="start sampling after this many seconds")
    p.add_argument("--system-map", help="System.map to symbolize the profile")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _boot(args)
    except VmshError as err:
        sys.stderr.write("boot_demo: " + ": ".join(error_chain(err)) + "\n")
        return 1


def _boot(args: argparse.Namespace) -> int:
    install_kick_handler()
    pvm = is_pvm_host()
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(layout.KVM_TSS_START)
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
    vm.create_irqchip()
    vm.create_pit2()
    mem = GuestMemoryMmap.create(args.memory_mib << 20)
    mem.register(vm)

    t0 = time.monotonic()
    kernel = load_kernel(mem, args.kernel)
    initrd = load_initramfs(mem, args.initramfs, kernel) if args.initramfs else None
    write_boot_tables(mem, kernel, args.cmdline, initrd)
    LOG.info("loaded %s kernel (entry %#x) in %.3fs", kernel.kind, kernel.entry, time.monotonic() - t0)

    stop = threading.Event()
    vcpus: list[Vcpu] = []

    def stop_all() -> None:
        stop.set()
        for v in vcpus:
            v.kick()

    pio, mmio = Bus("pio"), Bus("mmio")
    serial = Serial16550(IrqFdTrigger(vm, SERIAL_IRQ), _write_stdout)
    serial_entry = pio.insert(serial, SERIAL_BASE, 8, name="__serial")
    reset = EventTrigger(stop_all)
    pio.insert(I8042(reset), 0x60, 5, name="i8042")
    pio.insert(PostPort(verbose=args.verbose), 0x80, 1, name="post")
    pio.insert(DebugConsole(lambda b: os.write(2, b)), 0xE9, 1, name="__debug_console")

    handler = internal_error_handler(mem)
    supported = kvm.supported_cpuid()
    topology = CpuTopology.flat(args.cpus)
    for i in range(args.cpus):
        fd = vm.create_vcpu(i)
        configure_vcpu(fd, mem, kernel, supported, topology, pvm=pvm)
        vcpus.append(Vcpu(fd, pio, mmio, on_internal_error=handler))
    vm_stats = KvmStats(vm.stats_fd())
    vcpu_stats = [KvmStats(v.fd.stats_fd()) for v in vcpus]

    if True:  # stdin always feeds the UART
        def feed_input() -> None:
            while not stop.is_set():
                try:
                    data = os.read(0, 64)
                except OSError:
                    return
                if not data:
                    return
                while data and not stop.is_set():
                    lock = serial_entry.lock
                    if lock is not None:
                        with lock:
                            n = serial.enqueue_raw_bytes(data)
                    else:
                        n = serial.enqueue_raw_bytes(data)
                    data = data[n:]
                    if data:
                        time.sleep(0.01)
        threading.Thread(target=feed_input, name="serial-in", daemon=True).start()

    start = time.monotonic()
    for v in vcpus:
        v.start(on_stop=lambda _v: stop.set())
    sampler = None
    if args.sample_hz:
        sampler = RipSampler(list(vcpus), args.sample_hz)
        if args.sample_delay:
            threading.Timer(args.sample_delay, sampler.start).start()
        else:
            sampler.start()
    timed_out = not stop.wait(args.timeout or None)
    if sampler is not None:
        sampler.stop()
    for v in vcpus:
        v.kick()
    for v in vcpus:
        v.join(2)
    elapsed = time.monotonic() - start
    status = 0
    if timed_out:
        sys.stderr.write(f"\nboot_demo: timeout after {elapsed:.1f}s\n")
        status = 2
    for v in vcpus:
        if v.error is not None:
            sys.stderr.write(f"\nboot_demo: vcpu{v.index}: " + ": ".join(error_chain(v.error)) + "\n")
            status = 1
        elif v.stop_reason not in (None, VcpuStop.KICKED):
            sys.stderr.write(f"\nboot_demo: vcpu{v.index} stopped: {v.stop_reason.value}\n")
    if reset.event.is_set():
        sys.stderr.write("\nboot_demo: guest requested a reset (i8042)\n")
    if args.stats:
        counters = vcpu_stats[0].read_counters()
        keys = ("exits", "io_exits", "mmio_exits", "halt_exits", "insn_emulation", "insn_emulation_fail",
                "pf_taken", "pf_emulate")
        sys.stderr.write(f"boot_demo: {elapsed:.2f}s guest time; vcpu0 "
                         + " ".join(f"{k}={counters.get(k, 0)}" for k in keys) + "\n")
        vmc = vm_stats.read_counters()
        sys.stderr.write("boot_demo: vm " + " ".join(f"{k}={vmc.get(k, 0)}" for k in
                                                      ("mmu_pte_write", "mmu_shadow_zapped", "mmu_flooded")) + "\n")
        if handler is not None:
            sys.stderr.write(f"boot_demo: PVM handler counts {dict(handler.counts)}\n")
        sys.stderr.write(f"boot_demo: serial bytes out {serial.tx_count}\n")
    if sampler is not None:
        symbolizer = Symbolizer.from_system_map(args.system_map) if args.system_map else None
        sys.stderr.write("boot_demo: profile\n" + sampler.report(symbolizer) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
