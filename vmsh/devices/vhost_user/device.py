"""A virtio device whose queues a vhost-user backend serves.

The virtio-pci transport still owns the common configuration, the feature negotiation with the
driver and the MSI-X table; the device model offers what the backend offers (intersected with
what this device type may offer, as cloud-hypervisor does) and, when the driver sets DRIVER_OK,
hands the rings to the backend instead of processing them: their guest addresses and sizes,
one eventfd per queue that the guest's notifications signal (the device owns these ``kick_fds``;
the engine registers them as the queues' ioeventfds and never reads them itself) and the irqfd
of each queue's MSI-X vector as the call fd. Guest RAM goes to the backend as the fds of its
regions (``memory_table``, given by the engine: RAM must be shared).

Subclasses (``blk``, ``net``, and virtio-fs) give the device type, the queues, the offered
features and protocol features, and their configuration space. Nothing here imports the engine:
the socket path, the memory table and the I/O loop that watches the connection are given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from vmsh.devices.ratelimit import FdWatcher
from vmsh.devices.state import expect_state
from vmsh.devices.vhost_user import protocol as p
from vmsh.devices.vhost_user.frontend import Frontend, MemoryTable, Vring
from vmsh.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from vmsh.errors import DeviceStateError, GuestMemoryError, VhostUserError
from vmsh.thread_names import NamedThread

LOG = logging.getLogger(__name__)

VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_NOTIFICATION_DATA = 38
#: the virtio features every vhost-user device may pass on (cloud-hypervisor's
#: DEFAULT_VIRTIO_FEATURES, the protocol-features bit apart: that one is the frontend's)
DEFAULT_FEATURES = ((1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1)
                    | (1 << VIRTIO_F_IN_ORDER) | (1 << VIRTIO_F_ORDER_PLATFORM))
#: the protocol features every device type asks for (cloud-hypervisor adds CONFIG for blk and
#: INFLIGHT_SHMFD and LOG_SHMFD, which vmsh does not use)
DEFAULT_PROTOCOL = ((1 << p.PROTOCOL_F_MQ) | (1 << p.PROTOCOL_F_REPLY_ACK)
                    | (1 << p.PROTOCOL_F_CONFIGURE_MEM_SLOTS))


@dataclass(frozen=True, slots=True)
class VhostUserState:
    """What a snapshot would hold of a vhost-user device; restoring one is refused (the
    backend's own state cannot be saved)."""

    socket: str = ""


class VhostUserDevice(VirtioDevice):
    """A virtio device served by a vhost-user backend.

    :param dev_id: the device id (names the reconnection thread, as cloud-hypervisor's
        per-device thread is named).
    :param frontend: the (not yet connected) connection to the backend.
    :param memory_table: guest RAM for SET_MEM_TABLE.
    :param watcher: the engine's I/O loop, which notices the backend going away.
    :raises VhostUserError: when the backend cannot be reached or does not offer the features
        the device needs.
    """

    state_type = VhostUserState
    #: virtio features this device type may offer the driver
    offered_features: int = DEFAULT_FEATURES
    #: protocol features this device type uses
    offered_protocol: int = DEFAULT_PROTOCOL

    def __init__(self, dev_id: str, frontend: Frontend, memory_table: MemoryTable, queue_sizes: tuple[int, ...],
                 watcher: FdWatcher | None = None) -> None:
        self.queue_max_sizes = queue_sizes
        super().__init__()
        self.dev_id = dev_id
        self.frontend = frontend
        self.memory_table = memory_table
        self.watcher = watcher
        # the RAM must be shareable before anything else: the error names what is wrong
        memory_table()
        #: the queues' notification eventfds (the engine makes them its ioeventfds)
        self.kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in queue_sizes]
        self._watched: int | None = None
        self._closed = False
        try:
            frontend.connect()
            backend = frontend.negotiate(self.offered_protocol)
            self.avail_features = backend & self.offered_features
            limit = frontend.backend_queues
            if limit is not None and len(queue_sizes) > limit:
                raise VhostUserError(f"{dev_id}: the backend serves {frontend.backend_queues} queues, "
                                     f"{len(queue_sizes)} were asked for")
            self.setup()
        except BaseException:
            self._close_fds()
            frontend.close()
            raise
        self._watch()

    def setup(self) -> None:
        """Hook: after the negotiation, at creation (blk reads the backend's configuration)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def on_activate(self) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        call_fd = getattr(interrupt, "queue_eventfd", None)
        vrings = []
        for i, q in enumerate(self.queues):
            if not q.ready:
                continue
            vrings.append(Vring(i, q.size, q.desc_table, q.avail_ring, q.used_ring, q.next_avail, self.kick_fds[i],
                                call_fd(i) if call_fd is not None else None))
        # what this device adds itself (virtio-net's MAC and MTU) is not the backend's to know
        self.frontend.start(self.acked_features & self.frontend.backend_features, self.memory_table, vrings)

    def on_reset(self) -> None:
        self.frontend.stop()

    def pause(self) -> None:
        """The VM pauses: the backend stops serving the queues (the engine calls this for every
        device that has ``pause`` and ``resume``)."""
        self.frontend.enable(False)

    def resume(self) -> None:
        """The VM runs again (also at its first start, when nothing is started yet)."""
        self.frontend.enable(True)

    def queue_notify(self, index: int) -> None:
        """A notification that did not come through the ioeventfd (a notify write through the
        PCI configuration window): pass it on to the backend."""
        if 0 <= index < len(self.kick_fds) and not self._closed:
            try:
                os.eventfd_write(self.kick_fds[index], 1)
            except BlockingIOError:
                pass  # counter saturated: the backend has a kick pending anyway

    def close(self) -> None:
        self._unwatch()
        super().close()
        self._closed = True
        self.frontend.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in getattr(self, "kick_fds", []):
            os.close(fd)
        self.kick_fds = []

    # -- the backend going away ----------------------------------------------------------------

    def _watch(self) -> None:
        if self.watcher is not None and self.frontend.channel is not None:
            self._watched = self.frontend.fileno()
            self.watcher.add(self._watched, self._readable)

    def _unwatch(self) -> None:
        if self.watcher is not None and self._watched is not None:
            self.watcher.remove(self._watched)
        self._watched = None

    def _readable(self) -> None:
        """The I/O loop: the socket is readable outside a request, which means the backend left."""
        if not self.frontend.connection_lost():
            return
        self._unwatch()
        LOG.warning("%s: the vhost-user backend at %s went away; reconnecting", self.dev_id, self.frontend.path)
        NamedThread(target=self._reconnect, name=self.dev_id, daemon=True).start()

    def _reconnect(self) -> None:
        """The device's own thread (``{id}``, as cloud-hypervisor's backend-watching thread):
        wait for the backend without holding a lock, then replay the set-up with the queues
        held still."""
        try:
            self.frontend.reconnect()
            with self._all_locks():
                if self._closed:
                    self.frontend.close()
                    return
                self.frontend.replay(self._rebase)
                self._watch()
                # requests queued while no backend was there may have had their kick taken by
                # the old one: a spurious kick is harmless, a lost one leaves the guest waiting
                for index in range(len(self.kick_fds)):
                    self.queue_notify(index)
        except VhostUserError as err:
            LOG.error("%s: %s", self.dev_id, err)
            self.fail(err)
            return
        LOG.info("%s: reconnected to the vhost-user backend at %s", self.dev_id, self.frontend.path)

    def _rebase(self, vrings: list[Vring]) -> list[Vring]:
        """Restart each queue where the guest saw its last completion (the used index), so the
        new backend serves again what the old one had taken but not completed."""
        out = []
        for ring in vrings:
            try:
                base = self.memory.read_u16(ring.used + 2) if self.memory is not None else ring.base
            except GuestMemoryError:
                base = ring.base
            out.append(Vring(ring.index, ring.size, ring.desc, ring.avail, ring.used, base, ring.kick, ring.call))
        return out

    # -- snapshot ------------------------------------------------------------------------------

    def state(self) -> VhostUserState:
        return VhostUserState(self.frontend.path)

    def restore(self, state: Any) -> None:
        expect_state(state, VhostUserState)
        raise DeviceStateError("", "a vhost-user device cannot be restored from a snapshot")


