"""Boot a guest once, snapshot it at the ready prompt, and give every test its own clone.

On hosts where a boot costs seconds to minutes, a test suite cannot boot per test. A
:class:`SnapshotCache` boots each distinct launcher command line once (shared across pytest
xdist workers through a file lock in a common directory), waits for the ready marker, sets
the guest shell up for :meth:`Guest.run`, pauses and snapshots it; :func:`restore_guest`
then starts ``vmsh launch --restore ...,resume=on`` in a fresh process whose serial console
is already at that prompt. Restoring maps the snapshot's RAM copy-on-write, so clones are
cheap and share memory.

Writable disks are the one thing clones must not share: a cached snapshot keeps its own
copy of each (taken while the guest is paused, so it matches the guest's page cache), and
each clone runs on a private copy of that (like QEMU's ``snapshot=on``), so tests that
write to disks can run side by side.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from vmsh.api.client import ApiClient
from vmsh.harness.guest import Guest, GuestError
from vmsh.harness.waiting import wait_cpu_quiet

LOG = logging.getLogger(__name__)


def private_disks(snapshot: Path, dest: Path) -> Path:
    """A snapshot directory ``dest`` that shares ``snapshot``'s RAM and state files but has
    its own copy of every writable disk; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("state.json", "memory-ranges"):
        target = dest / name
        if target.exists() or target.is_symlink():
            target.unlink()
        os.symlink((snapshot / name).resolve(), target)
    config = json.loads((snapshot / "config.json").read_text())
    for disk in config.get("disks") or []:
        if disk.get("path") and not disk.get("readonly"):
            copy = dest / f"disk-{disk.get('id') or len(os.listdir(dest))}.img"
            shutil.copyfile(disk["path"], copy)
            disk["path"] = str(copy.resolve())
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: how long :func:`settle` waits for a booted guest to go quiet before its snapshot is taken
SETTLE_TIMEOUT = 10.0


def settle(guest: Guest, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until the booted guest's VMM is idle, so the snapshot is of a quiet guest.

    At its first prompt the guest kernel still has its boot's aftermath to run (deferred work,
    timers, the RNG's first fill: ~200,000 instructions, tens of ms on a host that emulates the
    guest kernel). Snapshotted then, every clone would run that work again and answer its first
    command that much later; once here, it is done for all of them.
    """
    if not wait_cpu_quiet(guest.pid, timeout):
        LOG.info("the guest did not go quiet within %gs: snapshot taken anyway", timeout)


def launch_argv(flags: list[str]) -> list[str]:
    """``vmsh launch`` with ``flags``, run by this Python."""
    return [sys.executable, "-m", "vmsh", "launch", *flags]


class SnapshotCache:
    """Snapshots of booted guests in ``root``, one per launcher command line."""

    def __init__(self, root: str | os.PathLike[str], boot_timeout: float = 300.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.boot_timeout = boot_timeout

    def key(self, flags: list[str]) -> str:
        return hashlib.sha256(json.dumps(flags).encode()).hexdigest()[:16]

    def get(self, flags: list[str]) -> Path:
        """The snapshot of a guest booted with ``flags`` (booting it if nobody has yet).

        ``flags`` must put the serial console on the terminal (``--serial tty``).

        :raises GuestError: when the boot fails; the console log is in ``<root>/<key>.boot/``.
        """
        key = self.key(flags)
        snap = self.root / key
        with _locked(self.root / f"{key}.lock"):
            if (snap / "config.json").exists():
                return snap
            work = self.root / f"{key}.boot"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            api = work / "api.sock"
            staging = work / "snapshot"
            staging.mkdir()
            with Guest(launch_argv([*flags, "--api-socket", str(api)]), workdir=work,
                       boot_timeout=self.boot_timeout) as guest:
                guest.wait_ready()
                guest.check_output("true")  # the shell answers: the snapshot is taken at its prompt
                settle(guest)
                try:
                    with ApiClient(str(api)) as client:
                        client.put("vm.pause")
                        client.put("vm.snapshot", {"destination_url": f"file://{staging}"})
                except Exception as err:
                    raise GuestError(f"snapshot of the booted guest failed: {err}") from err
                # Copy the disks now, while the guest is paused: they match its page cache.
                # (config.json is written last; readers hold the lock anyway.)
                shutil.rmtree(snap, ignore_errors=True)
                private_disks(staging, snap)
            for name in ("state.json", "memory-ranges"):
                os.replace(staging / name, snap / name)
            LOG.info("snapshot %s for %s", snap, " ".join(flags))
            return snap


def restore_guest(snapshot: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                  extra_flags: list[str] | None = None, timeout: float = 60.0) -> Guest:
    """A fresh VMM process running a clone of ``snapshot``, its shell ready for :meth:`Guest.run`.

    The clone runs on private copies of the snapshot's writable disks (in ``workdir``).
    """
    own = private_disks(Path(snapshot), Path(workdir) / "snapshot")
    flags = ["--restore", f"source_url=file://{own.resolve()},resume=on", *(extra_flags or [])]
    guest = Guest(launch_argv(flags), workdir=workdir, boot_timeout=timeout)
    guest.start()
    guest.mark_shell_ready()
    try:
        guest.check_output("true", timeout=timeout)
    except GuestError:
        guest.close()
        raise
    return guest
