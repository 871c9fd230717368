"""A real guest behind its serial console, driven with pexpect.

:class:`Guest` starts a VMM process whose serial console is the process's own terminal
(``vmsh launch ... --serial tty``), waits for the guest's ready marker, and runs shell
commands in it::

    with Guest(["vmsh", "launch", "--kernel", k, "--initramfs", i, "--serial", "tty", "--console", "off"],
               workdir=tmp_path) as guest:
        guest.wait_ready()
        result = guest.run("cat /proc/cmdline")
        assert result.status == 0

Commands are bracketed by markers that never appear in the command's own echo (the marker
text is split by quotes on the command line), so output is exact even when the terminal
echoes; kernel messages are quietened once the shell is up. Every wait has a timeout, and a
failure raises :class:`GuestError` carrying the command, its output so far and the tail of
the console log; the whole console is kept in ``<workdir>/console.log``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import ptyprocess

from vmsh.errors import VmshError
from vmsh.harness.shellproto import READY_MARKER, SHELL_PROMPT, clean, command_line, setup_line, strip_escapes
from vmsh.harness.waiting import WaitTimeout, wait_until

LOG = logging.getLogger(__name__)

CONSOLE_TAIL = 3000
#: the guest shell's acknowledgement of the setup line (each command forks on slow hosts)
SETUP_TIMEOUT = 90.0


class _Spawn(pexpect.spawn):
    """``pexpect.spawn`` whose child keeps ``pass_fds`` open (ptyprocess closes every other fd)
    and, with ``die_with_parent``, is sent SIGTERM when the process that started it dies."""

    def __init__(self, *args: Any, pass_fds: tuple[int, ...] = (), die_with_parent: bool = False, **kw: Any) -> None:
        # read by _spawnpty, which runs inside pexpect.spawn.__init__
        self._pass_fds = pass_fds
        self._die_with_parent = die_with_parent
        super().__init__(*args, **kw)
        # pexpect sleeps 50 ms before every send by default (for programs that turn echo off
        # after printing a password prompt). The harness only types at a prompt it has seen, and
        # the VMM queues console input until the guest's UART takes it, so the sleep is pure
        # latency: 50 ms on every command and on every clone's first answer.
        self.delaybeforesend = None

    def _spawnpty(self, args: list[str], **kwargs: Any) -> ptyprocess.PtyProcess:
        if self._die_with_parent:
            kwargs["preexec_fn"] = _terminate_with_parent(os.getpid())
        return ptyprocess.PtyProcess.spawn(args, pass_fds=self._pass_fds, **kwargs)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _terminate_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when ``parent`` dies (a
    killed pytest worker leaves no VMM behind; on SIGTERM the launcher removes its sockets)."""

    import ctypes  # here, in the parent: the child runs arm() between fork and exec

    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the signal was armed
            os._exit(1)

    return arm


def api_socket_of(argv: list[str]) -> str | None:
    """The API socket path a ``vmsh launch`` command line asks for (``--api-socket PATH`` or
    ``path=PATH``), or None."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--api-socket":
            if "=" not in value:
                return value
            keys = dict(part.partition("=")[::2] for part in value.split(","))
            return keys.get("path") or None
    return None


class GuestError(VmshError):
    """A guest that did not do what was expected in time; the message ends with the console tail."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a command printed (stdout and stderr, ``\\r\\n`` folded) and its exit status."""

    command: str
    output: str
    status: int

    def check(self) -> CommandResult:
        """Raise unless the command succeeded."""
        if self.status != 0:
            raise GuestError(f"command failed with status {self.status}: {self.command}\n{self.output}")
        return self


