"""Console backends: every mode carries output, and input where the mode has any."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmsh.config.model import ConsoleOutputMode as Mode
from vmsh.engine.console import open_backend
from vmsh.errors import DeviceError


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


def wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


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
        wait_for(lambda: collector.data == b"in")
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
        wait_for(lambda: backend._client is not None)
        backend.write(b"guest says hi")
        assert client.recv(100) == b"guest says hi"
        client.sendall(b"host input")
        wait_for(lambda: collector.data == b"host input")
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
        wait_for(lambda: backend._client is not None)
        client.sendall(b"early ")
        time.sleep(0.3)
        assert collector.data == b""  # nothing is fed to a guest that cannot take it yet
        backend.start_input(collector)
        wait_for(lambda: collector.data == b"early ")
        client.sendall(b"and later")
        wait_for(lambda: collector.data == b"early and later")
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
    backend.close()
