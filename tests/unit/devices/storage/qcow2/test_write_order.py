"""Every prefix of the writes Qcow2File makes is a consistent image: the file as a VMM killed
after any one of its writes would leave it. Each prefix is rebuilt from the image before the run
plus the logged writes, ``qemu-img check`` finds no corruption (leaks allowed), and every guest
write a completed flush covered reads back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.unit.devices.storage.qcow2.qemu import qemu_img, random_raw
from vmsh.devices.storage.qcow2 import Qcow2File
from vmsh.devices.storage.qcow2 import image as image_module
from vmsh.devices.storage.qcow2 import refcounts as refcounts_module

SIZE = 16 << 20
CS = 512  # a refcount table cluster covers 8 MiB of file: the run grows the table
SYNC = -1


@pytest.fixture(params=["big", "tiny"], ids=["default-caches", "tiny-caches"])
def caches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default table caches, or caches of two tables: evictions write tables in mid-request."""
    if request.param == "tiny":
        monkeypatch.setattr(image_module, "L2_CACHE_BYTES", 0)
        monkeypatch.setattr(refcounts_module, "CACHE_BYTES", 0)
    return str(request.param)


def test_every_prefix_of_the_write_log_is_consistent(tmp_path: Path, caches: str) -> None:
    rng = random.Random("order")
    base = random_raw(tmp_path / "base.raw", SIZE, rng, pieces=30)  # the backing file
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", "-b", base.name, "-F", "raw", image,
             cwd=tmp_path)
    original = image.read_bytes()
    log: list[tuple[int, bytes]] = []  # (offset, data), or (SYNC, b"")
    disk = Qcow2File(str(image), readonly=False)
    real_writev, real_sync = disk.file.writev, disk.file.sync

    def writev(views: list[memoryview], offset: int) -> None:
        log.append((offset, b"".join(bytes(v) for v in views)))
        real_writev(views, offset)

    def sync() -> None:
        log.append((SYNC, b""))
        real_sync()

    disk.file.writev = writev  # type: ignore[method-assign]  # logging every write the image makes
    disk.file.sync = sync  # type: ignore[method-assign]
    durable: list[tuple[int, int, bytes]] = []  # (log length when flushed, offset, data)
    written: list[tuple[int, bytes]] = []
    for i in range(72):
        n = rng.choice([512, 1536, 4096, 3 * 4096])
        off = rng.randrange(0, (SIZE - n) // 512) * 512
        if i % 6 == 0:  # twelve distinct MiB: more than the first refcount table covers
            n, off = 1 << 20, (i // 6) << 20
        if rng.random() < 0.75:
            data = rng.randbytes(n)
            disk.write([memoryview(data)], off)
            written = [w for w in written if w[0] + len(w[1]) <= off or w[0] >= off + n] + [(off, data)]
        else:
            disk.discard(off, n)  # 512-byte clusters: the whole range reads as zeros
            written = [w for w in written if w[0] + len(w[1]) <= off or w[0] >= off + n]
        if i % 6 == 5:
            disk.flush()
            durable = [(len(log), o, d) for o, d in written]
    disk.close()
    assert header_changed(original, image), "the run grew the refcount table"
    flushes = sorted({d[0] for d in durable})
    prefixes = sorted(set(range(0, len(log) + 1, max(1, len(log) // 60))) | set(flushes) | {len(log)})
    state = bytearray(original)
    done = 0
    crashed = tmp_path / "crashed.qcow2"
    for k in prefixes:
        for offset, data in log[done:k]:
            if offset != SYNC:
                if offset + len(data) > len(state):
                    state.extend(bytes(offset + len(data) - len(state)))
                state[offset:offset + len(data)] = data
        done = k
        crashed.write_bytes(state)
        check = qemu_img("check", crashed, check=False, cwd=tmp_path)
        assert check.returncode in (0, 3) and "ERROR" not in check.stdout, f"after {k} writes: {check.stdout}"
        if k in flushes:
            flat = tmp_path / "flat.raw"
            qemu_img("convert", "-f", "qcow2", "-O", "raw", crashed, flat, cwd=tmp_path)
            now = flat.read_bytes()
            for when, off, data in durable:
                if when <= k:
                    assert now[off:off + len(data)] == data, f"after {k} writes: flushed data at {off:#x} lost"


def header_changed(original: bytes, image: Path) -> bool:
    return original[48:60] != image.read_bytes()[48:60]


@pytest.mark.parametrize("cluster_size", [CS, 4096])
def test_power_loss_keeps_any_subset_of_the_unsynced_writes(tmp_path: Path, cluster_size: int, caches: str) -> None:
    """A power cut keeps every write before the last completed fdatasync and any subset of the
    ones after it: each such image is consistent too (this is what the barriers are for)."""
    rng = random.Random(f"power{cluster_size}")
    base = random_raw(tmp_path / "base.raw", SIZE, rng, pieces=30)  # the backing file
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "-b", base.name, "-F", "raw",
             image, cwd=tmp_path)
    original = image.read_bytes()
    log: list[tuple[int, bytes]] = []
    disk = Qcow2File(str(image), readonly=False)
    real_writev, real_sync = disk.file.writev, disk.file.sync

    def writev(views: list[memoryview], offset: int) -> None:
        log.append((offset, b"".join(bytes(v) for v in views)))
        real_writev(views, offset)

    def sync() -> None:
        log.append((SYNC, b""))
        real_sync()

    disk.file.writev = writev  # type: ignore[method-assign]  # logging every write the image makes
    disk.file.sync = sync  # type: ignore[method-assign]
    for i in range(72):
        n = rng.choice([512, 1536, 4096, 3 * 4096])
        off = rng.randrange(0, (SIZE - n) // 512) * 512
        if i % 6 == 0:
            n, off = 1 << 20, (i // 6) << 20
        if rng.random() < 0.75:
            disk.write([memoryview(rng.randbytes(n))], off)
        else:
            disk.discard(off, n)
        if i % 6 == 5:
            disk.flush()
    disk.close()
    syncs = [i for i, (offset, _) in enumerate(log) if offset == SYNC]
    assert len(syncs) > 10
    state = bytearray(original)
    crashed = tmp_path / "crashed.qcow2"
    done = 0
    # epochs of several writes (the others lose all or nothing): a sample, as each check costs qemu-img
    epochs = [(a, b) for a, b in zip([0, *syncs], [*syncs, len(log)], strict=True) if b - a > 2]
    for start, end in sorted(rng.sample(epochs, min(len(epochs), 30))):
        for offset, data in log[done:start]:
            _apply(state, offset, data)
        done = start
        epoch = [(o, d) for o, d in log[start:end] if o != SYNC]
        for _ in range(3):
            lost = bytearray(state)
            for offset, data in epoch:
                if rng.random() < 0.5:
                    _apply(lost, offset, data)
            crashed.write_bytes(lost)
            check = qemu_img("check", crashed, check=False, cwd=tmp_path)
            assert check.returncode in (0, 3) and "ERROR" not in check.stdout, \
                f"power cut after sync at {start}: {check.stdout}"


def _apply(state: bytearray, offset: int, data: bytes) -> None:
    if offset == SYNC:
        return
    if offset + len(data) > len(state):
        state.extend(bytes(offset + len(data) - len(state)))
    state[offset:offset + len(data)] = data
