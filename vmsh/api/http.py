"""cloud-hypervisor's HTTP API on a unix socket, served from :class:`vmsh.engine.vmm.Vmm`.

HTTP/1.1 with keep-alive, ``GET`` and ``PUT`` under ``/api/v1``. Each request is decoded
with the config layer, run through the VMM's action registry, and answered with
cloud-hypervisor's status codes: 200 with a JSON body, 204 without one, and on errors a
JSON array of the error chain with 400 (bad request, invalid config), 404 (no such route,
VM or device), 409 (duplicate id or path), 413 (body over 4 MiB), 429 (busy) or 500.
File descriptors sent as SCM_RIGHTS (``vm.add-net``, ``vm.restore``) are collected per
request. A client that misbehaves never takes the server down.
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import socket
import threading
from typing import Any

from vmsh.config.serde import JsonValueError, from_json_value
from vmsh.engine import seccomp
from vmsh.engine.actions import ACTIONS_BY_PATH, Action
from vmsh.engine.vmm import Vmm
from vmsh.errors import (
    BusyError,
    ConfigError,
    DuplicateError,
    NotFoundError,
    VmshError,
    error_chain,
)

LOG = logging.getLogger(__name__)

MAX_BODY = 4 << 20
MAX_HEADER = 16 << 10
MAX_FDS = 64
REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
}


class HttpError(Exception):
    """A request the server answers with an error status (never raised out of the server)."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(messages[0] if messages else REASONS[status])
        self.status = status
        self.messages = list(messages)


def status_of(err: BaseException) -> int:
    """The HTTP status cloud-hypervisor gives an error of this kind."""
    if isinstance(err, DuplicateError):
        return 409
    if isinstance(err, ConfigError):
        return 400
    if isinstance(err, NotFoundError):
        return 404
    if isinstance(err, BusyError):
        return 429
    return 500


def lock_socket_path(path: str) -> int:
    """Take ``<path>.lock``; a second VMM on the same path fails instead of stealing it.

    :raises VmshError: when another process holds the lock.
    """
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise VmshError(f"API socket {path} is in use by another VMM") from err
    return fd


