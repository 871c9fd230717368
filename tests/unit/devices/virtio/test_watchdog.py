"""virtio-watchdog: pings, the timer thread's lifecycle, firing, pause/resume, state."""

from __future__ import annotations

import threading
import time

from tests.unit.devices.virtio.driver import Allocator, FakeInterrupt, Ring
from vmsh.devices.virtio.device import COMMON_FEATURES
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.devices.virtio.watchdog import (
    WATCHDOG_TIMEOUT,
    WATCHDOG_TIMER_INTERVAL,
    VirtioWatchdog,
    VirtioWatchdogState,
)
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.persist import from_plain, to_plain


class FakeTrigger:
    def __init__(self) -> None:
        self.count = 0
        self.fired = threading.Event()

    def trigger(self) -> None:
        self.count += 1
        self.fired.set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def activate(dev: VirtioWatchdog, mem: GuestMemoryMmap, alloc: Allocator) -> Ring:
    ring = Ring.create(mem, alloc, 8)
    dev.activate(mem, [ring.attach(VirtQueue(mem, 8))], FakeInterrupt(), COMMON_FEATURES)
    return ring


def ping(dev: VirtioWatchdog, ring: Ring, mem: GuestMemoryMmap, alloc: Allocator,
         writable: bool = True) -> list[tuple[int, int]]:
    buf = alloc.alloc(1)
    mem.write_u8(buf, 0)
    ring.add([(buf, 1, writable)])
    dev.queue_notify(0)
    if writable:
        assert mem.read_u8(buf) == 1
    return ring.take_used()


def test_watchdog_defaults() -> None:
    dev = VirtioWatchdog(FakeTrigger())
    assert dev.device_type == 35 and dev.queue_max_sizes == (8,)
    assert (dev.interval, dev.timeout) == (WATCHDOG_TIMER_INTERVAL, WATCHDOG_TIMEOUT) == (15.0, 20.0)
    assert dev.config_bytes() == b""


def test_watchdog_fires_only_after_missed_pings(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    trig, clock = FakeTrigger(), Clock()
    dev = VirtioWatchdog(trig, interval=3600, clock=clock)  # ticks driven by hand
    ring = activate(dev, mem, alloc)
    clock.now += 1000
    assert not dev.check()  # not armed before the first ping
    [(_, length)] = ping(dev, ring, mem, alloc)
    assert length == 1
    clock.now += 3600 + 5
    assert not dev.check()
    ping(dev, ring, mem, alloc)
    clock.now += 3600 + 6
    assert dev.check() and trig.count == 1
    clock.now += 10000
    assert not dev.check()  # disarmed until the next ping
    assert dev.counters() == {"pings": 2, "resets": 1}
    dev.close()


def test_watchdog_thread_lifecycle(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    trig = FakeTrigger()
    dev = VirtioWatchdog(trig, interval=0.01, timeout=0.05)
    assert dev._thread is None
    ring = activate(dev, mem, alloc)
    thread = dev._thread
    assert thread is not None and thread.is_alive()
    for _ in range(10):  # a guest that keeps pinging is never reset
        ping(dev, ring, mem, alloc)
        time.sleep(0.01)
    assert trig.count == 0
    assert trig.fired.wait(5)  # then it stops pinging
    dev.reset()
    assert not thread.is_alive() and dev._thread is None
    ring = activate(dev, mem, alloc)
    assert dev._thread is not None and dev._thread.is_alive()
    dev.close()
    assert dev._thread is None


def test_watchdog_reset_from_its_own_trigger(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    done = threading.Event()

    class ResettingTrigger:
        def trigger(self) -> None:  # the engine resets the VM, which resets the device
            dev.reset()
            done.set()

    dev = VirtioWatchdog(ResettingTrigger(), interval=0.01, timeout=0.02)
    ring = activate(dev, mem, alloc)
    ping(dev, ring, mem, alloc)
    assert done.wait(5)
    assert dev._thread is None
    dev.close()


def test_watchdog_pause_resume(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    trig, clock = FakeTrigger(), Clock()
    dev = VirtioWatchdog(trig, interval=3600, clock=clock)
    ring = activate(dev, mem, alloc)
    ping(dev, ring, mem, alloc)
    dev.pause()
    clock.now += 100000
    assert not dev.check()
    dev.resume()
    assert not dev.check()
    clock.now += 3606
    assert dev.check()
    dev.close()


def test_watchdog_hostile_buffers(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioWatchdog(FakeTrigger(), interval=3600)
    ring = activate(dev, mem, alloc)
    [(_, length)] = ping(dev, ring, mem, alloc, writable=False)
    assert length == 0 and dev.last_ping is None and dev.counters()["pings"] == 0
    ring.add([(alloc.alloc(1), 0, True)])  # an empty buffer
    dev.queue_notify(0)
    assert ring.take_used()[0][1] == 0 and dev.last_ping is None
    ring.add([(1 << 40, 1, True)])  # outside RAM: the device needs a reset, nothing raised
    dev.queue_notify(0)
    assert dev.needs_reset
    dev.close()


def test_watchdog_state(mem: GuestMemoryMmap, alloc: Allocator) -> None:
    clock = Clock()
    dev = VirtioWatchdog(FakeTrigger(), interval=3600, clock=clock)
    ring = activate(dev, mem, alloc)
    ping(dev, ring, mem, alloc)
    state = from_plain(VirtioWatchdogState, to_plain(dev.state()))
    assert state == VirtioWatchdogState(enabled=True, pings=1, resets=0)
    dev.close()
    clock.now += 99999  # offline time does not count
    other = VirtioWatchdog(FakeTrigger(), interval=3600, clock=clock)
    other.restore(state)
    assert other.last_ping == clock.now and not other.check()
    assert other.counters() == {"pings": 1, "resets": 0}
    other.restore(VirtioWatchdogState())
    assert other.last_ping is None
    other.close()
