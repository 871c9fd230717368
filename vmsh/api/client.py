"""A client for the HTTP API on a unix socket (what ``vmsh remote`` and the harness use)."""

from __future__ import annotations

import array
import json
import socket
from typing import Any, Self

from vmsh.errors import VmshError


class ApiError(VmshError):
    """The server answered with an error status; ``messages`` is its error chain."""

    def __init__(self, status: int, messages: list[str]) -> None:
        super().__init__(f"API request failed with status {status}: " + ": ".join(messages))
        self.status = status
        self.messages = messages


class ApiClient:
    """One keep-alive connection to a VMM's API socket.

    Example::

        with ApiClient("/tmp/vm.sock") as api:
            api.put("vm.pause")
            state = api.get("vm.info")["state"]
    """

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise VmshError(f"Cannot connect to the API socket {path}") from err
        self._buf = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def get(self, endpoint: str) -> Any:
        return self.request("GET", endpoint)

    def put(self, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        return self.request("PUT", endpoint, body, fds)

    def request(self, method: str, endpoint: str, body: Any = None, fds: list[int] | None = None) -> Any:
        """Send one request; returns the decoded JSON body (None for 204).

        :raises ApiError: for an error status, with the server's error chain.
        """
        data = None if body is None else json.dumps(body).encode()
        status, payload = self.raw(method, f"/api/v1/{endpoint}", data, fds)
        decoded = json.loads(payload) if payload else None
        if status >= 400:
            messages = decoded if isinstance(decoded, list) else [str(decoded or "")]
            raise ApiError(status, [str(m) for m in messages])
        return decoded

    def raw(self, method: str, path: str, body: bytes | None = None, fds: list[int] | None = None) -> tuple[int, bytes]:
        """Send raw bytes as one request; returns ``(status, body)`` whatever the status."""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + (body or b"")
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self.sock.sendall(data)
            return self._read_response()
        except OSError as err:
            raise VmshError(f"API request {method} {path} failed") from err

    def _read_response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmshError("The VMM closed the API connection")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self._buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmshError("The VMM closed the API connection")
            self._buf += chunk
        payload, self._buf = self._buf[:length], self._buf[length:]
        return status, payload
