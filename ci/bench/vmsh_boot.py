"""Boot a kernel under vmsh (KVM) to the ready marker and report the cost: shared by the
boot benchmarks. Importable from ``ci/bench/*.py`` (they put the repository on sys.path)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

from vmsh.harness import Guest

READY = "VMSH-READY"
_STAT = re.compile(r"__vcpu\d+: .*?insn_emulation=(\d+)")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _emulated_now(api_socket: str) -> int | None:
    """KVM's emulated-instruction count right now, summed over vCPUs (API ``vm.counters``)."""
    try:
        conn = _UnixHTTPConnection(api_socket)
        conn.request("GET", "/api/v1/vm.counters")
        counters = json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    counts = [v["insn_emulation"] for k, v in counters.items() if k.startswith("__vcpu") and "insn_emulation" in v]
    return sum(counts) if counts else None


def boot_to_marker(kernel: Path, initrd: Path, cmdline: str, memory_mb: int = 128, timeout: float = 300,
                   extra: list[str] | None = None) -> tuple[float, int | None]:
    """Seconds from launch to the ready marker, and KVM's emulated-instruction count at that
    point (summed over vCPUs, read through the API socket as the marker arrives; else the
    count logged at exit; None when KVM does not report it)."""
    with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp:
        log = Path(tmp) / "vmsh.log"
        api = str(Path(tmp) / "api.sock")
        argv = [sys.executable, "-m", "vmsh", "launch", "--kernel", str(kernel), "--initramfs", str(initrd),
                "--cmdline", cmdline, "--memory", f"size={memory_mb}M", "--serial", "tty", "--console", "off",
                "--api-socket", f"path={api}", "-v", "--log-file", str(log), *(extra or [])]
        guest = Guest(argv, workdir=tmp, boot_timeout=timeout)
        start = time.monotonic()
        guest.start()
        try:
            guest.expect(re.escape(READY), timeout=timeout)
            elapsed = time.monotonic() - start
            at_marker = _emulated_now(api)
        finally:
            guest.close()  # SIGTERM: a clean shutdown logs KVM's statistics
        if at_marker is not None:
            return elapsed, at_marker
        counts = [int(m) for m in _STAT.findall(log.read_text(errors="replace"))]
        return elapsed, (sum(counts) if counts else None)
