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
import mmap
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

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.kernel_images import make_elf  # noqa: E402
from vmsh.api.client import ApiClient, ApiError  # noqa: E402
from vmsh.errors import VmshError  # noqa: E402

GUEST_SOURCE = Path(__file__).with_name("register_guest.S")

# --- the guest's memory map and mailbox (register_guest.S) ---------------------------------------
LOAD = 0x100_0000
MAILBOX = 0x110_0000
MB_MAGIC, MB_BOOTS, MB_MAP_ACK, MB_READY = 0x00, 0x08, 0x10, 0x18
MB_GO, MB_DONE, MB_COUNT, MB_CURSOR = 0x20, 0x28, 0x30, 0x38
MB_FAULT, MB_FAULT_RIP, MB_MAP_COUNT, MB_IRQS, MB_MAPPED = 0x40, 0x48, 0x50, 0x58, 0x60
MB_MAP_LIST, MB_VECTORS, MB_ENTRIES = 0x80, 0x400, 0x1000
MAGIC = 0x5A5A464745524D56
MAP_MAX = 16
ENTRY = struct.Struct("<QQBBH4x")
#: entries one chunk may hold (the mailbox area is 1 MiB)
MAX_CHUNK = (0x10_0000 - MB_ENTRIES) // ENTRY.size
OP_OUT, OP_IN, OP_WRITE, OP_READ, OP_OUTS, OP_INS = 0, 1, 2, 3, 4, 5
RAM_SIZE = 256 << 20
#: guest RAM the guest does not use: queues and buffers the fuzzer lays out live here
ARENA = (64 << 20, RAM_SIZE)
#: the guest's own image (code, GDT, IDT, page tables, stack): checked when the guest stops
IMAGE_CHECKED = (LOAD, LOAD + 0x1000)

# --- the machine (vmsh/engine/platform_devices.py, boot/layout.py, devices/virtio/pci.py) --------
LEGACY_PORTS = {  # name: (base, length)
    "serial": (0x3F8, 8), "i8042": (0x60, 5), "cmos": (0x70, 2), "post": (0x80, 1), "debugcon": (0xE9, 1),
    "acpi-sleep": (0x600, 8), "acpi-pm-timer": (0x608, 4), "pci-config": (0xCF8, 8),
}
#: ports KVM serves in the kernel (8259s, PIT, port B, ELCR): left alone
KVM_PORTS = {0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x4D0, 0x4D1}
GED = 0xFEB0_0000
PCI_HOTPLUG = 0xFEB0_1000
ECAM = 0xE800_0000
MMIO32 = (0xC000_0000, 0x1_0000_0000)
#: KVM's IOAPIC and local APIC, and its TSS/identity-map pages: left alone
KVM_MMIO = ((0xFEC0_0000, 0xFED0_0000), (0xFEE0_0000, 0xFEF0_0000), (0xF800_0000, 0xF810_0000))
VIRTIO_VENDOR = 0x1AF4
BAR_SIZE_VIRTIO = 0x80000
COMMON = [(0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1), (0x16, 2),
          (0x18, 2), (0x1A, 2), (0x1C, 2), (0x1E, 2), (0x20, 4), (0x24, 4), (0x28, 4), (0x2C, 4), (0x30, 4),
          (0x34, 4)]
ISR, DEVICE_CFG, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x2000, 0x4000, 0x6000, 0x8000, 0x48000
STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
PCI_CAP_MSIX, PCI_CAP_VNDR, VIRTIO_PCI_CAP_PCI_CFG = 0x11, 0x09, 5
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
VIRTIO_STATUS_NEEDS_RESET = 0x40
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


# --- the guest ------------------------------------------------------------------------------------

def build_guest(workdir: Path) -> Path:
    """Assemble ``register_guest.S`` (binutils) into a PVH ELF in ``workdir``; returns its path."""
    obj, elf, flat = workdir / "guest.o", workdir / "guest.elf", workdir / "guest.bin"
    for cmd in (["as", "--64", "-o", str(obj), str(GUEST_SOURCE)],
                ["ld", "-m", "elf_x86_64", f"-Ttext={LOAD:#x}", "-e", "_start", "-o", str(elf), str(obj)],
                ["objcopy", "-O", "binary", str(elf), str(flat)]):
        subprocess.run(cmd, check=True, capture_output=True)
    kernel = workdir / "guest.pvh"
    kernel.write_bytes(make_elf(entry_note=LOAD, paddr=LOAD, code=flat.read_bytes(), bss=0))
    return kernel


