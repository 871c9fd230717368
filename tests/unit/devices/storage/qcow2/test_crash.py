"""Crash consistency: a process writing through Qcow2File is killed (SIGKILL) at random points;
``qemu-img check`` then finds no corruption (leaked clusters are allowed), every write a completed
flush covered reads back, and every other sector holds either its old or its new contents."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.devices.storage.qcow2 import crash_writer
from tests.unit.devices.storage.qcow2.qemu import qemu_img, random_raw

SIZE = 16 << 20
ROOT = Path(__file__).resolve().parents[5]


def _run_and_kill(image: Path, seed: int, delay: float) -> int:
    """Start the writer, kill it ``delay`` seconds after it opened the image; the number of slot
    writes its last completed flush covered."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "tests.unit.devices.storage.qcow2.crash_writer", str(image),
                              str(seed), str(SIZE)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert child.stdout is not None
    flushed = 0
    deadline = None
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([child.stdout], [], [], timeout if timeout is not None else 30)
            if not ready:
                assert deadline is not None, "the writer never opened the image"
                break
            line = child.stdout.readline().strip()
            if not line:
                pytest.fail(f"the writer died on its own (rc {child.wait()})")
            if line == "open":
                deadline = time.monotonic() + delay
            else:
                flushed = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    return flushed


@pytest.mark.parametrize("cluster_size", [512, 4096])
def test_killed_writer_leaves_a_consistent_image(tmp_path: Path, cluster_size: int) -> None:
    rng = random.Random(cluster_size)
    base = random_raw(tmp_path / "base.raw", SIZE, rng, pieces=200)
    old = base.read_bytes()
    for round_ in range(4):
        image = tmp_path / f"disk{round_}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "-b", "base.raw", "-F", "raw",
                 image, cwd=tmp_path)
        seed = rng.randrange(1 << 30)
        flushed = _run_and_kill(image, seed, rng.uniform(0.05, 1.0))
        check = qemu_img("check", image, check=False)
        # 0: clean; 3: leaked clusters only. 2 would be corruption.
        assert check.returncode in (0, 3), check.stdout + check.stderr
        assert "ERROR" not in check.stdout, check.stdout
        raw = tmp_path / "now.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", image, raw)
        now = raw.read_bytes()
        slot = crash_writer.SLOT
        for i, s in enumerate(crash_writer.order(seed)):
            lo = s * slot
            new = crash_writer.pattern(seed, i)
            if i < flushed:
                assert now[lo:lo + slot] == new, f"round {round_}: flushed write {i} lost"
                continue
            for sec in range(0, slot, 512):
                got = now[lo + sec:lo + sec + 512]
                assert got in (old[lo + sec:lo + sec + 512], new[sec:sec + 512]), \
                    f"round {round_}: slot {s} sector {sec // 512} holds neither old nor new data"
