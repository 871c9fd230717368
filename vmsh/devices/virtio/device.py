"""The transport-independent part of a virtio device (virtio 1.2 §2, §3).

A ``VirtioDevice`` subclass describes its type, queue sizes, offered features and device
configuration space, and processes its queues when the driver kicks them. The transport
(``vmsh.devices.virtio.pci``) owns the feature negotiation and status registers, builds the
``VirtQueue`` s from the driver's writes, and calls ``activate`` once the driver sets
DRIVER_OK; interrupts go back through the transport's ``VirtioInterrupt``.

A malformed queue never escapes as an exception: ``queue_notify`` catches it, marks the
device as needing a reset (§2.1.2, DEVICE_NEEDS_RESET, which the transport ORs into the
status register), signals a configuration change and ignores the device's queues until the
driver resets it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from vmsh.devices.virtio.queue import VirtQueue
from vmsh.errors import GuestMemoryError, VirtQueueError
from vmsh.guest_memory import GuestMemory

LOG = logging.getLogger(__name__)

# Device status bits (§2.1)
VIRTIO_STATUS_ACKNOWLEDGE = 1  # the guest found the device
VIRTIO_STATUS_DRIVER = 2  # the guest has a driver for it
VIRTIO_STATUS_DRIVER_OK = 4  # the driver is ready: the device may be used
VIRTIO_STATUS_FEATURES_OK = 8  # feature negotiation complete
VIRTIO_STATUS_DEVICE_NEEDS_RESET = 64  # the device hit an error it cannot recover from
VIRTIO_STATUS_FAILED = 128  # the driver gave up on the device

# Reserved feature bits (§6)
VIRTIO_F_INDIRECT_DESC = 28  # indirect descriptor tables (§2.7.5.3)
VIRTIO_F_EVENT_IDX = 29  # used_event / avail_event (§2.7.10)
VIRTIO_F_VERSION_1 = 32  # compliant with virtio 1.x (non-legacy)
VIRTIO_F_ACCESS_PLATFORM = 33  # device behind an IOMMU
VIRTIO_F_RING_PACKED = 34  # packed virtqueues (not offered)

# Device types (§5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

#: features every device here supports: the split ring with indirect tables and event idx
COMMON_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)


def has_feature(features: int, bit: int) -> bool:
    """True if feature ``bit`` is set in ``features``."""
    return bool(features >> bit & 1)


class VirtioInterrupt(Protocol):
    """How a device raises interrupts (the transport decides: MSI-X vector, ISR bit...)."""

    def signal_used_queue(self, queue_index: int) -> None:
        """The device added used buffers to ``queue_index``."""
        ...

    def signal_config_change(self) -> None:
        """The device configuration (or DEVICE_NEEDS_RESET) changed."""
        ...


class VirtioDevice:
    """Base class of the device models.

    Subclasses set ``device_type``, ``queue_max_sizes`` and ``avail_features``, implement
    ``config_bytes`` (or ``read_config``/``write_config``) and ``process_queue``, and extend
    ``on_activate``/``on_reset``/``close``/``state``/``restore``/``counters`` as needed.

    Every device follows the state protocol of :mod:`vmsh.devices.state`: it sets
    ``state_type`` and implements ``state``/``restore`` (the queues belong to the transport's
    state).

    ``queue_notify`` may run on an I/O thread while the transport calls ``reset`` on a vCPU
    thread; each queue has a lock, and ``reset`` takes them all, so it waits for a request in
    progress to finish.
    """

    #: virtio device ID (§5)
    device_type: int = 0
    #: maximum size of each queue (the transport offers them; the driver may choose smaller)
    queue_max_sizes: tuple[int, ...] = ()
    #: feature bits the device offers
    avail_features: int = COMMON_FEATURES

    def __init__(self) -> None:
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: list[VirtQueue] = []
        self.interrupt: VirtioInterrupt | None = None
        #: True between ``activate`` and ``reset``
        self.activated = False
        #: set when a queue turned out malformed: DEVICE_NEEDS_RESET until the driver resets
        self.needs_reset = False
        self._locks = [threading.Lock() for _ in self.queue_max_sizes]

    # -- configuration space (§4.1.4.6) ------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The device-specific configuration structure (little endian)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read the configuration space; bytes beyond it read as zero."""
        size = max(0, size)
        if offset < 0:
            return b"\0" * size
        return self.config_bytes()[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """Write the configuration space (read-only unless a subclass says otherwise)."""
        LOG.debug("%s: ignored config write at %#x", type(self).__name__, offset)

    # -- lifecycle -------------------------------------------------------------------------

    def activate(self, memory: GuestMemory, queues: list[VirtQueue], interrupt: VirtioInterrupt,
                 acked_features: int) -> None:
        """Start the device: the driver set DRIVER_OK (§3.1.1).

        ``queues`` has one entry per queue index; only those with ``ready`` set are in use.

        :raises DeviceError: if the device cannot start (the transport then sets
            DEVICE_NEEDS_RESET).
        """
        with self._all_locks():
            self.memory = memory
            self.queues = queues
            self.interrupt = interrupt
            self.acked_features = acked_features
            self.needs_reset = False
            self.on_activate()
            self.activated = True

    def on_activate(self) -> None:
        """Hook: called by ``activate`` with the queue locks held."""

    def reset(self) -> None:
        """The driver wrote 0 to device status: forget the queues and stop (§2.4)."""
        with self._all_locks():
            self.on_reset()
            self.activated = False
            self.needs_reset = False
            self.queues = []
            self.interrupt = None
            self.memory = None
            self.acked_features = 0

    def on_reset(self) -> None:
        """Hook: called by ``reset`` with the queue locks held (stop worker threads here)."""

    def interrupts_changed(self) -> None:
        """Hook: the driver changed the MSI-X table, its mask or a queue's vector (called by
        the transport on the thread of that write, without the queue locks)."""

    def close(self) -> None:
        """VM teardown: reset, then release host resources (subclasses close their fds)."""
        self.reset()

    # -- queues ----------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index``: process it; never raises for a guest's mistakes."""
        if not 0 <= index < len(self._locks):
            return
        with self._locks[index]:
            if not self.activated or self.needs_reset or index >= len(self.queues):
                return
            queue = self.queues[index]
            if not queue.ready:
                return
            try:
                self.process_queue(index, queue)
            except (VirtQueueError, GuestMemoryError) as err:
                self.fail(err)

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        """Handle every available chain of ``queue`` (called with that queue's lock held).

        :raises VirtQueueError: for a malformed queue (``queue_notify`` turns it into
            DEVICE_NEEDS_RESET).
        """
        raise NotImplementedError

    def signal_used(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` if it wants one (§2.7.10)."""
        if self.interrupt is not None and self.queues[index].needs_notification():
            self.interrupt.signal_used_queue(index)

    def fail(self, err: Exception) -> None:
        """Enter DEVICE_NEEDS_RESET (§2.1.2) and tell the driver with a config change."""
        # the text, not the exception: a log record that kept it would keep its traceback's
        # views of guest RAM alive
        LOG.warning("%s: %s; the device needs a reset", type(self).__name__, str(err))
        self.needs_reset = True
        if self.interrupt is not None:
            self.interrupt.signal_config_change()

    def _all_locks(self) -> _Locks:
        return _Locks(self._locks)

    # -- snapshot and counters ---------------------------------------------------------------

    #: the device's frozen plain-data state class (set by every subclass)
    state_type: type[Any]

    def state(self) -> Any:
        """Device-specific plain-data state (the queues belong to the transport's state)."""
        raise NotImplementedError

    def restore(self, state: Any) -> None:
        """Load device-specific state (untrusted) in place, before the transport re-activates.

        :raises DeviceStateError: for a state of another class or a field that does not fit.
        """
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Per-device counters (e.g. read_bytes, write_ops)."""
        return {}


class _Locks:
    """Hold several locks, always acquired in the same order."""

    def __init__(self, locks: list[threading.Lock]) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self.locks):
            lock.release()
