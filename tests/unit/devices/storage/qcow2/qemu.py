"""Images made and judged by QEMU's own tool, ``qemu-img`` (Debian ``qemu-utils``), and a raw
reference file that every operation is mirrored onto."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmsh.devices.storage import DiskFile

QEMU_IMG = shutil.which("qemu-img")

if QEMU_IMG is None:  # ci/setup installs qemu-utils; say loudly what is missing
    pytest.fail("qemu-img not found: install qemu-utils (ci/debian-packages.txt)", pytrace=False)


def qemu_img(*args: str | Path, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    result = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check and result.returncode:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: {result.stderr}")
    return result


def check_clean(path: Path) -> None:
    """``qemu-img check`` finds no errors and no leaks."""
    result = qemu_img("check", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def assert_same(image: Path, reference: Path) -> None:
    result = qemu_img("compare", "-f", "qcow2", "-F", "raw", image, reference, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def random_raw(path: Path, size: int, rng: random.Random, *, pieces: int = 12) -> Path:
    """A sparse raw file with random data in a few random places (sector-aligned)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(pieces):
            n = rng.randrange(1, 64) * 512
            off = rng.randrange(0, (size - n) // 512) * 512
            f.seek(off)
            f.write(rng.randbytes(n))
    return path


def qcow2_from(raw: Path, out: Path, *, cluster_size: int, compat: str, compress: bool = False,
               backing: Path | None = None, backing_fmt: str = "raw") -> Path:
    """``raw`` converted to qcow2 (``backing``: only differences from it are stored)."""
    opts = f"cluster_size={cluster_size},compat={compat}"
    args: list[str | Path] = ["convert", "-f", "raw", "-O", "qcow2", "-o", opts]
    if compress:
        args.append("-c")
    if backing is not None:
        args += ["-B", backing.name, "-F", backing_fmt]
    qemu_img(*args, raw, out, cwd=out.parent)
    return out


def header_field(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    return value


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def mirror_write(reference: Path, offset: int, data: bytes) -> None:
    fd = os.open(reference, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_all(disk: DiskFile, size: int, chunk: int = 1 << 20) -> bytes:
    out = bytearray(size)
    view = memoryview(out)
    for pos in range(0, size, chunk):
        disk.read([view[pos:pos + chunk]], pos)
    return bytes(out)
