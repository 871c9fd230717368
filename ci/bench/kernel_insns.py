"""Benchmark: exactly where a guest kernel's boot instructions go, under QEMU TCG.

On PVM hosts every guest kernel instruction is emulated, so the count of kernel
instructions to the ready marker is the boot's cost. The rip-sampling profiler of
``vmsh launch --profile`` shows it statistically under vmsh; this shows it exactly
and in seconds: QEMU TCG boots the kernel with a small plugin (``tcg_kcount.c``,
compiled here with gcc) that counts the instructions executed at kernel addresses
per translation block, and the counts are mapped to ``System.map`` symbols. Every
initcall and a list of boot stages are "watched": the report splits the boot at
their entries, so the cost of each stage is exact.

/init is replaced by a copy that exits right after printing the marker (the kernel
then panics and QEMU exits), so the count stops at the marker. The machine is
``microvm`` with PCIe and an RTC, which differs from vmsh's (different ACPI tables
and devices), and TCG's local APIC timer is calibrated in a loop that vmsh's guests
skip (TSC deadline timer): that loop (``setup_boot_APIC_clock``) and the PIT-based
TSC calibration are reported but left out of the "comparable" total.

Usage: ``python ci/bench/kernel_insns.py [--kernel VMLINUX] [--initrd CPIO]
[--cmdline ...] [--top N] [--stage-min M]`` (defaults: the built default kernel
and initramfs).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmsh.images import cpio, image_path
from vmsh.images.qemu import QEMU, host_tsc_khz

HERE = Path(__file__).resolve().parent
#: boot stages watched besides the initcalls (those not inlined in this kernel are used)
STAGES = (
    "x86_64_start_kernel", "start_kernel", "setup_arch", "parse_early_param", "dmi_setup",
    "init_mem_mapping", "paging_init", "free_area_init", "setup_per_cpu_areas",
    "build_all_zonelists", "vfs_caches_init_early", "memblock_free_all", "kmem_cache_init",
    "sched_init", "init_IRQ", "time_init", "console_init", "acpi_early_init",
    "alternative_instructions", "rest_init", "kernel_init", "kernel_init_freeable", "smp_init",
    "sched_init_smp", "unpack_to_rootfs", "free_initrd_mem", "free_initmem", "mark_rodata_ro",
    "run_init_process",
)
#: TCG-only costs (see the module docstring)
TCG_ONLY = ("setup_boot_APIC_clock", "quick_pit_calibrate")


def text_symbols(system_map: Path) -> tuple[list[int], list[str], dict[str, int]]:
    """Sorted text-symbol addresses and names, and every symbol's address by name."""
    pairs, every = [], {}
    for line in system_map.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            every[parts[2]] = int(parts[0], 16)
            if parts[1] in "tTwW":
                pairs.append((int(parts[0], 16), parts[2]))
    pairs.sort()
    return [a for a, _ in pairs], [n for _, n in pairs], every


def initcall_addresses(vmlinux: Path, every: dict[str, int]) -> set[int]:
    """Targets of the initcall table (32-bit offsets relative to each entry)."""
    data = vmlinux.read_bytes()
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            segments.append((vaddr, offset, filesz))

    def read(addr: int) -> int:
        for vaddr, offset, size in segments:
            if vaddr <= addr < vaddr + size:
                return struct.unpack_from("<i", data, offset + addr - vaddr)[0]
        raise ValueError(f"{addr:#x} not in a loaded segment")

    start, end = every["__initcall_start"], every["__initcall_end"]
    return {a + read(a) for a in range(start, end, 4)}


