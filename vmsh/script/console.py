"""The guest's serial console as the shell sees it: kept output, ``expect``, ``send`` and ``run``.

:class:`ConsoleStream` collects everything the guest prints (bounded, the most recent
bytes kept) and lets commands wait for a pattern after a read cursor, send input, and run a
shell command with the harness's marker protocol. It is fed either by the VM in this
process (:class:`CapturedConsole`, the serial backend of ``--serial tty`` in the shell) or
by a remote VM's serial socket or pty (:class:`RemoteConsole`).

Commands wait for the guest as a person at its terminal would: input the guest does not read
yet (it is still booting) waits within the command's timeout, ``run`` after a boot waits for the
guest's shell prompt before typing, and a wait that can never end (the VM is paused, stopped or
gone: the session's :attr:`ConsoleStream.guard` says so) fails at once with the reason.
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
from vmsh.harness.shellproto import SHELL_PROMPT, clean, command_line, setup_line
from vmsh.thread_names import NamedThread

#: how much guest output is kept
KEEP = 1 << 20
#: how often a wait asks whether the VM can still answer (a ``vm.info`` call)
GUARD_INTERVAL = 0.25
#: how long ``send`` waits for the guest to take its input, by default
SEND_TIMEOUT = 30.0

#: Sends bytes to the guest, waiting until the monotonic deadline for it to take them.
Sender = Callable[[bytes, float], None]
#: Why the VM cannot take input or print output now (paused, stopped), or None when it can.
Guard = Callable[[], "str | None"]


class ConsoleTimeout(VmshError):
    """A pattern that did not appear in time; the message ends with the recent console output."""


class ConsoleStream:
    """Guest output with a read cursor, and a way to send input."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._dropped = 0  # bytes discarded from the front
        self._cursor = 0  # absolute offset of the next unread byte
        self._cond = threading.Condition()
        self._send: Sender | None = None
        self._ids = itertools.count()
        self._shell_ready = False
        #: where the output of the latest boot starts (absolute offset), while ``run`` has still
        #: to see that boot's shell prompt; None after a restore (the guest is at its prompt)
        self._boot_start: int | None = None
        #: set by the session: why the VM cannot answer now, or None
        self.guard: Guard | None = None
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

    def connect_input(self, send: Sender) -> None:
        self._send = send

    def check_live(self) -> None:
        """Raise at once when the VM cannot answer (paused, stopped, gone)."""
        reason = self.guard() if self.guard is not None else None
        if reason is not None:
            raise VmshError(reason)

    # --- consumer side -----------------------------------------------------------------------------

    def tail(self, size: int = 2000) -> str:
        with self._cond:
            return clean(bytes(self._data[-size:]))

    def position(self) -> int:
        """The absolute offset of the end of the output so far."""
        with self._cond:
            return self._dropped + len(self._data)

    def cursor(self) -> int:
        """The absolute offset of the first byte ``expect`` has not consumed."""
        with self._cond:
            return self._cursor

    def since(self, offset: int) -> bytes:
        """The output kept from the absolute ``offset`` on."""
        with self._cond:
            return bytes(self._data[max(offset - self._dropped, 0):])

    def unread(self) -> bytes:
        """Output not consumed by ``expect`` yet (and mark it read)."""
        with self._cond:
            start = self._cursor - self._dropped
            data = bytes(self._data[start:])
            self._cursor = self._dropped + len(self._data)
            return data

    def send(self, data: bytes | str, timeout: float = SEND_TIMEOUT) -> None:
        """Type ``data``, waiting up to ``timeout`` seconds for the guest to read it."""
        if self._send is None:
            raise VmshError("This VM's console takes no input (use --serial tty, pty or socket)")
        self.check_live()
        self._send(data.encode() if isinstance(data, str) else data, time.monotonic() + timeout)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[bytes]:
        """Wait for ``pattern`` (a regex) in output after the cursor; the cursor moves past the match."""
        return self._wait_for(re.compile(pattern.encode()), time.monotonic() + timeout, repr(pattern), timeout)

    def _wait_for(self, regex: re.Pattern[bytes], deadline: float, what: str, timeout: float,
                  start: int | None = None) -> re.Match[bytes]:
        """Wait for ``regex`` after the cursor (or after the absolute offset ``start``, leaving
        the cursor alone); the VM's liveness is asked every :data:`GUARD_INTERVAL` seconds,
        never while the output lock is held (a vCPU thread feeding output needs it)."""
        while True:
            with self._cond:
                slice_end = min(deadline, time.monotonic() + GUARD_INTERVAL)
                while True:
                    base = self._cursor if start is None else max(start, self._dropped)
                    match = regex.search(self._data, base - self._dropped)
                    if match:
                        if start is None:
                            self._last_before = bytes(self._data[base - self._dropped : match.start()])
                            self._cursor = self._dropped + match.end()
                        return match
                    remaining = slice_end - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if time.monotonic() >= deadline:
                    raise ConsoleTimeout(
                        f"timeout after {timeout:g}s waiting for {what}\n--- recent console output ---\n"
                        + clean(bytes(self._data[-1500:]))
                    )
            reason = self.guard() if self.guard is not None else None
            if reason is not None:
                with self._cond:  # output that came while the guard was asked still counts
                    base = self._cursor if start is None else max(start, self._dropped)
                    if regex.search(self._data, base - self._dropped) is None:
                        raise VmshError(f"{reason} (while waiting for {what})")

    def before(self) -> bytes:
        """What came between the previous cursor and the last match."""
        return getattr(self, "_last_before", b"")

    def run(self, command: str, timeout: float = 60.0) -> tuple[str, int]:
        """Run a shell command in the guest; returns (output, exit status).

        Within ``timeout`` seconds in all: after a boot, wait for the guest's shell prompt (a
        guest still booting does not read its console, and what it is sent then may be lost),
        set the shell up once, then run the command.
        """
        self.check_live()
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if not self._shell_ready:
            if self._boot_start is not None:
                self._wait_for(re.compile(SHELL_PROMPT.encode()), deadline, "the guest's shell prompt", timeout,
                               start=self._boot_start)
                self._boot_start = None
            line, ack = setup_line(f"shell{next(self._ids)}")
            self.send(line, timeout=left())
            self.expect(ack, timeout=left())
            self._shell_ready = True
        line, begin, end = command_line(command, next(self._ids))
        self.send(line, timeout=left())
        self.expect(begin, timeout=left())
        match = self.expect(end, timeout=left())
        return clean(self.before()), int(match.group(1))

    def reset_shell(self, booting: bool = False) -> None:
        """Forget the guest shell's setup (after a reboot or restore it must be done again);
        ``booting``: the guest starts from scratch, so ``run`` waits for its prompt first."""
        with self._cond:
            self._shell_ready = False
            self._boot_start = self._dropped + len(self._data) if booting else None


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

    def _deliver(self, data: bytes, deadline: float) -> None:
        """Feed the serial port's receive FIFO as the guest drains it, until ``deadline``; a
        guest that is still booting reads nothing for a while, a paused or stopped one never."""
        if self._sink is None:
            raise VmshError("The VM is not running: its console takes no input")
        with self._lock:
            start = time.monotonic()
            next_check = start + GUARD_INTERVAL
            while data:
                taken = self._sink(data)
                data = data[taken:]
                if not data:
                    return
                now = time.monotonic()
                if now >= deadline:
                    raise VmshError(f"The guest did not read its console input within {deadline - start:.3g}s "
                                    f"({len(data)} bytes left)")
                if now >= next_check:
                    self.stream.check_live()
                    next_check = now + GUARD_INTERVAL
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

    def _write(self, data: bytes, deadline: float) -> None:
        # the remote VMM's serial backend takes it and feeds its guest at the guest's pace
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

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
