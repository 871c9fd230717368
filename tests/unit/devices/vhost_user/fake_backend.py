"""A scripted vhost-user backend for the unit tests: it listens on a unix socket, records every
message the frontend sends (with the fds that came with it) and answers as a backend would
(QEMU's docs/interop/vhost-user.rst), or refuses one chosen request."""

from __future__ import annotations

import array
import os
import socket
import threading
from dataclasses import dataclass, field

from vmsh.devices.vhost_user import protocol as p


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    #: fds received with it (kept open until the backend closes)
    fds: list[int] = field(default_factory=list)
    #: which connection (1, 2, ...) it came on
    connection: int = 1

    def u64(self) -> int:
        value: int = p.U64.unpack(self.payload)[0]
        return value


class FakeBackend:
    """A backend on ``path``; ``messages`` is what it received, in order."""

    def __init__(self, path: str, *, features: int, protocol: int = 0, queues: int = 1,
                 config: bytes = b"", refuse: int | None = None,
                 hang_up_on: tuple[int, int] | None = None) -> None:
        self.path = path
        self.features = features
        self.protocol = protocol
        self.queues = queues
        self.config = config
        #: answer this request's acknowledgement with a failure status
        self.refuse = refuse
        #: (connection number, request): on that connection, hang up instead of answering it
        self.hang_up_on = hang_up_on
        self.messages: list[Message] = []
        self.connections = 0
        self.changed = threading.Condition()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def requests(self, connection: int | None = None) -> list[int]:
        """The requests received so far (on one connection only if given)."""
        return [m.request for m in self.messages if connection in (None, m.connection)]

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.messages) >= count, timeout), self.requests()

    def drop(self) -> None:
        """Close the connection as a crashing backend would."""
        if self._conn is not None:
            self._conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        if self._conn is not None:
            self._conn.close()
        for m in self.messages:
            for fd in m.fds:
                os.close(fd)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conn = conn
            with self.changed:
                self.connections += 1
                self.changed.notify_all()
            try:
                while self._one(conn):
                    pass
            except OSError:
                pass

    def _one(self, conn: socket.socket) -> bool:
        fds = array.array("i")
        data, ancillary, _, _ = conn.recvmsg(p.HEADER.size, socket.CMSG_LEN(8 * fds.itemsize))
        if len(data) < p.HEADER.size:
            return False
        for level, kind, blob in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
        request, flags, size = p.HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            chunk = conn.recv(size - len(payload))
            if not chunk:
                return False
            payload += chunk
        message = Message(request, flags, payload, list(fds), self.connections)
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()
        if self.hang_up_on == (self.connections, request):
            conn.close()
            return False
        reply = self._answer(message)
        if reply is None and flags & p.FLAG_NEED_REPLY:
            reply = p.U64.pack(1 if request == self.refuse else 0)
        if reply is not None:
            conn.sendall(p.HEADER.pack(request, p.VERSION | p.FLAG_REPLY, len(reply)) + reply)
        return True

    def _answer(self, m: Message) -> bytes | None:
        if m.request == p.GET_FEATURES:
            return p.U64.pack(self.features)
        if m.request == p.GET_PROTOCOL_FEATURES:
            return p.U64.pack(self.protocol)
        if m.request == p.GET_QUEUE_NUM:
            return p.U64.pack(self.queues)
        if m.request == p.GET_CONFIG:
            offset, size, flags = p.CONFIG_HEADER.unpack_from(m.payload)
            return p.CONFIG_HEADER.pack(offset, size, flags) + self.config[offset:offset + size].ljust(size, b"\0")
        if m.request == p.GET_VRING_BASE:
            index, _ = p.VRING_STATE.unpack(m.payload)
            return p.VRING_STATE.pack(index, 7)
        return None


def vring_fd_index(m: Message) -> tuple[int, bool]:
    """(queue index, fd attached) of a SET_VRING_KICK/CALL/ERR."""
    value = m.u64()
    return value & p.VRING_INDEX_MASK, not value & p.VRING_NOFD


def unpack_regions(payload: bytes) -> list[tuple[int, int, int, int]]:
    count, _ = p.MEM_HEADER.unpack_from(payload)
    return [p.MEM_REGION.unpack_from(payload, p.MEM_HEADER.size + i * p.MEM_REGION.size) for i in range(count)]
