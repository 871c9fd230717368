"""The asynchronous engines against the host's real io_uring and Linux AIO."""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsh.devices.storage import aio, async_io, open_disk, uring
from vmsh.devices.storage import raw as raw_module
from vmsh.devices.storage.async_io import AsyncDisk, open_kernel_queue
from vmsh.devices.storage.raw import RawFile

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return path


def _engine(disk: RawFile, backend: str, depth: int = 32) -> AsyncDisk:
    engine = disk.open_async(depth, io_uring=backend == "io_uring", aio=backend == "aio")
    if engine is None:
        # the host lacks it (io_uring_disabled, no CONFIG_AIO): say so rather than pass silently
        pytest.skip(f"this host has no {backend}")
    assert engine.name == backend
    return engine


def _wait(engine: AsyncDisk, count: int) -> list[tuple[int, OSError | None]]:
    done: list[tuple[int, OSError | None]] = []
    while len(done) < count:
        assert select.select([engine.fd], [], [], 5)[0], "no completion signalled"
        done += engine.complete()
    return done


@pytest.fixture(params=["io_uring", "aio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ram() -> Iterator[memoryview]:
    buf = mmap.mmap(-1, 4 * SIZE)
    view = memoryview(buf)
    yield view
    view.release()
    buf.close()


def test_many_in_flight_move_the_right_bytes(image: Path, backend: str, ram: memoryview) -> None:
    disk = open_disk(str(image))
    assert isinstance(disk, RawFile)
    engine = _engine(disk, backend)
    content = bytearray(image.read_bytes())
    rng = random.Random(7)
    # 16 writes of scattered 4 KiB pieces, all in flight at once, then 16 reads of the same places
    offsets = rng.sample(range(SIZE // 8192), 16)
    for token, where in enumerate(offsets):
        src = ram[token * 8192:token * 8192 + 8192]
        src[:] = os.urandom(8192)
        content[where * 8192:where * 8192 + 8192] = src
        assert engine.write(token, [src[:4096], src[4096:]], where * 8192)
    engine.submit()
    assert engine.in_flight == 16 or engine.in_flight + len(engine._done) <= 16
    done = _wait(engine, 16)
    assert sorted(t for t, _ in done) == list(range(16)) and all(e is None for _, e in done)
    assert engine.in_flight == 0
    assert image.read_bytes() == bytes(content)
    base = SIZE
    for token, where in enumerate(offsets):
        dst = ram[base + token * 8192:base + token * 8192 + 8192]
        assert engine.read(100 + token, [dst[:512], dst[512:]], where * 8192)
    engine.submit()
    assert sorted(t for t, _ in _wait(engine, 16)) == list(range(100, 116))
    for token, where in enumerate(offsets):
        assert ram[base + token * 8192:base + token * 8192 + 8192] == content[where * 8192:where * 8192 + 8192]
    engine.close()
    engine.close()  # a second close does nothing
    disk.close()


def test_flush_after_writes(image: Path, backend: str, ram: memoryview) -> None:
    disk = open_disk(str(image))
    assert isinstance(disk, RawFile)
    engine = _engine(disk, backend)
    ram[:4096] = b"\x5a" * 4096
    assert engine.write(1, [ram[:4096]], 0)
    engine.flush(2)  # io_uring: a draining fsync; AIO: waits for the write, then fdatasync
    engine.submit()
    done = dict(_wait(engine, 2))
    assert done == {1: None, 2: None}
    assert image.read_bytes()[:4096] == b"\x5a" * 4096
    engine.close()
    disk.close()


def test_short_read_past_the_end_is_finished_with_zeros(image: Path, backend: str, ram: memoryview) -> None:
    disk = open_disk(str(image))
    assert isinstance(disk, RawFile)
    engine = _engine(disk, backend)
    os.truncate(image, SIZE - 1024)  # the file shrank under the device
    ram[:4096] = b"\xff" * 4096
    assert engine.read(1, [ram[:4096]], SIZE - 4096)
    engine.submit()
    assert _wait(engine, 1) == [(1, None)]
    assert ram[:3072] == image.read_bytes()[SIZE - 4096:] and ram[3072:4096] == bytes(1024)
    engine.close()
    disk.close()


def test_kernel_errors_come_back_as_oserror(image: Path, backend: str, ram: memoryview) -> None:
    disk = open_disk(str(image), readonly=True)
    assert isinstance(disk, RawFile)
    engine = _engine(disk, backend)
    assert engine.write(1, [ram[:512]], 0)  # the descriptor is read-only: EBADF from the kernel
    engine.submit()
    [(token, err)] = _wait(engine, 1)
    assert token == 1 and isinstance(err, OSError) and err.errno == errno.EBADF
    engine.close()
    disk.close()


def test_requests_the_kernel_cannot_take_are_refused(image: Path, backend: str, ram: memoryview) -> None:
    disk = open_disk(str(image))
    assert isinstance(disk, RawFile)
    engine = _engine(disk, backend, depth=2)
    assert not engine.read(1, [ram[i:i + 1] for i in range(async_io.SLOT_IOVECS + 1)], 0)  # too many iovecs
    assert not engine.write(2, [memoryview(b"read-only")], 0)  # ctypes cannot address it
    assert engine.read(3, [ram[:512]], 0) and engine.read(4, [ram[512:1024]], 0)
    assert engine.full and not engine.read(5, [ram[:512]], 0)  # depth reached
    engine.close()  # waits for the two in flight
    assert engine.in_flight == 0
    disk.close()
    disk = RawFile(str(image), os.open(image, os.O_RDWR), readonly=False, direct=True)
    engine = _engine(disk, backend)
    assert not engine.read(1, [ram[:100]], 0)  # O_DIRECT needs whole blocks: the bounce path serves it
    engine.close()
    disk.close()


def test_open_kernel_queue_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_kernel_queue(4, io_uring=False, aio=False) is None
    queue = open_kernel_queue(4, io_uring=False)
    if queue is None:
        pytest.skip("this host has no Linux AIO")
    assert queue.name == "aio"
    queue.close()

    def refuse(self: object, depth: int) -> None:
        raise OSError(errno.EPERM, "io_uring is disabled")

    monkeypatch.setattr(uring.IoUring, "__init__", refuse)
    queue = open_kernel_queue(4)
    assert queue is not None and queue.name == "aio"
    queue.close()
    monkeypatch.setattr(aio.LinuxAio, "__init__", refuse)
    assert open_kernel_queue(4) is None


def test_a_file_in_memory_is_served_synchronously() -> None:
    # tmpfs has no non-blocking reads: io_uring would hand every request to a worker thread
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this host")
    fd, path = tempfile.mkstemp(dir="/dev/shm")
    if not raw_module.memory_backed(fd):
        os.close(fd)
        os.unlink(path)
        pytest.skip("/dev/shm is not tmpfs on this host")
    try:
        os.write(fd, bytes(4096))
        disk = RawFile(path, fd, readonly=False, direct=False)
        assert disk.open_async(4) is None
        disk.close()
    finally:
        os.unlink(path)
