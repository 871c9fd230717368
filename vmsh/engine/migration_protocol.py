"""The live migration wire format: request and response frames, memory range tables, fd passing.

The format is cloud-hypervisor's (its ``vm-migration`` crate, ``protocol.rs``; the flow is
described in its ``docs/live_migration.md``), so the frames are the same bytes:

* a request is 16 bytes, ``command u16``, 6 bytes of padding, ``length u64`` (the payload
  bytes that follow); a response is 16 bytes, ``status u16``, padding, ``length u64``;
* commands: Start 1, Config 2, State 3, Memory 4, Complete 5, Abandon 6, MemoryFd 7; statuses
  Ok 1, Error 2;
* a Memory payload is a table of ``(gpa u64, length u64)`` ranges followed by the bytes of each
  range in table order;
* a MemoryFd request carries the 4-byte slot number with the slot's file descriptor attached
  (SCM_RIGHTS).

Everything here works on a connected ``socket.socket``; a peer that closes or sends garbage is a
:class:`~vmsh.errors.MigrationError`.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from collections.abc import Iterable, Sequence

from vmsh.errors import MigrationError

_FRAME = struct.Struct("<H6xQ")
_RANGE = struct.Struct("<QQ")
_SLOT = struct.Struct("<I")
#: a payload larger than this is refused before it is read (a config or state is far smaller;
#: memory is streamed range by range, not read as one payload)
MAX_PAYLOAD = 256 << 20


class Command(enum.IntEnum):
    INVALID = 0
    START = 1
    CONFIG = 2
    STATE = 3
    MEMORY = 4
    COMPLETE = 5
    ABANDON = 6
    MEMORY_FD = 7


class Status(enum.IntEnum):
    INVALID = 0
    OK = 1
    ERROR = 2


def socket_url_path(url: str) -> str:
    """The path of a ``unix:PATH`` URL (the only kind cloud-hypervisor v40 migrates over).

    :raises MigrationError: for any other URL.
    """
    if not url.startswith("unix:") or len(url) == len("unix:"):
        raise MigrationError(f"Unsupported migration URL (only unix:PATH is): {url}")
    return url[len("unix:"):]


def recv_exact(sock: socket.socket, length: int) -> bytes:
    """Exactly ``length`` bytes; :raises MigrationError: when the peer closes first."""
    buf = bytearray(length)
    view = memoryview(buf)
    while view:
        try:
            n = sock.recv_into(view)
        except OSError as err:
            raise MigrationError("The migration stream broke") from err
        if n == 0:
            raise MigrationError("The migration peer closed the connection")
        view = view[n:]
    return bytes(buf)


def recv_into(sock: socket.socket, target: memoryview) -> None:
    """Fill ``target`` from the socket (guest RAM is read straight into its mapping)."""
    while target:
        try:
            n = sock.recv_into(target)
        except OSError as err:
            raise MigrationError("The migration stream broke") from err
        if n == 0:
            raise MigrationError("The migration peer closed the connection")
        target = target[n:]


def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except OSError as err:
        raise MigrationError("The migration stream broke") from err


def send_request(sock: socket.socket, command: Command, payload: bytes = b"") -> None:
    send_all(sock, _FRAME.pack(command, len(payload)) + payload)


def read_request(sock: socket.socket) -> tuple[Command, int]:
    """The next request's command and payload length (the payload is left to read)."""
    raw, length = _FRAME.unpack(recv_exact(sock, _FRAME.size))
    try:
        command = Command(raw)
    except ValueError:
        raise MigrationError(f"Unknown migration command {raw}") from None
    return command, length


def read_payload(sock: socket.socket, length: int) -> bytes:
    if length > MAX_PAYLOAD:
        raise MigrationError(f"Migration payload of {length} bytes is too large")
    return recv_exact(sock, length)


def send_response(sock: socket.socket, status: Status) -> None:
    send_all(sock, _FRAME.pack(status, 0))


def read_response(sock: socket.socket) -> Status:
    raw, length = _FRAME.unpack(recv_exact(sock, _FRAME.size))
    if length:
        read_payload(sock, length)  # v40 never sends one; skip it
    try:
        return Status(raw)
    except ValueError:
        raise MigrationError(f"Unknown migration response status {raw}") from None


def expect_ok(sock: socket.socket, what: str) -> None:
    """Read a response; :raises MigrationError: unless it is Ok."""
    if read_response(sock) is not Status.OK:
        raise MigrationError(f"The destination refused the migration's {what}")


def request(sock: socket.socket, command: Command, payload: bytes = b"") -> None:
    """Send a request and wait for Ok."""
    send_request(sock, command, payload)
    expect_ok(sock, command.name.lower().replace("_", " "))


# --- memory ---------------------------------------------------------------------------------------


def encode_table(ranges: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(_RANGE.pack(gpa, length) for gpa, length in ranges)


def decode_table(data: bytes) -> list[tuple[int, int]]:
    if len(data) % _RANGE.size:
        raise MigrationError(f"A memory range table of {len(data)} bytes is not whole ranges")
    return [_RANGE.unpack_from(data, i) for i in range(0, len(data), _RANGE.size)]


def ranges_from_bitmap(bitmap: bytes, base: int, page_size: int = 4096) -> list[tuple[int, int]]:
    """Runs of set bits (one per page, least significant bit first in each byte, as KVM's dirty
    log) as ``(guest address, length)`` ranges from ``base``."""
    ranges: list[tuple[int, int]] = []
    bits = int.from_bytes(bitmap, "little")
    page = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1
        bits >>= skip
        page += skip
        run = (~bits & (bits + 1)).bit_length() - 1  # the number of low set bits
        ranges.append((base + page * page_size, run * page_size))
        bits >>= run
        page += run
    return ranges


# --- file descriptors -------------------------------------------------------------------------------


def send_fd(sock: socket.socket, slot: int, fd: int) -> None:
    """A MemoryFd request: the header, then the slot number with ``fd`` attached."""
    send_all(sock, _FRAME.pack(Command.MEMORY_FD, _SLOT.size))
    try:
        sock.sendmsg([_SLOT.pack(slot)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    except OSError as err:
        raise MigrationError("The migration stream broke") from err


def recv_fd(sock: socket.socket, length: int) -> tuple[int, int]:
    """The slot number and the fd of a MemoryFd request whose header was read."""
    if length != _SLOT.size:
        raise MigrationError(f"A MemoryFd request of {length} bytes (expected {_SLOT.size})")
    fds = array.array("i")
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(_SLOT.size, socket.CMSG_SPACE(fds.itemsize))
    except OSError as err:
        raise MigrationError("The migration stream broke") from err
    for level, kind, cmsg in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cmsg[:len(cmsg) - len(cmsg) % fds.itemsize])
    if len(data) != _SLOT.size or len(fds) != 1:
        for fd in fds:
            _close(fd)
        raise MigrationError("A MemoryFd request came without its slot number and file descriptor")
    return _SLOT.unpack(data)[0], fds[0]


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def send_memory(sock: socket.socket, ranges: Sequence[tuple[int, int]], views: Sequence[memoryview]) -> None:
    """A Memory request: the table of ``ranges``, then ``views`` (each range's bytes, in order)."""
    table = encode_table(ranges)
    send_all(sock, _FRAME.pack(Command.MEMORY, len(table)) + table)
    for view in views:
        send_all(sock, view)
    expect_ok(sock, "memory")
