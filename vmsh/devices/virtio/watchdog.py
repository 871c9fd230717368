"""virtio-watchdog (device type 35), cloud-hypervisor's guest watchdog (virtio-devices/src/watchdog.rs).

One queue of 8. The guest's driver pings by making a device-writable buffer available; the device
writes a 1 into its first byte and returns it at once. The first ping arms the watchdog: from then
on a timer thread wakes every ``interval`` (15 s, which must match the driver's ping period) and
if no ping came for more than ``timeout`` (interval + 5 s) calls the injected reset ``Trigger``,
as cloud-hypervisor writes its reset eventfd. After firing the watchdog disarms until the next
ping (the VM is being reset anyway).

The timer thread starts in ``on_activate`` and stops in ``on_reset`` / ``close``. ``pause`` stops
the checks while the VM is paused, and ``resume`` restarts the clock, so time spent paused or in a
snapshot never counts against the guest; a restored watchdog that was armed is armed again with a
fresh clock (cloud-hypervisor does the same).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.base import Trigger
from vmsh.devices.state import expect_state
from vmsh.devices.virtio.device import VirtioDevice
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.state_types import U64
from vmsh.thread_names import NamedThread

LOG = logging.getLogger(__name__)

VIRTIO_ID_WATCHDOG = 35
#: cloud-hypervisor's watchdog queue size
WATCHDOG_QUEUE_SIZE = 8
#: seconds between checks (cloud-hypervisor's WATCHDOG_TIMER_INTERVAL; the driver pings this often)
WATCHDOG_TIMER_INTERVAL = 15.0
#: seconds without a ping after which the VM is reset (WATCHDOG_TIMEOUT = interval + 5)
WATCHDOG_TIMEOUT = WATCHDOG_TIMER_INTERVAL + 5


@dataclass(frozen=True, slots=True)
class VirtioWatchdogState:
    """Plain-data state of a ``VirtioWatchdog``."""

    #: a ping was seen: the watchdog is armed
    enabled: bool = False
    pings: U64 = 0
    resets: U64 = 0


class VirtioWatchdog(VirtioDevice):
    """A watchdog that resets the VM when the guest stops pinging.

    :param reset: raised when the guest missed its pings (the engine resets the VM).
    :param interval: seconds between checks.
    :param timeout: seconds without a ping that fire the watchdog (default ``interval + 5``).
    :param clock: a monotonic clock in seconds (tests inject their own).

    Example::

        watchdog = VirtioWatchdog(reset=vm_reset_trigger)
    """

    state_type = VirtioWatchdogState

    device_type = VIRTIO_ID_WATCHDOG

    def __init__(self, reset: Trigger, *, interval: float = WATCHDOG_TIMER_INTERVAL, timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError(f"watchdog interval {interval} is not positive")
        self.queue_max_sizes = (WATCHDOG_QUEUE_SIZE,)
        super().__init__()
        self.reset_trigger = reset
        self.interval = interval
        self.timeout = interval + 5 if timeout is None else timeout
        self.clock = clock
        #: time of the last ping; None while the watchdog is not armed
        self.last_ping: float | None = None
        self.pings = 0
        self.resets = 0
        self._lock = threading.Lock()
        self._paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the timer thread ------------------------------------------------------------------

    def on_activate(self) -> None:
        self._start_timer()

    def on_reset(self) -> None:
        self._stop_timer()

    def close(self) -> None:
        super().close()
        self._stop_timer()

    def _start_timer(self) -> None:
        if self._thread is not None:
            return
        self._stop = threading.Event()
        # named as cloud-hypervisor's watchdog thread (its device id)
        self._thread = NamedThread(target=self._run, args=(self._stop,), name="__watchdog", daemon=True)
        self._thread.start()

    def _stop_timer(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        # The reset trigger may reset this device from the timer thread itself: no self-join then.
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.check()

    def check(self) -> bool:
        """One timer tick: fire the reset trigger if the guest missed its pings; True if it fired."""
        with self._lock:
            if self._paused or self.last_ping is None:
                return False
            gap = self.clock() - self.last_ping
            if gap <= self.timeout:
                return False
            self.last_ping = None  # disarmed until the next ping
            self.resets += 1
        LOG.error("virtio-watchdog: %.0f seconds since the last ping; resetting the VM", gap)
        try:
            self.reset_trigger.trigger()
        except Exception:  # the timer thread must survive a failing trigger
            LOG.exception("virtio-watchdog: reset trigger failed")
        return True

    def pause(self) -> None:
        """The VM is paused: stop counting."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """The VM runs again: an armed watchdog restarts its clock."""
        with self._lock:
            self._paused = False
            if self.last_ping is not None:
                self.last_ping = self.clock()

    # -- the queue -------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        used = False
        while (chain := queue.pop()) is not None:
            written = 0
            first = chain.descriptors[0] if chain.descriptors else None
            if first is not None and first.write_only and first.length > 0:
                self.memory.write_u8(first.addr, 1)  # type: ignore[union-attr]  # queues only run once activated with RAM
                written = first.length
                with self._lock:
                    if self.last_ping is None:
                        LOG.info("virtio-watchdog: first ping; checking every %g seconds", self.interval)
                    self.last_ping = self.clock()
                    self.pings += 1
            else:
                # Not a ping (cloud-hypervisor stops the device here); give the buffer back.
                LOG.debug("virtio-watchdog: buffer without a writable first descriptor")
            queue.add_used(chain.head, written)
            used = True
        if used:
            self.signal_used(index)

    # -- snapshot and counters ---------------------------------------------------------------

    def state(self) -> VirtioWatchdogState:
        with self._lock:
            return VirtioWatchdogState(self.last_ping is not None, self.pings, self.resets)

    def restore(self, state: VirtioWatchdogState) -> None:
        """Load ``state``; an armed watchdog restarts its clock now (the time offline does not count).

        :raises DeviceStateError: for another state class or a counter beyond 64 bits.
        """
        s = expect_state(state, VirtioWatchdogState)
        with self._lock:
            self.last_ping = self.clock() if s.enabled else None
            self.pings, self.resets = s.pings, s.resets

    def counters(self) -> dict[str, int]:
        return {"pings": self.pings, "resets": self.resets}
