"""QEMU's virtiofsd (Debian ``qemu-system-common``: ``/usr/lib/qemu/virtiofsd``) as a test backend
for ``--fs``: one daemon sharing one host directory on one vhost-user socket.

This virtiofsd serves one frontend connection and exits when the frontend goes away (a VM that
ends, a device that is removed), so every device needs a daemon of its own.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmsh.harness.waiting import wait_until

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


class Virtiofsd:
    """A running virtiofsd: ``socket`` is its vhost-user socket, ``shared`` the directory it shares.

    ``cache=none``: the guest asks the daemon for every read and lookup, so a file the host
    changes is seen by the guest at once (cloud-hypervisor's docs recommend ``--cache=never``,
    the same mode in the Rust daemon). ``sandbox=chroot``: the default namespace sandbox needs
    unprivileged mount namespaces, which containers often forbid.
    """

    def __init__(self, shared: Path, socket: Path, log: Path) -> None:
        if not os.access(VIRTIOFSD, os.X_OK):
            pytest.skip(f"{VIRTIOFSD} is missing: apt-get install qemu-system-common")
        self.shared, self.socket, self.log = shared, socket, log
        shared.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(VIRTIOFSD), f"--socket-path={socket}", "-o", f"source={shared}", "-o", "cache=none",
                 "-o", "sandbox=chroot", "-f"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_until(socket.exists, 30, f"virtiofsd's socket {socket}", interval=0.05, process=self.proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
