"""One request to a VMM's API socket, read back the way ch-remote v40's HTTP client reads it.

What decides ch-remote's output is here: a body is printed only when the response has a
``Content-Length`` (so a 204 without one prints nothing), exactly as it arrived; a status
other than 100, 200 and 204 is an error named after the status (``NotFound``,
``InternalServerError``, ``Unknown`` for the codes ch-remote does not name). Descriptors go
with the request head as SCM_RIGHTS.

Unlike ch-remote v40, header names are matched in any case and the status line may carry a
reason phrase (``HTTP/1.1 200 OK``): ch-remote expects its server's (micro_http's) exact
``Content-Length: `` and ``HTTP/1.1 200 `` without one.
"""

from __future__ import annotations

import array
import dataclasses
import socket

from vmsh.errors import VmshError

#: the status codes ch-remote v40 names, as it names them; any other is "Unknown"
STATUS_NAMES = {100: "Continue", 200: "Ok", 204: "NoContent", 400: "BadRequest", 404: "NotFound",
                500: "InternalServerError", 501: "NotImplemented"}
SUCCESS = (100, 200, 204)


class TransportError(VmshError):
    """The exchange itself failed (ch-remote's HTTP client errors, in its words)."""


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    #: None when the response had no Content-Length
    body: bytes | None

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, "Unknown")


def os_error_text(err: OSError) -> str:
    """An OS error as Rust's ``io::Error`` displays it: ``No such file or directory (os error 2)``."""
    if err.errno is None:
        return str(err)
    return f"{err.strerror} (os error {err.errno})"


def connect(path: str) -> socket.socket:
    """:raises OSError: when the socket cannot be reached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, method: str, endpoint: str, body: bytes | None, fds: list[int]) -> Response:
    """Send ``method /api/v1/endpoint`` with ``body`` and ``fds``; read the response.

    :raises TransportError: when the socket fails or the response is not HTTP/1.1.
    """
    head = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    data = head.encode() + b"\r\n" + (body or b"")
    try:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    except OSError as err:
        what = "Error sending file descriptors" if fds else "Error writing to or reading from HTTP socket"
        raise TransportError(f"{what}: {os_error_text(err)}") from None
    try:
        if sent < len(data):  # even an empty send fails once the server has answered and closed
            sock.sendall(data[sent:])
        return _read(sock)
    except OSError as err:
        raise TransportError(f"Error writing to or reading from HTTP socket: {os_error_text(err)}") from None


def _read(sock: socket.socket) -> Response:
    received = b""
    length: int | None = None
    body_at: int | None = None
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break  # the server closed the connection: take what came
        received += chunk
        if body_at is None and b"\r\n\r\n" in received:
            body_at = received.index(b"\r\n\r\n") + 4
            length = _content_length(received[:body_at])
            if length is None:
                break
        if body_at is not None and length is not None and len(received) >= body_at + length:
            break
    first = received.split(b"\r\n", 1)[0].decode("latin-1")
    if not first.startswith("HTTP/1.1"):
        raise TransportError("HTTP output is missing protocol statement")
    code = first[len("HTTP/1.1"):].split(maxsplit=1)[0] if first[len("HTTP/1.1"):].strip() else ""
    if not code.isdigit():
        reason = "cannot parse integer from empty string" if not code else "invalid digit found in string"
        raise TransportError(f"Error parsing HTTP status code: {reason}")
    body = received[body_at:body_at + length] if body_at is not None and length is not None else None
    return Response(int(code), body)


def _content_length(head: bytes) -> int | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "content-length":
            value = value.strip()
            if not value.isdigit():
                raise TransportError("Error parsing HTTP Content-Length field: invalid digit found in string")
            return int(value)
    return None
