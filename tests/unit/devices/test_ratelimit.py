"""Token buckets, the two-bucket limiter, groups and the resume timer, on a fake clock."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from tests.unit.fakes import FakeClock, FakeWatcher
from vmsh.config.model import (
    RateLimiterConfig,
    RateLimiterGroupConfig,
    TokenBucketConfig,
)
from vmsh.devices.ratelimit import (
    NS_PER_MS,
    RateLimiter,
    RateLimiterGroup,
    ThrottleTimer,
    TimerFd,
    TokenBucket,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_bucket_starts_full_and_refills_at_its_rate(clock: FakeClock) -> None:
    b = TokenBucket(1000, 1000, clock=clock)  # 1 token/ms
    assert b.available() == 1000
    assert b.reduce(600) == (True, 0)
    assert b.reduce(500) == (False, 100 * NS_PER_MS)  # refused, nothing taken
    assert b.budget == 400
    clock.advance_ms(100)
    assert b.reduce(500) == (True, 0)
    clock.advance_ms(10_000)
    assert b.available() == 1000  # never above size


def test_bucket_no_token_lost_to_rounding(clock: FakeClock) -> None:
    b = TokenBucket(1000, 1000, clock=clock)
    b.reduce(1000)
    for _ in range(1000):  # 1000 refills of half a token each
        clock.advance_ms(0.5)
        b.refill()
    assert b.budget == 500


def test_bucket_one_time_burst_spent_first_and_not_refilled(clock: FakeClock) -> None:
    b = TokenBucket(1000, 1000, 1100, clock=clock)
    assert b.reduce(1000) == (True, 0)
    assert b.one_time_burst == 100 and b.budget == 1000
    assert b.reduce(500) == (True, 0)  # 100 from the burst, 400 from the budget
    assert b.one_time_burst == 0 and b.budget == 600
    assert b.reduce(500) == (True, 0)
    assert b.reduce(500)[0] is False
    clock.advance_ms(500)
    assert b.reduce(500) == (True, 0)
    clock.advance_ms(5000)
    assert b.one_time_burst == 0 and b.available() == 1000


def test_bucket_over_consumption(clock: FakeClock) -> None:
    b = TokenBucket(1000, 1000, clock=clock)
    # 2500 from a full bucket of 1000: allowed, empties it, and 1500 tokens are owed (1.5 s)
    assert b.reduce(2500) == (True, 1500 * NS_PER_MS)
    assert b.budget == 0


def test_bucket_rejects_disabled_configs(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1000)
    with pytest.raises(ValueError):
        TokenBucket(100, 0)
    assert TokenBucket.from_config(TokenBucketConfig(size=0, refill_time=100)) is None
    assert TokenBucket.from_config(TokenBucketConfig(size=10, refill_time=0)) is None
    assert TokenBucket.from_config(None) is None


def limiter(clock: FakeClock, bw: tuple[int, int, int] | None = None,
            ops: tuple[int, int, int] | None = None) -> RateLimiter:
    def bucket(t: tuple[int, int, int] | None) -> TokenBucketConfig | None:
        return None if t is None else TokenBucketConfig(size=t[0], one_time_burst=t[1], refill_time=t[2])
    lim = RateLimiter.from_config(RateLimiterConfig(bandwidth=bucket(bw), ops=bucket(ops)), clock=clock)
    assert lim is not None
    return lim


def test_limiter_from_config_without_buckets_is_none() -> None:
    assert RateLimiter.from_config(None) is None
    assert RateLimiter.from_config(RateLimiterConfig()) is None
    assert RateLimiter.from_config(RateLimiterConfig(bandwidth=TokenBucketConfig(size=0, refill_time=5))) is None


def test_limiter_bandwidth_blocks_then_resumes(clock: FakeClock) -> None:
    lim = limiter(clock, bw=(1000, 0, 1000))
    assert lim.consume(1000, 1000000)  # no ops bucket: ops are free
    assert not lim.blocked() and lim.delay() == 0
    assert not lim.consume(100)
    assert lim.blocked() and lim.delay() == pytest.approx(0.1)
    assert lim.throttled == 1
    clock.advance_ms(50)
    assert not lim.consume(1)  # blocked: even a small request waits
    assert lim.delay() == pytest.approx(0.05)
    clock.advance_ms(50)
    assert lim.consume(100)


def test_limiter_over_consumption_blocks_for_the_excess(clock: FakeClock) -> None:
    lim = limiter(clock, bw=(1 << 20, 0, 1000))  # 1 MiB/s
    assert lim.consume(4 << 20)  # 4 MiB in one request: goes, owes 3 MiB
    assert lim.delay() == pytest.approx(3.0)
    clock.advance_ms(2999)
    assert not lim.consume(512)
    clock.advance_ms(1)
    assert lim.consume(512)


def test_limiter_ops_and_bytes_together(clock: FakeClock) -> None:
    lim = limiter(clock, bw=(10_000, 0, 1000), ops=(3, 0, 1000))
    assert all(lim.consume(100) for _ in range(3))
    assert not lim.consume(100)  # out of ops, bytes left
    assert lim.bandwidth is not None and lim.bandwidth.budget == 9700  # nothing taken
    clock.advance_ms(1000)
    assert lim.consume(9000)
    assert not lim.consume(5000)  # ops left, bytes not: the op is given back
    assert lim.ops is not None and lim.ops.budget == 2


def test_limiter_ops_only(clock: FakeClock) -> None:
    lim = limiter(clock, ops=(10, 5, 100))
    assert all(lim.consume(1 << 30) for _ in range(15))  # burst + size
    assert not lim.consume(0)
    clock.advance_ms(10)  # one op per 10 ms
    assert lim.consume(0)


def test_limiter_is_thread_safe(clock: FakeClock) -> None:
    lim = limiter(clock, bw=(100_000, 0, 1000))
    granted = []

    def worker() -> None:
        n = 0
        for _ in range(2000):
            n += lim.consume(10, 0)
        granted.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 8000  # exactly what fit, never more
    assert lim.bandwidth is not None and lim.bandwidth.budget == 100_000 - 80_000


def test_group_shares_one_set_of_buckets(clock: FakeClock) -> None:
    cfg = RateLimiterGroupConfig(id="group0", rate_limiter_config=RateLimiterConfig(
        bandwidth=TokenBucketConfig(size=1000, refill_time=1000)))
    group = RateLimiterGroup.from_config(cfg, clock=clock)
    assert group.id == "group0"
    a, b = group.limiter, group.limiter
    assert a.consume(600)
    assert not b.consume(600)  # the other disk sees what the first took
    assert a.blocked() and b.blocked()
    clock.advance_ms(200)
    assert b.consume(600)


def test_timerfd_fires_once() -> None:
    t = TimerFd()
    try:
        t.set(0.01)
        assert select.select([t.fd], [], [], 2.0)[0] == [t.fd]
        t.clear()
        assert select.select([t.fd], [], [], 0.05)[0] == []
        t.set(0.01)
        t.set(0)  # disarmed
        assert select.select([t.fd], [], [], 0.05)[0] == []
    finally:
        t.close()


def test_throttle_timer_on_a_watcher() -> None:
    watcher = FakeWatcher()
    reran: list[int] = []
    timer = ThrottleTimer(reran.append, watcher)
    timer.wait(1, 0.01)
    timer.wait(3, 5.0)  # the earlier deadline stays
    assert timer.waiting == {1, 3}
    (fd, callback), = watcher.fds.items()
    assert select.select([fd], [], [], 2.0)[0] == [fd]
    callback()  # what the I/O loop does
    assert reran == [1, 3] and not timer.waiting
    assert select.select([fd], [], [], 0)[0] == []  # expiry consumed
    timer.wait(0, 10.0)
    timer.cancel()
    assert not timer.waiting
    timer.close()
    assert watcher.fds == {}
    timer.wait(0, 0.001)  # after close: ignored
    assert watcher.fds == {}


def test_throttle_timer_without_watcher_uses_a_thread() -> None:
    done = threading.Event()
    reran: list[int] = []
    timer = ThrottleTimer(lambda i: (reran.append(i), done.set()), None)
    start = time.monotonic()
    timer.wait(2, 0.02)
    assert done.wait(2.0)
    assert reran == [2] and time.monotonic() - start >= 0.015
    timer.close()


def test_fd_count_is_stable() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        timer = ThrottleTimer(lambda i: None, FakeWatcher())
        timer.wait(0, 1.0)
        timer.close()
    assert len(os.listdir("/proc/self/fd")) == before
