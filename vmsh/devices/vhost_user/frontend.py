"""The vhost-user frontend: one connection to a backend and the conversation over it.

The order is cloud-hypervisor v40's (its ``virtio-devices/src/vhost_user/vu_common_ctrl.rs``),
the messages QEMU's ``docs/interop/vhost-user.rst``:

* at device creation (:meth:`Frontend.negotiate`): SET_OWNER, GET_FEATURES; with the
  protocol-features bit GET/SET_PROTOCOL_FEATURES (REPLY_ACK then makes every later request
  acknowledged); with MQ GET_QUEUE_NUM;
* when the driver sets DRIVER_OK (:meth:`Frontend.start`): SET_FEATURES (the driver's features
  plus the protocol-features bit), SET_MEM_TABLE with the guest RAM fds, and per queue
  SET_VRING_NUM, SET_VRING_ADDR (ring addresses in this process's mapping), SET_VRING_BASE,
  SET_VRING_CALL (the irqfd of the queue's MSI-X vector), SET_VRING_KICK (the queue's ioeventfd),
  then SET_VRING_ENABLE for each;
* at a device reset (:meth:`Frontend.stop`): SET_VRING_ENABLE(0) and GET_VRING_BASE per queue.

A backend that goes away is noticed on the I/O loop (the socket becomes readable at EOF) and the
frontend reconnects as cloud-hypervisor does (a client retries for up to 60 s, a server waits for
the next connection), then replays the negotiation and, for a started device, the whole start.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.vhost_user import protocol as p
from vmsh.errors import VhostUserError

LOG = logging.getLogger(__name__)

#: cloud-hypervisor keeps retrying a client connection for this long
CONNECT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Vring:
    """One started queue as the backend is told about it (guest physical ring addresses)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    #: where the backend starts reading the available ring
    base: int
    #: the ioeventfd the guest's notification signals
    kick: int
    #: the irqfd of the queue's MSI-X vector (None: the driver gave the queue no vector)
    call: int | None


#: returns the guest RAM the backend must map (raises VhostUserError if it cannot be shared)
MemoryTable = Callable[[], list[p.MemoryRegion]]


