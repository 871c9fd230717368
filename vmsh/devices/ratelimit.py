"""Token-bucket rate limiting for the I/O devices (``--disk``/``--net`` ``bw_*``/``ops_*`` keys and
``--rate-limit-group``), with the semantics of cloud-hypervisor's (originally Firecracker's)
``rate_limiter`` crate:

- A bucket holds ``size`` tokens and starts full; it refills at ``size`` tokens per
  ``refill_time`` milliseconds, never beyond ``size``. ``one_time_burst`` is extra credit on top,
  spent first and never refilled. A bucket with ``size`` or ``refill_time`` 0 does not exist
  (that direction is unlimited).
- A ``RateLimiter`` has a bandwidth bucket (bytes) and an operations bucket. A request that
  does not fit in what is left fails, takes nothing, and blocks the limiter until the tokens it
  needed have been refilled; a request bigger than the whole bucket succeeds, empties it and
  blocks the limiter for as long as refilling the excess takes (the crate's over-consumption).
  While blocked every ``consume`` fails; ``delay`` says how long that lasts.
- A ``RateLimiterGroup`` is one limiter shared by several devices: they draw from the same
  buckets, each with its own timer to resume.

Devices stop taking chains from a queue when ``consume`` fails (the chain goes back to the
ring) and let a ``ThrottleTimer`` re-run the queue after ``delay``: the timer is a timerfd
watched by the engine's I/O loop, so it fires on the device thread and is quiet while the VM
is paused.

Limiters have no snapshot state (no ``state``/``restore``): their buckets are the host's budget,
not something the guest can observe or change, and a group is shared by several devices. A
restored device starts with full buckets, as a freshly built one does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from vmsh.config.model import (
    RateLimiterConfig,
    RateLimiterGroupConfig,
    TokenBucketConfig,
)
from vmsh.thread_names import NamedTimer

LOG = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
#: shortest wait after a refused request (the crate re-tries every 100 ms; waiting exactly as
#: long as the refill needs is kinder to latency, but never spin on sub-millisecond timers)
MIN_DELAY_NS = NS_PER_MS

#: a clock in integer nanoseconds, monotonic
Clock = Callable[[], int]


class TokenBucket:
    """One bucket of ``size`` tokens refilled every ``refill_time_ms``, plus a one-time burst.

    Not thread-safe by itself: the ``RateLimiter`` owning it holds a lock.

    :raises ValueError: if ``size`` or ``refill_time_ms`` is not positive (use no bucket then).
    """

    def __init__(self, size: int, refill_time_ms: int, one_time_burst: int = 0, *,
                 clock: Clock = time.monotonic_ns) -> None:
        if size <= 0 or refill_time_ms <= 0:
            raise ValueError(f"a token bucket needs a size and a refill time (got {size}, {refill_time_ms} ms)")
        self.size = size
        self.refill_time_ms = refill_time_ms
        #: remaining burst credit (spent first, never refilled)
        self.one_time_burst = max(0, one_time_burst)
        #: tokens available (burst not included)
        self.budget = size
        self._clock = clock
        self._refill_ns = refill_time_ms * NS_PER_MS
        self._last = clock()
        #: fraction of a token refilled but not yet credited, in units of 1/_refill_ns
        self._remainder = 0

    @classmethod
    def from_config(cls, config: TokenBucketConfig | None, *, clock: Clock = time.monotonic_ns) -> TokenBucket | None:
        """The bucket of ``config``, or None when it limits nothing (size or refill_time 0)."""
        if config is None or config.size <= 0 or config.refill_time <= 0:
            return None
        return cls(config.size, config.refill_time, config.one_time_burst or 0, clock=clock)

    def refill(self) -> None:
        """Credit the tokens refilled since the last call."""
        now = self._clock()
        elapsed = max(0, now - self._last)
        self._last = now
        if self.budget >= self.size:
            self._remainder = 0
            return
        # Exact integer arithmetic: no token is lost to rounding however often this runs.
        acc = elapsed * self.size + self._remainder
        tokens, self._remainder = divmod(acc, self._refill_ns)
        self.budget += tokens
        if self.budget >= self.size:
            self.budget, self._remainder = self.size, 0

    def available(self) -> int:
        """Tokens that could be taken now (burst included)."""
        self.refill()
        return self.one_time_burst + self.budget

    def reduce(self, tokens: int) -> tuple[bool, int]:
        """Take ``tokens`` if they are there.

        :returns: ``(taken, wait_ns)``: ``(False, ns until they would be)`` when too few are
            left (nothing taken); ``(True, 0)`` on success; ``(True, ns)`` for a request bigger
            than the bucket, which empties it and must be followed by a wait of ``ns``.
        """
        tokens = max(0, tokens)
        if self.one_time_burst >= tokens:
            self.one_time_burst -= tokens
            return True, 0
        self.refill()
        need = tokens - self.one_time_burst
        if need <= self.budget:
            self.one_time_burst = 0
            self.budget -= need
            return True, 0
        if need > self.size:
            # Over-consumption: let it through, then hold everything back for as long as the
            # excess takes to refill.
            excess = need - self.budget
            self.one_time_burst = 0
            self.budget = 0
            return True, self.time_for(excess)
        return False, self.time_for(need - self.budget)

    def time_for(self, tokens: int) -> int:
        """Nanoseconds of refilling that produce ``tokens`` more tokens."""
        if tokens <= 0:
            return 0
        num = tokens * self._refill_ns - self._remainder
        return max(0, -(-num // self.size))

    def replenish(self, tokens: int) -> None:
        """Give back ``tokens`` (an operation that was counted but did not happen)."""
        self.budget = min(self.size, self.budget + max(0, tokens))


class RateLimiter:
    """Bandwidth (bytes) and operations buckets; either may be absent (unlimited).

    Thread-safe: several queues (or several devices of a group) may consume at once.

    Example::

        limiter = RateLimiter(bandwidth=TokenBucket(1 << 20, 1000))   # 1 MiB/s
        if not limiter.consume(len(data), 1):
            retry_after(limiter.delay())
    """

    def __init__(self, *, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None,
                 clock: Clock = time.monotonic_ns) -> None:
        self.bandwidth = bandwidth
        self.ops = ops
        self._clock = clock
        self._lock = threading.Lock()
        #: clock value until which every consume fails
        self._blocked_until = 0
        #: refused and over-sized requests (each one blocks the limiter)
        self.throttled = 0

    @classmethod
    def from_config(cls, config: RateLimiterConfig | None, *, clock: Clock = time.monotonic_ns) -> RateLimiter | None:
        """The limiter of ``config``, or None when it has no bucket."""
        if config is None:
            return None
        bandwidth = TokenBucket.from_config(config.bandwidth, clock=clock)
        ops = TokenBucket.from_config(config.ops, clock=clock)
        if bandwidth is None and ops is None:
            return None
        return cls(bandwidth=bandwidth, ops=ops, clock=clock)

    def consume(self, nbytes: int, ops: int = 1) -> bool:
        """Account one request of ``nbytes`` bytes and ``ops`` operations.

        True: go ahead. False: nothing was taken; retry after :meth:`delay`.
        """
        with self._lock:
            now = self._clock()
            if now < self._blocked_until:
                return False
            wait = 0
            if self.ops is not None:
                ok, wait = self.ops.reduce(ops)
                if not ok:
                    return self._block(now, wait)
            if self.bandwidth is not None:
                ok, bw_wait = self.bandwidth.reduce(nbytes)
                if not ok:
                    if self.ops is not None and wait == 0:
                        self.ops.replenish(ops)
                    return self._block(now, bw_wait)
                wait = max(wait, bw_wait)
            if wait:
                self._block(now, wait)
            return True

    def _block(self, now: int, wait_ns: int) -> bool:
        self._blocked_until = max(self._blocked_until, now + max(wait_ns, MIN_DELAY_NS))
        self.throttled += 1
        return False

    def blocked(self) -> bool:
        """True while every consume fails."""
        with self._lock:
            return self._clock() < self._blocked_until

    def delay(self) -> float:
        """Seconds until the limiter takes requests again (0.0 when it does now)."""
        with self._lock:
            return max(0, self._blocked_until - self._clock()) / NS_PER_S


class RateLimiterGroup:
    """``--rate-limit-group``: one limiter whose buckets several devices share.

    Example::

        group = RateLimiterGroup.from_config(RateLimiterGroupConfig(id="group0", rate_limiter_config=...))
        disk0 = VirtioBlock(path0, rate_limiter=group.limiter, watcher=loop)
        disk1 = VirtioBlock(path1, rate_limiter=group.limiter, watcher=loop)
    """

    def __init__(self, group_id: str, limiter: RateLimiter) -> None:
        self.id = group_id
        self.limiter = limiter

    @classmethod
    def from_config(cls, config: RateLimiterGroupConfig, *, clock: Clock = time.monotonic_ns) -> RateLimiterGroup:
        """The group of ``config``; a config without buckets gives an unlimited limiter."""
        limiter = RateLimiter.from_config(config.rate_limiter_config, clock=clock)
        return cls(config.id, limiter if limiter is not None else RateLimiter(clock=clock))


# --- the resume timer -----------------------------------------------------------------------------


class FdWatcher(Protocol):
    """The engine's I/O loop: call ``callback`` whenever ``fd`` is readable."""

    def add(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
#: struct itimerspec: it_interval {tv_sec, tv_nsec}, it_value {tv_sec, tv_nsec}
_ITIMERSPEC = struct.Struct("qqqq")

_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class TimerFd:
    """A one-shot CLOCK_MONOTONIC timerfd (the os module has none before Python 3.13)."""

    def __init__(self) -> None:
        self.fd = _check(_timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC))

    def set(self, seconds: float) -> None:
        """Fire once after ``seconds`` (at least 1 ns); 0 or less disarms."""
        ns = int(seconds * NS_PER_S)
        if seconds > 0:
            ns = max(ns, 1)
        # INVARIANTS: a 32-byte itimerspec for the call to read; no old value asked for.
        _check(_timerfd_settime(self.fd, 0, _ITIMERSPEC.pack(0, 0, ns // NS_PER_S, ns % NS_PER_S), None))

    def clear(self) -> None:
        """Consume an expiry (so the fd is no longer readable)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ThrottleTimer:
    """Re-run throttled queues of one device once their limiter has tokens again.

    ``wait(index, seconds)`` remembers the queue and arms the timer; when it fires (on the I/O
    loop's thread) ``rerun(index)`` is called for every remembered queue. Without a watcher
    (unit tests of a bare device, or no I/O loop) a timer thread (``rate-limit``) does the same.
    """

    def __init__(self, rerun: Callable[[int], None], watcher: FdWatcher | None) -> None:
        self._rerun = rerun
        self._watcher = watcher
        self._lock = threading.Lock()
        self._queues: set[int] = set()
        self._deadline: float | None = None
        self._timerfd: TimerFd | None = None
        self._thread_timer: NamedTimer | None = None
        self._closed = False

    @property
    def waiting(self) -> frozenset[int]:
        """Queues waiting for the timer."""
        with self._lock:
            return frozenset(self._queues)

    def wait(self, index: int, seconds: float) -> None:
        """Re-run queue ``index`` in ``seconds`` (an earlier pending deadline is kept)."""
        with self._lock:
            if self._closed:
                return
            self._queues.add(index)
            seconds = max(seconds, MIN_DELAY_NS / NS_PER_S)
            deadline = time.monotonic() + seconds
            if self._deadline is not None and self._deadline <= deadline:
                return
            self._deadline = deadline
            if self._watcher is not None:
                if self._timerfd is None:
                    self._timerfd = TimerFd()
                    self._watcher.add(self._timerfd.fd, self.fire)
                self._timerfd.set(seconds)
            else:
                if self._thread_timer is not None:
                    self._thread_timer.cancel()
                self._thread_timer = NamedTimer(seconds, self.fire)
                self._thread_timer.name = "rate-limit"
                self._thread_timer.daemon = True
                self._thread_timer.start()

    def fire(self) -> None:
        """The timer expired: re-run the waiting queues (each under its own queue lock)."""
        with self._lock:
            if self._timerfd is not None:
                self._timerfd.clear()
            queues = sorted(self._queues)
            self._queues.clear()
            self._deadline = None
            self._thread_timer = None
        for index in queues:
            self._rerun(index)

    def cancel(self) -> None:
        """Forget the waiting queues and disarm (device reset)."""
        with self._lock:
            self._queues.clear()
            self._deadline = None
            if self._timerfd is not None:
                self._timerfd.set(0)
                self._timerfd.clear()
            if self._thread_timer is not None:
                self._thread_timer.cancel()
                self._thread_timer = None

    def close(self) -> None:
        """Cancel and release the timerfd."""
        self.cancel()
        with self._lock:
            self._closed = True
            if self._timerfd is not None:
                if self._watcher is not None:
                    self._watcher.remove(self._timerfd.fd)
                self._timerfd.close()
                self._timerfd = None