def stop_at_marker(initrd: Path, dest: Path) -> None:
    """Copy ``initrd`` (a newc archive) with /init exiting right after it prints the marker."""
    data, off, entries = initrd.read_bytes(), 0, []
    while True:
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        off += 110
        name = data[off: off + namesize - 1].decode()
        off += namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        body = data[off: off + size]
        off += size + (-size % 4)
        if name == "init":
            body = body.replace(b'echo "VMSH-READY"\n', b'echo "VMSH-READY"\nexit 0\n')
        entries.append(cpio.Entry(name, mode, body, rdev=(fields[9], fields[10])))
    with open(dest, "wb") as f:
        cpio.write(f, entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", type=Path, help="ELF vmlinux (default: the built default kernel)")
    parser.add_argument("--system-map", type=Path, help="default: System.map next to --kernel")
    parser.add_argument("--initrd", type=Path, help="default: the built initramfs")
    parser.add_argument("--cmdline", default="console=ttyS0 quiet panic=-1")
    parser.add_argument("--memory-mb", type=int, default=128)
    parser.add_argument("--top", type=int, default=30, help="symbols listed")
    parser.add_argument("--stage-top", type=int, default=4, help="symbols listed per stage")
    parser.add_argument("--stage-min", type=float, default=0.1,
                        help="stages listed from this many million instructions")
    args = parser.parse_args(argv)
    kernel = args.kernel or image_path("vmlinux")
    system_map = args.system_map or kernel.parent / "System.map"
    initrd = args.initrd or image_path("initramfs")
    addrs, names, every = text_symbols(system_map)

    def symbol(addr: int) -> str:
        i = bisect.bisect_right(addrs, addr) - 1
        return names[i] if i >= 0 else f"{addr:#x}"

    with tempfile.TemporaryDirectory(prefix="vmsh-kcount-") as tmp:
        t = Path(tmp)
        plugin = t / "tcg_kcount.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(plugin), str(HERE / "tcg_kcount.c")], check=True)
        watched = initcall_addresses(kernel, every) | {every[s] for s in STAGES if s in every}
        (t / "watch").write_text("".join(f"{a:x}\n" for a in sorted(watched)))
        stop_at_marker(initrd, t / "initrd.cpio")
        khz = host_tsc_khz()
        cmdline = f"{args.cmdline} tsc_early_khz={khz}" if khz else args.cmdline
        out = t / "counts"
        qemu = [QEMU, "-accel", "tcg", "-M", "microvm,pcie=on,rtc=on", "-cpu", "max", "-m", str(args.memory_mb),
                "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                "-no-reboot", "-kernel", str(kernel), "-initrd", str(t / "initrd.cpio"), "-append", cmdline,
                "-plugin", f"{plugin},out={out},watch={t / 'watch'}"]
        console = subprocess.run(qemu, capture_output=True, text=True, errors="replace", timeout=600).stdout
        if "VMSH-READY" not in console:
            print(console[-2000:])
            raise SystemExit("the guest did not reach the ready marker")
        total = collections.Counter()
        stages: list[tuple[str, collections.Counter[str]]] = [("(start)", collections.Counter())]
        for line in out.read_text().splitlines():
            kind = line[:2]
            if kind == "E ":
                stages.append((symbol(int(line.split()[1], 16)), collections.Counter()))
            elif kind != "B ":
                addr, n = line.split()
                name = symbol(int(addr, 16))
                stages[-1][1][name] += int(n)
                total[name] += int(n)

    everything = sum(total.values())
    tcg_only = sum(total[s] for s in TCG_ONLY)
    print(f"kernel instructions to the ready marker: {everything / 1e6:.2f} M, "
          f"{(everything - tcg_only) / 1e6:.2f} M without the TCG-only calibration loops")
    print(f"\ntop {args.top} symbols")
    for name, n in total.most_common(args.top):
        print(f"{n / 1e6:8.3f} M {n * 100 / everything:5.1f} %  {name}")
    print(f"\nstages (from the entry of each to the next watched entry, >= {args.stage_min} M)")
    for name, counts in stages:
        n = sum(counts.values())
        if n >= args.stage_min * 1e6:
            tops = ", ".join(f"{s} {c / 1e3:.0f}k" for s, c in counts.most_common(args.stage_top))
            print(f"{n / 1e6:7.3f} M  {name}: {tops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
