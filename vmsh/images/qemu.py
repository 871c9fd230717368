"""Booting the guest images under QEMU with TCG: the check of the images that does not
depend on vmsh, shared by ``tests/images`` and ``ci/bench/kernel.py``.

QEMU's KVM mode does not work on this project's hosts (they are PVM hosts, see ``vmsh/engine/pvm.py``), so this is
pure emulation (``-accel tcg``). The serial console is QEMU's stdio, driven through
pipes with pexpect. The ELF ``vmlinux`` kernels boot through their PVH note on
``-M microvm``; bzImages boot through SeaBIOS on ``-M pc``.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

from vmsh.errors import ImageError

if TYPE_CHECKING:
    from pexpect.popen_spawn import PopenSpawn

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
READY_MARKER = "VMSH-READY"


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (TCG's guest TSC follows the host's), if known.

    Passed as ``tsc_early_khz=``: under a busy TCG the guest's TSC calibration against
    the PIT sometimes hangs, and knowing the frequency skips it.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return int(float(m[1]) * 1000) if m else None


@dataclass
class BootSpec:
    """One QEMU boot: which kernel and initramfs, on which machine, with what command line."""

    kernel: Path
    initrd: Path
    machine: str = "microvm"
    cmdline: str = "console=ttyS0"
    memory_mb: int = 256
    cpus: int = 1
    extra_args: list[str] = field(default_factory=list)

    def full_cmdline(self) -> str:
        """The command line QEMU passes to the kernel (plus tsc_early_khz= if known)."""
        khz = host_tsc_khz()
        return f"{self.cmdline} tsc_early_khz={khz}" if khz else self.cmdline

    def argv(self) -> list[str]:
        return [
            QEMU, "-accel", "tcg", "-M", self.machine, "-m", str(self.memory_mb),
            "-smp", str(self.cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", self.full_cmdline(), *self.extra_args,
        ]


class QemuGuest:
    """A running QEMU with its serial console on pipes; use as a context manager."""

    def __init__(self, spec: BootSpec) -> None:
        if shutil.which(QEMU) is None:
            raise ImageError(f"{QEMU} not found: apt-get install qemu-system-x86")
        self.spec = spec
        self.proc: PopenSpawn | None = None
        self.started = 0.0

    def __enter__(self) -> Self:
        import pexpect.popen_spawn

        self.started = time.monotonic()
        self.proc = pexpect.popen_spawn.PopenSpawn(
            self.spec.argv(), timeout=60, encoding="utf-8", codec_errors="replace",
            maxread=65536,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def _running(self) -> PopenSpawn:
        if self.proc is None:
            raise ImageError("QEMU is not running (use QemuGuest as a context manager)")
        return self.proc

    def expect(self, pattern: str, timeout: float) -> str:
        """Wait for a regex on the console; return the matched text.

        On timeout or QEMU exit, raise ImageError with the console's last lines.
        """
        import pexpect

        try:
            self._running.expect(pattern, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF) as err:
            what = "timeout" if isinstance(err, pexpect.TIMEOUT) else "QEMU exited"
            tail = "\n".join(str(self._running.before).splitlines()[-25:])
            raise ImageError(f"{what} waiting for {pattern!r}; console tail:\n{tail}") from None
        return self._running.after

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait for /init's ready marker; return seconds since QEMU started."""
        self.expect(rf"(?m)^{READY_MARKER}\r?$", timeout)
        elapsed = time.monotonic() - self.started
        # the shell's first prompt (busybox follows it with a cursor query, ESC [6n):
        # input typed before it would be echoed twice
        self.expect(r"[#$] (?:\x1b\[6n)?", timeout)
        return elapsed

    def run(self, command: str, timeout: float = 20) -> str:
        """Type a shell command; return its output (between unique markers)."""
        tag = f"VMSH-{int(time.monotonic() * 1e6) % 10**8}"
        # the marker is split in the command so the echoed input does not match it
        self._running.send(f"{command}; echo {tag[:5]}''{tag[5:]}-END\n")
        self.expect(rf"{tag}-END", timeout)
        # what follows the terminal's echo of the command (which ends in the split tag)
        out = str(self._running.before).rsplit(f"''{tag[5:]}-END", 1)[-1]
        return out.replace("\r\n", "\n").strip("\r\n")

    def send(self, text: str) -> None:
        self._running.send(text)

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for QEMU to exit (after a poweroff); return its exit status."""
        import pexpect

        try:
            self._running.expect(pexpect.EOF, timeout=timeout)
        except pexpect.TIMEOUT:
            raise ImageError(f"QEMU still running {timeout:.0f} s after poweroff") from None
        return self._running.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.kill(9)
            self.proc.wait()


def boot_to_marker(spec: BootSpec, timeout: float = 60) -> float:
    """Boot once, return the seconds to the ready marker, then kill QEMU."""
    with QemuGuest(spec) as guest:
        return guest.wait_ready(timeout)
