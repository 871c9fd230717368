"""Warm clones: a small pool of idle, pre-started VMM processes to restore snapshots into.

A clone in a fresh process pays for Python's start-up and vmsh's imports before the restore
itself (~20 ms) can begin. A :class:`VmmPool` keeps ``size`` idle ``vmsh launch --api-socket``
processes started ahead of time, each with its serial console on its own terminal, so a clone
is one ``vm.restore`` (``resume=on``) into one of them plus the console the harness already
holds; a replacement is started after each clone, while the test runs.

The pool owns its processes until it hands one out (then the :class:`Guest` does, and its
``close`` stops it). Nothing is left behind:

* :meth:`VmmPool.close` stops the idle processes (the pytest plugin calls it when the session
  ends, Ctrl-C included, and at interpreter exit);
* every pooled process is started with ``die_with_parent``: the kernel sends it SIGTERM when
  the process that owns the pool dies, even by SIGKILL, and the launcher then removes its API
  socket (a pooled VMM has no VM, so no tap device, until it is handed out);
* a pooled process that died or does not answer its API in time is stopped and replaced, never
  handed out.

Pooled processes must be started from one thread that lives as long as the pool (the kernel's
parent-death signal follows the thread that forked): pytest's main thread.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import time
from collections import deque
from pathlib import Path

from vmsh.errors import VmshError
from vmsh.harness.guest import Guest, GuestError
from vmsh.harness.snapshots import launch_argv, private_disks

LOG = logging.getLogger(__name__)

#: how long a pooled process may take to answer its API (Python start-up on a loaded host)
START_TIMEOUT = 60.0


class VmmPool:
    """Up to ``size`` idle VMM processes under ``root``; :meth:`clone` restores a snapshot into one."""

    def __init__(self, root: str | os.PathLike[str], size: int = 2, *, start_timeout: float = START_TIMEOUT) -> None:
        if size < 1:
            raise ValueError("a pool holds at least one process")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.start_timeout = start_timeout
        self._idle: deque[Guest] = deque()
        self._ids = itertools.count()
        self._closed = False
        #: pooled processes found broken and replaced (for tests and logs)
        self.replaced = 0
        atexit.register(self.close)
        self.fill()

    def fill(self) -> None:
        """Start processes until ``size`` are idle."""
        while not self._closed and len(self._idle) < self.size:
            self._idle.append(self._spawn())

    def _spawn(self) -> Guest:
        n = next(self._ids)
        # a short socket path: sun_path holds 107 bytes, pytest's temp paths are long
        sock = self.root / f"v{n}.sock"
        guest = Guest(launch_argv(["--api-socket", str(sock)]), workdir=self.root / f"vmm{n}", die_with_parent=True)
        return guest.start()

    def wait_ready(self) -> None:
        """Wait until every idle process answers its API (replacing broken ones)."""
        checked: deque[Guest] = deque()
        while self._idle:
            guest = self._idle.popleft()
            if self._answers(guest):
                checked.append(guest)
            else:
                self.replaced += 1
                guest.close()
                self._idle.append(self._spawn())
        self._idle = checked

    def idle_pids(self) -> list[int]:
        return [guest.pid for guest in self._idle]

    def take(self) -> Guest:
        """An idle process whose API answers (waiting for its start-up if needed); a broken one
        is stopped and replaced first."""
        if self._closed:
            raise VmshError("the VMM pool is closed")
        for _ in range(self.size + 2):
            if not self._idle:
                self.fill()
            guest = self._idle.popleft()
            if self._answers(guest):
                return guest
            LOG.warning("pooled VMM %s is broken: replaced\n%s", guest.pid, guest.console_tail(1000))
            self.replaced += 1
            guest.close()
        raise VmshError(f"no pooled VMM answered within {self.start_timeout:g}s")

    def _answers(self, guest: Guest) -> bool:
        from vmsh.api.client import ApiClient

        assert guest.api_socket is not None
        sock = Path(guest.api_socket)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if guest.exit_status() is not None:
                return False
            if sock.exists():
                try:
                    with ApiClient(str(sock), timeout=5) as client:
                        client.get("vmm.ping")
                    return True
                except VmshError:
                    return False
            time.sleep(0.005)
        return False

    def clone(self, snapshot: str | os.PathLike[str], workdir: str | os.PathLike[str],
              timeout: float = 60.0) -> Guest:
        """A clone of ``snapshot`` restored into a pooled process, its shell ready for
        :meth:`Guest.run`; on private copies of the snapshot's writable disks (in ``workdir``).
        The restore's reply is the check (the snapshot was taken at the shell's prompt); a
        replacement process is started afterwards."""
        from vmsh.api.client import ApiClient

        workdir = Path(workdir)
        own = private_disks(Path(snapshot), workdir / "snapshot")
        guest = self.take()
        # the clone's directory is laid out as a fresh-process clone's: its private disks under
        # snapshot/, its console log (kept where the pooled process started) linked in
        guest.workdir = workdir
        (workdir / "console.log").symlink_to(guest.log_path)
        try:
            assert guest.api_socket is not None
            with ApiClient(guest.api_socket, timeout=timeout) as client:
                client.put("vm.restore", {"source_url": f"file://{own.resolve()}", "resume": True})
            guest.mark_shell_ready()
        except (GuestError, VmshError) as err:
            guest.close()
            raise GuestError(f"restoring {snapshot} into a pooled VMM failed: {err}") from err
        finally:
            self.fill()
        return guest

    def close(self) -> None:
        """Stop every idle process (a handed-out one belongs to its :class:`Guest`)."""
        self._closed = True
        while self._idle:
            self._idle.popleft().close()
