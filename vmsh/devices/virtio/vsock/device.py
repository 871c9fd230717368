"""The virtio-vsock device (virtio 1.2 §5.10): its queues, and the packets between them and the host.

Queues: 0 rx (device to guest), 1 tx (guest to device), 2 event. The transmit queue's packets
are checked here (header length, CIDs, type, payload size against the chain) and handed to the
multiplexer (:mod:`.multiplexer`), which routes them to host streams; towards the guest, the
packets without payload that the multiplexer queued go into receive buffers first, and data is
read from a host stream straight into the guest's receive buffers (``os.readv``), never more
than the guest's credit allows (:mod:`.connection`).

Host fds are watched through the injected ``watcher`` (the engine's I/O loop, level-triggered,
readable only): the listening socket, host streams still sending their ``CONNECT`` line, and
connected streams only while the guest has receive buffers and credit - so a guest that stops
reading costs nothing. Every host event runs under the device's lock (:meth:`VirtioVsock._run`).

A hostile guest is bounded: at most ``max_connections`` connections, ``CONN_TX_BUF_SIZE``
buffered bytes each, ``MAX_PKT_PAYLOAD`` per packet, and a bounded queue of control packets
(when it is full, transmit processing waits for the guest to take them). Malformed packets
are dropped or answered with OP_RST; a malformed ring puts the device into DEVICE_NEEDS_RESET.

Host sockets cannot be snapshotted: a restored device has no connections and sends the guest a
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, after which the guest's connected sockets fail.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.config.model import VsockConfig
from vmsh.devices.state import expect_state
from vmsh.devices.virtio.device import VirtioDevice
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue
from vmsh.devices.virtio.vsock.connection import ESTABLISHED, U32_MASK
from vmsh.devices.virtio.vsock.multiplexer import MAX_CONNECTIONS, FdWatcher, VsockMuxer
from vmsh.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
    PacketHeader,
)
from vmsh.errors import DeviceError, DeviceStateError, GuestMemoryError, VirtQueueError
from vmsh.state_types import U64

LOG = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19

RXQ = 0
TXQ = 1
EVENTQ = 2
#: cloud-hypervisor's vsock queue size
VSOCK_QUEUE_SIZE = 256
#: control packets waiting for receive buffers; beyond this, transmit processing waits
MAX_PENDING_CONTROL = 1024
#: packets moved from one host stream per readable event before giving others a turn
_RX_BURST = 16


@dataclass(frozen=True, slots=True)
class VirtioVsockState:
    """Plain-data state of a ``VirtioVsock``: the CID and counters (connections do not survive)."""

    cid: U64 = 0
    rx_bytes: U64 = 0
    tx_bytes: U64 = 0
    host_connections: U64 = 0
    guest_connections: U64 = 0
    resets_sent: U64 = 0
    dropped_packets: U64 = 0


class VirtioVsock(VirtioDevice):
    """A vsock device bridging guest stream sockets to host unix sockets.

    :param cid: the guest's context id.
    :param socket_path: the host unix socket to listen on (``--vsock socket=``).
    :param watcher: the engine's I/O loop (``add(fd, callback)`` / ``remove(fd)``).
    :param max_connections: most connections at once (host- and guest-initiated).
    :raises DeviceError: for a reserved CID, or if the socket cannot be created.

    Example::

        vsock = VirtioVsock.from_config(VsockConfig(cid=3, socket="/tmp/vm.vsock"), io_loop)
        # host:  socat - UNIX-CONNECT:/tmp/vm.vsock  then type  CONNECT 1234
    """

    device_type = VIRTIO_ID_VSOCK
    state_type = VirtioVsockState

    def __init__(self, cid: int, socket_path: str, watcher: FdWatcher, *, max_connections: int = MAX_CONNECTIONS,
                 queue_size: int = VSOCK_QUEUE_SIZE) -> None:
        if not 2 < cid < U32_MASK or max_connections < 1:
            raise DeviceError(f"{cid} is a special VSOCK CID" if max_connections >= 1
                              else "no vsock connections allowed")
        self.queue_max_sizes = (queue_size, queue_size, queue_size)
        super().__init__()
        self.cid = cid
        self.socket_path = socket_path
        self.watcher = watcher
        self.max_connections = max_connections
        #: taken by queue processing and by every host event (through ``_run``)
        self._lock = threading.RLock()
        self._running = False
        self._rx_stalled = False
        self._tx_throttled = False
        self._reset_event = False
        self._counts = {"rx_bytes": 0, "tx_bytes": 0, "host_connections": 0, "guest_connections": 0,
                        "resets_sent": 0, "dropped_packets": 0}
        self.mux = VsockMuxer(cid, socket_path, watcher, max_connections=max_connections, run=self._run,
                              can_receive=lambda: self._running and not self._rx_stalled,
                              on_readable=self._host_readable, counts=self._counts)

    @classmethod
    def from_config(cls, config: VsockConfig, watcher: FdWatcher) -> VirtioVsock:
        """A vsock device from ``--vsock`` keys (cid, socket)."""
        return cls(config.cid, config.socket, watcher)

    def config_bytes(self) -> bytes:
        """struct virtio_vsock_config (§5.10.4): le64 guest_cid."""
        return struct.pack("<Q", self.cid)

    # -- lifecycle -------------------------------------------------------------------------

    def on_activate(self) -> None:
        with self._lock:
            self._running = True
            self._rx_stalled = self._tx_throttled = False
            self.mux.start()
            try:
                self._send_reset_event()
            except (VirtQueueError, GuestMemoryError) as err:
                self.needs_reset = True
                LOG.warning("virtio-vsock: %s", err)

    def on_reset(self) -> None:
        with self._lock:
            self._running = False
            self.mux.stop()

    def close(self) -> None:
        super().close()
        with self._lock:
            self.mux.close()

    # -- queues ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == TXQ:
            self._process_tx(queue)
            return
        resume_tx = False
        with self._lock:
            if not self._running:
                return
            if index == EVENTQ:
                self._send_reset_event()
                return
            # New receive buffers: deliver what waits and watch the host streams again.
            self._rx_stalled = False
            self._deliver_control()
            self.mux.rearm_all()
            resume_tx = self._tx_throttled and not self.mux.control
        if resume_tx:
            self._tx_throttled = False
            self.queue_notify(TXQ)

    def _send_reset_event(self) -> None:
        if not self._reset_event or len(self.queues) <= EVENTQ or not self.queues[EVENTQ].ready:
            return
        queue = self.queues[EVENTQ]
        chain = queue.pop()
        if chain is None:
            return  # when the driver adds an event buffer
        written = chain.write(struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
        queue.add_used(chain.head, written)
        self._reset_event = False
        self.signal_used(EVENTQ)

    def _process_tx(self, queue: VirtQueue) -> None:
        used = False
        with self._lock:
            if not self._running:
                return
            self.mux.sweep()
            while True:
                if len(self.mux.control) >= MAX_PENDING_CONTROL:
                    self._tx_throttled = True  # until the guest takes what waits for it
                    break
                chain = queue.pop()
                if chain is None:
                    break
                self._handle_tx(chain)
                queue.add_used(chain.head, 0)
                used = True
            self._deliver_control()
        if used:
            self.signal_used(TXQ)

    def _handle_tx(self, chain: DescriptorChain) -> None:
        """Check one packet from the guest against its chain, then hand it to the multiplexer."""
        if chain.readable_len < HDR_SIZE:
            self._counts["dropped_packets"] += 1
            return
        hdr = PacketHeader.decode(chain.read(0, HDR_SIZE))
        if hdr.src_cid != self.cid or hdr.dst_cid != VSOCK_HOST_CID:
            # Not ours to route (cloud-hypervisor drops packets for other CIDs).
            self._counts["dropped_packets"] += 1
            return
        conn = self.mux.conns.get((hdr.dst_port, hdr.src_port))
        if hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            self.mux.reset(hdr.dst_port, hdr.src_port, conn)
            return
        if hdr.length > MAX_PKT_PAYLOAD or hdr.length > chain.readable_len - HDR_SIZE:
            LOG.debug("virtio-vsock: packet length %d with %d bytes", hdr.length, chain.readable_len - HDR_SIZE)
            self._counts["dropped_packets"] += 1
            self.mux.reset(hdr.dst_port, hdr.src_port, conn)
            return
        self.mux.from_guest(hdr, chain)

    # -- host events -----------------------------------------------------------------------

    def _run(self, work: Callable[[], None]) -> None:
        """Run ``work`` for a watcher callback, then deliver; never raises into the I/O loop."""
        resume_tx = False
        with self._lock:
            if not self._running or self.needs_reset:
                return
            try:
                self.mux.sweep()
                work()
                self._deliver_control()
            except (VirtQueueError, GuestMemoryError) as err:
                self.fail(err)
                return
            resume_tx = self._tx_throttled and not self.mux.control
        if resume_tx:
            self._tx_throttled = False
            self.queue_notify(TXQ)

    def _host_readable(self, key: tuple[int, int]) -> None:
        """Read a host stream into receive buffers, as far as buffers and the guest's credit go."""
        conn = self.mux.conns.get(key)
        if conn is None or conn.state != ESTABLISHED:
            return
        queue = self.queues[RXQ]
        for _ in range(_RX_BURST):
            self._deliver_control()
            if self.mux.control or not queue.ready:
                self._rx_stalled = True
                break
            credit = conn.peer_credit()
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self.mux.control.append((conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0))
                break
            chain = queue.pop()
            if chain is None:
                self._rx_stalled = True
                break
            if chain.writable_len <= HDR_SIZE:
                queue.add_used(chain.head, 0)  # a useless buffer: give it back
                self.signal_used(RXQ)
                continue
            n = min(chain.writable_len - HDR_SIZE, credit, MAX_PKT_PAYLOAD)
            try:
                got = os.readv(conn.fd, chain.writable_views(HDR_SIZE, n))
            except BlockingIOError:
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF
                break
            except OSError as err:
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF
                LOG.debug("virtio-vsock: host stream of port %d: %s", conn.local_port, err)
                self.mux.reset(conn.local_port, conn.peer_port, conn)
                return
            if got == 0:
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF
                self.mux.host_closed(conn)
                break
            chain.write(self.mux.header(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RW, 0, got))
            queue.add_used(chain.head, HDR_SIZE + got)
            conn.sent_to_guest(got)
            self._counts["rx_bytes"] += got
            self.signal_used(RXQ)
            if got < n:
                break  # drained for now
        if self._rx_stalled:
            self.mux.rearm_all()
        elif key in self.mux.conns:
            self.mux.update_arm(conn)

    def _deliver_control(self) -> None:
        """Move waiting control packets into receive buffers (with the lock held)."""
        control = self.mux.control
        if not control or len(self.queues) <= RXQ or not self.queues[RXQ].ready:
            return
        queue = self.queues[RXQ]
        used = False
        while control:
            chain = queue.pop()
            if chain is None:
                self._rx_stalled = True
                self.mux.rearm_all()
                break
            if chain.writable_len < HDR_SIZE:
                queue.add_used(chain.head, 0)
                used = True
                continue
            local_port, peer_port, op, flags = control.popleft()
            queue.add_used(chain.head, chain.write(self.mux.header(local_port, peer_port, op, flags)))
            used = True
        if used:
            self.signal_used(RXQ)

    # -- snapshot and counters ---------------------------------------------------------------

    def state(self) -> VirtioVsockState:
        return VirtioVsockState(cid=self.cid, **self._counts)

    def restore(self, state: VirtioVsockState) -> None:
        """Load counters; connections are gone, so the guest gets a transport reset event.

        :raises DeviceStateError: for another state class, another CID than the device's,
            or a counter beyond 64 bits.
        """
        s = expect_state(state, VirtioVsockState)
        if s.cid != self.cid:
            raise DeviceStateError("cid", f"{s.cid} is not this device's CID {self.cid}")
        for key in self._counts:
            self._counts[key] = getattr(s, key)
        self._reset_event = True

    def counters(self) -> dict[str, int]:
        return {**self._counts, "connections": len(self.mux.conns)}
