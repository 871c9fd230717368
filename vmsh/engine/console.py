"""Host ends of the guest consoles: where serial and debug-console output goes, and where
serial input comes from, for each ``--serial``/``--console``/``--debug-console`` mode.

* ``null`` discards output; ``off`` means no device at all (the caller creates none);
* ``tty`` is this process's standard output and input (a terminal is put in raw mode and
  restored on close);
* ``file=PATH`` writes to a file (created or truncated, mode 0600 under the VMM's umask);
* ``pty`` opens a pseudo-terminal and reports its path (``/dev/pts/N``);
* ``socket=PATH`` listens on a unix socket; one client at a time gets the output and feeds
  the input.

Output is called from vCPU threads, so it never blocks for long: a pty or socket whose
reader is not keeping up loses bytes rather than stalling the guest.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any

from vmsh.config.model import ConsoleOutputMode
from vmsh.engine import seccomp
from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

#: Takes bytes for the guest and returns how many it accepted (a FIFO may be full).
InputSink = Callable[[bytes], int]


class ConsoleBackend:
    """The host side of one console. This base class is the ``null`` mode."""

    #: what ``vm.info`` shows as the console's file (the pty path for ``pty``)
    path: str | None = None
    #: the name of the thread that reads the host side (``open_backend``'s ``input_thread``)
    input_thread: str = "console-in"

    def write(self, data: bytes) -> None:
        """Guest output."""

    def start_input(self, sink: InputSink) -> None:
        """Start feeding host input to ``sink`` (modes without input ignore this)."""

    def close(self) -> None:
        """Release what the backend holds; later writes are dropped."""


def _pump(fd: int, sink: InputSink, stop: threading.Event, name: str) -> None:
    """Forward input from ``fd`` until EOF or ``stop``, retrying while the guest's FIFO is full.

    The descriptor is polled and ``stop`` checked before every read: after a reboot a new
    VM reads the same terminal, and an old reader must not take (and drop) its input.
    """

    def body() -> None:
        while not stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready or stop.is_set():
                    continue
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                return
            if not data:
                return
            while data and not stop.is_set():
                taken = sink(data)
                data = data[taken:]
                if data:
                    stop.wait(0.005)

    threading.Thread(target=seccomp.confined(seccomp.ThreadKind.CONSOLE, body), name=name, daemon=True).start()


class FdBackend(ConsoleBackend):
    """Output to a file descriptor (and optionally input from another)."""

    def __init__(self, out_fd: int, in_fd: int | None = None, *, owns: bool = False,
                 drop_when_full: bool = False) -> None:
        self.out_fd = out_fd
        self.in_fd = in_fd
        self._owns = owns
        self._drop = drop_when_full
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.out_fd, view)
                except BlockingIOError:
                    if self._drop:
                        self.dropped += len(view)
                        return
                    continue
                except OSError as err:
                    LOG.debug("console output lost: %s", err)
                    return
                view = view[n:]

    def start_input(self, sink: InputSink) -> None:
        if self.in_fd is not None:
            _pump(self.in_fd, sink, self._stop, self.input_thread)

    def close(self) -> None:
        self._stop.set()
        if self._owns:
            for fd in {self.out_fd} if self.in_fd is None else {self.out_fd, self.in_fd}:
                try:
                    os.close(fd)
                except OSError:
                    pass


class TtyBackend(FdBackend):
    """This process's stdout and stdin; a terminal on stdin is put in raw mode until close."""

    def __init__(self, with_input: bool = True) -> None:
        super().__init__(1, 0 if with_input else None)
        self._saved: list[Any] | None = None  # termios attributes: ints and a list of control chars
        if with_input and os.isatty(0):
            self._saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)  # keep what was typed before the VMM started

    def close(self) -> None:
        super().close()
        if self._saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
            self._saved = None


class PtyBackend(FdBackend):
    """A new pseudo-terminal; ``path`` is the device a user attaches to."""

    def __init__(self) -> None:
        master, slave = os.openpty()
        # Raw: no echo, no newline translation; the guest's own tty does that.
        tty.setraw(slave)
        os.set_blocking(master, False)
        super().__init__(master, master, owns=True, drop_when_full=True)
        # Holding the slave open keeps the master readable when no client is attached.
        self._slave = slave
        self.path = os.ttyname(slave)
        LOG.info("PTY path: %s", self.path)

    def start_input(self, sink: InputSink) -> None:
        _pump(self.out_fd, sink, self._stop, self.input_thread)

    def close(self) -> None:
        super().close()
        try:
            os.close(self._slave)
        except OSError:
            pass


