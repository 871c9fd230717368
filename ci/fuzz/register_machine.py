"""The register campaign's machine (``fuzz_registers.py``): its guest and the guest's mailbox,
the machine's fixed places (ports, ECAM, the platform's MMIO, the virtio BAR layout), the
layout ``vm.info`` shows, and one ``vmsh launch`` process of the fully populated machine.

The guest is ``register_guest.S``, assembled with binutils and wrapped into a PVH ELF; its
memory map and mailbox fields are the ``LOAD``, ``MAILBOX`` and ``MB_*`` constants here, which
must match the ``.set`` lines of the assembler source.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import time
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

    def u16_at(self, address: int) -> int:
        """The little-endian u16 at guest physical ``address`` (a used ring's index)."""
        assert self.mem is not None
        return int.from_bytes(self.mem[address:address + 2], "little")

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