class ApiServer:
    """Serves the API of ``vmm`` on a unix socket (a path, or an inherited descriptor)."""

    def __init__(self, vmm: Vmm, path: str | None = None, fd: int | None = None) -> None:
        self.vmm = vmm
        self.path = path
        self._lock_fd: int | None = None
        self._closing = threading.Event()
        if fd is not None:
            self.sock = socket.socket(fileno=fd)
        elif path is not None:
            self._lock_fd = lock_socket_path(path)
            try:
                if os.path.exists(path):
                    os.unlink(path)  # stale: its owner is gone, we hold the lock
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.bind(path)
            except OSError as err:
                self._release_lock()
                raise VmshError(f"Cannot bind the API socket {path}") from err
        else:
            raise ValueError("ApiServer needs a path or a descriptor")
        self.sock.listen(16)
        self._thread = threading.Thread(target=seccomp.confined(seccomp.ThreadKind.API_SERVER, self._accept_loop),
                                        name="http-server", daemon=True)

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            if self.path:
                try:
                    os.unlink(self.path + ".lock")
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting, remove the socket file and the lock."""
        self._closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._release_lock()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=seccomp.confined(seccomp.ThreadKind.API_CONNECTION, self._serve), args=(conn,),
                             name="http-conn", daemon=True).start()

    # --- one connection -------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        reader = _Reader(conn)
        try:
            while not self._closing.is_set():
                try:
                    request = reader.read_request()
                except HttpError as err:
                    self._send(conn, err.status, _error_body(err.messages or [str(err)]), keep_alive=False)
                    return
                if request is None:
                    return
                method, path, body, fds, keep_alive = request
                status, payload = self.handle(method, path, body, fds)
                self._send(conn, status, payload, keep_alive)
                if not keep_alive:
                    return
        except OSError as err:
            LOG.debug("API connection closed: %s", err)
        finally:
            reader.close_fds()
            conn.close()

    @staticmethod
    def _send(conn: socket.socket, status: int, payload: bytes | None, keep_alive: bool) -> None:
        head = [f"HTTP/1.1 {status} {REASONS.get(status, '')}", "Server: Cloud Hypervisor API"]
        head.append("Connection: keep-alive" if keep_alive else "Connection: close")
        if payload is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        elif status != 204:
            head.append("Content-Length: 0")
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (payload or b""))

    def handle(self, method: str, path: str, body: bytes | None, fds: list[int]) -> tuple[int, bytes | None]:
        """Answer one request: ``(status, JSON body or None)``."""
        try:
            action = ACTIONS_BY_PATH.get(path.split("?", 1)[0])
            if action is None:
                raise HttpError(404, f"No API endpoint {path}")
            if method not in ("GET", "PUT") or method != action.http_method:
                raise HttpError(400, f"{path} takes {action.http_method}, not {method}")
            request = _decode_body(action, body)
            if fds:
                request = _attach_fds(action, request, fds)
            result = self.vmm.call(action, request)
            if result is None:
                return 204, None
            return 200, json.dumps(result).encode()
        except HttpError as err:
            return err.status, _error_body(err.messages)
        except VmshError as err:
            return status_of(err), _error_body(["Error from API", *error_chain(err)])
        except Exception as err:  # a bug must not take the VMM down with it
            LOG.exception("API request %s %s failed", method, path)
            return 500, _error_body(["Error from API", f"internal error: {err!r}"])


def _error_body(messages: list[str]) -> bytes:
    return json.dumps(messages).encode()


def _decode_body(action: Action, body: bytes | None) -> Any:
    if action.body is None:
        if body:
            raise HttpError(400, f"{action.path} takes no body")
        return None
    if not body:
        raise HttpError(400, f"{action.path} needs a JSON body")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HttpError(400, "Error from API", f"Malformed JSON body: {err}") from None
    try:
        return from_json_value(action.body, value)
    except JsonValueError as err:
        raise HttpError(400, "Error from API", f"Invalid {action.body.__name__}", str(err)) from None


def _attach_fds(action: Action, request: Any, fds: list[int]) -> Any:
    """Give SCM_RIGHTS descriptors to the request that can take them (net taps)."""
    if action.name == "add-net":
        request.fds = list(fds)
        fds.clear()
        return request
    if action.name == "restore" and request.net_fds:
        # in the order of net_fds, num_fds each (cloud-hypervisor's ch-remote sends them so)
        wanted = sum(entry.num_fds for entry in request.net_fds)
        if wanted != len(fds):
            raise HttpError(400, f"net_fds asks for {wanted} file descriptors, the request carries {len(fds)}")
        for entry in request.net_fds:
            entry.fds, fds[:] = fds[: entry.num_fds], fds[entry.num_fds:]
        return request
    raise HttpError(400, f"{action.path} takes no file descriptors")


class _Reader:
    """Reads HTTP/1.1 requests (and SCM_RIGHTS descriptors) from one connection."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""
        self.fds: list[int] = []

    def _recv(self) -> bytes:
        fds = array.array("i")
        data, ancdata, _, _ = self.conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        self.fds.extend(fds)
        return data

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def read_request(self) -> tuple[str, str, bytes | None, list[int], bool] | None:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEADER:
                raise HttpError(400, "Request header too large")
            chunk = self._recv()
            if not chunk:
                return None
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise HttpError(400, "Malformed request line") from None
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, f"Malformed header line: {line[:80]}")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HttpError(400, "Invalid Content-Length") from None
        if length < 0:
            raise HttpError(400, "Invalid Content-Length")
        if length > MAX_BODY:
            raise HttpError(413, f"Request body too large: {length} bytes (at most {MAX_BODY})")
        while len(self.buf) < length:
            chunk = self._recv()
            if not chunk:
                return None
            self.buf += chunk
        body, self.buf = self.buf[:length], self.buf[length:]
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        fds, self.fds = self.fds, []
        return method, target, body or None, fds, keep_alive