class Guest:
    """One VMM process and the guest on its serial console.

    :param argv: the VMM command line; its standard input and output must be the serial console.
    :param workdir: where ``console.log`` goes (created if needed).
    :param boot_timeout: seconds to wait for the ready marker.
    :param pass_fds: fds the VMM inherits under the same numbers (``--net fd=N``); each must
        be inheritable (``os.set_inheritable``).
    :param die_with_parent: the VMM gets SIGTERM when this process dies (see :mod:`vmsh.harness.pool`).
    """

    _ids = itertools.count()

    def __init__(self, argv: list[str], workdir: str | os.PathLike[str], *, boot_timeout: float = 120.0,
                 env: dict[str, str] | None = None, ready_marker: str = READY_MARKER,
                 pass_fds: tuple[int, ...] = (), die_with_parent: bool = False) -> None:
        self.argv = list(argv)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "console.log"
        self.boot_timeout = boot_timeout
        self.ready_marker = ready_marker
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept for the guest's lifetime
        self._env = {**os.environ, **(env or {})}
        self.pass_fds = tuple(pass_fds)
        self.die_with_parent = die_with_parent
        self.child: pexpect.spawn | None = None
        self._shell_ready = False
        self._started = 0.0
        self._answered = False  # a command has run: the VM was booted or restored
        #: the VMM's API socket, when ``argv`` gives one: ``run`` asks it whether the VM runs
        self.api_socket = api_socket_of(self.argv)

    # --- process --------------------------------------------------------------------------------

    def start(self) -> Guest:
        """Start the VMM process."""
        LOG.info("starting %s", shlex.join(self.argv))
        self.child = _Spawn(
            self.argv[0], self.argv[1:], env=self._env, timeout=self.boot_timeout, dimensions=(50, 250),
            logfile=self._log, echo=False, pass_fds=self.pass_fds, die_with_parent=self.die_with_parent,
        )
        self._started = time.monotonic()
        return self

    def __enter__(self) -> Guest:
        if self.child is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        assert self.child is not None
        return int(self.child.pid)

    def console_tail(self, size: int = CONSOLE_TAIL) -> str:
        """The last ``size`` bytes of the console log, escape sequences removed."""
        if not self._log.closed:
            self._log.flush()
        data = self.log_path.read_bytes()[-size:]
        return strip_escapes(data).decode("utf-8", "replace")

    def _fail(self, what: str, output: str = "") -> GuestError:
        alive = self.child is not None and self.child.isalive()
        state = "running" if alive else f"exited with status {self.exit_status()}"
        text = f"{what} (VMM {state})"
        if output:
            text += f"\n--- output so far ---\n{output}"
        return GuestError(f"{text}\n--- console tail ({self.log_path}) ---\n{self.console_tail()}")

    def expect(self, pattern: str | list[str], timeout: float | None = None) -> int:
        """Wait for a regex on the console; returns the index of the pattern that matched."""
        assert self.child is not None, "the guest is not started"
        try:
            return int(self.child.expect(pattern, timeout=timeout))
        except pexpect.TIMEOUT:
            raise self._fail(f"timeout after {timeout}s waiting for {pattern!r}") from None
        except pexpect.EOF:
            raise self._fail(f"console closed while waiting for {pattern!r}") from None

    def send(self, text: str) -> None:
        assert self.child is not None, "the guest is not started"
        self.child.send(text)

    # --- guest ------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> Guest:
        """Wait for the ready marker and the shell's first prompt, then set the shell up for :meth:`run`.

        Input typed before the shell has opened its terminal can be lost, so nothing is sent
        before the prompt shows.
        """
        self.expect(re.escape(self.ready_marker), timeout=timeout or self.boot_timeout)
        self.expect(SHELL_PROMPT, timeout=timeout or self.boot_timeout)
        self._setup_shell()
        return self

    def mark_shell_ready(self) -> None:
        """Declare the shell already set up (a guest restored from a snapshot taken at its prompt)."""
        self._shell_ready = True

    def _setup_shell(self) -> None:
        # A unique prompt, no echo, and kernel messages off the console; the marker
        # printed by printf proves the settings took.
        line, ack = setup_line(f"setup{next(self._ids)}")
        self.send(line)
        self.expect(ack, timeout=SETUP_TIMEOUT)
        self._shell_ready = True

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run a shell command in the guest; returns its output and exit status.

        A guest still booting (started without :meth:`wait_ready`) is waited for first, within
        ``timeout`` or what is left of ``boot_timeout``, whichever is longer. A command that can
        never run is an error at once: the VMM has exited, or (when ``argv`` has an
        ``--api-socket``) the VM is paused or not running.
        """
        self._check_live()
        if not self._shell_ready:
            self.wait_ready(timeout=max(timeout, self.boot_timeout - (time.monotonic() - self._started)))
        line, begin, end = command_line(command, next(self._ids))
        self.send(line)
        self.expect(begin, timeout=timeout)
        try:
            self.expect(end, timeout=timeout)
        except GuestError as err:
            assert self.child is not None
            partial = clean(self.child.before if isinstance(self.child.before, bytes) else b"")
            raise GuestError(f"command did not finish: {command}\n--- output so far ---\n{partial}\n{err}") from None
        assert self.child is not None and self.child.match is not None
        output = clean(self.child.before)
        self._answered = True
        return CommandResult(command=command, output=output, status=int(self.child.match.group(1)))

    def _check_live(self) -> None:
        if self.child is None:
            raise GuestError("the guest is not started: call start() first")
        if not self.child.isalive():
            raise self._fail("the VMM has exited: the guest runs no more commands")
        if self.api_socket is None:
            return
        from vmsh.api.client import ApiClient, ApiError

        # The API answers before the launcher has booted or restored the VM: until the guest's
        # shell has answered once, only a paused VM is known to stay silent.
        try:
            with ApiClient(self.api_socket, timeout=10) as client:
                state = client.get("vm.info")["state"]
        except ApiError as err:  # no VM
            if self._answered:
                raise self._fail(f"the VM is not running: {err}") from None
            return
        except VmshError:
            return  # the API does not answer (yet): the console will tell
        if state == "Paused":
            raise self._fail("the VM is paused: resume it first")
        if state != "Running" and self._answered:
            raise self._fail(f"the VM is not running (it is {state})")

    def check_output(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command``; raise unless it succeeds; return its output."""
        return self.run(command, timeout).check().output

    # --- end --------------------------------------------------------------------------------------

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for the VMM process to end; returns its exit status."""
        child = self.child
        assert child is not None

        def ended() -> bool:
            if not child.isalive():
                return True
            try:  # read the console meanwhile: a child blocked on a full pty never exits
                child.expect(pexpect.EOF, timeout=0.5)
            except pexpect.TIMEOUT:
                pass
            return False

        try:
            wait_until(ended, timeout, "the VMM to exit", interval=0)
        except WaitTimeout:
            raise self._fail(f"the VMM did not exit within {timeout}s") from None
        status = self.exit_status()
        assert status is not None, "isalive() reaped it"
        return status

    def exit_status(self) -> int | None:
        if self.child is None or self.child.isalive():
            return None
        if self.child.signalstatus is not None:
            return -int(self.child.signalstatus)
        return self.child.exitstatus

    def close(self) -> None:
        """Stop the VMM (SIGTERM and SIGHUP, then SIGKILL) and close the log."""
        child = self.child
        if child is not None and child.isalive():
            child.kill(signal.SIGTERM)
            child.kill(signal.SIGHUP)
            try:
                wait_until(lambda: not child.isalive(), 5, "the VMM to end after SIGTERM")
            except WaitTimeout:
                child.kill(signal.SIGKILL)
        if child is not None:
            child.close(force=True)
        if not self._log.closed:
            self._log.close()
