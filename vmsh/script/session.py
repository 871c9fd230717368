"""A command-language session: variables, the VM it drives, its console, and how lines run.

The same :class:`Session` serves the interactive shell, ``vmsh run FILE.vmsh`` and
``vmsh -c``. It drives either a VMM in this process (:class:`LocalTarget`) or a running
``vmsh launch --api-socket`` (:class:`RemoteTarget`, after ``connect PATH``); both go
through the VMM's action registry, so a command means the same thing either way.
"""

from __future__ import annotations

import functools
import logging
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmsh.config.serde import from_json_value
from vmsh.engine.vmm import ACTIONS_BY_PATH, GuestEvent, Vmm
from vmsh.errors import VmshError, error_chain
from vmsh.script.console import CapturedConsole, ConsoleStream, RemoteConsole
from vmsh.script.lexer import iter_commands

LOG = logging.getLogger(__name__)


class ScriptError(VmshError):
    """A command that failed; ``where`` is ``file:line`` (or ``<stdin>``/``-c``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message


class QuitRequest(Exception):
    """``quit``: leave the session (not an error)."""


class LocalTarget:
    """A VMM in this process; the guest's ``--serial tty`` console is the session's stream."""

    local = True

    def __init__(self, stream: ConsoleStream, notify: Callable[[str], None]) -> None:
        from vmsh.engine.builder import build_for_boot, build_from_snapshot

        self.console = CapturedConsole(stream)
        self.vmm = Vmm(vm_factory=functools.partial(build_for_boot, post=lambda work: work(), tty=self.console),  # INTERIM
                       restore_factory=functools.partial(build_from_snapshot, post=lambda work: work()),
                       exit_on_poweroff=False)
        self._notify = notify
        self._stop = threading.Event()
        threading.Thread(target=self._guest_events, name="guest-events", daemon=True).start()

    def _guest_events(self) -> None:
        while not self._stop.is_set():
            try:
                kind, detail = self.vmm.guest_events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == GuestEvent.FATAL:
                self._notify(f"the VM stopped: {detail}")
                with self.vmm.lock:
                    if self.vmm.vm is not None:
                        self.vmm.vm.shutdown()
                        self.vmm.vm = None
                continue
            self.vmm.handle_guest_event(kind, detail)
            if kind == GuestEvent.POWEROFF:
                self._notify("the guest powered off")
            elif kind == GuestEvent.RESET:
                self._notify("the guest rebooted")

    def call(self, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        action = ACTIONS_BY_PATH.get(f"/api/v1/{endpoint}")
        if action is None:
            raise VmshError(f"no such action: {endpoint}")
        request = None
        if action.body is not None:
            request = from_json_value(action.body, body if body is not None else {})
            if fds and hasattr(request, "fds"):
                request.fds = list(fds)
        return self.vmm.call(action, request)

    @property
    def vm(self) -> Any:
        return self.vmm.vm

    def close(self) -> None:
        self._stop.set()
        with self.vmm.lock:
            self.vmm.delete()


class RemoteTarget:
    """A VMM reached through its API socket."""

    local = False

    def __init__(self, path: str) -> None:
        from vmsh.api.client import ApiClient

        self.path = path
        self.client = ApiClient(path, timeout=None)
        self.client.get("vmm.ping")

    def call(self, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        method = "GET" if endpoint in ("vm.info", "vm.counters", "vmm.ping") else "PUT"
        return self.client.request(method, endpoint, body, fds)

    @property
    def vm(self) -> Any:
        raise VmshError(f"This command needs the VM in this shell, not the remote one at {self.path}")

    def close(self) -> None:
        self.client.close()


@dataclass
class Location:
    """Where a line came from, for error messages."""

    source: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class Session:
    """Runs command lines against a target; keeps variables and the console stream."""

    def __init__(self, out: Callable[[str], None] | None = None) -> None:
        self.variables: dict[str, str] = {"status": "0", "output": ""}
        self.stream = ConsoleStream()
        self.out = out or (lambda text: sys.stdout.write(text + "\n"))
        self.messages: list[str] = []
        self._target: LocalTarget | RemoteTarget | None = None
        self._remote_console: RemoteConsole | None = None
        self.source_depth = 0

    # --- target ----------------------------------------------------------------------------------

    def _notify(self, message: str) -> None:
        self.messages.append(message)
        self.stream.reset_shell()

    @property
    def target(self) -> LocalTarget | RemoteTarget:
        if self._target is None:
            self._target = LocalTarget(self.stream, self._notify)
        return self._target

    def connect(self, path: str) -> None:
        """Drive the VMM behind ``path`` from now on."""
        remote = RemoteTarget(path)
        self.close_target()
        self._target = remote

    def close_target(self) -> None:
        if self._remote_console is not None:
            self._remote_console.close()
            self._remote_console = None
        if self._target is not None:
            self._target.close()
            self._target = None
        self.stream = ConsoleStream()

    def console(self) -> ConsoleStream:
        """The console stream, connected to a remote VM's serial socket or pty on first use."""
        target = self.target
        if isinstance(target, RemoteTarget) and self._remote_console is None:
            serial = target.call("vm.info")["config"]["serial"]
            mode = serial.get("mode")
            if mode == "Socket":
                self._remote_console = RemoteConsole(self.stream, socket_path=serial.get("socket"))
            elif mode == "Pty":
                self._remote_console = RemoteConsole(self.stream, pty_path=serial.get("file"))
            else:
                raise VmshError(f"The remote VM's serial port is {mode}: use --serial socket=PATH or pty to drive it")
        return self.stream

    def state(self) -> str:
        """The VM's state, or ``none`` (for the shell's toolbar)."""
        if self._target is None:
            return "none"
        try:
            return str(self._target.call("vm.info")["state"])
        except VmshError:
            return "none"

    # --- running ------------------------------------------------------------------------------------

    def execute(self, line: str, where: Location | None = None) -> None:
        """Run every command of ``line``; the first failure raises :class:`ScriptError`."""
        from vmsh.script.commands import COMMANDS

        location = where or Location("<input>", 0)
        try:
            for words in iter_commands(line, lambda: self.variables):
                name, args = words[0], words[1:]
                command = COMMANDS.get(name)
                if command is None:
                    raise VmshError(f"unknown command '{name}' (try: help)")
                command.run(self, args)
        except QuitRequest:
            raise
        except ScriptError:
            raise
        except VmshError as err:
            raise ScriptError(str(location), ": ".join(error_chain(err))) from err

    def run_file(self, path: str) -> None:
        """Run a script file line by line (``source``, ``vmsh run``)."""
        if self.source_depth > 20:
            raise VmshError("source is nested too deeply")
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise VmshError(f"Cannot read {path}") from err
        self.source_depth += 1
        try:
            for number, line in enumerate(lines, start=1):
                self.execute(line, Location(path, number))
        finally:
            self.source_depth -= 1

    def close(self) -> None:
        self.close_target()


def run_script(path: str, *, out: Callable[[str], None] | None = None, err: Callable[[str], None] | None = None) -> int:
    """``vmsh run FILE``: 0 when every command succeeds; else 1 with file, line and console tail."""
    return _run(lambda s: s.run_file(path), out, err)


def run_commands(text: str, *, out: Callable[[str], None] | None = None, err: Callable[[str], None] | None = None) -> int:
    """``vmsh -c "cmd; cmd"``."""
    return _run(lambda s: s.execute(text, Location("-c", 0)), out, err)


def _run(body: Callable[[Session], None], out: Callable[[str], None] | None, err: Callable[[str], None] | None) -> int:
    write_err = err or (lambda text: sys.stderr.write(text + "\n"))
    session = Session(out)
    try:
        body(session)
        return 0
    except QuitRequest as request:
        return int(request.args[0]) if request.args else 0
    except VmshError as error:
        write_err(f"error: {error}")
        tail = session.stream.tail()
        if tail and "--- recent console output ---" not in str(error):
            write_err("--- recent console output ---\n" + tail)
        return 1
    finally:
        session.close()
