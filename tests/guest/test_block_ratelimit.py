"""virtio-blk rate limiting seen from a real guest: the same direct read is measurably slower
on a rate-limited disk than on an unlimited one.

Three views of the raw pattern image, read-only: ``vda`` limited to 64 KiB/s
(``bw_size=65536,bw_refill_time=1000``), ``vdb`` to 10 operations/s, ``vdc`` unlimited.
Buckets start full, so a read of N bytes from ``vda`` waits for N - 64 KiB of refill whatever
the guest's own speed: that lower bound is exact. The comparison with ``vdc`` needs a margin,
because every guest instruction is emulated on this host and a busy machine makes the same
``dd`` take from one to several seconds; the limits are chosen so the refill time (7 s, 4 s)
stays well above that noise. Times are taken by the host around the guest command.
"""

from __future__ import annotations

import time

import pytest

from vmsh.api.client import ApiClient
from vmsh.harness.snapshots import restore_guest

KIB = 1 << 10


@pytest.fixture
def guest(vmsh_guest, vmsh_snapshots, vmsh_image, tmp_path):
    raw = vmsh_image("raw-disk")
    snap = vmsh_snapshots.get(vmsh_guest.flags(
        "--disk", f"path={raw},readonly=on,bw_size={64 * KIB},bw_refill_time=1000,id=bw_limited",
        f"path={raw},readonly=on,ops_size=10,ops_refill_time=1000,id=ops_limited",
        f"path={raw},readonly=on,id=unlimited"))
    api = tmp_path / "api.sock"
    clone = restore_guest(snap, tmp_path / "clone", extra_flags=["--api-socket", str(api)])
    clone.api = str(api)
    yield clone
    clone.close()


def timed_read(guest, dev: str, bs: str, count: int, skip: int = 0) -> float:
    start = time.monotonic()
    out = guest.check_output(f"dd if=/dev/{dev} of=/dev/null bs={bs} count={count} skip={skip} iflag=direct"
                             " 2>/dev/null; echo rc=$?", timeout=120)
    assert out == "rc=0", out
    return time.monotonic() - start


def counters(guest) -> dict:
    with ApiClient(guest.api) as api:
        return api.get("vm.counters")


def test_bandwidth_limited_disk_is_slower(guest) -> None:
    fast = timed_read(guest, "vdc", "64k", 8)
    slow = timed_read(guest, "vda", "64k", 8)  # 512 KiB: 448 KiB of refill at 64 KiB/s
    print(f"bandwidth: limited {slow:.2f} s, unlimited {fast:.2f} s")
    assert slow >= 7.0, (slow, fast)
    assert slow >= fast + 3.5, (slow, fast)
    c = counters(guest)
    assert c["bw_limited"]["read_bytes"] >= 512 * KIB and c["bw_limited"]["throttled"] >= 1
    assert "throttled" not in c["unlimited"]


def test_ops_limited_disk_is_slower(guest) -> None:
    fast = timed_read(guest, "vdc", "4k", 50)
    slow = timed_read(guest, "vdb", "4k", 50)  # 50 requests: 40 beyond the bucket at 10/s
    print(f"ops: limited {slow:.2f} s, unlimited {fast:.2f} s")
    assert slow >= 4.0, (slow, fast)
    assert slow >= fast + 2.0, (slow, fast)
    c = counters(guest)
    assert c["ops_limited"]["read_ops"] >= 50 and c["ops_limited"]["throttled"] >= 1