# --- the layout the API shows ---------------------------------------------------------------------

@dataclasses.dataclass
class Device:
    id: str
    segment: int
    slot: int
    base: int
    size: int
    bar64: bool

    @property
    def virtio(self) -> bool:
        return self.size == BAR_SIZE_VIRTIO


def read_layout(info: dict[str, Any]) -> list[Device]:
    """Every PCI device of ``vm.info``'s device tree with its BAR 0 (cloud-hypervisor's shape:
    a ``_virtio-pci-<id>`` node or the device's own node holds ``pci_bdf`` and the ``PciBar``)."""
    out = []
    for node in (info.get("device_tree") or {}).values():
        bdf = node.get("pci_bdf")
        bars = [r["PciBar"] for r in node.get("resources") or [] if isinstance(r, dict) and "PciBar" in r]
        if not bdf or not bars:
            continue
        seg, _bus, devfn = bdf.split(":")
        out.append(Device(node["id"], int(seg, 16), int(devfn.split(".")[0], 16), int(bars[0]["base"]),
                          int(bars[0]["size"]), bars[0].get("type_") == "Mmio64"))
    return sorted(out, key=lambda d: (d.segment, d.slot))


# --- the VMM process ------------------------------------------------------------------------------

class VmmGone(Exception):
    """The VMM process ended or its API stopped answering."""


