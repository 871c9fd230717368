"""The guest's serial console as the shell sees it: kept output, ``expect``, ``send`` and ``run``.

:class:`ConsoleStream` collects everything the guest prints (bounded, the most recent
bytes kept) and lets commands wait for a pattern after a read cursor, send input, and run a
shell command with the harness's marker protocol. It is fed either by the VM in this
process (:class:`CapturedConsole`, the serial backend of ``--serial tty`` in the shell) or
by a remote VM's serial socket or pty (:class:`RemoteConsole`).
"""

from __future__ import annotations

import itertools
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable

from vmsh.engine.console import ConsoleBackend, InputSink
from vmsh.errors import VmshError
from vmsh.harness.shellproto import clean, command_line, setup_line
from vmsh.thread_names import NamedThread

#: how much guest output is kept
KEEP = 1 << 20


class ConsoleTimeout(VmshError):
    """A pattern that did not appear in time; the message ends with the recent console output."""


class ConsoleStream:
    """Guest output with a read cursor, and a way to send input."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._dropped = 0  # bytes discarded from the front
        self._cursor = 0  # absolute offset of the next unread byte
        self._cond = threading.Condition()
        self._send: Callable[[bytes], None] | None = None
        self._ids = itertools.count()
        self._shell_ready = False
        #: called with new output (the attached terminal, the shell's live view)
        self.listeners: list[Callable[[bytes], None]] = []

    # --- producer side -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            if len(self._data) > KEEP:
                cut = len(self._data) - KEEP
                del self._data[:cut]
                self._dropped += cut
                self._cursor = max(self._cursor, self._dropped)
            self._cond.notify_all()
        for listener in list(self.listeners):
            listener(data)

    def connect_input(self, send: Callable[[bytes], None]) -> None:
        self._send = send

    # --- consumer side -----------------------------------------------------------------------------

    def tail(self, size: int = 2000) -> str:
        with self._cond:
            return clean(bytes(self._data[-size:]))

    def unread(self) -> bytes:
        """Output not consumed by ``expect`` yet (and mark it read)."""
        with self._cond:
            start = self._cursor - self._dropped
            data = bytes(self._data[start:])
            self._cursor = self._dropped + len(self._data)
            return data

    def send(self, data: bytes | str) -> None:
        if self._send is None:
            raise VmshError("This VM's console takes no input (use --serial tty, pty or socket)")
        self._send(data.encode() if isinstance(data, str) else data)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[bytes]:
        """Wait for ``pattern`` (a regex) in output after the cursor; the cursor moves past the match."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = self._cursor - self._dropped
                match = regex.search(self._data, start)
                if match:
                    self._last_before = bytes(self._data[start : match.start()])
                    self._cursor = self._dropped + match.end()
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsoleTimeout(
                        f"timeout after {timeout:g}s waiting for {pattern!r}\n--- recent console output ---\n"
                        + clean(bytes(self._data[-1500:]))
                    )
                self._cond.wait(remaining)

    def before(self) -> bytes:
        """What came between the previous cursor and the last match."""
        return getattr(self, "_last_before", b"")

    def run(self, command: str, timeout: float = 60.0) -> tuple[str, int]:
        """Run a shell command in the guest; returns (output, exit status)."""
        if not self._shell_ready:
            line, ack = setup_line(f"shell{next(self._ids)}")
            self.send(line)
            self.expect(ack, timeout=min(timeout, 30.0))
            self._shell_ready = True
        line, begin, end = command_line(command, next(self._ids))
        self.send(line)
        self.expect(begin, timeout=timeout)
        match = self.expect(end, timeout=timeout)
        return clean(self.before()), int(match.group(1))

    def reset_shell(self) -> None:
        """Forget the guest shell's setup (after a reboot or restore it must be done again)."""
        self._shell_ready = False


class CapturedConsole(ConsoleBackend):
    """A serial backend that feeds a :class:`ConsoleStream` (the shell's ``--serial tty``)."""

    def __init__(self, stream: ConsoleStream) -> None:
        self.stream = stream
        self._sink: InputSink | None = None
        self._lock = threading.Lock()
        stream.connect_input(self._deliver)

    def write(self, data: bytes) -> None:
        self.stream.feed(bytes(data))

    def start_input(self, sink: InputSink) -> None:
        self._sink = sink

    def _deliver(self, data: bytes) -> None:
        if self._sink is None:
            raise VmshError("The VM is not running: its console takes no input")
        with self._lock:
            deadline = time.monotonic() + 10
            while data:
                taken = self._sink(data)
                data = data[taken:]
                if data:
                    if time.monotonic() > deadline:
                        raise VmshError("The guest is not reading its console")
                    time.sleep(0.002)


class RemoteConsole:
    """Feeds a :class:`ConsoleStream` from a remote VM's serial socket or pty."""

    def __init__(self, stream: ConsoleStream, *, socket_path: str | None = None, pty_path: str | None = None) -> None:
        self.stream = stream
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        if socket_path is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(socket_path)
            except OSError as err:
                raise VmshError(f"Cannot connect to the serial socket {socket_path}") from err
            self._fd = self._sock.fileno()
        elif pty_path is not None:
            try:
                self._fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)
            except OSError as err:
                raise VmshError(f"Cannot open the serial pty {pty_path}") from err
        else:
            raise VmshError("The remote VM's serial port is neither a socket nor a pty: its console cannot be reached")
        stream.connect_input(self._write)
        NamedThread(target=self._read, name="remote-console", daemon=True).start()

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], 0.2)
                if ready:
                    data = os.read(self._fd, 65536)
                    if not data:
                        return
                    self.stream.feed(data)
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)