class Frontend:
    """A connection to one vhost-user backend.

    :param path: the backend's unix socket.
    :param server: listen on ``path`` and wait for the backend to connect (vhost-user-net's
        ``vhost_mode=server``) instead of connecting to it.
    :param connect_timeout: how long to keep trying (or waiting) for the connection.
    """

    def __init__(self, path: str, *, server: bool = False, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.server = server
        self.connect_timeout = connect_timeout
        self.channel: p.Channel | None = None
        self._listener: socket.socket | None = None
        #: the backend's virtio features and what both sides agreed on
        self.backend_features = 0
        self.acked_protocol = 0
        self.offered_protocol = 0
        #: how many queues the backend serves (GET_QUEUE_NUM with MQ)
        self.backend_queues: int | None = None
        #: serializes every request/reply exchange and the disconnect check
        self.lock = threading.Lock()
        #: what the last start told the backend (replayed after a reconnection)
        self._started: tuple[int, list[Vring]] | None = None
        self._memory: MemoryTable | None = None

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (client: connect with retries; server: listen and accept).

        :raises VhostUserError: when there is no backend in time.
        """
        if self.server:
            if self._listener is None:
                self._listener = p.listen_server(self.path)
            sock = p.accept_backend(self._listener, self.path, self.connect_timeout)
        else:
            sock = p.connect_client(self.path, self.connect_timeout)
        self.channel = p.Channel(sock)

    def close(self) -> None:
        """Drop the connection (and the listening socket)."""
        with self.lock:
            if self.channel is not None:
                self.channel.close()
                self.channel = None
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def fileno(self) -> int:
        return self._chan().fileno()

    def _chan(self) -> p.Channel:
        if self.channel is None:
            raise VhostUserError(f"not connected to the vhost-user backend at {self.path}")
        return self.channel

    # -- creation ------------------------------------------------------------------------------

    def negotiate(self, offered_protocol: int) -> int:
        """SET_OWNER and feature discovery; returns the backend's virtio features.

        ``offered_protocol`` are the protocol features this device can use; the acked set is
        their intersection with the backend's (kept for reconnections).
        """
        with self.lock:
            self.offered_protocol = offered_protocol
            return self._negotiate()

    def _negotiate(self) -> int:
        chan = self._chan()
        chan.reply_ack = False
        chan.command(p.SET_OWNER)
        self.backend_features = chan.get_u64(p.GET_FEATURES)
        self.acked_protocol = 0
        if self.backend_features >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            backend_protocol = chan.get_u64(p.GET_PROTOCOL_FEATURES)
            self.acked_protocol = backend_protocol & self.offered_protocol
            chan.set_u64(p.SET_PROTOCOL_FEATURES, self.acked_protocol)
            chan.reply_ack = self.has_protocol(p.PROTOCOL_F_REPLY_ACK)
        if self.has_protocol(p.PROTOCOL_F_MQ):
            self.backend_queues = chan.get_u64(p.GET_QUEUE_NUM)
        return self.backend_features

    def has_protocol(self, bit: int) -> bool:
        return bool(self.acked_protocol >> bit & 1)

    def get_config(self, size: int) -> bytes:
        """GET_CONFIG of the first ``size`` bytes of the device configuration space."""
        if not self.has_protocol(p.PROTOCOL_F_CONFIG):
            raise VhostUserError(f"the backend at {self.path} does not offer its configuration space")
        payload = p.CONFIG_HEADER.pack(0, size, p.CONFIG_WRITABLE) + bytes(size)
        with self.lock:
            reply = self._chan().call(p.GET_CONFIG, payload)
        if len(reply) != len(payload):
            raise VhostUserError(f"the backend's configuration reply has {len(reply)} bytes, not {len(payload)}")
        return reply[p.CONFIG_HEADER.size:]

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: the driver wrote the configuration space (e.g. virtio-blk's writeback)."""
        if not self.has_protocol(p.PROTOCOL_F_CONFIG):
            return
        with self.lock:
            self._chan().command(p.SET_CONFIG, p.CONFIG_HEADER.pack(offset, len(data), p.CONFIG_WRITABLE) + data)

    # -- activation ------------------------------------------------------------------------------

    def start(self, features: int, memory: MemoryTable, vrings: list[Vring]) -> None:
        """Hand the started queues to the backend (the driver set DRIVER_OK).

        :raises VhostUserError: when the backend refuses or is gone.
        """
        with self.lock:
            self._memory = memory
            self._start(features, vrings)
            self._started = (features, vrings)

    def _start(self, features: int, vrings: list[Vring]) -> None:
        chan = self._chan()
        assert self._memory is not None
        if self.backend_features >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            features |= 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
        chan.set_u64(p.SET_FEATURES, features)
        regions = self._memory()
        if len(regions) > p.MAX_MEM_REGIONS:
            raise VhostUserError(f"guest RAM has {len(regions)} regions; a memory table holds {p.MAX_MEM_REGIONS}")
        chan.command(p.SET_MEM_TABLE, p.pack_mem_table(regions), [r.fd for r in regions])
        for ring in vrings:
            chan.command(p.SET_VRING_NUM, p.VRING_STATE.pack(ring.index, ring.size))
        for ring in vrings:
            addrs = [_user_addr(regions, gpa, n) for gpa, n in
                     ((ring.desc, 16 * ring.size), (ring.used, 6 + 8 * ring.size), (ring.avail, 6 + 2 * ring.size))]
            chan.command(p.SET_VRING_ADDR, p.VRING_ADDR.pack(ring.index, 0, *addrs, 0))
            chan.command(p.SET_VRING_BASE, p.VRING_STATE.pack(ring.index, ring.base))
            if ring.call is not None:
                chan.set_vring_fd(p.SET_VRING_CALL, ring.index, ring.call)
            chan.set_vring_fd(p.SET_VRING_KICK, ring.index, ring.kick)
        if self.backend_features >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # with protocol features the rings start disabled (vhost-user.rst, "Ring states")
            for ring in vrings:
                chan.command(p.SET_VRING_ENABLE, p.VRING_STATE.pack(ring.index, 1))

    def stop(self) -> list[int]:
        """Stop the started queues (a device reset): disable them and fetch where each stopped.

        A backend that is gone is not an error here: there is nothing left to stop.
        """
        with self.lock:
            started, self._started = self._started, None
            if started is None or self.channel is None:
                return []
            bases = []
            try:
                for ring in started[1]:
                    if self.backend_features >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                        self.channel.command(p.SET_VRING_ENABLE, p.VRING_STATE.pack(ring.index, 0))
                    reply = self.channel.call(p.GET_VRING_BASE, p.VRING_STATE.pack(ring.index, 0))
                    if len(reply) == p.VRING_STATE.size:
                        bases.append(p.VRING_STATE.unpack(reply)[1])
            except VhostUserError as err:
                LOG.warning("%s: stopping the backend's queues: %s", self.path, err)
            return bases

    def enable(self, on: bool) -> None:
        """SET_VRING_ENABLE on every started queue: a paused VM's backend stops serving them
        (cloud-hypervisor's pause and resume of a vhost-user device). Needs protocol features
        (without them a ring cannot be disabled); a backend that is gone is not an error here."""
        with self.lock:
            if self._started is None or self.channel is None \
                    or not self.backend_features >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                return
            try:
                for ring in self._started[1]:
                    self.channel.command(p.SET_VRING_ENABLE, p.VRING_STATE.pack(ring.index, int(on)))
            except VhostUserError as err:
                LOG.warning("%s: %s the backend's queues: %s", self.path, "enabling" if on else "disabling", err)

    # -- disconnection ---------------------------------------------------------------------------

    def connection_lost(self) -> bool:
        """True if the backend closed the connection (called when the socket is readable).

        Takes the lock, so a reply another thread is waiting for is read by that thread first;
        anything else the backend sends on this channel is unexpected and dropped.
        """
        with self.lock:
            if self.channel is None:
                return False
            sock = self.channel.sock
            timeout = sock.gettimeout()
            sock.setblocking(False)  # with a timeout, recv would first wait up to that long
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return False
            except OSError:
                return True
            finally:
                sock.settimeout(timeout)
            if data:
                LOG.warning("%s: ignored %d unexpected bytes from the backend", self.path, len(data))
                return False
            return True

    def reconnect(self) -> None:
        """Drop the dead connection and make a new one (client: retry for up to 60 s; server:
        wait for the backend to connect again). Nothing is sent yet: see :meth:`replay`.

        :raises VhostUserError: when the backend does not come back in time.
        """
        with self.lock:
            if self.channel is not None:
                self.channel.close()
                self.channel = None
        self.connect()

    def replay(self, rebase: Callable[[list[Vring]], list[Vring]]) -> None:
        """On a new connection, the negotiation again (the protocol features acked before) and,
        if the device was started, the whole start; ``rebase`` gives the started queues their
        current positions.

        :raises VhostUserError: when the backend refuses.
        """
        with self.lock:
            self._negotiate()
            if self._started is not None:
                features, vrings = self._started
                vrings = rebase(vrings)
                self._start(features, vrings)
                self._started = (features, vrings)


def _user_addr(regions: list[p.MemoryRegion], gpa: int, length: int) -> int:
    """This process's address of guest physical ``gpa`` (the ring must lie in one region)."""
    for r in regions:
        if r.guest_addr <= gpa and gpa + length <= r.guest_addr + r.size:
            return r.user_addr + gpa - r.guest_addr
    raise VhostUserError(f"the ring at {gpa:#x}+{length:#x} is not inside one region of guest RAM")
