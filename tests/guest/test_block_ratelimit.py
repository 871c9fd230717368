"""virtio-blk rate limiting seen from a real guest: a direct read from a limited disk never gets
more than the token bucket can admit, and the device's counters show that it held requests back.

Three views of the raw pattern image, read-only: ``vda`` limited to 64 KiB/s
(``bw_size=65536,bw_refill_time=1000``), ``vdb`` to 10 operations/s, ``vdc`` unlimited.

The check is the token bucket's own bound, not a comparison of timings: a bucket of ``size``
tokens refilled at ``size`` per ``refill_time`` holds at most ``size`` when a read starts and gains
``size * elapsed / refill_time`` while it runs, so over ``elapsed`` seconds it admits at most
``size + size * elapsed / refill_time`` tokens, however fast or slow the guest is (as long as no
single request is bigger than the bucket, which the crate lets through on credit: these reads
are 64 KiB and one operation at a time). What was admitted is the device's ``read_bytes`` /
``read_ops`` counter; the elapsed time is taken by the host around the guest command, so it is
never shorter than the time the device saw. The ``throttled`` counter says how often the device
left requests in the ring for the limiter's timer.
"""

from __future__ import annotations

import time

import pytest

from vmsh.api.client import ApiClient
from vmsh.harness.snapshots import restore_guest

KIB = 1 << 10
BW_SIZE, BW_REFILL_MS = 64 * KIB, 1000
OPS_SIZE, OPS_REFILL_MS = 10, 1000


@pytest.fixture
def guest(vmsh_guest, vmsh_snapshots, vmsh_image, tmp_path):
    raw = vmsh_image("raw-disk")
    snap = vmsh_snapshots.get(vmsh_guest.flags(
        "--disk", f"path={raw},readonly=on,bw_size={BW_SIZE},bw_refill_time={BW_REFILL_MS},id=bw_limited",
        f"path={raw},readonly=on,ops_size={OPS_SIZE},ops_refill_time={OPS_REFILL_MS},id=ops_limited",
        f"path={raw},readonly=on,id=unlimited"))
    api = tmp_path / "api.sock"
    clone = restore_guest(snap, tmp_path / "clone", extra_flags=["--api-socket", str(api)])
    clone.api = str(api)
    yield clone
    clone.close()


def admitted_at_most(size: int, refill_ms: int, elapsed: float) -> float:
    """The most a full bucket of ``size`` refilled at ``size`` per ``refill_ms`` admits in ``elapsed`` s."""
    return size + size * elapsed * 1000 / refill_ms


def counters(guest, dev_id: str) -> dict[str, int]:
    with ApiClient(guest.api) as api:
        return api.get("vm.counters")[dev_id]


def read_through(guest, dev_id: str, dev: str, bs: str, count: int) -> tuple[dict[str, int], float]:
    """Read ``count`` blocks of ``bs`` from ``/dev/<dev>`` with O_DIRECT; returns how the device's
    counters changed meanwhile and the seconds it took."""
    before = counters(guest, dev_id)
    start = time.monotonic()
    out = guest.check_output(f"dd if=/dev/{dev} of=/dev/null bs={bs} count={count} iflag=direct"
                             " 2>/dev/null; echo rc=$?", timeout=120)
    elapsed = time.monotonic() - start
    after = counters(guest, dev_id)
    assert out == "rc=0", out
    return {key: value - before.get(key, 0) for key, value in after.items()}, elapsed


def test_bandwidth_limited_disk_admits_no_more_than_the_bucket(guest) -> None:
    delta, elapsed = read_through(guest, "bw_limited", "vda", "64k", 8)
    bound = admitted_at_most(BW_SIZE, BW_REFILL_MS, elapsed)
    print(f"bandwidth: {delta['read_bytes']} bytes in {elapsed:.2f} s (at most {bound:.0f}), "
          f"throttled {delta['throttled']} times")
    assert delta["read_bytes"] >= 512 * KIB, delta  # all of dd's reads went through the device
    assert delta["read_bytes"] <= bound, (delta, elapsed)
    assert delta["throttled"] >= 1, delta
    assert "throttled" not in counters(guest, "unlimited")


def test_ops_limited_disk_admits_no_more_than_the_bucket(guest) -> None:
    delta, elapsed = read_through(guest, "ops_limited", "vdb", "4k", 50)
    bound = admitted_at_most(OPS_SIZE, OPS_REFILL_MS, elapsed)
    print(f"ops: {delta['read_ops']} requests in {elapsed:.2f} s (at most {bound:.1f}), "
          f"throttled {delta['throttled']} times")
    assert delta["read_ops"] >= 50, delta
    assert delta["read_ops"] <= bound, (delta, elapsed)
    assert delta["throttled"] >= 1, delta
