"""A stand-in API socket: records each request as it arrived and answers with canned bytes."""

from __future__ import annotations

import array
import os
import socket
import threading
from pathlib import Path
from typing import Self


class FakeApi:
    """Serve ``reply`` (raw response bytes, or None to hang up unanswered) to every request on ``path``.

    ``requests`` holds each request's bytes and ``fd_counts`` how many descriptors came with it.
    """

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.path = str(path)
        self.reply = reply
        self.requests: list[bytes] = []
        self.fd_counts: list[int] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, name="fake-api", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # shutdown wakes the thread's accept(); closing alone would leave it waiting on a
        # descriptor number the next test may reuse
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(timeout=5)
        self.listener.close()
        assert not self.thread.is_alive()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data, fds = b"", 0
        while b"\r\n\r\n" not in data:
            chunk, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            if not chunk:
                return
            data += chunk
            for _, _, payload in ancillary:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds += len(received)
                for fd in received:
                    os.close(fd)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        lengths = [int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")]
        length = lengths[0] if lengths else 0
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        self.fd_counts.append(fds)
        if self.reply is not None:
            conn.sendall(self.reply)


def response(status: str, body: bytes | None, *headers: str) -> bytes:
    """``HTTP/1.1 <status>`` with ``body`` and a Content-Length (none when ``body`` is None)."""
    lines = [f"HTTP/1.1 {status}", "Server: fake", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
