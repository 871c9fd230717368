"""Console backends: every mode carries output, and input where the mode has any."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmsh.config.model import ConsoleOutputMode as Mode
from vmsh.engine.console import SocketBackend, open_backend
from vmsh.errors import DeviceError
from vmsh.harness.waiting import wait_until


class Collector:
    def __init__(self, capacity: int = 1 << 20) -> None:
        self.data = b""
        self.capacity = capacity
        self.event = threading.Event()

    def __call__(self, data: bytes) -> int:
        take = data[: self.capacity]
        self.data += take
        self.event.set()
        return len(take)


def test_off_is_no_device() -> None:
    assert open_backend(Mode.OFF) is None


def test_null_discards() -> None:
    backend = open_backend(Mode.NULL)
    backend.write(b"gone")
    backend.close()


def test_file_gets_output(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_text("old")
    backend = open_backend(Mode.FILE, file=str(path))
    backend.write(b"hello ")
    backend.write(b"world")
    backend.close()
    assert path.read_bytes() == b"hello world"


def test_file_error_names_path(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"nodir/serial\.log"):
        open_backend(Mode.FILE, file=str(tmp_path / "nodir" / "serial.log"))


def test_pty_both_ways() -> None:
    backend = open_backend(Mode.PTY)
    assert backend.path and backend.path.startswith("/dev/pts/")
    collector = Collector()
    backend.start_input(collector)
    fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
    try:
        backend.write(b"out\n")
        assert os.read(fd, 100) == b"out\n"
        os.write(fd, b"in")
        wait_until(lambda: collector.data == b"in", 5, "the input", interval=0.01)
    finally:
        os.close(fd)
        backend.close()


def test_pty_without_reader_does_not_block() -> None:
    backend = open_backend(Mode.PTY)
    start = time.monotonic()
    for _ in range(2000):
        backend.write(b"x" * 100)
    assert time.monotonic() - start < 5
    backend.close()


def test_socket_both_ways_with_backpressure(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    backend = open_backend(Mode.SOCKET, socket_path=path)
    collector = Collector(capacity=2)  # a FIFO that takes two bytes at a time
    backend.start_input(collector)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    try:
        wait_until(lambda: backend._client is not None, 5, "the backend to accept", interval=0.01)
        backend.write(b"guest says hi")
        assert client.recv(100) == b"guest says hi"
        client.sendall(b"host input")
        wait_until(lambda: collector.data == b"host input", 5, "the host input", interval=0.01)
    finally:
        client.close()
        backend.close()
    assert not os.path.exists(path)


def test_socket_input_typed_before_input_starts_is_kept(tmp_path: Path) -> None:
    # The VM lets input in only once its irqchip and vCPUs are set up; a client that
    # connected and typed before that must not lose its bytes (or all later ones).
    path = str(tmp_path / "serial.sock")
    backend = open_backend(Mode.SOCKET, socket_path=path)
    collector = Collector()
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    try:
        wait_until(lambda: backend._client is not None, 5, "the backend to accept", interval=0.01)
        client.sendall(b"early ")
        time.sleep(0.3)  # time in which the input thread could (wrongly) pass the bytes on
        assert collector.data == b""  # nothing is fed to a guest that cannot take it yet
        backend.start_input(collector)
        wait_until(lambda: collector.data == b"early ", 5, "the early input", interval=0.01)
        client.sendall(b"and later")
        wait_until(lambda: collector.data == b"early and later", 5, "all input", interval=0.01)
    finally:
        client.close()
        backend.close()


def test_busy_socket_path_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    first = open_backend(Mode.SOCKET, socket_path=path)
    try:
        with pytest.raises(DeviceError, match="in use"):
            open_backend(Mode.SOCKET, socket_path=path)
    finally:
        first.close()


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    backend = open_backend(Mode.SOCKET, socket_path=path)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)  # refused by the stale file: a live listener took its place
        client.close()
    finally:
        backend.close()


def test_a_held_socket_takes_nothing_until_released(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    backend = open_backend(Mode.SOCKET, socket_path=path)
    assert isinstance(backend, SocketBackend)
    collector = Collector()
    backend.start_input(collector)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    try:
        wait_until(lambda: backend._client is not None, 5, "the backend to accept", interval=0.01)
        fds = backend.hold()
        assert len(fds) == 2 and fds[0] != fds[1]  # the listener, then the client
        client.sendall(b"typed while held")
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)  # waits in the listener's backlog
        time.sleep(0.3)  # time in which the input thread could (wrongly) take either
        assert collector.data == b"" and backend._client is not None
        backend.release()
        wait_until(lambda: collector.data == b"typed while held", 5, "the held input", interval=0.01)
        second.close()
    finally:
        client.close()
        backend.close()
    assert not os.path.exists(path)


def test_a_socket_console_moves_with_its_client_and_unread_input(tmp_path: Path) -> None:
    """What a live migration does with ``--serial socket=``: the source holds its backend and
    passes the fds on; the new backend serves the same client, gets the bytes the old guest did
    not take, and keeps the path; a later client connects to it."""
    path = str(tmp_path / "serial.sock")
    source = open_backend(Mode.SOCKET, socket_path=path)
    assert isinstance(source, SocketBackend)
    full = Collector(capacity=0)  # the guest's FIFO is full: nothing is taken
    source.start_input(full)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.settimeout(5)
    try:
        wait_until(lambda: source._client is not None, 5, "the backend to accept", interval=0.01)
        client.sendall(b"not taken yet")
        time.sleep(0.2)
        fds = [os.dup(fd) for fd in source.hold()]  # as SCM_RIGHTS would give them to another VMM
        dest = SocketBackend(path, inherited=(socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])))
        assert not dest.owns_path
        source.owns_path = False  # the migration completed: the destination listens there
        source.close()
        assert os.path.exists(path)
        collector = Collector()
        dest.start_input(collector)
        wait_until(lambda: collector.data == b"not taken yet", 5, "the unread input", interval=0.01)
        dest.write(b"from the destination")
        assert client.recv(100) == b"from the destination"
        assert full.data == b""
        client.close()
        later = socket.socket(socket.AF_UNIX)
        later.connect(path)
        later.sendall(b"a later client")
        wait_until(lambda: collector.data.endswith(b"a later client"), 5, "the later client", interval=0.01)
        later.close()
        dest.owns_path = True
        dest.close()
        assert not os.path.exists(path)
    finally:
        client.close()
        source.close()
