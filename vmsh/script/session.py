"""A command-language session: variables, the VM it drives, its console, and how lines run.

The same :class:`Session` serves the interactive shell, ``vmsh run FILE.vmsh`` and
``vmsh -c``. It drives either a VMM in this process (:class:`LocalTarget`) or a running
``vmsh launch --api-socket`` (:class:`RemoteTarget`, after ``connect PATH``); both go
through the VMM's action registry, so a command means the same thing either way.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmsh.config.serde import from_json_value
from vmsh.engine.actions import ACTIONS_BY_ENDPOINT
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.errors import VmshError, error_chain
from vmsh.script import debug_commands  # noqa: F401 - importing it registers the debugging commands
from vmsh.script.commands import COMMANDS
from vmsh.script.console import CapturedConsole, ConsoleStream, RemoteConsole
from vmsh.script.interface import QuitRequest
from vmsh.script.lexer import iter_commands
from vmsh.thread_names import NamedThread

if TYPE_CHECKING:
    from vmsh.engine.vmm import RestoreFactory, VmFactory

LOG = logging.getLogger(__name__)

__all__ = ["LocalTarget", "Location", "QuitRequest", "RemoteTarget", "ScriptError", "Session", "run_commands",
           "run_script"]

#: what the guest did, as the shell tells its user
_NOTICES = {
    GuestEvent.POWEROFF: "the guest powered off",
    GuestEvent.RESET: "the guest rebooted",
    GuestEvent.FATAL: "the VM stopped: {detail}",
}


class ScriptError(VmshError):
    """A command that failed; ``where`` is ``file:line`` (or ``<stdin>``/``-c``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _request(endpoint: str, body: Any, fds: list[int] | None) -> tuple[Any, Any]:
    """The action of ``endpoint`` and its decoded body, as the HTTP server would decode them."""
    action = ACTIONS_BY_ENDPOINT.get(endpoint)
    if action is None:
        raise VmshError(f"no such action: {endpoint}")
    request: Any = None
    if action.body is not None:
        request = from_json_value(action.body, body if body is not None else {})
        if fds and hasattr(request, "fds"):
            request.fds = list(fds)
    return action, request


class LocalTarget:
    """A VMM in this process; the guest's ``--serial tty`` console is the session's stream.

    Its control loop (guest poweroff, reset, fatal errors and callables the VM posts) runs on a
    thread of its own; a guest that powers off or fails leaves the config, as
    cloud-hypervisor's ``--no-shutdown`` does, and the session is told.
    """

    local = True

    def __init__(self, stream: ConsoleStream, notify: Callable[[str], None], *, events: EventMonitor | None = None,
                 factories: tuple[VmFactory, RestoreFactory] | None = None) -> None:
        from vmsh.launcher import make_vmm

        self.console = CapturedConsole(stream)
        self.vmm = make_vmm(events or EventMonitor(), tty=self.console, exit_on_poweroff=False, factories=factories)
        self._notify = notify
        self._stop = threading.Event()
        # "vmm": cloud-hypervisor's name for the thread that runs its control loop
        self._loop = NamedThread(target=self.vmm.run_control_loop, name="vmm", daemon=True,
                                 kwargs={"until": self._stop.is_set, "on_event": self._on_event})
        self._loop.start()

    def _on_event(self, kind: str, detail: str) -> None:
        notice = _NOTICES.get(kind)
        if notice is not None:
            self._notify(notice.format(detail=detail))

    def call(self, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        action, request = _request(endpoint, body, fds)
        return self.vmm.call(action, request)

    def close(self) -> None:
        self._stop.set()
        self.vmm.do("vm.delete")
        self._loop.join(5)


class RemoteTarget:
    """A VMM reached through its API socket."""

    local = False

    def __init__(self, path: str) -> None:
        from vmsh.api.client import ApiClient

        self.path = path
        self.client = ApiClient(path, timeout=None)
        self.client.get("vmm.ping")

    def call(self, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        action = ACTIONS_BY_ENDPOINT.get(endpoint)
        if action is None:
            raise VmshError(f"no such action: {endpoint}")
        if action.body is not None and body is None:
            body = {}
        return self.client.request(action.http_method, endpoint, body, fds)

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

    def __init__(self, out: Callable[[str], None] | None = None, *, events: EventMonitor | None = None,
                 factories: tuple[VmFactory, RestoreFactory] | None = None) -> None:
        """``events`` and ``factories`` (tests) replace the local VMM's event monitor and the
        engine's VM builders."""
        self.variables: dict[str, str] = {"status": "0", "output": ""}
        self.stream = self._new_stream()
        self.out: Callable[[str], None] = out or _print
        self.messages: list[str] = []
        self._target: LocalTarget | RemoteTarget | None = None
        self._local_events = events
        self._local_factories = factories
        self._remote_console: RemoteConsole | None = None
        self.source_depth = 0

    # --- target ----------------------------------------------------------------------------------

    def _new_stream(self) -> ConsoleStream:
        stream = ConsoleStream()
        stream.guard = self.undeliverable
        return stream

    def _notify(self, message: str) -> None:
        self.messages.append(message)
        self.stream.reset_shell(booting=True)  # a rebooted guest starts from scratch

    def undeliverable(self) -> str | None:
        """Why the VM cannot read console input or print now, or None while it runs."""
        state = self.state()
        if state == "Running":
            return None
        if state == "Paused":
            return "The VM is paused: resume it first"
        if state == "none":
            return "There is no VM: create and boot one first" if self._target is None or self._target.local \
                else "The remote VMM has no VM (or does not answer)"
        return f"The VM is not running (it is {state})"

    @property
    def target(self) -> LocalTarget | RemoteTarget:
        if self._target is None:
            self._target = LocalTarget(self.stream, self._notify, events=self._local_events,
                                       factories=self._local_factories)
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
        self.stream = self._new_stream()

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


def run_commands(text: str, *, out: Callable[[str], None] | None = None,
                 err: Callable[[str], None] | None = None) -> int:
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
