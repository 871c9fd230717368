"""qemu-img as the reference for the image format tests: it makes images, checks and compares them."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (Debian qemu-utils) is missing")


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_ok(*args: str) -> str:
    res = qemu_img(*args)
    assert res.returncode == 0, f"qemu-img {' '.join(args)}: {res.stdout}{res.stderr}"
    return res.stdout


def virtual_size(path: Path, fmt: str) -> int:
    return int(json.loads(qemu_ok("info", "-f", fmt, "--output=json", str(path)))["virtual-size"])


def reference(path: Path, size: int, seed: int) -> Path:
    """A sparse raw image of ``size`` bytes with random data in scattered 64 KiB-1 MiB extents."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(6):
            length = rng.randrange(1, 17) * 64 * 1024
            f.seek(rng.randrange(0, size - length) // 512 * 512)
            f.write(rng.randbytes(length))
    return path


def scattered_writes(size: int, seed: int) -> list[tuple[int, bytes]]:
    """(offset, data) writes in whole sectors: the first and last sectors, block-straddling ones."""
    rng = random.Random(seed)
    writes = [(0, rng.randbytes(512)), (size - 4096, rng.randbytes(4096)),
              ((1 << 20) - 1024, rng.randbytes(3072))]
    for _ in range(8):
        length = rng.randrange(1, 300) * 512
        writes.append((rng.randrange(0, size - length) // 512 * 512, rng.randbytes(length)))
    return writes


def split_views(data: bytes) -> list[memoryview]:
    """``data`` as several views of odd lengths, as a guest's descriptor chain may give them."""
    buf = memoryview(bytearray(data))
    cut = min(len(data), 1000)
    return [buf[:cut], buf[cut:]] if cut < len(data) else [buf]


def apply_to_raw(path: Path, writes: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
