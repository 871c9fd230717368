"""The host side of virtio-vsock: cloud-hypervisor's unix-socket multiplexer.

As cloud-hypervisor's muxer (virtio-devices/src/vsock/unix/muxer.rs, after Firecracker's):

- **host to guest**: a host program connects to the unix socket at ``socket=`` (a stale socket
  file is replaced) and writes ``CONNECT <port>\\n`` (or ``connect``). A host port is allocated
  (from 2^30 up), the guest gets an OP_REQUEST to ``<port>``, and when it answers OP_RESPONSE
  the host program reads ``OK <hostport>\\n``; from then on the stream carries the data. If the
  guest refuses (OP_RST) the host stream is closed.
- **guest to host**: a guest connecting to host port P (CID 2) is connected to the unix socket
  ``<socket>_<P>``; if nobody listens there the guest gets OP_RST.

:class:`VsockMuxer` owns the listening socket, the host streams still sending their
``CONNECT`` line, the connection table, the packets without payload that wait for the guest
(``control``), and the writability of host streams with buffered guest data (a nested epoll
whose own fd goes to the watcher, cloud-hypervisor's trick). It routes the guest's packets to
their connection and runs each stream's state machine. It is not thread-safe by itself: the
device calls it with its lock held, and host events reach it through the device's ``run``,
which takes that lock and delivers what waits afterwards.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import Protocol

from vmsh.devices.virtio.queue import DescriptorChain
from vmsh.devices.virtio.vsock.connection import (
    CLOSING,
    CONN_TIMEOUT,
    CONN_TX_BUF_SIZE,
    ESTABLISHED,
    LOCAL_INIT,
    U32_MASK,
    Connection,
)
from vmsh.devices.virtio.vsock.packet import (
    HDR_SIZE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    PacketHeader,
    host_header,
)
from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

#: cloud-hypervisor's connection limit (defs::MAX_CONNECTIONS)
MAX_CONNECTIONS = 1023
#: longest ``CONNECT <port>\\n`` line read from a host stream
MAX_COMMAND = 32
#: host-side ports of host-initiated connections have bit 30 set (cloud-hypervisor)
_LOCAL_PORT_BIT = 1 << 30

#: a packet without payload for the guest: (local_port, peer_port, op, flags)
Control = tuple[int, int, int, int]


class FdWatcher(Protocol):
    """The engine's I/O loop: call ``callback`` whenever ``fd`` is readable."""

    def add(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


def listen(path: str) -> socket.socket:
    """A non-blocking unix stream socket listening at ``path`` (a stale socket there is replaced).

    :raises DeviceError: if ``path`` is something else than a socket, or cannot be bound.
    """
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


def parse_connect(line: bytes | bytearray) -> int | None:
    """The port of a ``CONNECT <port>\\n`` (or ``connect``) line, or None if it is not one."""
    if not line.endswith(b"\n") or not line.startswith((b"CONNECT ", b"connect ")):
        return None
    try:
        port = int(line[8:-1].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return port if 0 <= port <= U32_MASK else None


class VsockMuxer:
    """Host unix sockets on one side, the guest's stream packets on the other.

    :param cid: the guest's CID (for the headers of packets to it).
    :param run: how a host event is handled: ``run(work)`` calls ``work`` with the device's
        lock held and then delivers what waits for the guest.
    :param can_receive: whether the guest takes data now (device running, receive buffers).
    :param on_readable: reads a readable host stream (by connection key) into the guest.
    :param counts: the device's counters, updated in place (connections, resets).
    """

    def __init__(self, cid: int, socket_path: str, watcher: FdWatcher, *, max_connections: int,
                 run: Callable[[Callable[[], None]], None], can_receive: Callable[[], bool],
                 on_readable: Callable[[tuple[int, int]], None], counts: dict[str, int]) -> None:
        self.cid = cid
        self.socket_path = socket_path
        self.watcher = watcher
        self.max_connections = max_connections
        self.run = run
        self.can_receive = can_receive
        self.on_readable = on_readable
        self.counts = counts
        self.listener = listen(socket_path)
        #: the socket file this listener made: a later VMM (a migration's destination) may have
        #: replaced it by its own, which :meth:`close` must leave in place
        self._socket_file = _file_id(socket_path)
        self.conns: dict[tuple[int, int], Connection] = {}
        self._by_fd: dict[int, Connection] = {}
        #: host streams still sending their CONNECT line: fd -> (socket, bytes so far)
        self._pending: dict[int, tuple[socket.socket, bytearray]] = {}
        #: packets for the guest without payload, oldest first
        self.control: collections.deque[Control] = collections.deque()
        self._listening = False
        self._wepoll = select.epoll()
        self._wepoll_armed = False
        self._local_port_last = _LOCAL_PORT_BIT - 1

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Accept host connections."""
        if not self._listening:
            self.watcher.add(self.listener.fileno(), lambda: self.run(self._accept))
            self._listening = True

    def stop(self) -> None:
        """Stop accepting, close every host stream and forget what waits for the guest."""
        if self._listening:
            self.watcher.remove(self.listener.fileno())
            self._listening = False
        for conn in list(self.conns.values()):
            self.drop(conn)
        for fd, (sock, _) in list(self._pending.items()):
            self.watcher.remove(fd)
            sock.close()
        self._pending.clear()
        self.control.clear()
        if self._wepoll_armed:
            self.watcher.remove(self._wepoll.fileno())
            self._wepoll_armed = False

    def close(self) -> None:
        """Remove the socket file and release the listener (after :meth:`stop`)."""
        if self._socket_file is not None and _file_id(self.socket_path) == self._socket_file:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        self.listener.close()
        self._wepoll.close()

    # -- packets from the guest ------------------------------------------------------------

    def from_guest(self, hdr: PacketHeader, chain: DescriptorChain) -> None:
        """Route a checked stream packet (its payload follows the header in ``chain``)."""
        key = (hdr.dst_port, hdr.src_port)
        conn = self.conns.get(key)
        if conn is None:
            if hdr.op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(hdr.dst_port, hdr.src_port, hdr.buf_alloc, hdr.fwd_cnt)
            elif hdr.op != VIRTIO_VSOCK_OP_RST:  # never answer an RST with one
                self.reset(hdr.dst_port, hdr.src_port, None)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        op = hdr.op
        if op == VIRTIO_VSOCK_OP_RST:
            self.drop(conn)
        elif op == VIRTIO_VSOCK_OP_RESPONSE and conn.state == LOCAL_INIT:
            self._established(conn)
        elif op == VIRTIO_VSOCK_OP_RW and conn.state == ESTABLISHED and not conn.guest_shut_send:
            self._forward(conn, chain, hdr.length)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and conn.state != LOCAL_INIT:
            conn.credit_requested = False
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST and conn.state != LOCAL_INIT:
            self.credit_update(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN and conn.state != LOCAL_INIT:
            self._guest_shutdown(conn, hdr.flags)
        elif op == VIRTIO_VSOCK_OP_RW and conn.state == CLOSING:
            pass  # the host end is gone; the guest will see our SHUTDOWN
        else:
            # Unknown op, or one that makes no sense in this state (§5.10.6.4): reset.
            self.reset(hdr.dst_port, hdr.src_port, conn)
            return
        if conn.sock.fileno() >= 0:
            self.update_arm(conn)

    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self.conns) + len(self._pending) >= self.max_connections:
            LOG.info("virtio-vsock: connection limit reached; refusing guest connection to %d", local_port)
            self.reset(local_port, peer_port, None)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(f"{self.socket_path}_{local_port}")
        except OSError as err:
            LOG.debug("virtio-vsock: guest connection to port %d: %s", local_port, err)
            sock.close()
            self.reset(local_port, peer_port, None)
            return
        conn = Connection(sock, local_port, peer_port, ESTABLISHED, peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self._add(conn)
        self.counts["guest_connections"] += 1
        self.control.append((local_port, peer_port, VIRTIO_VSOCK_OP_RESPONSE, 0))
        self.update_arm(conn)

    def _add(self, conn: Connection) -> None:
        self.conns[conn.key] = conn
        self._by_fd[conn.fd] = conn

    def _established(self, conn: Connection) -> None:
        conn.state = ESTABLISHED
        conn.deadline = None
        msg = f"OK {conn.local_port}\n".encode()
        try:
            sent = conn.sock.send(msg)
        except OSError as err:
            LOG.debug("virtio-vsock: cannot acknowledge host connection: %s", err)
            sent = -1
        if sent != len(msg):
            self.reset(conn.local_port, conn.peer_port, conn)

    def reset(self, local_port: int, peer_port: int, conn: Connection | None) -> None:
        """Answer with OP_RST and forget the connection."""
        if conn is not None:
            self.drop(conn)
        self.control.append((local_port, peer_port, VIRTIO_VSOCK_OP_RST, 0))
        self.counts["resets_sent"] += 1

    def drop(self, conn: Connection) -> None:
        """Forget ``conn`` and close its host stream (the host end sees EOF)."""
        self.conns.pop(conn.key, None)
        if conn.sock.fileno() < 0:
            return
        self._by_fd.pop(conn.fd, None)
        if conn.armed:
            self.watcher.remove(conn.fd)
            conn.armed = False
        if conn.want_write:
            self._unwatch_write(conn)
        conn.sock.close()

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV and flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            # Both ways closed: cloud-hypervisor resets the connection.
            self.reset(conn.local_port, conn.peer_port, conn)
            return
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
            conn.guest_shut_rcv = True
        if flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            conn.guest_shut_send = True
            if not conn.txbuf:
                conn.shut_wr()

    def host_closed(self, conn: Connection) -> None:
        """The host closed its end: tell the guest, and wait (bounded) for its RST."""
        conn.state = CLOSING
        conn.deadline = time.monotonic() + CONN_TIMEOUT
        self.control.append((conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_SHUTDOWN,
                             VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND))

    def sweep(self) -> None:
        """Reset connections the guest left hanging past their deadline."""
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline is not None and c.deadline <= now]:
            self.reset(conn.local_port, conn.peer_port, conn)

    # -- guest to host ---------------------------------------------------------------------

    def _forward(self, conn: Connection, chain: DescriptorChain, length: int) -> None:
        if not length:
            return
        if len(conn.txbuf) + length > CONN_TX_BUF_SIZE:
            LOG.debug("virtio-vsock: guest port %d sent beyond its credit", conn.peer_port)
            self.reset(conn.local_port, conn.peer_port, conn)
            return
        self.counts["tx_bytes"] += length
        views = chain.readable_views(HDR_SIZE, length)
        written = 0
        if not conn.txbuf:
            try:
                written = os.writev(conn.fd, views)
            except BlockingIOError:
                written = 0
            except OSError as err:
                LOG.debug("virtio-vsock: host stream of port %d: %s", conn.local_port, err)
                self.reset(conn.local_port, conn.peer_port, conn)
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

    def _forwarded(self, conn: Connection, n: int) -> None:
        if conn.forwarded(n):
            self.credit_update(conn)

    def credit_update(self, conn: Connection) -> None:
        """Queue a CREDIT_UPDATE for the guest (one at a time)."""
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self.control.append((conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0))

    def _watch_write(self, conn: Connection) -> None:
        if not conn.want_write:
            self._wepoll.register(conn.fd, select.EPOLLOUT)
            conn.want_write = True
        if not self._wepoll_armed:
            self.watcher.add(self._wepoll.fileno(), lambda: self.run(self._flush_writable))
            self._wepoll_armed = True

    def _unwatch_write(self, conn: Connection) -> None:
        if conn.want_write:
            try:
                self._wepoll.unregister(conn.fd)
            except OSError:
                pass
            conn.want_write = False
        if self._wepoll_armed and not any(c.want_write for c in self.conns.values()):
            self.watcher.remove(self._wepoll.fileno())
            self._wepoll_armed = False

    def _flush_writable(self) -> None:
        """Host streams with buffered guest data can take more (I/O thread)."""
        for fd, _ in self._wepoll.poll(0):
            conn = self._by_fd.get(fd)
            if conn is None:
                continue
            try:
                n = conn.sock.send(conn.txbuf)
            except BlockingIOError:
                continue
            except OSError:
                self.reset(conn.local_port, conn.peer_port, conn)
                continue
            del conn.txbuf[:n]
            self._forwarded(conn, n)
            if not conn.txbuf:
                self._unwatch_write(conn)
                if conn.guest_shut_send:
                    conn.shut_wr()
        if not any(c.want_write for c in self.conns.values()) and self._wepoll_armed:
            self.watcher.remove(self._wepoll.fileno())
            self._wepoll_armed = False

    # -- host connections ------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                LOG.warning("virtio-vsock: accept on %s: %s", self.socket_path, err)
                return
            if len(self.conns) + len(self._pending) >= self.max_connections:
                LOG.warning("virtio-vsock: connection limit reached; refusing new host connection")
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._pending[fd] = (sock, bytearray())
            self.watcher.add(fd, functools.partial(self.run, functools.partial(self._read_command, fd)))

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
        port = parse_connect(buf) if data else None
        if port is None and data and not buf.endswith(b"\n") and len(buf) < MAX_COMMAND:
            return  # wait for the rest of the line
        del self._pending[fd]
        self.watcher.remove(fd)
        if port is None or len(self.conns) >= self.max_connections:
            LOG.debug("virtio-vsock: bad host command %r", bytes(buf))
            sock.close()
            return
        local_port = self._allocate_port()
        conn = Connection(sock, local_port, port, LOCAL_INIT, deadline=time.monotonic() + CONN_TIMEOUT)
        self._add(conn)
        self.counts["host_connections"] += 1
        self.control.append((local_port, port, VIRTIO_VSOCK_OP_REQUEST, 0))

    def _allocate_port(self) -> int:
        used = {c.local_port for c in self.conns.values()}
        while True:
            self._local_port_last = ((self._local_port_last + 1) & ~(1 << 31)) | _LOCAL_PORT_BIT
            if self._local_port_last not in used:
                return self._local_port_last

    # -- host to guest ---------------------------------------------------------------------

    def update_arm(self, conn: Connection) -> None:
        """Watch ``conn``'s host stream for reading exactly while the guest can take its data."""
        want = (self.can_receive() and conn.state == ESTABLISHED and not conn.guest_shut_rcv
                and conn.peer_credit() > 0)
        if want and not conn.armed:
            conn.armed = True
            self.watcher.add(conn.fd, functools.partial(self.run, functools.partial(self.on_readable, conn.key)))
        elif conn.armed and not want:
            conn.armed = False
            self.watcher.remove(conn.fd)

    def rearm_all(self) -> None:
        for conn in list(self.conns.values()):
            self.update_arm(conn)

    def header(self, local_port: int, peer_port: int, op: int, flags: int, length: int = 0) -> bytes:
        """The header of a packet to the guest, advertising the connection's credit (not on RST)."""
        conn = self.conns.get((local_port, peer_port))
        buf_alloc = fwd_cnt = 0
        if conn is not None and op != VIRTIO_VSOCK_OP_RST:
            buf_alloc, fwd_cnt = conn.advertise_credit()
        return host_header(self.cid, local_port, peer_port, op, flags, length, buf_alloc, fwd_cnt)


def _file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the socket file at ``path``, None if there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None
