"""The vhost-user wire format: message codes, flags, payload layouts and the framed socket.

QEMU's ``docs/interop/vhost-user.rst`` is the specification. Every message is a 12-byte header
(``request``, ``flags``, ``size``, all native-endian u32: little endian on x86_64) followed by
``size`` bytes of payload; file descriptors travel beside it as SCM_RIGHTS ancillary data on the
unix stream socket. Flags bits 0-1 are the version (1), bit 2 marks a reply, bit 3 asks the
backend for a reply (REPLY_ACK). Only what a frontend sends and reads is here; the
conversation itself is :mod:`vmsh.devices.vhost_user.frontend`.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from dataclasses import dataclass

from vmsh.errors import VhostUserError

LOG = logging.getLogger(__name__)

# Front-end message types (vhost-user.rst, "Front-end message types")
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38

#: the messages whose backend always answers (with a payload of its own)
_HAS_REPLY = frozenset({GET_FEATURES, GET_PROTOCOL_FEATURES, GET_VRING_BASE, GET_QUEUE_NUM, GET_CONFIG,
                        GET_MAX_MEM_SLOTS})

# Header flags
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

#: the virtio feature bit a backend sets when it speaks the protocol-features extension
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Protocol feature bits (vhost-user.rst, "Protocol features")
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_RARP = 2
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_MTU = 4
PROTOCOL_F_BACKEND_REQ = 5
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_INFLIGHT_SHMFD = 12
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15

#: at most this many regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_MEM_REGIONS = 8
#: SET_VRING_KICK/CALL/ERR: bits 0-7 are the queue index, bit 8 says no fd is attached
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
#: GET_CONFIG/SET_CONFIG flags: a writable field (VHOST_USER_CONFIG_WRITABLE)
CONFIG_WRITABLE = 0x1
#: the largest device configuration space a message carries
MAX_CONFIG_SIZE = 256

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
#: struct vhost_vring_state: index, num
VRING_STATE = struct.Struct("<II")
#: struct vhost_vring_addr: index, flags, descriptor, used, available and log addresses
VRING_ADDR = struct.Struct("<IIQQQQ")
#: one memory region: guest address, size, user (frontend virtual) address, mmap offset
MEM_REGION = struct.Struct("<QQQQ")
#: VhostUserMemory: region count, padding
MEM_HEADER = struct.Struct("<II")
#: VhostUserConfig: offset, size, flags (the payload bytes follow)
CONFIG_HEADER = struct.Struct("<III")

#: the payload sizes a reply to each request must have (GET_CONFIG's depends on the request)
_U64_REPLIES = frozenset({GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS})
#: how long to wait for a reply before the backend counts as hung (seconds)
REPLY_TIMEOUT = 60.0
#: a payload larger than this is refused (the biggest legitimate reply is GET_CONFIG's)
MAX_PAYLOAD = 4096


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One piece of guest RAM as the backend maps it: the file and offset it lives in, and
    where it is in guest physical memory and in this process."""

    guest_addr: int
    size: int
    #: the frontend's virtual address of the region (the rings' addresses are given in these)
    user_addr: int
    #: the file (a memfd, a hugetlbfs or memory-zone file) the backend maps; not owned here
    fd: int
    #: where the region starts in ``fd``
    offset: int

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_addr, self.size, self.user_addr, self.offset)


def pack_mem_table(regions: list[MemoryRegion]) -> bytes:
    """SET_MEM_TABLE's payload (the fds go with it, in the same order)."""
    return MEM_HEADER.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


