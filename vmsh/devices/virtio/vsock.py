"""virtio-vsock (virtio 1.2 §5.10) with cloud-hypervisor's unix-socket backend.

Guest sockets (AF_VSOCK, stream) are connected to host unix sockets, as cloud-hypervisor's muxer
does (virtio-devices/src/vsock/unix/muxer.rs, after Firecracker's):

- **host to guest**: a host program connects to the unix socket at ``socket=`` (the device
  listens there; a stale socket file is replaced) and writes ``CONNECT <port>\\n`` (or
  ``connect``). The device allocates a host port (from 2^30 up), sends the guest an OP_REQUEST
  to ``<port>``, and when the guest answers OP_RESPONSE writes ``OK <hostport>\\n`` to the host
  program; from then on the stream carries the data. If the guest refuses (OP_RST) the host
  stream is closed.
- **guest to host**: a guest connecting to host port P (CID 2) is connected to the unix
  socket ``<socket>_<P>``; if nobody listens there the guest gets OP_RST.

Queues: 0 rx (device to guest), 1 tx (guest to device), 2 event. Every packet starts with the
44-byte ``virtio_vsock_hdr`` (§5.10.6)::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

Flow control (§5.10.6.3): each side advertises ``buf_alloc`` (its receive buffer) and
``fwd_cnt`` (bytes it has consumed); a sender keeps ``tx_cnt - peer_fwd_cnt <= peer_buf_alloc``.
The device advertises ``CONN_TX_BUF_SIZE`` per connection and buffers what the host stream does
not take at once; a guest that sends beyond its credit has its connection reset. Towards the
guest, data is read from the host stream straight into the guest's receive buffers
(``os.readv``), never more than the guest's credit allows.

Host fds are watched through the injected ``watcher`` (the engine's I/O loop, level-triggered,
readable only): the listening socket, host streams still sending their ``CONNECT`` line, and
connected streams only while the guest has receive buffers and credit - so a guest that stops
reading costs nothing. Writability of streams with buffered data is watched through a nested
epoll whose own fd goes to the watcher (cloud-hypervisor's trick).

A hostile guest is bounded: at most ``max_connections`` connections, ``CONN_TX_BUF_SIZE``
buffered bytes each, ``MAX_PKT_PAYLOAD`` per packet, and a bounded queue of control packets
(when it is full, transmit processing waits for the guest to take them). Malformed packets
are dropped or answered with OP_RST; a malformed ring puts the device into DEVICE_NEEDS_RESET.

Host sockets cannot be snapshotted: a restored device has no connections and sends the guest a
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, after which the guest's connected sockets fail.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vmsh.config.model import VsockConfig
from vmsh.devices.state import U64, expect_state
from vmsh.devices.virtio.device import VirtioDevice
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue
from vmsh.errors import DeviceError, DeviceStateError, GuestMemoryError, VirtQueueError

LOG = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19

RXQ = 0
TXQ = 1
EVENTQ = 2
#: cloud-hypervisor's vsock queue size
VSOCK_QUEUE_SIZE = 256

#: struct virtio_vsock_hdr (§5.10.6)
_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size  # 44

# Operations (§5.10.6)
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
VIRTIO_VSOCK_TYPE_STREAM = 1
# SHUTDOWN flags (§5.10.6.5): the sender will receive / send no more
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
# Event queue (§5.10.6.6)
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

VSOCK_HOST_CID = 2
#: receive buffer advertised for each connection: the most guest data buffered per connection
CONN_TX_BUF_SIZE = 256 << 10
#: send a CREDIT_UPDATE once this much was forwarded since the guest last heard our fwd_cnt
CREDIT_UPDATE_THRESHOLD = CONN_TX_BUF_SIZE // 2
#: the largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PKT_PAYLOAD = 64 << 10
#: cloud-hypervisor's connection limit (defs::MAX_CONNECTIONS)
MAX_CONNECTIONS = 1023
#: control packets waiting for receive buffers; beyond this, transmit processing waits
MAX_PENDING_CONTROL = 1024
#: longest ``CONNECT <port>\\n`` line read from a host stream
MAX_COMMAND = 32
#: a connection the guest does not answer (REQUEST) or close (after SHUTDOWN) within this is reset
CONN_TIMEOUT = 2.0
#: host-side ports of host-initiated connections have bit 30 set (cloud-hypervisor)
_LOCAL_PORT_BIT = 1 << 30
#: packets moved from one host stream per readable event before giving others a turn
_RX_BURST = 16

_U32 = 0xFFFF_FFFF


class FdWatcher(Protocol):
    """The engine's I/O loop: call ``callback`` whenever ``fd`` is readable."""

    def add(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


# Connection states
LOCAL_INIT = "local-init"  # host connected, REQUEST sent to the guest, no answer yet
ESTABLISHED = "established"
CLOSING = "closing"  # SHUTDOWN sent to the guest after the host closed; waiting for its RST


@dataclass(eq=False)
class _Conn:
    """One guest-host stream."""

    sock: socket.socket
    local_port: int  # the host side's port
    peer_port: int  # the guest side's port
    state: str
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    rx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # guest bytes written to the host stream
    last_fwd_sent: int = 0  # fwd_cnt as the guest last heard it
    txbuf: bytearray = field(default_factory=bytearray)
    armed: bool = False  # host stream watched for reading
    want_write: bool = False  # registered in the writability epoll
    guest_shut_rcv: bool = False  # the guest will receive no more
    guest_shut_send: bool = False  # the guest will send no more: SHUT_WR once txbuf drains
    credit_requested: bool = False
    credit_update_queued: bool = False
    deadline: float | None = None

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def peer_credit(self) -> int:
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)


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
        if not 2 < cid < _U32 or max_connections < 1:
            raise DeviceError(f"{cid} is a special VSOCK CID" if max_connections >= 1 else "no vsock connections allowed")
        self.queue_max_sizes = (queue_size, queue_size, queue_size)
        super().__init__()
        self.cid = cid
        self.socket_path = socket_path
        self.watcher = watcher
        self.max_connections = max_connections
        self.listener = self._listen(socket_path)
        self._mux = threading.RLock()
        self._running = False
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._by_fd: dict[int, _Conn] = {}
        #: host streams still sending their CONNECT line: fd -> (socket, bytes so far)
        self._pending: dict[int, tuple[socket.socket, bytearray]] = {}
        #: packets for the guest without payload: (local_port, peer_port, op, flags)
        self._control: collections.deque[tuple[int, int, int, int]] = collections.deque()
        self._rx_stalled = False
        self._tx_throttled = False
        self._listening = False
        self._wepoll = select.epoll()
        self._wepoll_armed = False
        self._local_port_last = _LOCAL_PORT_BIT - 1
        self._reset_event = False
        self._counts = {"rx_bytes": 0, "tx_bytes": 0, "host_connections": 0, "guest_connections": 0,
                        "resets_sent": 0, "dropped_packets": 0}

    @classmethod
    def from_config(cls, config: VsockConfig, watcher: FdWatcher) -> VirtioVsock:
        """A vsock device from ``--vsock`` keys (cid, socket)."""
        return cls(config.cid, config.socket, watcher)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise DeviceError(f"cannot use vsock socket {path}") from err
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise DeviceError(f"vsock socket {path} exists and is not a socket")
            os.unlink(path)  # stale, from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise DeviceError(f"cannot listen on vsock socket {path}") from err
        return sock

    def config_bytes(self) -> bytes:
        """struct virtio_vsock_config (§5.10.4): le64 guest_cid."""
        return struct.pack("<Q", self.cid)

    # -- lifecycle -------------------------------------------------------------------------

    def on_activate(self) -> None:
        with self._mux:
            self._running = True
            self._rx_stalled = self._tx_throttled = False
            if not self._listening:
                self.watcher.add(self.listener.fileno(), self._on_listener)
                self._listening = True
            try:
                self._send_reset_event()
            except (VirtQueueError, GuestMemoryError) as err:
                self.needs_reset = True
                LOG.warning("virtio-vsock: %s", err)

    def on_reset(self) -> None:
        with self._mux:
            self._running = False
            if self._listening:
                self.watcher.remove(self.listener.fileno())
                self._listening = False
            for conn in list(self._conns.values()):
                self._drop(conn)
            for fd, (sock, _) in list(self._pending.items()):
                self.watcher.remove(fd)
                sock.close()
            self._pending.clear()
            self._control.clear()
            if self._wepoll_armed:
                self.watcher.remove(self._wepoll.fileno())
                self._wepoll_armed = False

    def close(self) -> None:
        super().close()
        with self._mux:
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except OSError:
                pass
            self.listener.close()
            self._wepoll.close()

    # -- queues ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == TXQ:
            self._process_tx(queue)
            return
        resume_tx = False
        with self._mux:
            if not self._running:
                return
            if index == EVENTQ:
                self._send_reset_event()
                return
            # New receive buffers: deliver what waits and watch the host streams again.
            self._rx_stalled = False
            self._deliver_control()
            self._rearm_all()
            resume_tx = self._tx_throttled and not self._control
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
        with self._mux:
            if not self._running:
                return
            self._sweep()
            while True:
                if len(self._control) >= MAX_PENDING_CONTROL:
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
        if chain.readable_len < HDR_SIZE:
            self._counts["dropped_packets"] += 1
            return
        (src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc,
         fwd_cnt) = _HDR.unpack(chain.read(0, HDR_SIZE))
        key = (dst_port, src_port)
        conn = self._conns.get(key)
        if src_cid != self.cid or dst_cid != VSOCK_HOST_CID:
            # Not ours to route (cloud-hypervisor drops packets for other CIDs).
            self._counts["dropped_packets"] += 1
            return
        if ptype != VIRTIO_VSOCK_TYPE_STREAM:
            self._reset(dst_port, src_port, conn)
            return
        if length > MAX_PKT_PAYLOAD or length > chain.readable_len - HDR_SIZE:
            LOG.debug("virtio-vsock: packet length %d with %d bytes", length, chain.readable_len - HDR_SIZE)
            self._counts["dropped_packets"] += 1
            self._reset(dst_port, src_port, conn)
            return
        if conn is None:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != VIRTIO_VSOCK_OP_RST:  # never answer an RST with one
                self._reset(dst_port, src_port, None)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == VIRTIO_VSOCK_OP_RST:
            self._drop(conn)
        elif op == VIRTIO_VSOCK_OP_RESPONSE and conn.state == LOCAL_INIT:
            self._established(conn)
        elif op == VIRTIO_VSOCK_OP_RW and conn.state == ESTABLISHED and not conn.guest_shut_send:
            self._forward(conn, chain, length)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and conn.state != LOCAL_INIT:
            conn.credit_requested = False
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST and conn.state != LOCAL_INIT:
            self._credit_update(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN and conn.state != LOCAL_INIT:
            self._guest_shutdown(conn, flags)
        elif op == VIRTIO_VSOCK_OP_RW and conn.state == CLOSING:
            pass  # the host end is gone; the guest will see our SHUTDOWN
        else:
            # Unknown op, or one that makes no sense in this state (§5.10.6.4): reset.
            self._reset(dst_port, src_port, conn)
            return
        if conn.sock.fileno() >= 0:
            self._update_arm(conn)

    # -- connections -----------------------------------------------------------------------

    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self._conns) + len(self._pending) >= self.max_connections:
            LOG.info("virtio-vsock: connection limit reached; refusing guest connection to %d", local_port)
            self._reset(local_port, peer_port, None)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(f"{self.socket_path}_{local_port}")
        except OSError as err:
            LOG.debug("virtio-vsock: guest connection to port %d: %s", local_port, err)
            sock.close()
            self._reset(local_port, peer_port, None)
            return
        conn = _Conn(sock, local_port, peer_port, ESTABLISHED, peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self._add(conn)
        self._counts["guest_connections"] += 1
        self._control.append((local_port, peer_port, VIRTIO_VSOCK_OP_RESPONSE, 0))
        self._update_arm(conn)

    def _add(self, conn: _Conn) -> None:
        self._conns[(conn.local_port, conn.peer_port)] = conn
        self._by_fd[conn.fd] = conn

    def _established(self, conn: _Conn) -> None:
        conn.state = ESTABLISHED
        conn.deadline = None
        msg = f"OK {conn.local_port}\n".encode()
        try:
            sent = conn.sock.send(msg)
        except OSError as err:
            LOG.debug("virtio-vsock: cannot acknowledge host connection: %s", err)
            sent = -1
        if sent != len(msg):
            self._reset(conn.local_port, conn.peer_port, conn)

    def _reset(self, local_port: int, peer_port: int, conn: _Conn | None) -> None:
        """Answer with OP_RST and forget the connection."""
        if conn is not None:
            self._drop(conn)
        self._control.append((local_port, peer_port, VIRTIO_VSOCK_OP_RST, 0))
        self._counts["resets_sent"] += 1

    def _drop(self, conn: _Conn) -> None:
        """Forget ``conn`` and close its host stream (the host end sees EOF)."""
        self._conns.pop((conn.local_port, conn.peer_port), None)
        if conn.sock.fileno() < 0:
            return
        self._by_fd.pop(conn.fd, None)
        if conn.armed:
            self.watcher.remove(conn.fd)
            conn.armed = False
        if conn.want_write:
            self._unwatch_write(conn)
        conn.sock.close()

    def _guest_shutdown(self, conn: _Conn, flags: int) -> None:
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV and flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            # Both ways closed: cloud-hypervisor resets the connection.
            self._reset(conn.local_port, conn.peer_port, conn)
            return
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
            conn.guest_shut_rcv = True
        if flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            conn.guest_shut_send = True
            if not conn.txbuf:
                self._shut_wr(conn)

    @staticmethod
    def _shut_wr(conn: _Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _sweep(self) -> None:
        """Reset connections the guest left hanging past their deadline."""
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline is not None and c.deadline <= now]:
            self._reset(conn.local_port, conn.peer_port, conn)

    # -- guest to host ---------------------------------------------------------------------

    def _forward(self, conn: _Conn, chain: DescriptorChain, length: int) -> None:
        if not length:
            return
        if len(conn.txbuf) + length > CONN_TX_BUF_SIZE:
            LOG.debug("virtio-vsock: guest port %d sent beyond its credit", conn.peer_port)
            self._reset(conn.local_port, conn.peer_port, conn)
            return
        self._counts["tx_bytes"] += length
        views = chain.readable_views(HDR_SIZE, length)
        written = 0
        if not conn.txbuf:
            try:
                written = os.writev(conn.fd, views)
            except BlockingIOError:
                written = 0
            except OSError as err:
                LOG.debug("virtio-vsock: host stream of port %d: %s", conn.local_port, err)
                self._reset(conn.local_port, conn.peer_port, conn)
                return
        if written < length:
            pos = 0
            for v in views:
                n = len(v)
                if pos + n > written:
                    conn.txbuf += v[max(0, written - pos):]
                pos += n
            self._watch_write(conn)
        self._forwarded(conn, written)

    def _forwarded(self, conn: _Conn, n: int) -> None:
        conn.fwd_cnt = (conn.fwd_cnt + n) & _U32
        if ((conn.fwd_cnt - conn.last_fwd_sent) & _U32) >= CREDIT_UPDATE_THRESHOLD:
            self._credit_update(conn)

    def _credit_update(self, conn: _Conn) -> None:
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self._control.append((conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0))

    def _watch_write(self, conn: _Conn) -> None:
        if not conn.want_write:
            self._wepoll.register(conn.fd, select.EPOLLOUT)
            conn.want_write = True
        if not self._wepoll_armed:
            self.watcher.add(self._wepoll.fileno(), self._on_writable)
            self._wepoll_armed = True

    def _unwatch_write(self, conn: _Conn) -> None:
        if conn.want_write:
            try:
                self._wepoll.unregister(conn.fd)
            except OSError:
                pass
            conn.want_write = False
        if self._wepoll_armed and not any(c.want_write for c in self._conns.values()):
            self.watcher.remove(self._wepoll.fileno())
            self._wepoll_armed = False

    def _on_writable(self) -> None:
        """Host streams with buffered guest data can take more (I/O thread)."""
        self._callback(self._flush_writable)

    def _flush_writable(self) -> None:
        for fd, _ in self._wepoll.poll(0):
            conn = self._by_fd.get(fd)
            if conn is None:
                continue
            try:
                n = conn.sock.send(conn.txbuf)
            except BlockingIOError:
                continue
            except OSError:
                self._reset(conn.local_port, conn.peer_port, conn)
                continue
            del conn.txbuf[:n]
            self._forwarded(conn, n)
            if not conn.txbuf:
                self._unwatch_write(conn)
                if conn.guest_shut_send:
                    self._shut_wr(conn)
        if not any(c.want_write for c in self._conns.values()) and self._wepoll_armed:
            self.watcher.remove(self._wepoll.fileno())
            self._wepoll_armed = False

    # -- host to guest ---------------------------------------------------------------------

    def _callback(self, work: Callable[[], None]) -> None:
        """Run ``work`` for a watcher callback, then deliver; never raises into the I/O loop."""
        resume_tx = False
        with self._mux:
            if not self._running or self.needs_reset:
                return
            try:
                self._sweep()
                work()
                self._deliver_control()
            except (VirtQueueError, GuestMemoryError) as err:
                self.fail(err)
                return
            resume_tx = self._tx_throttled and not self._control
        if resume_tx:
            self._tx_throttled = False
            self.queue_notify(TXQ)

    def _on_listener(self) -> None:
        self._callback(self._accept)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                LOG.warning("virtio-vsock: accept on %s: %s", self.socket_path, err)
                return
            if len(self._conns) + len(self._pending) >= self.max_connections:
                LOG.warning("virtio-vsock: connection limit reached; refusing new host connection")
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._pending[fd] = (sock, bytearray())
            self.watcher.add(fd, functools.partial(self._on_command, fd))

    def _on_command(self, fd: int) -> None:
        self._callback(functools.partial(self._read_command, fd))

    def _read_command(self, fd: int) -> None:
        entry = self._pending.get(fd)
        if entry is None:
            return
        sock, buf = entry
        try:
            # Peek, then take exactly the line: bytes after the newline are the stream's data.
            data = sock.recv(MAX_COMMAND - len(buf), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        end = data.find(b"\n")
        if end >= 0:
            data = data[:end + 1]
        if data:
            sock.recv(len(data))
            buf += data
        port = _parse_connect(buf) if data else None
        if port is None and data and not buf.endswith(b"\n") and len(buf) < MAX_COMMAND:
            return  # wait for the rest of the line
        del self._pending[fd]
        self.watcher.remove(fd)
        if port is None or len(self._conns) >= self.max_connections:
            LOG.debug("virtio-vsock: bad host command %r", bytes(buf))
            sock.close()
            return
        local_port = self._allocate_port()
        conn = _Conn(sock, local_port, port, LOCAL_INIT, deadline=time.monotonic() + CONN_TIMEOUT)
        self._add(conn)
        self._counts["host_connections"] += 1
        self._control.append((local_port, port, VIRTIO_VSOCK_OP_REQUEST, 0))

    def _allocate_port(self) -> int:
        used = {c.local_port for c in self._conns.values()}
        while True:
            self._local_port_last = ((self._local_port_last + 1) & ~(1 << 31)) | _LOCAL_PORT_BIT
            if self._local_port_last not in used:
                return self._local_port_last

    def _update_arm(self, conn: _Conn) -> None:
        want = (self._running and not self._rx_stalled and conn.state == ESTABLISHED and not conn.guest_shut_rcv
                and conn.peer_credit() > 0)
        if want and not conn.armed:
            conn.armed = True
            key = (conn.local_port, conn.peer_port)
            self.watcher.add(conn.fd, functools.partial(self._on_host_readable, key))
        elif conn.armed and not want:
            conn.armed = False
            self.watcher.remove(conn.fd)

    def _rearm_all(self) -> None:
        for conn in list(self._conns.values()):
            self._update_arm(conn)

    def _on_host_readable(self, key: tuple[int, int]) -> None:
        self._callback(functools.partial(self._host_readable, key))

    def _host_readable(self, key: tuple[int, int]) -> None:
        conn = self._conns.get(key)
        if conn is None or conn.state != ESTABLISHED:
            return
        queue = self.queues[RXQ]
        for _ in range(_RX_BURST):
            self._deliver_control()
            if self._control or not queue.ready:
                self._rx_stalled = True
                break
            credit = conn.peer_credit()
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self._control.append((conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0))
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
                self._reset(conn.local_port, conn.peer_port, conn)
                return
            if got == 0:
                # The host closed its end: tell the guest, and wait (bounded) for its RST.
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF
                conn.state = CLOSING
                conn.deadline = time.monotonic() + CONN_TIMEOUT
                self._control.append((conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_SHUTDOWN,
                                      VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND))
                break
            chain.write(self._header(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RW, 0, got))
            queue.add_used(chain.head, HDR_SIZE + got)
            conn.rx_cnt = (conn.rx_cnt + got) & _U32
            self._counts["rx_bytes"] += got
            self.signal_used(RXQ)
            if got < n:
                break  # drained for now
        if self._rx_stalled:
            self._rearm_all()
        elif key in self._conns:
            self._update_arm(conn)

    def _header(self, local_port: int, peer_port: int, op: int, flags: int, length: int = 0) -> bytes:
        conn = self._conns.get((local_port, peer_port))
        buf_alloc = fwd_cnt = 0
        if conn is not None and op != VIRTIO_VSOCK_OP_RST:
            buf_alloc, fwd_cnt = CONN_TX_BUF_SIZE, conn.fwd_cnt
            conn.last_fwd_sent = fwd_cnt
            conn.credit_update_queued = False
        return _HDR.pack(VSOCK_HOST_CID, self.cid, local_port, peer_port, length, VIRTIO_VSOCK_TYPE_STREAM, op,
                         flags, buf_alloc, fwd_cnt)

    def _deliver_control(self) -> None:
        """Move waiting control packets into receive buffers (with ``_mux`` held)."""
        if not self._control or len(self.queues) <= RXQ or not self.queues[RXQ].ready:
            return
        queue = self.queues[RXQ]
        used = False
        while self._control:
            chain = queue.pop()
            if chain is None:
                self._rx_stalled = True
                self._rearm_all()
                break
            if chain.writable_len < HDR_SIZE:
                queue.add_used(chain.head, 0)
                used = True
                continue
            local_port, peer_port, op, flags = self._control.popleft()
            queue.add_used(chain.head, chain.write(self._header(local_port, peer_port, op, flags)))
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
        return {**self._counts, "connections": len(self._conns)}


def _parse_connect(line: bytes | bytearray) -> int | None:
    """The port of a ``CONNECT <port>\\n`` (or ``connect``) line, or None if it is not one."""
    if not line.endswith(b"\n") or not line.startswith((b"CONNECT ", b"connect ")):
        return None
    try:
        port = int(line[8:-1].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return port if 0 <= port <= _U32 else None
