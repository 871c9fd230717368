"""Boot a kernel under vmsh (KVM) to the ready marker and report the cost: shared by the
boot benchmarks. Importable from ``ci/bench/*.py`` (they put the repository on sys.path)."""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from vmsh.harness import Guest

READY = "VMSH-READY"
_STAT = re.compile(r"__vcpu\d+: .*?insn_emulation=(\d+)")


def boot_to_marker(kernel: Path, initrd: Path, cmdline: str, memory_mb: int = 128, timeout: float = 300,
                   extra: list[str] | None = None) -> tuple[float, int | None]:
    """Seconds from launch to the ready marker, and KVM's emulated-instruction count at that
    point (summed over vCPUs; None when KVM does not report it)."""
    with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp:
        log = Path(tmp) / "vmsh.log"
        argv = [sys.executable, "-m", "vmsh", "launch", "--kernel", str(kernel), "--initramfs", str(initrd),
                "--cmdline", cmdline, "--memory", f"size={memory_mb}M", "--serial", "tty", "--console", "off",
                "-v", "--log-file", str(log), *(extra or [])]
        guest = Guest(argv, workdir=tmp, boot_timeout=timeout)
        start = time.monotonic()
        guest.start()
        try:
            guest.expect(re.escape(READY), timeout=timeout)
            elapsed = time.monotonic() - start
        finally:
            guest.close()  # SIGTERM: a clean shutdown logs KVM's statistics
        counts = [int(m) for m in _STAT.findall(log.read_text(errors="replace"))]
        return elapsed, (sum(counts) if counts else None)