class Channel:
    """A connected vhost-user socket: send requests (with fds), read replies.

    Not thread-safe: the device that owns it serializes its use (its own lock).
    """

    def __init__(self, sock: socket.socket, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = sock
        # a backend that stops answering must not hold the vCPU or the I/O thread forever
        sock.settimeout(reply_timeout)
        #: set by the frontend once REPLY_ACK is negotiated: every request without a reply of
        #: its own asks for an acknowledgement
        self.reply_ack = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None, *,
             need_reply: bool = False) -> None:
        """Send one message.

        :raises VhostUserError: when the socket is gone.
        """
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as err:
            raise VhostUserError(f"cannot send vhost-user request {request} to the backend") from err

    def receive(self, request: int) -> bytes:
        """Read the reply to ``request`` and return its payload.

        :raises VhostUserError: for a closed socket, or a reply that is not the one asked for.
        """
        header = self._read(HEADER.size, request)
        code, flags, size = HEADER.unpack(header)
        if code != request or not flags & FLAG_REPLY or flags & 0x3 != VERSION:
            raise VhostUserError(f"the backend answered request {request} with message {code} (flags {flags:#x})")
        if size > MAX_PAYLOAD:
            raise VhostUserError(f"the backend's reply to request {request} is {size} bytes long")
        return self._read(size, request) if size else b""

    def _read(self, length: int, request: int) -> bytes:
        chunks = []
        left = length
        while left:
            try:
                chunk = self.sock.recv(left)
            except OSError as err:
                raise VhostUserError(f"cannot read the backend's reply to request {request}") from err
            if not chunk:
                raise VhostUserError(f"the backend closed the connection (waiting for the reply to request {request})")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    # -- requests ------------------------------------------------------------------------------

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """Send a request whose backend always answers (GET_*), and return the answer."""
        assert request in _HAS_REPLY
        self.send(request, payload, fds)
        reply = self.receive(request)
        if request in _U64_REPLIES and len(reply) != U64.size:
            raise VhostUserError(f"the backend's reply to request {request} has {len(reply)} bytes, not 8")
        return reply

    def get_u64(self, request: int) -> int:
        value: int = U64.unpack(self.call(request))[0]
        return value

    def command(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """Send a request that has no answer of its own; with REPLY_ACK wait for the backend's
        acknowledgement (a u64: zero for success)."""
        self.send(request, payload, fds, need_reply=self.reply_ack)
        if self.reply_ack:
            reply = self.receive(request)
            if len(reply) != U64.size:
                raise VhostUserError(f"the backend's acknowledgement of request {request} has {len(reply)} bytes")
            status = U64.unpack(reply)[0]
            if status:
                raise VhostUserError(f"the backend refused request {request} (status {status})")

    def set_u64(self, request: int, value: int) -> None:
        self.command(request, U64.pack(value))

    def set_vring_fd(self, request: int, index: int, fd: int | None) -> None:
        """SET_VRING_KICK/CALL/ERR for queue ``index`` (``None``: no fd, the invalid-fd bit)."""
        if fd is None:
            self.command(request, U64.pack((index & VRING_INDEX_MASK) | VRING_NOFD))
        else:
            self.command(request, U64.pack(index & VRING_INDEX_MASK), [fd])


def connect_client(path: str, timeout: float, *, interval: float = 0.1) -> socket.socket:
    """Connect to the backend's socket, retrying every ``interval`` seconds for ``timeout``
    seconds (cloud-hypervisor retries every 100 ms for 60 s: the backend may still be starting).

    :raises VhostUserError: when no connection could be made in time.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except OSError as err:
            sock.close()
            if time.monotonic() + interval > deadline:
                raise VhostUserError(f"cannot connect to the vhost-user backend at {path}") from err
        time.sleep(interval)


def listen_server(path: str) -> socket.socket:
    """Bind and listen on ``path`` (server mode), replacing a stale socket file.

    :raises VhostUserError: when the socket cannot be created.
    """
    try:
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(1)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        raise VhostUserError(f"cannot listen for the vhost-user backend at {path}") from err
    return sock


def accept_backend(listener: socket.socket, path: str, timeout: float | None) -> socket.socket:
    """Wait for the backend to connect to our listening socket.

    :raises VhostUserError: when it does not in ``timeout`` seconds.
    """
    listener.settimeout(timeout)
    try:
        sock, _ = listener.accept()
    except OSError as err:
        raise VhostUserError(f"no vhost-user backend connected to {path}") from err
    sock.setblocking(True)
    return sock
