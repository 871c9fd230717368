"""Benchmark: what ``vmsh launch --restore`` spends on imports before it can restore.

Runs ``python -X importtime -m vmsh launch --restore source_url=...,resume=on`` a few times on a
snapshot of the default guest (booted once here unless ``--snapshot DIR`` is given), waits for
the VMM's ``restored`` event, and prints medians: the time from the command to that event, all
imports, vmsh's own imports, and the vmsh modules that cost most (cumulative, with what they
import). The harness's warm clones (:mod:`vmsh.harness.pool`) pay none of this per clone.

Usage: ``python ci/bench/restore_imports.py [--snapshot DIR] [--runs 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmsh.harness.snapshots import SnapshotCache
from vmsh.images import image_path


def parse_importtime(text: str) -> list[tuple[int, str, int]]:
    """``(depth, module, cumulative µs)`` for each line of ``-X importtime`` output."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue  # the header
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((depth, name.strip(), int(cumulative)))
    return rows


def one_run(snapshot: Path, tmp: Path) -> tuple[float, list[tuple[int, str, int]]]:
    events = tmp / "events.json"
    events.unlink(missing_ok=True)
    argv = [sys.executable, "-X", "importtime", "-m", "vmsh", "launch", "--restore",
            f"source_url=file://{snapshot},resume=on", "--event-monitor", f"path={events}"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        while not (events.exists() and '"restored"' in events.read_text()):
            if proc.poll() is not None or time.monotonic() - start > 120:
                raise RuntimeError(f"the restore did not finish: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.002)
        restored = time.monotonic() - start
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    return restored, parse_importtime(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshot", type=Path, default=None, help="a snapshot directory (default: boot one)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmsh-bench-") as tmp_name:
        tmp = Path(tmp_name)
        snapshot = args.snapshot
        if snapshot is None:
            flags = ["--kernel", str(image_path("vmlinux")), "--initramfs", str(image_path("initramfs")),
                     "--cmdline", "console=ttyS0 quiet", "--serial", "tty", "--console", "off", "--memory", "size=256M"]
            snapshot = SnapshotCache(tmp / "snapshots", boot_timeout=600).get(flags)
        runs = [one_run(snapshot, tmp) for _ in range(args.runs)]
    restored = statistics.median(r[0] for r in runs)
    total = statistics.median(sum(c for d, _, c in rows if d == 0) for _, rows in runs)
    ours = statistics.median(sum(c for d, n, c in rows if d == 0 and n.startswith("vmsh")) for _, rows in runs)
    count = statistics.median(sum(1 for _, n, _ in rows if n.startswith("vmsh")) for _, rows in runs)
    print(f"vmsh launch --restore, median of {args.runs}: restored {restored * 1000:.0f} ms after the command; "
          f"imports {total / 1000:.0f} ms, of which vmsh's {ours / 1000:.0f} ms ({count:.0f} vmsh modules)")
    biggest: dict[str, list[int]] = {}
    for _, rows in runs:
        for depth, name, cumulative in rows:
            if name.startswith("vmsh.") and depth <= 2:
                biggest.setdefault(name, []).append(cumulative)
    top = sorted(biggest.items(), key=lambda item: -statistics.median(item[1]))[:10]
    for name, values in top:
        print(f"  {statistics.median(values) / 1000:7.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
