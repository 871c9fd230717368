"""The interactive shell: ``vmsh`` with no arguments.

A prompt_toolkit session over the command language (:mod:`vmsh.script`): completion of
command names and of the launcher's options and keys after ``create``/``add-*``, persistent
history (``$VMSH_HISTORY`` or ``~/.vmsh_history``), ``help``, the VM's state in the bottom
toolbar, and errors shown in red without ending the session. ``console`` attaches the
terminal to the guest's serial console until Ctrl-] is pressed; guest output is kept while
detached (and shown on the next attach). ``record FILE`` ... ``record stop`` writes the session
down as a script (:mod:`vmsh.script.recorder`).
"""

from __future__ import annotations

import os
import re
import select
import sys
import termios
import time
import tty
from collections.abc import Iterable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.shortcuts import print_formatted_text

from vmsh.config.launcher_args import FLAGS
from vmsh.errors import VmshError, error_chain
from vmsh.script.commands import COMMANDS
from vmsh.script.lexer import split_commands
from vmsh.script.recorder import Recorder
from vmsh.script.session import QuitRequest, RemoteTarget, ScriptError, Session

#: Ctrl-]: leaves ``console``, as telnet and virsh do
DETACH = b"\x1d"
_KEY = re.compile(r"([a-z_0-9]+)=([^,]*)")

#: commands whose arguments are launcher flags, or one option's key=value syntax
_FLAG_COMMANDS = {"create"}
_OPTION_COMMANDS = {
    "add-disk": "disk", "add-net": "net", "add-pmem": "pmem", "add-fs": "fs", "add-vsock": "vsock",
    "add-vdpa": "vdpa", "add-device": "device", "add-user-device": "user-device",
}


def option_keys(syntax: str) -> dict[str, list[str]]:
    """The keys of an option syntax string and, for ``a|b`` values, their choices."""
    keys: dict[str, list[str]] = {}
    for key, value in _KEY.findall(syntax):
        keys[key] = value.split("|") if "|" in value and "<" not in value else []
    return keys


class VmshCompleter(Completer):
    """Command names first; then launcher flags and option keys where they apply."""

    def __init__(self) -> None:
        self.flags = {f"--{f.name}": f for f in FLAGS if f.name not in ("version", "dry-run")}

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        current = "" if text.endswith((" ", "\t")) or not words else words[-1]
        if len(words) == 0 or (len(words) == 1 and current):
            for name in sorted(COMMANDS):
                if name.startswith(current):
                    yield Completion(name, -len(current), display_meta=COMMANDS[name].summary)
            return
        cmd = words[0]
        if cmd == "help":
            for name in sorted(COMMANDS):
                if name.startswith(current):
                    yield Completion(name, -len(current))
            return
        if cmd in _FLAG_COMMANDS:
            if current.startswith("-") or not current:
                for flag in sorted(self.flags):
                    if flag.startswith(current) and current != flag:
                        yield Completion(flag, -len(current), display_meta=self.flags[flag].help[:60])
                if current.startswith("-"):
                    return
            previous = words[-1] if not current else (words[-2] if len(words) > 1 else "")
            option = self.flags.get(previous)
            if option is not None:
                yield from self._keys(option.help, current)
            return
        if cmd in _OPTION_COMMANDS:
            from vmsh.config.parse import OPTION_PARSERS

            yield from self._keys(OPTION_PARSERS[_OPTION_COMMANDS[cmd]][1], current)

    @staticmethod
    def _keys(syntax: str, current: str) -> Iterable[Completion]:
        _, _, last = current.rpartition(",")
        keys = option_keys(syntax)
        if "=" in last:
            key, _, value = last.partition("=")
            for choice in keys.get(key, []):
                if choice.startswith(value):
                    yield Completion(choice, -len(value))
            return
        for key, choices in keys.items():
            if key.startswith(last):
                yield Completion(f"{key}=", -len(last), display_meta="|".join(choices) if choices else "")


