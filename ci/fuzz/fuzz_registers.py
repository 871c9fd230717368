"""Fuzz campaign: a guest that misdrives every device of a fully populated machine.

The real VMM runs as its own process (``python3 -m vmsh launch``, ``--seccomp true``) with a
serial port, the debug console, a virtio console, two disks (one on a second PCI segment), net
(a tap; as root only), rng, pmem, vsock, balloon, watchdog and pvpanic. Its guest is
``register_guest.S``: it enters long mode and then runs the port and MMIO accesses this process
writes into a mailbox in guest RAM (the memory zone is a shared file both map), one chunk at a
time. Between chunks this process reads the current layout from the API (``vm.info``: every
PCI device's BAR 0 where the guest has put it) and makes the next chunk from a seeded
``random.Random``, so a run is reproducible from its seed (up to timing: interrupts, the
watchdog and the I/O thread run when they run).

Targets, weighted: the platform's I/O ports (serial, i8042, CMOS, POST, debug console, the ACPI
sleep/reset register and PM timer, the 0xcf8/0xcfc configuration pair), random ports; PCI
configuration space through ECAM for every slot of both segments (header, BARs, command register,
each capability: the virtio ones and MSI-X, found by walking the list from the guest); each
device's BAR 0 (virtio common configuration with random and plausible values, so devices
activate on garbage, ISR, device configuration, queue notifications, MSI-X table and PBA;
pvpanic's register); the GED and the PCI hotplug registers; random addresses in the MMIO
windows. A third of the virtio activations use rings this process lays out in a RAM arena the
guest never uses, with descriptors pointing inside it, so the devices get requests to chew on.

What is not aimed at, and why:

* KVM's own devices (8259 PIC 0x20/0xa0, PIT 0x40-0x43 and 0x61, ELCR 0x4d0, IOAPIC, local
  APIC): not vmsh's code, and the guest needs its timer to wake up;
* MSI-X message data with a delivery mode other than fixed, lowest priority or NMI: INIT,
  SIPI, SMI and ExtINT would stop or reset the one vCPU as on hardware (the guest shooting
  itself), which would count as hangs that say nothing about the VMM; the delivery-mode bits
  of a write that covers them are cleared, the rest of the value stays random;
* guest RAM below the arena (the boot tables, this guest's code and its mailbox): queue
  addresses the fuzzer picks are in the arena or random; a device may still DMA into the
  guest through a random value (rarely), so a guest that stops is checked for a changed image
  before its stop is counted as a VMM hang.

Power-off and reset are not avoided: the ACPI sleep (0x34) and reset (0x01) values at 0x600,
i8042 command 0xfe, the CMOS shutdown byte, the watchdog and a triple fault stop or reboot the
VM. A reboot happens inside the VMM process (the guest's boot counter in the mailbox tells); a
power-off ends the process with status 0 and no traceback, and a fresh VMM is started. Both are
counted ("guest restarts"), neither is a crash. Ejects through the hotplug register remove
devices for good (as on hardware); when fewer than half are left a fresh VMM is started.

A crash is the VMM process ending other than by a clean power-off (an exit status other than
0, a signal), its API no longer answering or answering an error status (``vm.info`` and
``vm.counters`` are polled while the guest runs), or a ``Traceback`` in its log (an exception a
thread caught and logged is still a bug). A hang is a chunk that does not finish within the
time limit while the VMM still answers. Beyond not crashing, three checks (each counted, and a
failure fails the run):

* probe, at each start: every device's vendor ID reads back through ECAM and 0xcf8/0xcfc, every
  virtio device offers VIRTIO_F_VERSION_1;
* decode, every other chunk: each BAR that sits at a free place of its segment's window answers
  there (num_queues, pvpanic's register), and configuration space answers on exactly the slots
  the device tree lists;
* recovery, every 16 chunks and at the end: every BAR is brought home, and the rng and both
  disks, reset and driven as a driver does, serve one well-formed request (64 random bytes; a
  read of sector 0 with status OK) and raise its MSI-X interrupt in the guest.

The figures: accesses, crashes, hangs, guest restarts, devices seen in their error state (virtio
NEEDS_RESET, from the log), the checks passed, peak RSS of the VMM process (``VmHWM``, the
largest over its lives), its open fds and threads, time.

Run by hand from the repository root (root for the tap)::

    python3 ci/fuzz/fuzz_registers.py --accesses 100000 [--seed N] [--chunk 500] [--time-limit 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz.register_accesses import Access, Generator
from ci.fuzz.register_machine import (
    ENTRY,
    IMAGE_CHECKED,
    LOAD,
    MAILBOX,
    MAX_CHUNK,
    MB_BOOTS,
    MB_COUNT,
    MB_CURSOR,
    MB_DONE,
    MB_ENTRIES,
    MB_FAULT,
    MB_FAULT_RIP,
    MB_GO,
    MB_IRQS,
    MMIO32,
    MSIX_TABLE,
    NOTIFY,
    OP_IN,
    OP_OUT,
    OP_READ,
    OP_WRITE,
    PCI_CAP_MSIX,
    PCI_CAP_VNDR,
    STATUS_ACK,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_STATUS_NEEDS_RESET,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Device,
    VmmGone,
    VmmProcess,
    build_guest,
    read_layout,
)
from vmsh.api.client import ApiError
from vmsh.errors import VmshError

#: where the recovery check lays out its rings: RAM the fuzzed queues are never pointed at
CHECK_AREA = 60 << 20
#: how long a device may take to serve the recovery check's request
CHECK_SECONDS = 10.0

#: log lines worth counting: (kind, pattern)
LOG_PATTERNS = [
    ("needs-reset", re.compile(r"virtio-pci .*: (activation failed|DRIVER_OK without FEATURES_OK)|needs a reset")),
    ("traceback", re.compile(r"^Traceback ")),
    ("error", re.compile(r"\bERROR\b")),
    ("reset-request", re.compile(r"requested a (CPU )?reset|resetting the VM")),
    ("poweroff-request", re.compile(r"requested poweroff")),
    ("panic", re.compile(r"pvpanic: guest reported")),
]



# --- the campaign ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    accesses: int = 0
    chunks: int = 0
    crashes: int = 0
    hangs: int = 0
    guest_faults: int = 0
    guest_corrupted: int = 0
    guest_restarts: int = 0
    vmm_lives: int = 0
    poweroffs: int = 0
    needs_reset: int = 0
    needs_reset_seen: set[str] = dataclasses.field(default_factory=set)
    peak_rss_mib: float = 0.0
    max_fds: int = 0
    max_threads: int = 0
    seconds: float = 0.0
    interrupts: int = 0
    log_counts: Counter[str] = dataclasses.field(default_factory=Counter)
    classes: Counter[str] = dataclasses.field(default_factory=Counter)
    device_counters: Counter[str] = dataclasses.field(default_factory=Counter)
    findings: list[str] = dataclasses.field(default_factory=list)
    probe_failures: int = 0
    #: recovery checks passed, and failed (a device that did not serve a well-formed request after
    #: a reset)
    recoveries: int = 0
    recovery_failures: int = 0
    #: BARs at a free place of their window that answered there, and that did not
    decode_checks: int = 0
    decode_failures: int = 0

    @property
    def ok(self) -> bool:
        return (self.crashes == 0 and self.hangs == 0 and self.probe_failures == 0 and self.recovery_failures == 0
                and self.decode_failures == 0)

    def summary(self) -> str:
        return (f"registers: {self.accesses} accesses in {self.chunks} chunks, {self.crashes} crashes, "
                f"{self.hangs} hangs, {self.guest_restarts} guest restarts ({self.poweroffs} power-offs), "
                f"{self.vmm_lives} VMM processes, devices in their error state {self.needs_reset} times "
                f"({', '.join(sorted(self.needs_reset_seen)) or 'none'}), guest faults {self.guest_faults}, "
                f"recovery checks {self.recoveries} passed, {self.recovery_failures} failed, "
                f"decode checks {self.decode_checks} passed, {self.decode_failures} failed, "
                f"peak RSS of the VMM {self.peak_rss_mib:.0f} MiB (at most {self.max_fds} open fds, "
                f"{self.max_threads} threads), {self.seconds:.1f} s")


def default_tap() -> str | None:
    """A tap name when this process may create one (root), else None (net is left out)."""
    return f"vmshfz{os.getpid() % 10000}" if os.geteuid() == 0 else None


class Campaign:
    def __init__(self, seed: int, chunk: int, time_limit: float, workdir: Path, tap: str | None,
                 verbose: bool = False, keep: bool = False) -> None:
        self.rnd = random.Random(seed)
        self.gen = Generator(self.rnd)
        self.chunk_size = min(chunk, MAX_CHUNK)
        self.time_limit = time_limit
        self.workdir = workdir
        self.kernel = build_guest(workdir)
        self.image = self.kernel.read_bytes()
        self.flat = (workdir / "guest.bin").read_bytes()
        self.tap = tap
        self.verbose = verbose
        #: keep each VMM's directory (its log, disks and RAM file) instead of removing it when it ends
        self.keep = keep
        self.report = Report()
        self.vmm: VmmProcess | None = None
        self.initial_devices = 0
        self.polls = 0

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def finding(self, text: str) -> None:
        self.report.findings.append(text)
        print(f"--- finding: {text}", file=sys.stderr, flush=True)

    # -- VMM lives --

    def start_vmm(self) -> VmmProcess:
        self.report.vmm_lives += 1
        vmm = VmmProcess(self.workdir, self.kernel, self.tap, self.report.vmm_lives)
        self.vmm = vmm
        vmm.wait_started(60)
        deadline = time.monotonic() + 60
        while True:
            # The socket file appears at bind(), a moment before listen() (a refused connect),
            # and the API answers a moment before the VM is created (a 404).
            try:
                info = vmm.info(30)
                break
            except ApiError as err:
                if err.status != 404 or time.monotonic() > deadline or not vmm.alive():
                    raise VmmGone(f"vm.info answered {err.status} after the start: {err}") from err
            except VmmGone:
                if time.monotonic() > deadline or not vmm.alive():
                    raise
            time.sleep(0.02)
        devices = read_layout(info)
        self.gen.original = {}
        self.gen.set_layout(devices)
        self.gen.mem = vmm.mem
        self.initial_devices = len(devices)
        self.gen.regions = sorted({(d.base >> 30) << 30 for d in devices if d.base >= 1 << 32})
        vmm.handshake(self.gen.regions, 60)
        self.probe(vmm)
        return vmm

    def note_resources(self, vmm: VmmProcess) -> None:
        r = self.report
        r.peak_rss_mib = max(r.peak_rss_mib, vmm.peak_rss_kib / 1024)
        r.max_fds = max(r.max_fds, vmm.max_fds)
        r.max_threads = max(r.max_threads, vmm.max_threads)

    def add_counters(self, counters: dict[str, dict[str, Any]]) -> None:
        """Sum the devices' counters (requests served: proof that activations on laid-out rings
        reach the devices' queue code)."""
        for dev_id, values in counters.items():
            for name, value in values.items():
                if isinstance(value, int) and value:
                    self.report.device_counters[f"{dev_id.rstrip('0123456789')}.{name}"] += value

    def end_vmm(self, why: str) -> None:
        vmm = self.vmm
        if vmm is None:
            return
        if vmm.alive() and vmm.api is not None:
            try:
                self.add_counters(vmm.api.get("vm.counters"))
            except (VmshError, OSError, ValueError):
                pass
        self.scan_log(vmm)
        vmm.sample_rss()
        self.note_resources(vmm)
        status = vmm.close()
        self.scan_log(vmm)
        self.say(f"VMM life {self.report.vmm_lives} ended ({why}), status {status}")
        self.vmm = None
        if not self.keep:
            shutil.rmtree(vmm.dir, ignore_errors=True)

    def scan_log(self, vmm: VmmProcess) -> None:
        text = vmm.new_log()
        if not text:
            return
        lines = text.splitlines()
        for i, line in enumerate(lines):
            for kind, pattern in LOG_PATTERNS:
                if pattern.search(line):
                    self.report.log_counts[kind] += 1
                    if kind == "traceback":
                        self.report.crashes += 1
                        self.finding("a traceback in the VMM log:\n" + "\n".join(lines[max(0, i - 2):i + 25]))
                    if kind == "needs-reset":
                        self.report.needs_reset += 1
                        m = re.search(r"-- (Virtio\w+): ", line)
                        if m:
                            self.report.needs_reset_seen.add(m.group(1))
                        elif "virtio-pci" in line:
                            self.report.needs_reset_seen.add("the transport (activation refused)")
        for line in lines:
            if "ERROR" in line and "virtio-watchdog" not in line and "reboot failed" not in line:
                self.say(f"VMM error line: {line}")

    # -- the loop --

    def probe(self, vmm: VmmProcess) -> None:
        """Find every device's capabilities by walking their lists from the guest (once per
        machine), and check that the guest reaches the devices at all: each one's vendor ID reads
        back through ECAM and through 0xcf8/0xcfc."""
        devices = self.gen.devices
        accesses: list[Access] = []
        for d in devices:
            accesses.append((OP_READ, 2, self.gen.ecam(d.segment, d.slot, 0), 0))
            if d.segment == 0:
                accesses += [(OP_OUT, 4, 0xCF8, 0x8000_0000 | d.slot << 11), (OP_IN, 2, 0xCFC, 0)]
        results = self.run_chunk(vmm, accesses, count=False)
        if results is None:
            return
        vendors = [v for (op, _s, _a, _v), v in zip(accesses, results, strict=True) if op in (OP_READ, OP_IN)]
        probed = [d for d in devices for _ in range(2 if d.segment == 0 else 1)]
        for dev, got in zip(probed, vendors, strict=True):
            if got == 0xFFFF or got == 0:
                self.report.probe_failures += 1
                self.finding(f"probe: {dev.id} at {dev.segment:04x}:00:{dev.slot:02x}.0 reads vendor {got:#x}")
        # the features each virtio device offers (device_feature_select 0 and 1)
        virtio = [d for d in devices if d.virtio and self.gen.mapped(d.base, d.size)]
        reads = []
        for d in virtio:
            reads += [(OP_WRITE, 4, d.base, 0), (OP_READ, 4, d.base + 4, 0),
                      (OP_WRITE, 4, d.base, 1), (OP_READ, 4, d.base + 4, 0), (OP_READ, 2, d.base + 0x12, 0)]
        results = self.run_chunk(vmm, reads, count=False)
        if results is None:
            return
        for i, d in enumerate(virtio):
            self.gen.features[d.id] = results[5 * i + 1] | results[5 * i + 3] << 32
            self.gen.num_queues[d.id] = results[5 * i + 4]
            if not self.gen.features[d.id] >> 32 & 1:
                self.report.probe_failures += 1
                self.finding(f"probe: {d.id} does not offer VIRTIO_F_VERSION_1 (features {self.gen.features[d.id]:#x})")
        others = [d for d in devices if not d.virtio and self.gen.mapped(d.base, d.size)]
        results = self.run_chunk(vmm, [(OP_READ, 1, d.base, 0) for d in others], count=False) if others else []
        if results is None:
            return
        for d, value in zip(others, results, strict=True):
            self.gen.num_queues[d.id] = value  # pvpanic: its one register (the events it supports)
        # capability walk
        todo = {(d.segment, d.slot): 0x34 for d in devices if (d.segment, d.slot) not in self.gen.caps}
        for key in todo:
            self.gen.caps[key] = {}
        for _ in range(16):
            if not todo:
                break
            keys = list(todo)
            reads = [(OP_READ, 4, self.gen.ecam(s, sl, todo[(s, sl)]), 0) for s, sl in keys]
            results = self.run_chunk(vmm, reads, count=False)
            if results is None:
                return
            nxt = {}
            for key, value in zip(keys, results, strict=True):
                if todo[key] == 0x34:
                    pointer = value & 0xFC
                else:
                    self.gen.caps[key][todo[key]] = value & 0xFF
                    if value & 0xFF == PCI_CAP_VNDR and value >> 24 == VIRTIO_PCI_CAP_PCI_CFG:
                        self.gen.pci_cfg[key] = todo[key]
                    pointer = (value >> 8) & 0xFC
                if pointer and pointer not in self.gen.caps[key]:
                    nxt[key] = pointer
            todo = nxt

    def decodable(self, d: Device) -> bool:
        """Whether ``d``'s BAR, where ``vm.info`` says it is, must decode: inside its segment's
        window (the 32-bit one split in two halves, the mapped GiB of the 64-bit one), clear of
        every other device's BAR and of the holes between the BARs' first places (the pmem
        region, a memory slot)."""
        lo, hi = d.base, d.base + d.size
        half = (MMIO32[1] - 0x1800_0000 - MMIO32[0]) // 2 & ~((1 << 20) - 1)  # 640 MiB from 3 GiB, split
        win32 = (MMIO32[0] + d.segment * half, MMIO32[0] + (d.segment + 1) * half)
        homes = sorted((self.gen.original.get(x.id, x.base), x) for x in self.gen.devices)
        seg_regions = sorted({(h >> 30) << 30 for h, x in homes if x.segment == d.segment and h >= 1 << 32})
        in64 = any(b <= lo and hi <= b + (1 << 30) for b in seg_regions)
        if not (win32[0] <= lo and hi <= win32[1]) and not in64:
            return False
        if any(x.id != d.id and x.base < hi and lo < x.base + x.size for x in self.gen.devices):
            return False
        ends = [(h + x.size, nxt[0]) for (h, x), nxt in itertools.pairwise(homes) if h + x.size < nxt[0]]
        return not any(a < hi and lo < b for a, b in ends)

    def check_decode(self, vmm: VmmProcess) -> None:
        """Every BAR that sits at a free place of its window answers there: a virtio device's
        num_queues or pvpanic's register reads back (a BAR the VMM left unmapped would read
        all ones); and configuration space agrees with the device tree: each slot of each
        segment answers (a vendor ID) if and only if ``vm.info`` lists a device there (an ejected
        device is gone from both), slot 0 being the host bridge."""
        targets = [d for d in self.gen.devices if d.id in self.gen.num_queues and self.decodable(d)]
        reads = [(OP_READ, 2 if d.virtio else 1, d.base + (0x12 if d.virtio else 0), 0) for d in targets]
        slots = [(seg, slot) for seg in range(2) for slot in range(32)]
        reads += [(OP_READ, 2, self.gen.ecam(seg, slot, 0), 0) for seg, slot in slots]
        results = self.run_chunk(vmm, reads, count=False)
        if results is None:
            return
        vendors = results[len(targets):]
        try:
            listed = {(d.segment, d.slot) for d in read_layout(vmm.info())}
        except (VmmGone, ApiError):
            return  # judged at the top of the campaign's loop
        for (seg, slot), vendor in zip(slots, vendors, strict=True):
            if (vendor != 0xFFFF) != (slot == 0 or (seg, slot) in listed):
                self.report.decode_failures += 1
                self.finding(f"config space: slot {seg:04x}:00:{slot:02x}.0 reads vendor {vendor:#x} but the device "
                             f"tree {'lists' if (seg, slot) in listed else 'does not list'} a device there")
        for d, got in zip(targets, results, strict=False):
            if got == self.gen.num_queues[d.id]:
                self.report.decode_checks += 1
            elif any(x.id == d.id and x.base == d.base for x in read_layout(vmm.info())):
                self.report.decode_failures += 1
                self.finding(f"decode: {d.id}'s BAR is at {d.base:#x}, a free place of its window, but "
                             f"num_queues there reads {got:#x} (expected {self.gen.num_queues[d.id]})")

    def check_recovery(self, vmm: VmmProcess) -> None:
        """The oracle beyond "it did not crash": after all the garbage, the rng and the disks,
        reset and driven as a driver does (virtio 1.2 §3.1.1), serve one well-formed request
        through the ioeventfd path: 64 random bytes, a read of sector 0 with status OK; and
        their status shows no NEEDS_RESET. Every BAR is brought home first."""
        assert vmm.mem is not None
        accesses = self.gen.restore_bars(everyone=True)
        plans: list[tuple[Device, str, int, int, int, int]] = []
        for n, d in enumerate(self.gen.devices):
            kind = d.id.removeprefix("_virtio-pci-").rstrip("0123456789").strip("_")
            home = self.gen.original.get(d.id, d.base)
            if kind not in ("rng", "disk") or not d.virtio or not self.gen.mapped(home, d.size):
                continue
            area = CHECK_AREA + n * 0x10000
            desc, avail, used, buf = area, area + 0x1000, area + 0x2000, area + 0x3000
            vmm.mem[area:area + 0x10000] = bytes(0x10000)
            if kind == "rng":
                chain = [(buf, 64, VIRTQ_DESC_F_WRITE, 0)]
            else:
                vmm.mem[buf:buf + 16] = struct.pack("<IIQ", 0, 0, 0)  # VIRTIO_BLK_T_IN, sector 0
                vmm.mem[buf + 0x400] = 0xFF
                chain = [(buf, 16, VIRTQ_DESC_F_NEXT, 1), (buf + 0x100, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
                         (buf + 0x400, 1, VIRTQ_DESC_F_WRITE, 0)]
            table = b"".join(struct.pack("<QIHH", *c) for c in chain)
            vmm.mem[desc:desc + len(table)] = table
            vmm.mem[avail:avail + 6] = struct.pack("<HHH", 0, 1, 0)  # flags, idx 1, ring[0] = head 0
            b = home
            msix = next((off for off, cap in self.gen.caps.get((d.segment, d.slot), {}).items() if cap == PCI_CAP_MSIX),
                        None)
            vector = 0x40 + n  # the queue's MSI-X entry 1 sends this vector to the guest's local APIC
            if msix is not None:
                accesses += [(OP_WRITE, 2, self.gen.ecam(d.segment, d.slot, msix + 2), 0x8000),  # enable, unmask
                             (OP_WRITE, 4, b + MSIX_TABLE + 16, 0xFEE0_0000), (OP_WRITE, 4, b + MSIX_TABLE + 20, 0),
                             (OP_WRITE, 4, b + MSIX_TABLE + 24, vector), (OP_WRITE, 4, b + MSIX_TABLE + 28, 0)]
            accesses += [
                (OP_WRITE, 1, b + 0x14, 0), (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER),
                (OP_WRITE, 4, b + 0x08, 1), (OP_WRITE, 4, b + 0x0C, 1), (OP_WRITE, 4, b + 0x08, 0),
                (OP_WRITE, 4, b + 0x0C, 0), (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK),
                (OP_WRITE, 2, b + 0x16, 0), (OP_WRITE, 2, b + 0x18, 8),
                (OP_WRITE, 2, b + 0x1A, 1 if msix is not None else 0xFFFF),
                (OP_WRITE, 4, b + 0x20, desc), (OP_WRITE, 4, b + 0x24, 0), (OP_WRITE, 4, b + 0x28, avail),
                (OP_WRITE, 4, b + 0x2C, 0), (OP_WRITE, 4, b + 0x30, used), (OP_WRITE, 4, b + 0x34, 0),
                (OP_WRITE, 2, b + 0x1C, 1),
                (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
                (OP_WRITE, 2, b + NOTIFY, 0), (OP_READ, 1, b + 0x14, 0)]
            before = vmm.interrupts(vector)
            plans.append((d, kind, used, buf, vector if msix is not None else -1, before))
        if not plans:
            return
        results = self.run_chunk(vmm, accesses, count=False)
        if results is None:
            return  # the guest rebooted or the VMM went away meanwhile: counted there
        status = [v for (op, _s, a, _v), v in zip(accesses, results, strict=True) if op == OP_READ]
        deadline = time.monotonic() + CHECK_SECONDS
        for (d, kind, used, buf, vector, before), st in zip(plans, status[-len(plans):], strict=True):
            def served() -> bool:
                return (vmm.u16_at(used + 2) == 1  # noqa: B023 (called at once)
                        and (vector < 0 or vmm.interrupts(vector) != before))  # noqa: B023
            while not served() and time.monotonic() < deadline:
                time.sleep(0.005)
            done = vmm.u16_at(used + 2) == 1
            irq = vector < 0 or vmm.interrupts(vector) != before
            ok = done and irq and not st & VIRTIO_STATUS_NEEDS_RESET and (kind != "disk" or vmm.mem[buf + 0x400] == 0)
            if ok:
                self.report.recoveries += 1
            elif vmm.u64(MB_BOOTS) == vmm.boot and any(x.id == d.id for x in read_layout(vmm.info())):
                # (neither rebooted nor ejected meanwhile)
                self.report.recovery_failures += 1
                self.finding(f"recovery: {d.id} did not serve a well-formed request after a reset (used idx "
                             f"{'1' if done else 'still 0'}, MSI-X vector {vector:#x} "
                             f"{'taken' if irq else 'not taken'}, status {st:#x}, "
                             f"request status {vmm.mem[buf + 0x400]:#x})")

    def run_chunk(self, vmm: VmmProcess, accesses: list[Access], count: bool = True) -> list[int] | None:
        """Run ``accesses`` in the guest; the values reads returned, or None when the chunk did
        not finish (the VMM or the guest went away: already counted)."""
        assert vmm.mem is not None
        blob = b"".join(ENTRY.pack(a, v & (1 << 64) - 1, op & 0xFF, size, op >> 8) for op, size, a, v in accesses)
        vmm.mem[MAILBOX + MB_ENTRIES:MAILBOX + MB_ENTRIES + len(blob)] = blob
        vmm.set_u64(MB_COUNT, len(accesses))
        go = vmm.u64(MB_GO) + 1
        vmm.set_u64(MB_GO, go)
        deadline = time.monotonic() + self.time_limit
        next_poll = time.monotonic() + 0.02
        while vmm.u64(MB_DONE) != go:
            if count and time.monotonic() > next_poll:
                # the API's readers (device tree, counters) while the vCPU moves BARs and ejects
                next_poll = time.monotonic() + 0.02
                if not self.poll_api(vmm):
                    return None
            if vmm.u64(MB_BOOTS) != vmm.boot:
                self.guest_restarted(vmm, accesses)
                return None
            if vmm.u64(MB_FAULT):
                self.guest_stopped(vmm, accesses, "fault")
                return None
            if not vmm.alive():
                self.vmm_exited(vmm, accesses)
                return None
            if time.monotonic() > deadline:
                self.chunk_timed_out(vmm, accesses)
                return None
            time.sleep(0.001)
        if count:
            self.report.accesses += len(accesses)
            self.report.chunks += 1
        raw = vmm.mem[MAILBOX + MB_ENTRIES:MAILBOX + MB_ENTRIES + len(blob)]
        return [ENTRY.unpack_from(raw, i * ENTRY.size)[1] for i in range(len(accesses))]

    def poll_api(self, vmm: VmmProcess) -> bool:
        """One ``vm.info`` or ``vm.counters`` while a chunk runs; False when the VMM is gone (counted)."""
        self.polls += 1
        try:
            if self.polls % 2:
                vmm.info()
            elif vmm.api is not None:
                vmm.api.get("vm.counters")
        except ApiError as err:
            if not self.exiting_cleanly(vmm):
                self.report.crashes += 1
                self.finding(f"the API answered {err.status} while the guest ran: {err}")
        except (VmmGone, VmshError, OSError):
            if vmm.alive():
                return True  # judged by the chunk's own checks (a hang if it does not go on)
        return True

    @staticmethod
    def exiting_cleanly(vmm: VmmProcess) -> bool:
        """After an error status: whether the VMM is on its way out after a guest power-off (the
        VM is deleted a moment before the process ends, and the API says so meanwhile)."""
        try:
            vmm.proc.wait(5)
        except subprocess.TimeoutExpired:
            return False
        return vmm.proc.returncode == 0

    def in_flight(self, vmm: VmmProcess, accesses: list[Access]) -> str:
        cursor = vmm.u64(MB_CURSOR)
        if cursor < len(accesses):
            op, size, address, value = accesses[cursor]
            name = ("out", "in", "write", "read", "rep outs", "rep ins")[op & 0xFF]
            return f"access {cursor} of the chunk: {name} {size} bytes at {address:#x} value {value:#x}"
        return "between accesses"

    def guest_restarted(self, vmm: VmmProcess, accesses: list[Access]) -> None:
        self.report.guest_restarts += 1
        self.report.accesses += max(0, min(vmm.u64(MB_CURSOR), len(accesses)))
        self.say(f"guest rebooted during {self.in_flight(vmm, accesses)}")
        try:
            self.gen.set_layout(read_layout(vmm.info()))
            vmm.handshake(self.gen.regions, 60)
        except (VmmGone, TimeoutError, ApiError) as err:
            if self.exiting_cleanly(vmm):  # the rebooted guest powered off at once
                self.vmm_exited(vmm, [])
                return
            self.finding(f"the VMM did not boot the guest again after a reset: {err}")
            self.report.crashes += 1
            self.end_vmm("no reboot")

    def image_intact(self, vmm: VmmProcess) -> bool:
        assert vmm.mem is not None
        lo, hi = IMAGE_CHECKED
        return vmm.mem[lo:hi] == self.flat[:hi - lo]

    def guest_stopped(self, vmm: VmmProcess, accesses: list[Access], why: str) -> None:
        fault = vmm.u64(MB_FAULT)
        self.report.accesses += max(0, min(vmm.u64(MB_CURSOR), len(accesses)))
        if not self.image_intact(vmm):
            self.report.guest_corrupted += 1
            assert vmm.mem is not None
            changed = [hex(LOAD + i) for i in range(IMAGE_CHECKED[1] - LOAD) if vmm.mem[LOAD + i] != self.flat[i]]
            self.say(f"the guest's image was overwritten (a device DMA the fuzz pointed there: {changed[:8]}), "
                     f"exception {fault - 1} during {self.in_flight(vmm, accesses)}: a fresh VMM")
        else:
            self.report.guest_faults += 1
            self.finding(f"the guest took exception {fault - 1} (stack word {vmm.u64(MB_FAULT_RIP):#x}) "
                         f"during {self.in_flight(vmm, accesses)}")
        self.end_vmm(why)

    def vmm_exited(self, vmm: VmmProcess, accesses: list[Access]) -> None:
        status = vmm.proc.wait()
        self.scan_log(vmm)
        stderr = (vmm.dir / "stderr").read_bytes().decode(errors="replace")
        self.report.accesses += max(0, min(vmm.u64(MB_CURSOR), len(accesses)))
        if status == 0 and "Traceback" not in stderr:
            self.report.guest_restarts += 1
            self.report.poweroffs += 1
            self.say(f"the guest powered off during {self.in_flight(vmm, accesses)}")
        else:
            self.report.crashes += 1
            tail = "\n".join(stderr.splitlines()[-30:])
            self.finding(f"the VMM exited with status {status} during {self.in_flight(vmm, accesses)}:\n{tail}")
        self.end_vmm(f"exited {status}")

    def chunk_timed_out(self, vmm: VmmProcess, accesses: list[Access]) -> None:
        where = self.in_flight(vmm, accesses)
        try:
            state = vmm.info(10).get("state")
        except VmmGone as err:
            self.report.crashes += 1
            self.finding(f"the VMM stopped answering its API during {where}: {err}")
            self.end_vmm("API dead")
            return
        if not self.image_intact(vmm):
            self.report.guest_corrupted += 1
            self.report.accesses += max(0, min(vmm.u64(MB_CURSOR), len(accesses)))
            self.say("the guest's image was overwritten (a device DMA the fuzz pointed there): a fresh VMM")
        else:
            self.report.hangs += 1
            self.finding(f"hang: the chunk did not finish in {self.time_limit:.0f} s (VM {state}, guest "
                         f"interrupts {vmm.u64(MB_IRQS)}) during {where}")
        self.end_vmm("hang")

    def run(self, accesses: int) -> Report:
        start = time.monotonic()
        try:
            while self.report.accesses < accesses:
                vmm = self.vmm
                if vmm is None:
                    try:
                        vmm = self.start_vmm()
                    except (VmmGone, TimeoutError) as err:
                        self.report.crashes += 1
                        self.finding(f"the VMM did not start or boot the guest: {err}")
                        self.end_vmm("failed start")
                        if self.report.crashes > 5:
                            break
                        continue
                    if self.vmm is None:
                        continue
                try:
                    devices = read_layout(vmm.info())
                except ApiError as err:
                    if self.exiting_cleanly(vmm):
                        self.vmm_exited(vmm, [])  # a power-off: the VM was gone before the process
                    else:
                        self.report.crashes += 1
                        self.finding(f"vm.info answered {err.status}: {err}")
                        self.end_vmm("API error")
                    continue
                except VmmGone as err:
                    if vmm.alive():
                        self.report.crashes += 1
                        self.finding(f"the VMM stopped answering its API: {err}")
                        self.end_vmm("API dead")
                    else:
                        self.vmm_exited(vmm, [])
                    continue
                self.gen.set_layout(devices)
                if len(devices) * 2 < self.initial_devices:
                    self.end_vmm("most devices ejected")
                    continue
                n = min(self.chunk_size, accesses - self.report.accesses)
                chunk = self.gen.chunk(n)
                if self.report.chunks % 8 == 7:
                    chunk = self.gen.restore_bars() + chunk
                self.run_chunk(vmm, chunk[:MAX_CHUNK])
                if self.vmm is not None and self.report.chunks % 2 == 1:
                    try:
                        self.gen.set_layout(read_layout(self.vmm.info()))
                    except (VmmGone, ApiError):
                        continue  # judged at the top of the loop
                    self.check_decode(self.vmm)
                if self.vmm is not None and self.report.chunks % 16 == 15:
                    self.check_recovery(self.vmm)
                if self.vmm is not None:
                    self.scan_log(self.vmm)
                    self.vmm.sample_rss()
                    self.note_resources(self.vmm)
                    self.report.interrupts = max(self.report.interrupts, self.vmm.u64(MB_IRQS))
                if self.report.chunks % 20 == 0:
                    self.report.seconds = time.monotonic() - start
                    self.say(self.report.summary())
            if self.vmm is not None:
                try:
                    self.check_recovery(self.vmm)
                except VmmGone as err:
                    self.report.crashes += 1
                    self.finding(f"the VMM stopped answering during the last recovery check: {err}")
            if self.vmm is not None and self.vmm.api is not None:
                try:
                    self.add_counters(self.vmm.api.get("vm.counters"))
                except (VmshError, OSError):
                    pass
        finally:
            self.end_vmm("done")
            self.report.classes = self.gen.classes
            self.report.seconds = time.monotonic() - start
        return self.report


def run(accesses: int, seed: int = 0, chunk: int = 500, time_limit: float = 30.0, tap: str | None = None,
        verbose: bool = False, keep: bool = False) -> Report:
    """Run the campaign; returns its report."""
    workdir = Path(tempfile.mkdtemp(prefix="vmsh-regfuzz-"))
    try:
        return Campaign(seed, chunk, time_limit, workdir, tap, verbose, keep).run(accesses)
    finally:
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz campaign: guest register accesses to every device")
    parser.add_argument("--accesses", type=int, default=10_000, help="accesses to run (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--chunk", type=int, default=500, help="accesses per mailbox round (default 500)")
    parser.add_argument("--time-limit", type=float, default=30.0,
                        help="seconds a chunk may take before it counts as a hang (default 30)")
    parser.add_argument("--no-net", action="store_true", help="leave virtio-net out even as root")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, disks)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the VMM of the moment is shut down with the campaign
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    tap = None if args.no_net else default_tap()
    if tap is None:
        print("not root (or --no-net): virtio-net is left out", file=sys.stderr)
    report = run(args.accesses, args.seed, args.chunk, args.time_limit, tap, args.verbose, args.keep)
    print("accesses by target: " + ", ".join(f"{k} {v}" for k, v in sorted(report.classes.items())))
    print("device counters: " + ", ".join(f"{k} {v}" for k, v in sorted(report.device_counters.items())))
    print("log lines: " + ", ".join(f"{k} {v}" for k, v in sorted(report.log_counts.items())))
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
