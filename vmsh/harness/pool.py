"""Warm clones: a small pool of idle, pre-started VMM processes to restore snapshots into.

A clone in a fresh process pays for Python's start-up and vmsh's imports before the restore
itself (~20 ms) can begin. A :class:`VmmPool` keeps ``size`` idle ``vmsh launch --api-socket``
processes started ahead of time, each with its serial console on its own terminal, so a clone
is one ``vm.restore`` (``resume=on``) into one of them plus the console the harness already
holds; a replacement is started after each clone, while the test runs.

A pooled process is started with :data:`~vmsh.engine.warmup.WARM_RESTORE_ENV` set: before it
answers its API it pays a restore's once-per-process costs (``vmsh.engine.warmup``; 6-8 ms of
a first ``vm.restore`` measured here), and it is otherwise a plain ``vmsh launch`` waiting for a
VM. The restore goes on the API connection whose ``vmm.ping`` found the process answering.

The pool owns its processes until it hands one out (then the :class:`Guest` does, and its
``close`` stops it). Nothing is left behind:

* :meth:`VmmPool.close` stops the idle processes (the pytest plugin calls it when the session
  ends, Ctrl-C included, and at interpreter exit);
* every pooled process is started with ``die_with_parent``: the kernel sends it SIGTERM when
  the process that owns the pool dies, even by SIGKILL, and the launcher then removes its API
  socket (a pooled VMM has no VM, so no tap device, until it is handed out);
* a pooled process that died or does not answer its API in time is stopped and replaced, never
  handed out.

A clone's replacement is started by the pool's refill thread (``vmsh-pool-refill``)
``refill_delay`` seconds after the clone was handed out: a new VMM process's Python start-up
takes a CPU for a few hundred ms, and started at once it would compete with the clone's first
answer (and its fork would be on the clone's path). A :meth:`take` that finds no idle process
starts one itself.

The kernel's parent-death signal follows the thread that forked, so every pooled process is
started by a thread that lives as long as the process owning the pool: the caller's (pytest's
main thread) or the refill thread, which never ends before the process does (after
:meth:`close` it only waits).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from vmsh.api.client import ApiClient
from vmsh.engine.warmup import WARM_RESTORE_ENV
from vmsh.errors import VmshError
from vmsh.harness.guest import Guest, GuestError
from vmsh.harness.snapshots import launch_argv, private_disks

LOG = logging.getLogger(__name__)

#: how long a pooled process may take to answer its API (Python start-up on a loaded host)
START_TIMEOUT = 60.0
#: seconds between handing a clone out and starting its replacement (see the module docstring)
REFILL_DELAY = 0.5


class VmmPool:
    """Up to ``size`` idle VMM processes under ``root``; :meth:`clone` restores a snapshot into one.

    ``_lock`` guards ``_idle`` and ``_closed``; ``_spawn_lock`` lets one thread at a time start
    processes (so the pool never holds more than ``size``), taken before ``_lock``.
    """

    def __init__(self, root: str | os.PathLike[str], size: int = 2, *, start_timeout: float = START_TIMEOUT,
                 refill_delay: float = REFILL_DELAY) -> None:
        if size < 1:
            raise ValueError("a pool holds at least one process")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.start_timeout = start_timeout
        self.refill_delay = refill_delay
        self._idle: deque[Guest] = deque()
        self._ids = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        self._spawn_lock = threading.Lock()
        self._refill_due = threading.Event()
        #: pooled processes found broken and replaced (for tests and logs)
        self.replaced = 0
        atexit.register(self.close)
        self.fill()
        threading.Thread(target=self._refill_loop, name="vmsh-pool-refill", daemon=True).start()

    def fill(self) -> None:
        """Start processes until ``size`` are idle."""
        with self._spawn_lock:
            while True:
                with self._lock:
                    if self._closed or len(self._idle) >= self.size:
                        return
                guest = self._spawn()
                with self._lock:
                    if not self._closed:
                        self._idle.append(guest)
                        continue
                guest.close()  # closed meanwhile
                return

    def _refill_loop(self) -> None:
        """The refill thread: after each clone, wait ``refill_delay`` and fill the pool. It never
        returns (the processes it started get SIGTERM when it ends)."""
        while True:
            self._refill_due.wait()
            time.sleep(self.refill_delay)
            self._refill_due.clear()
            try:
                self.fill()
            except Exception:  # the thread must outlive its processes; take() starts one itself
                LOG.exception("refilling the VMM pool failed")

    def _spawn(self) -> Guest:
        n = next(self._ids)
        # a short socket path: sun_path holds 107 bytes, pytest's temp paths are long
        sock = self.root / f"v{n}.sock"
        # warm: the process pays a restore's first-call costs before it answers (vmsh.engine.warmup)
        guest = Guest(launch_argv(["--api-socket", str(sock)]), workdir=self.root / f"vmm{n}", die_with_parent=True,
                      env={WARM_RESTORE_ENV: "1"})
        return guest.start()

    def wait_ready(self) -> None:
        """Fill the pool and wait until every idle process answers its API (replacing broken ones)."""
        while True:
            self.fill()
            with self._lock:
                idle = list(self._idle)
            broken = []
            for guest in idle:
                client = self._answers(guest)
                if client is None:
                    broken.append(guest)
                else:
                    client.close()
            if not broken:
                return
            for guest in broken:
                with self._lock:
                    self._idle.remove(guest)
                self.replaced += 1
                guest.close()

    def idle_pids(self) -> list[int]:
        with self._lock:
            return [guest.pid for guest in self._idle]

    def take(self) -> Guest:
        """An idle process whose API answers (waiting for its start-up if needed); a broken one
        is stopped and replaced first."""
        guest, client = self._take()
        client.close()
        return guest

    def _take(self) -> tuple[Guest, ApiClient]:
        """:meth:`take`, with the API connection that found the process answering, still open
        (the clone's restore goes on it: no second connection, no second server thread)."""
        for _ in range(self.size + 2):
            with self._lock:
                if self._closed:
                    raise VmshError("the VMM pool is closed")
                guest = self._idle.popleft() if self._idle else None
            if guest is None:
                self.fill()
                continue
            client = self._answers(guest)
            if client is not None:
                return guest, client
            LOG.warning("pooled VMM %s is broken: replaced\n%s", guest.pid, guest.console_tail(1000))
            self.replaced += 1
            guest.close()
        raise VmshError(f"no pooled VMM answered within {self.start_timeout:g}s")

    def _answers(self, guest: Guest) -> ApiClient | None:
        """An open API connection on which ``guest`` just answered ``vmm.ping``; None when it
        exited or does not answer in time."""
        assert guest.api_socket is not None
        sock = Path(guest.api_socket)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if guest.exit_status() is not None:
                return None
            if sock.exists():
                try:
                    client = ApiClient(str(sock), timeout=5)
                except VmshError:
                    return None
                try:
                    client.get("vmm.ping")
                except VmshError:
                    client.close()
                    return None
                return client
            time.sleep(0.005)
        return None

    def clone(self, snapshot: str | os.PathLike[str], workdir: str | os.PathLike[str],
              timeout: float = 60.0) -> Guest:
        """A clone of ``snapshot`` restored into a pooled process, its shell ready for
        :meth:`Guest.run`; on private copies of the snapshot's writable disks (in ``workdir``).
        The restore's reply is the check (the snapshot was taken at the shell's prompt); the
        refill thread starts a replacement process ``refill_delay`` seconds later."""
        workdir = Path(workdir)
        own = private_disks(Path(snapshot), workdir / "snapshot")
        guest, client = self._take()
        try:
            with client:
                # the clone's directory is laid out as a fresh-process clone's: its private disks
                # under snapshot/, its console log (kept where the pooled process started) linked in
                guest.workdir = workdir
                (workdir / "console.log").symlink_to(guest.log_path)
                client.sock.settimeout(timeout)
                client.put("vm.restore", {"source_url": f"file://{own.resolve()}", "resume": True})
            guest.mark_shell_ready()
        except (GuestError, VmshError) as err:
            guest.close()
            raise GuestError(f"restoring {snapshot} into a pooled VMM failed: {err}") from err
        finally:
            self._refill_due.set()
        return guest

    def close(self) -> None:
        """Stop every idle process (a handed-out one belongs to its :class:`Guest`); a process
        the refill thread is starting meanwhile is stopped by that thread."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for guest in idle:
            guest.close()