class Shell:
    """The interactive loop around a :class:`Session`."""

    def __init__(self, session: Session | None = None, *, history: History | None = None,
                 input: Any = None, output: Any = None) -> None:
        self.session = session or Session(out=self.print)
        self.session.out = self.print
        self._state = ("none", 0.0)
        self.prompt: PromptSession[str] = PromptSession(
            history=history or _default_history(), completer=VmshCompleter(), complete_while_typing=False,
            bottom_toolbar=self.toolbar, input=input, output=output,
        )
        self._output = output
        #: the recording in progress (``record FILE``), if any
        self.recorder: Recorder | None = None

    def print(self, text: str) -> None:
        print_formatted_text(text, output=self._output)

    def error(self, text: str) -> None:
        print_formatted_text(FormattedText([("ansired", f"error: {text}")]), output=self._output)

    def toolbar(self) -> str:
        # vm.info costs a call (an HTTP request for a remote VM): at most twice a second.
        state, at = self._state
        if time.monotonic() - at > 0.5:
            state = self.session.state()
            self._state = (state, time.monotonic())
        target = self.session._target
        where = "remote " + target.path if isinstance(target, RemoteTarget) else "local"
        return f" VM: {state}   ({where})   help: commands, console: attach (Ctrl-] detaches)"

    def loop(self) -> int:
        """Read and run lines until ``quit`` or end of input; returns the exit status."""
        try:
            return self._loop()
        finally:
            self.stop_recording()

    def _loop(self) -> int:
        while True:
            for message in self.session.messages:
                self.print(f"[{message}]")
            self.session.messages.clear()
            try:
                line = self.prompt.prompt("vmsh> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if line.strip() == "console":
                self.attach_console()
                continue
            if line.split()[:1] == ["record"]:
                self.record(line)
                continue
            try:
                self.session.execute(line)
                if self.recorder is not None:
                    self.recorder.command(line)
            except QuitRequest as request:
                return int(request.args[0]) if request.args else 0
            except ScriptError as err:
                self.error(err.reason)
            except VmshError as err:
                self.error(str(err))

    def record(self, line: str) -> None:
        """``record FILE`` starts a recording (ending one in progress); ``record stop`` ends it."""
        try:
            words = split_commands(line, self.session.variables)
        except VmshError as err:
            self.error(str(err))
            return
        args = words[0][1:] if len(words) == 1 else None
        if args is None or len(args) != 1:
            self.error("record takes a file name, or stop")
            return
        if args[0] == "stop":
            if self.recorder is None:
                self.error("nothing is being recorded")
            self.stop_recording()
            return
        self.stop_recording()
        try:
            self.recorder = Recorder(args[0], self.session.variables)
        except VmshError as err:
            self.error(": ".join(error_chain(err)))
            return
        self.print(f"[recording to {args[0]}: record stop ends it]")

    def stop_recording(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.print(f"[recorded {self.recorder.lines} lines to {self.recorder.path}]")
            self.recorder = None

    def attach_console(self) -> None:
        """Connect this terminal to the guest's serial console until Ctrl-] is pressed."""
        try:
            stream = self.session.console()
        except VmshError as err:
            self.error(str(err))
            return
        if not os.isatty(0):
            self.error("console needs an interactive terminal")
            return
        self.print("[console: Ctrl-] returns to the vmsh prompt]")
        recorder = self.recorder
        if recorder is not None:
            recorder.console_attached(stream.cursor())
        os.write(1, stream.unread())
        stream.listeners.append(self._echo)
        saved = termios.tcgetattr(0)
        try:
            tty.setraw(0)
            while True:
                ready, _, _ = select.select([0], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(0, 1024)
                if not data or DETACH in data:
                    before = data.split(DETACH, 1)[0]
                    if before:
                        if recorder is not None:
                            recorder.console_typed(before, stream)
                        stream.send(before)
                    break
                if recorder is not None:
                    recorder.console_typed(data, stream)
                stream.send(data)
        except VmshError as err:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            self.error(str(err))
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            if recorder is not None:
                recorder.console_detached(stream)
            stream.listeners.remove(self._echo)
            stream.unread()  # shown live already
            self.print("\n[detached]")

    @staticmethod
    def _echo(data: bytes) -> None:
        os.write(1, data)


def _default_history() -> History:
    path = os.environ.get("VMSH_HISTORY", os.path.expanduser("~/.vmsh_history"))
    try:
        open(path, "a").close()
        return FileHistory(path)
    except OSError:
        return InMemoryHistory()


def main() -> int:
    """``vmsh`` without arguments."""
    shell = Shell()
    try:
        return shell.loop()
    finally:
        shell.session.close()


if __name__ == "__main__":
    sys.exit(main())
