"""What the commands of the language (:mod:`vmsh.script.commands`) need of the session that runs
them (:mod:`vmsh.script.session`), so that neither module imports the other's internals: the
commands see a :class:`SessionApi` and its :class:`Target`, the session looks commands up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vmsh.script.console import ConsoleStream


class QuitRequest(Exception):
    """``quit``: leave the session (not an error); ``args[0]`` is the exit status."""


class Target(Protocol):
    """The VMM a session drives: in this process, or behind an API socket."""

    #: True for a VMM in this process (paths are this process's)
    local: bool

    def call(self, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        """Run the action ``endpoint`` (``vm.boot``) with a JSON body; returns the JSON reply.

        :raises VmshError: the action's error (with its chain).
        """
        ...

    def close(self) -> None: ...


class SessionApi(Protocol):
    """The session as the commands use it."""

    variables: dict[str, str]
    stream: ConsoleStream
    #: shows a command's output
    out: Callable[[str], None]

    @property
    def target(self) -> Target: ...

    def console(self) -> ConsoleStream:
        """The guest console's stream (connected on first use for a remote VM)."""
        ...

    def connect(self, path: str) -> None: ...

    def state(self) -> str: ...

    def run_file(self, path: str) -> None: ...