class SocketBackend(ConsoleBackend):
    """A listening unix socket; the connected client gets the output and sends input.

    The listening socket and its client can move to another VMM with the VM (a live migration,
    :mod:`vmsh.engine.migration`): :meth:`hold` stops this backend taking connections and input
    and gives their fds to send, :meth:`release` takes them back if the migration fails, and the
    destination's backend is made with ``inherited``. Input is consumed only as far as the guest
    took it (the rest stays in the socket), so bytes a client typed while the VM was paused
    reach the guest on whichever VMM runs it next.
    """

    def __init__(self, path: str, input_thread: str = ConsoleBackend.input_thread, *,
                 inherited: tuple[socket.socket, socket.socket | None] | None = None) -> None:
        self.path: str = path
        self.input_thread = input_thread
        #: whether :meth:`close` removes the socket file: not while another VMM may still use it
        #: (an inherited socket until its migration completes; a socket handed over)
        self.owns_path = inherited is None
        if inherited is None:
            self._listener = _listen(path)
            client = None
        else:
            self._listener, client = inherited
            if client is not None:
                client.setblocking(False)
        # Non-blocking: during a migration two processes hold the listener, and the one whose
        # select saw a connection may lose the accept to the other.
        self._listener.setblocking(False)
        self._client: socket.socket | None = client
        self._lock = threading.Lock()  # the client, for write() from the vCPU threads
        self._io = threading.Lock()  # an accept or one read-and-feed, against hold()
        self._held = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._sink: InputSink | None = None
        self._input_started = threading.Event()
        threading.Thread(target=seccomp.confined(seccomp.ThreadKind.CONSOLE, lambda: self._serve(client)),
                         name=input_thread, daemon=True).start()

    def _serve(self, client: socket.socket | None) -> None:
        while not self._stop.is_set():
            if client is None:
                client = self._accept()
                if client is None:
                    return
            # A client may connect (and type) before the VM lets input in (start_input): its
            # bytes wait in the socket until then instead of being dropped with the client.
            while not self._input_started.wait(0.2):
                if self._stop.is_set():
                    return
            assert self._sink is not None
            self._read_client(client, self._sink)
            client = None

    def _readable(self, sock: socket.socket) -> bool | None:
        """Whether ``sock`` has something to take, after waiting up to 0.2 s (never while held);
        None once the backend is closed."""
        if self._stop.is_set():
            return None
        if self._held.is_set():
            self._stop.wait(0.05)
            return False
        try:
            ready, _, _ = select.select([sock], [], [], 0.2)
        except (OSError, ValueError):
            return None
        return bool(ready)

    def _accept(self) -> socket.socket | None:
        while (readable := self._readable(self._listener)) is not None:
            if not readable:
                continue
            with self._io:
                if self._held.is_set():
                    continue
                try:
                    client, _ = self._listener.accept()
                except BlockingIOError:
                    continue  # another process holding the listener took it
                except OSError:
                    return None
            client.setblocking(False)
            with self._lock:
                if self._client is not None:
                    self._client.close()
                self._client = client
            return client
        return None

    def _read_client(self, client: socket.socket, sink: InputSink) -> None:
        while (readable := self._readable(client)) is not None:
            if not readable:
                continue
            with self._io:
                if self._held.is_set():
                    continue
                try:
                    data = client.recv(4096, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    with self._lock:
                        if self._client is client:
                            self._client = None
                    client.close()
                    return
                taken = sink(data)
                if taken:
                    client.recv(taken)  # the bytes the guest took; the rest stay in the socket
            if not taken:
                self._stop.wait(0.005)  # the guest's FIFO is full

    def hold(self) -> list[int]:
        """Stop taking connections and input (after the accept or read under way) and give the
        fds that move with the VM: the listening socket's, then the client's if one is connected."""
        self._held.set()
        with self._io:
            pass
        with self._lock:
            client = self._client
        return [self._listener.fileno()] + ([client.fileno()] if client is not None else [])

    def release(self) -> None:
        """Take connections and input again (the migration failed)."""
        self._held.clear()

    def write(self, data: bytes) -> None:
        with self._lock:
            client = self._client
            if client is None:
                return
            try:
                client.send(data)
            except (BlockingIOError, OSError):
                pass  # a client that does not read loses output; the guest never waits

    def start_input(self, sink: InputSink) -> None:
        self._sink = sink
        self._input_started.set()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._client is not None:
                self._client.close()
                self._client = None
        self._listener.close()
        if self.owns_path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _listen(path: str) -> socket.socket:
    """A unix socket listening at ``path`` (a stale socket file there is replaced).

    :raises DeviceError: when another process listens there, or binding fails.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens there any more
        else:
            listener.close()
            raise DeviceError(f"Console socket {path} is in use by another process")
        finally:
            probe.close()
    try:
        listener.bind(path)
    except OSError as err:
        listener.close()
        raise DeviceError(f"Cannot listen on console socket {path}") from err
    listener.listen(1)
    return listener


def open_backend(mode: ConsoleOutputMode, file: str | None = None, socket_path: str | None = None,
                 *, with_input: bool = True, input_thread: str = ConsoleBackend.input_thread) -> ConsoleBackend | None:
    """The backend of a console mode; None for ``off`` (no device).

    :param input_thread: the name of the thread that reads the host side (cloud-hypervisor's
        names: ``serial-manager`` for the serial port, ``__console`` for the virtio console).
    :raises DeviceError: when the file, pty or socket cannot be had, naming it.
    """
    backend = _open_backend(mode, file, socket_path, with_input, input_thread)
    if backend is not None:
        backend.input_thread = input_thread
    return backend


def _open_backend(mode: ConsoleOutputMode, file: str | None, socket_path: str | None, with_input: bool,
                  input_thread: str) -> ConsoleBackend | None:
    if mode is ConsoleOutputMode.OFF:
        return None
    if mode is ConsoleOutputMode.NULL:
        return ConsoleBackend()
    if mode is ConsoleOutputMode.TTY:
        return TtyBackend(with_input=with_input)
    if mode is ConsoleOutputMode.PTY:
        try:
            return PtyBackend()
        except OSError as err:
            raise DeviceError("Cannot open a pseudo-terminal for the console") from err
    if mode is ConsoleOutputMode.FILE:
        if file is None:
            raise DeviceError("Path missing when using file console mode")
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise DeviceError(f"Cannot open console file {file}") from err
        return FdBackend(fd, owns=True)
    if socket_path is None:
        # virtio-console has no socket mode (the builder refuses it, as cloud-hypervisor does)
        raise DeviceError("No socket option support for console device")
    return SocketBackend(socket_path, input_thread)