class VmmProcess:
    """One ``vmsh launch`` of the fuzzed machine, its API and its guest's mailbox."""

    def __init__(self, workdir: Path, kernel: Path, tap: str | None, life: int) -> None:
        self.dir = workdir / f"life{life}"
        self.dir.mkdir()
        self.api_path = self.dir / "api.sock"
        self.log_path = self.dir / "vmm.log"
        self.zone = self.dir / "ram"
        with open(self.zone, "wb") as f:
            f.truncate(RAM_SIZE)
        for name, size in (("disk0", 8 << 20), ("disk1", 1 << 20), ("pmem", 2 << 20)):
            with open(self.dir / name, "wb") as f:
                f.truncate(size)
        args = [
            sys.executable, "-m", "vmsh", "launch", "-v", "--log-file", str(self.log_path),
            "--api-socket", f"path={self.api_path}", "--event-monitor", f"path={self.dir / 'events'}",
            "--seccomp", "true", "--kernel", str(kernel), "--cpus", "boot=1",
            "--memory", "size=0", "--memory-zone", f"id=z0,size={RAM_SIZE >> 20}M,file={self.zone},shared=on",
            "--platform", "num_pci_segments=2",
            "--serial", f"file={self.dir / 'serial'}", "--console", f"file={self.dir / 'console'}",
            "--debug-console", f"file={self.dir / 'debugcon'}",
            "--disk", f"path={self.dir / 'disk0'}", f"path={self.dir / 'disk1'},pci_segment=1",
            "--rng", "src=/dev/urandom", "--pmem", f"file={self.dir / 'pmem'},size=2M",
            "--vsock", f"cid=3,socket={self.dir / 'vsock'}", "--balloon", "size=0",
            "--watchdog", "--pvpanic",
        ]
        if tap is not None:
            args += ["--net", f"tap={tap}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.stderr = open(self.dir / "stderr", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     env=env, cwd=ROOT)
        self.api: ApiClient | None = None
        self.mem: mmap.mmap | None = None
        self.log_pos = 0
        self.peak_rss_kib = 0
        self.max_fds = 0
        self.max_threads = 0
        self.boot = 0

    # -- mailbox --

    def u64(self, off: int) -> int:
        assert self.mem is not None
        return int.from_bytes(self.mem[MAILBOX + off:MAILBOX + off + 8], "little")

    def set_u64(self, off: int, value: int) -> None:
        assert self.mem is not None
        self.mem[MAILBOX + off:MAILBOX + off + 8] = (value & (1 << 64) - 1).to_bytes(8, "little")

    def interrupts(self, vector: int) -> int:
        """How many times the guest took ``vector``."""
        assert self.mem is not None
        at = MAILBOX + MB_VECTORS + 4 * vector
        return int.from_bytes(self.mem[at:at + 4], "little")

    # -- process --

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample_rss(self) -> None:
        """Note the process's peak RSS, open fds and threads (bounded resources)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return
        m = re.search(r"VmHWM:\s+(\d+) kB", text)
        if m:
            self.peak_rss_kib = max(self.peak_rss_kib, int(m.group(1)))
        m = re.search(r"Threads:\s+(\d+)", text)
        if m:
            self.max_threads = max(self.max_threads, int(m.group(1)))
        self.max_fds = max(self.max_fds, fds)

    def info(self, timeout: float = 10.0) -> dict[str, Any]:
        """``vm.info``; raises VmmGone when the VMM does not answer."""
        try:
            if self.api is None:
                self.api = ApiClient(str(self.api_path), timeout=timeout)
            info: dict[str, Any] = self.api.get("vm.info")
            return info
        except ApiError:
            raise  # it answered: an error status is a finding of its own
        except (VmshError, OSError, ValueError) as err:
            if self.api is not None:
                self.api.close()
                self.api = None
            raise VmmGone(f"the API did not answer vm.info: {err}") from err

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.api_path.exists() or self.zone.stat().st_size < RAM_SIZE:
            if not self.alive():
                raise VmmGone(f"the VMM exited with status {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise VmmGone("the VMM did not open its API socket")
            time.sleep(0.05)
        fd = os.open(self.zone, os.O_RDWR)
        try:
            self.mem = mmap.mmap(fd, RAM_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def handshake(self, regions: list[int], timeout: float) -> None:
        """Wait for the guest's next boot, give it ``regions`` to map, wait until it is ready."""
        deadline = time.monotonic() + timeout
        while not (self.u64(MB_MAGIC) == MAGIC and self.u64(MB_BOOTS) > self.boot):
            self._check_deadline(deadline, "the guest to boot")
        boots = self.u64(MB_BOOTS)
        self.set_u64(MB_GO, 0)
        self.set_u64(MB_COUNT, 0)
        for i, base in enumerate(regions[:MAP_MAX]):
            self.set_u64(MB_MAP_LIST + 8 * i, base)
        self.set_u64(MB_MAP_COUNT, min(len(regions), MAP_MAX))
        self.set_u64(MB_MAP_ACK, boots)
        while self.u64(MB_READY) != boots:
            if self.u64(MB_BOOTS) != boots:
                boots = self.u64(MB_BOOTS)  # it rebooted meanwhile (a watchdog left running): again
                self.set_u64(MB_MAP_ACK, boots)
            self._check_deadline(deadline, "the guest to map its regions")
        self.boot = boots

    def _check_deadline(self, deadline: float, what: str) -> None:
        if not self.alive():
            raise VmmGone(f"the VMM exited with status {self.proc.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.002)

    def new_log(self) -> str:
        """Log text written since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_pos)
                data = f.read()
        except OSError:
            return ""
        cut = data.rfind(b"\n") + 1
        self.log_pos += cut
        return data[:cut].decode(errors="replace")

    def close(self) -> int | None:
        """Shut the VMM down (API, then SIGTERM, then SIGKILL); returns its exit status."""
        if self.alive():
            try:
                if self.api is None:
                    self.api = ApiClient(str(self.api_path), timeout=5)
                self.api.put("vmm.shutdown")
            except (VmshError, OSError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.api is not None:
            self.api.close()
            self.api = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.stderr.close()
        return self.proc.returncode


# --- the generator --------------------------------------------------------------------------------

#: (op, size, address, value); for rep outs/ins the op carries the count in bits 8-23 and the value
#: is the guest address of the buffer
Access = tuple[int, int, int, int]


class Generator:
    """Chunks of accesses from one seeded ``random.Random`` and what is known of the layout."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.devices: list[Device] = []
        self.original: dict[str, int] = {}
        self.regions: list[int] = []
        #: capabilities found by walking each device's list: (segment, slot) -> {offset: cap id}
        self.caps: dict[tuple[int, int], dict[int, int]] = {}
        #: where each virtio function's PCI_CFG capability is (virtio 1.2 §4.1.4.9)
        self.pci_cfg: dict[tuple[int, int], int] = {}
        #: the features each virtio device offers and its number of queues (read by the probe)
        self.features: dict[str, int] = {}
        self.num_queues: dict[str, int] = {}
        self.classes: Counter[str] = Counter()

    # -- values --

    def value(self, size: int) -> int:
        r = self.rnd.random()
        mask = (1 << 8 * size) - 1
        if r < 0.35:
            return self.rnd.getrandbits(8 * size)
        if r < 0.55:
            return self.rnd.choice((0, 1, 2, 3, 4, 7, 8, 0xF, 0x10, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
                                    0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 63, mask)) & mask
        if r < 0.75:
            return self.rnd.randrange(0, 64)
        if r < 0.9:
            return self.arena_address() & mask
        return (self.rnd.choice(self.regions) + self.rnd.randrange(0, 1 << 30)) & mask if self.regions else 0

    def arena_address(self, align: int = 16) -> int:
        return self.rnd.randrange(ARENA[0], ARENA[1] - 0x10000) & ~(align - 1)

    def size(self, allowed: tuple[int, ...] = (1, 2, 4, 8)) -> int:
        return self.rnd.choice(allowed)

    # -- layout --

    def set_layout(self, devices: list[Device]) -> None:
        self.devices = devices
        for d in devices:
            self.original.setdefault(d.id, d.base)

    def mapped(self, address: int, size: int) -> bool:
        if address + size <= 1 << 32:
            return True
        return any(b <= address and address + size <= b + (1 << 30) for b in self.regions)

    def ecam(self, segment: int, slot: int, register: int, function: int = 0, bus: int = 0) -> int:
        return ECAM + (segment << 20) + (bus << 20 if segment == 0 and bus else 0) \
            + (slot << 15) + (function << 12) + register

    # -- accesses --

    def chunk(self, count: int) -> list[Access]:
        out: list[Access] = []
        kinds = ("port", "cf8", "ecam", "bar", "virtio-activate", "bar-move", "platform-mmio", "random-mmio",
                 "random-port", "reset", "pci-cfg-window")
        weights = (18, 8, 18, 30, 1.5, 2, 4, 8, 8, 0.03, 3)
        while len(out) < count:
            kind = self.rnd.choices(kinds, weights)[0]
            made = getattr(self, "_" + kind.replace("-", "_"))()
            self.classes[kind] += len(made)
            out.extend(made)
        return out[:count]

    def _rw(self, address: int, size: int, port: bool = False, write: bool | None = None) -> Access:
        if write is None:
            write = self.rnd.random() < 0.6
        if port:
            return (OP_OUT if write else OP_IN, size, address, self.value(size) if write else 0)
        return (OP_WRITE if write else OP_READ, size, address, self.value(size) if write else 0)

    def _port(self) -> list[Access]:
        base, length = self.rnd.choice(list(LEGACY_PORTS.values()))
        port = base + self.rnd.randrange(length)
        if self.rnd.random() < 0.05:  # rep outs / rep ins (the vCPU's string I/O path)
            count = self.rnd.choice((1, 2, 16, 64, 255))
            buf = self.arena_address(8)
            op = OP_OUTS if self.rnd.random() < 0.6 else OP_INS
            if op == OP_OUTS and port in (0x600, 0x64, 0x70, 0x71):
                op = OP_INS  # a buffer of arena bytes would reset the VM too often
            return [(op | count << 8, self.size((1, 2, 4)), port, buf)]
        return [self._rw(port, self.size((1, 2, 4)), port=True)]

    def _reset(self) -> list[Access]:
        """Ask for a reset the ways a guest can (the VMM reboots the VM in its process), or,
        rarely, power off (the process ends and the campaign starts a fresh one)."""
        r = self.rnd.random()
        if r < 0.1:
            return [(OP_OUT, 1, 0x600, 0x34)]
        if r < 0.4:
            return [(OP_OUT, 1, 0x600, 0x01)]
        if r < 0.7:
            return [(OP_OUT, 1, 0x64, 0xFE)]
        return [(OP_OUT, 1, 0x70, 0x0F), (OP_OUT, 1, 0x71, 0x00)]

    def _random_port(self) -> list[Access]:
        port = self.rnd.randrange(0x10000)
        while port in KVM_PORTS:
            port = self.rnd.randrange(0x10000)
        return [self._rw(port, self.size((1, 2, 4)), port=True)]

    def _slot(self) -> tuple[int, int]:
        if self.devices and self.rnd.random() < 0.85:
            d = self.rnd.choice(self.devices)
            return d.segment, d.slot
        return self.rnd.randrange(2), self.rnd.randrange(32)

    def _register(self, segment: int, slot: int) -> int:
        caps = self.caps.get((segment, slot), {})
        r = self.rnd.random()
        if r < 0.25:
            return self.rnd.choice((0x04, 0x06, 0x0C, 0x10, 0x14, 0x18, 0x30, 0x3C, 0x3D))
        if r < 0.65 and caps:
            return self.rnd.choice(list(caps)) + self.rnd.randrange(0, 20)
        if r < 0.95:
            return self.rnd.randrange(0x100)
        return self.rnd.randrange(0x1000)

    def _cf8(self) -> list[Access]:
        segment, slot = self._slot()
        register = self._register(0, slot) if segment == 0 else self.rnd.randrange(0x100)
        if self.rnd.random() < 0.9:
            function = self.rnd.randrange(8) if self.rnd.random() < 0.1 else 0
            address = 0x8000_0000 | slot << 11 | function << 8 | (register & 0xFC)
        else:
            address = self.rnd.getrandbits(32)
        size = self.size((1, 2, 4))
        offset = register & 3 if size == 1 else (register & 2 if size == 2 else 0)
        return [(OP_OUT, 4, 0xCF8, address), self._rw(0xCFC + offset, size, port=True)]

    def _ecam(self) -> list[Access]:
        segment, slot = self._slot()
        register = self._register(segment, slot)
        size = self.size((1, 2, 4, 4, 8))
        function = self.rnd.randrange(8) if self.rnd.random() < 0.05 else 0
        bus = self.rnd.randrange(256) if self.rnd.random() < 0.03 else 0
        address = self.ecam(segment, slot, register & 0xFFF, function, bus)
        return [self._rw(address, size)]

    def _bar_device(self) -> Device | None:
        live = [d for d in self.devices if d.base and self.mapped(d.base, d.size)]
        return self.rnd.choice(live) if live else None

    def _bar(self) -> list[Access]:
        d = self._bar_device()
        if d is None:
            return self._bar_move()
        if not d.virtio:
            off = self.rnd.randrange(min(d.size, 0x20)) if self.rnd.random() < 0.9 else self.rnd.randrange(d.size)
            return [self._rw(d.base + off, self.size((1, 2, 4)))]
        r = self.rnd.random()
        size = self.size()
        if r < 0.45:
            off, natural = self.rnd.choice(COMMON)
            size = natural if self.rnd.random() < 0.8 else size
            access = self._rw(d.base + off, size)
            if access[0] == OP_WRITE and off in (0x20, 0x28, 0x30) and self.rnd.random() < 0.7:
                access = (OP_WRITE, 4, d.base + off, self.arena_address(64))
            elif access[0] == OP_WRITE and off in (0x24, 0x2C, 0x34) and self.rnd.random() < 0.7:
                access = (OP_WRITE, 4, d.base + off, 0)
            elif access[0] == OP_WRITE and off == 0x14 and self.rnd.random() < 0.5:
                access = (OP_WRITE, 1, d.base + off, self.rnd.choice((0, 1, 3, 0xB, 0xF, 0x8F, 0x4F, 0x7, 0xFF)))
            return [access]
        if r < 0.5:
            return [self._rw(d.base + ISR, size, write=self.rnd.random() < 0.2)]
        if r < 0.65:
            return [self._rw(d.base + DEVICE_CFG + self.rnd.randrange(0x100 if self.rnd.random() < 0.9 else 0x1000),
                             size)]
        if r < 0.75:
            return [(OP_WRITE, self.size((2, 2, 4, 1)), d.base + NOTIFY + 4 * self.rnd.randrange(8),
                     self.rnd.randrange(8))]
        if r < 0.92:
            off = self.rnd.randrange(16 * 24) if self.rnd.random() < 0.9 else self.rnd.randrange(0x40000)
            access = self._rw(d.base + MSIX_TABLE + off, size)
            if access[0] == OP_WRITE:
                access = (OP_WRITE, size, access[2], _fixed_delivery(off, size, access[3]))
            return [access]
        if r < 0.96:
            return [self._rw(d.base + MSIX_PBA + self.rnd.randrange(0x800), size)]
        edge = d.base + self.rnd.choice((d.size - self.rnd.randrange(1, 8), -self.rnd.randrange(1, 8)))
        if self.rnd.random() < 0.5 and self.mapped(edge, size):  # across the BAR's ends
            return [self._rw(edge, size)]
        return [self._rw(d.base + self.rnd.randrange(d.size - 8), size)]

    def _pci_cfg_window(self) -> list[Access]:
        """BAR 0 through the PCI_CFG capability's window (bar, offset, length, then data): the
        registers again, reached from a configuration write instead of an MMIO exit."""
        if not self.pci_cfg:
            return self._ecam()
        (segment, slot), cap = self.rnd.choice(sorted(self.pci_cfg.items()))
        r = self.rnd.random()
        if r < 0.5:
            offset = self.rnd.choice(COMMON)[0]
        elif r < 0.65:
            offset = NOTIFY + 4 * self.rnd.randrange(4)
        elif r < 0.8:
            offset = MSIX_TABLE + self.rnd.randrange(16 * 12)
        elif r < 0.9:
            offset = DEVICE_CFG + self.rnd.randrange(0x40)
        else:
            offset = self.rnd.getrandbits(32 if self.rnd.random() < 0.3 else 19)
        length = self.rnd.choice((1, 2, 4, 4, 0, 3, 8, self.rnd.getrandbits(32)))
        out: list[Access] = [
            (OP_WRITE, 1, self.ecam(segment, slot, cap + 4), 0 if self.rnd.random() < 0.9 else self.rnd.randrange(256)),
            (OP_WRITE, 4, self.ecam(segment, slot, cap + 8), offset),
            (OP_WRITE, 4, self.ecam(segment, slot, cap + 12), length)]
        size = self.size((1, 2, 4, 4))
        data = self.ecam(segment, slot, cap + 16)
        if self.rnd.random() < 0.6:
            value = self.value(size)
            if MSIX_TABLE <= offset < MSIX_TABLE + 0x40000:
                value = _fixed_delivery(offset - MSIX_TABLE, size, value)
            out.append((OP_WRITE, size, data, value))
        else:
            out.append((OP_READ, size, data, 0))
        return out

    def _virtio_activate(self) -> list[Access]:
        """Reset a device and drive it to DRIVER_OK with random or laid-out queues, then kick."""
        live = [d for d in self.devices if d.virtio and d.base and self.mapped(d.base, d.size)]
        if not live:
            return self._bar()
        d = self.rnd.choice(live)
        b = d.base
        w: list[Access] = [(OP_WRITE, 1, b + 0x14, 0), (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER)]
        offered = self.features.get(d.id, 1 << 32)
        r = self.rnd.random()
        if r < 0.7:  # what a driver does: a subset of the offer, with VERSION_1
            features = (offered & self.rnd.getrandbits(64)) | (offered & 1 << 32)
        elif r < 0.85:
            features = offered
        else:
            features = self.rnd.getrandbits(64)
        w += [(OP_WRITE, 4, b + 0x08, 1), (OP_WRITE, 4, b + 0x0C, features >> 32), (OP_WRITE, 4, b + 0x08, 0),
              (OP_WRITE, 4, b + 0x0C, features & 0xFFFF_FFFF),
              (OP_WRITE, 1, b + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK),
              (OP_READ, 1, b + 0x14, 0)]
        for q in range(self.rnd.randrange(1, 5)):
            qsize = self.rnd.choice((1, 2, 4, 8, 16, 64, 256, 3, 0, 0xFFFF))
            w += [(OP_WRITE, 2, b + 0x16, q), (OP_WRITE, 2, b + 0x18, qsize),
                  (OP_WRITE, 2, b + 0x1A, self.rnd.choice((0, 1, 2, 0xFFFF, self.rnd.randrange(16))))]
            if self.rnd.random() < 0.6:
                desc, avail, used = self.lay_out_ring(max(1, min(qsize, 256)))
            else:
                desc, avail, used = (self.arena_address(16), self.arena_address(2), self.arena_address(4))
            for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
                w += [(OP_WRITE, 4, b + off, addr & 0xFFFF_FFFF), (OP_WRITE, 4, b + off + 4, addr >> 32)]
            w.append((OP_WRITE, 2, b + 0x1C, 1 if self.rnd.random() < 0.9 else self.rnd.randrange(4)))
        w.append((OP_WRITE, 1, b + 0x14, self.rnd.choice((0xF, 0xF, 0xF, 0x7, 0x4F, 0x8F))))
        for _ in range(self.rnd.randrange(1, 6)):
            w.append((OP_WRITE, 2, b + NOTIFY + 4 * self.rnd.randrange(4), self.rnd.randrange(4)))
        w.append((OP_READ, 1, b + 0x14, 0))
        return w

    def lay_out_ring(self, qsize: int) -> tuple[int, int, int]:
        """Write a split ring into the arena (descriptors pointing into the arena, some chained,
        some indirect, odd lengths and flags) and return its three addresses. Written by this
        process before the chunk runs: guest RAM that the guest itself never touches."""
        assert self.mem is not None
        base = self.arena_address(4096)
        desc, avail, used = base, base + 16 * qsize, (base + 16 * qsize + 6 + 2 * qsize + 4095) & ~4095
        buf = bytearray()
        i = 0
        while i < qsize:  # chains of 1-3 as a driver builds them (readable, then writable), some broken
            chain = min(self.rnd.randint(1, 3), qsize - i)
            for j in range(chain):
                addr = self.arena_address(8) if self.rnd.random() < 0.95 else self.rnd.getrandbits(64)
                length = self.rnd.choice((16, 512, 4096, 1, 8, 65536, 0, self.rnd.getrandbits(32),
                                          self.rnd.randrange(600)))
                flags = (1 if j < chain - 1 else 0) | (2 if j > 0 or self.rnd.random() < 0.3 else 0)
                if self.rnd.random() < 0.1:
                    flags = self.rnd.choice((4, 6, self.rnd.getrandbits(16)))
                nxt = i + j + 1 if self.rnd.random() < 0.95 else self.rnd.getrandbits(16)
                buf += struct.pack("<QIHH", addr, length, flags, nxt % (1 << 16))
            i += chain
        self.mem[desc:desc + len(buf)] = bytes(buf)
        ring = [self.rnd.randrange(qsize) if self.rnd.random() < 0.9 else self.rnd.getrandbits(16)
                for _ in range(qsize)]
        idx = self.rnd.choice((1, qsize, self.rnd.getrandbits(16)))
        self.mem[avail:avail + 4 + 2 * qsize] = struct.pack(f"<HH{qsize}H", 0, idx, *ring)
        self.mem[used:used + 4] = bytes(4)
        # buffers: small integers (plausible request headers) and random bytes
        for _ in range(4):
            at = self.arena_address(8)
            self.mem[at:at + 64] = bytes(self.rnd.choice((0, 1, 2, 4, 8, 0xFF, self.rnd.randrange(256)))
                                         for _ in range(64))
        return desc, avail, used

    def _bar_move(self) -> list[Access]:
        """Move a BAR: into its window (the device follows), somewhere random, or back home."""
        if not self.devices:
            return self._ecam()
        d = self.rnd.choice(self.devices)
        r = self.rnd.random()
        home = self.original.get(d.id, d.base)
        if r < 0.5:
            target = home
        elif r < 0.8:
            target = home + self.rnd.randrange(1, 64) * d.size  # further into the same window
        else:
            target = self.rnd.getrandbits(64 if d.bar64 else 32) & ~0xF
        out: list[Access] = []
        if self.rnd.random() < 0.3:
            out.append((OP_WRITE, 2, self.ecam(d.segment, d.slot, 0x04), 0))  # decoding off while moving
        if self.rnd.random() < 0.2:  # size it first, as a driver does
            out += [(OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x10), 0xFFFF_FFFF),
                    (OP_READ, 4, self.ecam(d.segment, d.slot, 0x10), 0)]
        out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x10), target & 0xFFFF_FFF0))
        if d.bar64:
            out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x14), target >> 32))
        out.append((OP_WRITE, 2, self.ecam(d.segment, d.slot, 0x04), 0x6))  # memory space, bus master
        return out

    def restore_bars(self, everyone: bool = False) -> list[Access]:
        """Put every moved BAR back where the VMM placed it (the campaign does this now and then,
        so that the devices stay reachable). With ``everyone``, every BAR is first parked at a
        free place and then brought home: a BAR left unmapped because it was moved onto another
        device's is mapped again only when its value changes."""
        out: list[Access] = []
        moved = [d for d in self.devices if everyone or d.base != self.original.get(d.id, d.base)]
        for phase in ("park", "home"):
            for n, d in enumerate(moved):
                home = self.original.get(d.id, d.base)
                target = home + (0x1000_0000 + n * d.size if phase == "park" else 0)
                out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x10), target & 0xFFFF_FFF0))
                if d.bar64:
                    out.append((OP_WRITE, 4, self.ecam(d.segment, d.slot, 0x14), target >> 32))
                out.append((OP_WRITE, 2, self.ecam(d.segment, d.slot, 0x04), 0x6))
        return out

    def _platform_mmio(self) -> list[Access]:
        r = self.rnd.random()
        if r < 0.4:
            return [self._rw(GED + self.rnd.randrange(4), self.size((1, 2, 4)))]
        off = self.rnd.choice((0x0, 0x4, 0x8, 0xC, self.rnd.randrange(16)))
        access = self._rw(PCI_HOTPLUG + off, self.size((4, 4, 1, 2, 8)))
        if access[0] == OP_WRITE and off == 0x8:
            # an eject removes devices for good: one slot at a time, and often none
            value = 1 << self.rnd.randrange(32) if self.rnd.random() < 0.3 else 0
            access = (OP_WRITE, 4 if self.rnd.random() < 0.9 else access[1], access[2], value)
        return [access]

    def _random_mmio(self) -> list[Access]:
        size = self.size()
        if self.regions and self.rnd.random() < 0.4:
            address = self.rnd.choice(self.regions) + self.rnd.randrange(0, (1 << 30) - 8)
        elif self.rnd.random() < 0.5:
            address = ECAM + self.rnd.randrange(2 << 20)
        else:
            address = self.rnd.randrange(*MMIO32)
            while any(lo <= address < hi for lo, hi in KVM_MMIO) or address + size > MMIO32[1]:
                address = self.rnd.randrange(*MMIO32)
        return [self._rw(address, size)]

    mem: mmap.mmap | None = None


def _fixed_delivery(offset: int, size: int, value: int) -> int:
    """``value`` for a ``size``-byte write at ``offset`` of an MSI-X table with the delivery-mode
    bits (message data bits 8-10, the second byte of each entry's data dword at entry offset 8)
    cleared when they are written, so that only fixed, lowest-priority and NMI messages happen."""
    for i in range(size):
        if (offset + i) % 16 == 9:
            byte = value >> 8 * i & 0xFF
            mode = byte & 7
            if mode not in (0, 1, 4):
                value &= ~(7 << 8 * i)
    return value


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
        while True:  # the API socket is up a moment before the VM is created
            try:
                info = vmm.info(30)
                break
            except ApiError as err:
                if err.status != 404 or time.monotonic() > deadline or not vmm.alive():
                    raise VmmGone(f"vm.info answered {err.status} after the start: {err}") from err
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
                return (int.from_bytes(vmm.mem[used + 2:used + 4], "little") == 1  # noqa: B023 (called at once)
                        and (vector < 0 or vmm.interrupts(vector) != before))  # noqa: B023
            while not served() and time.monotonic() < deadline:
                time.sleep(0.005)
            done = int.from_bytes(vmm.mem[used + 2:used + 4], "little") == 1
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
