"""The refill bound that tests/guest/test_block_ratelimit.py checks in a real guest, proved here on
a fake clock for any arrival pattern: a limiter whose bucket holds ``size`` tokens refilled at
``size`` per ``refill_time`` admits at most ``size + size * elapsed / refill_time`` tokens in any
window of ``elapsed`` nanoseconds, when no request is bigger than the bucket; and a refused request
goes through once its ``delay`` has passed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fakes import FakeClock
from vmsh.devices.ratelimit import NS_PER_MS, RateLimiter, TokenBucket

SIZE, REFILL_MS = 1000, 100
REFILL_NS = REFILL_MS * NS_PER_MS

steps = st.lists(st.tuples(st.integers(0, 2 * REFILL_NS), st.integers(1, SIZE)), min_size=1, max_size=60)


def admitted_log(arrivals: list[tuple[int, int]], bucket: str) -> list[tuple[int, int]]:
    """Feed (gap ns, tokens) arrivals to a limiter with one bucket; a refused request is retried
    at its next arrival slot. Returns (time, tokens) of every admitted request."""
    clock = FakeClock()
    tb = TokenBucket(SIZE, REFILL_MS, clock=clock)
    limiter = RateLimiter(bandwidth=tb, clock=clock) if bucket == "bandwidth" else RateLimiter(ops=tb, clock=clock)
    log = []
    for gap, tokens in arrivals:
        clock.now += gap
        ok = limiter.consume(tokens, 1) if bucket == "bandwidth" else limiter.consume(0, tokens)
        if ok:
            log.append((clock.now, tokens))
    return log


@settings(max_examples=300, deadline=None)
@given(arrivals=steps, bucket=st.sampled_from(["bandwidth", "ops"]))
def test_no_window_admits_more_than_the_bucket_and_its_refill(arrivals: list[tuple[int, int]], bucket: str) -> None:
    log = admitted_log(arrivals, bucket)
    for i, (start, _) in enumerate(log):
        total = 0
        for end, tokens in log[i:]:
            total += tokens
            # total <= SIZE + SIZE * (end - start) / REFILL_NS, in integers
            assert total * REFILL_NS <= SIZE * REFILL_NS + SIZE * (end - start), (log, start, end, total)


@given(first=st.integers(1, SIZE), second=st.integers(1, SIZE), gap=st.integers(0, REFILL_NS))
def test_a_refused_request_goes_through_after_its_delay(first: int, second: int, gap: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(bandwidth=TokenBucket(SIZE, REFILL_MS, clock=clock), clock=clock)
    assert limiter.consume(first)
    clock.now += gap
    if limiter.consume(second):
        return
    clock.now += int(limiter.delay() * 1e9) + 1  # delay() is in float seconds: round past it
    assert limiter.consume(second)
