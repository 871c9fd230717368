"""cloud-hypervisor's HTTP API on a unix socket, served from :class:`vmsh.engine.vmm.Vmm`.

HTTP/1.1 with keep-alive, ``GET`` and ``PUT`` under ``/api/v1``. Requests are framed by h11
(Content-Length and chunked bodies, pipelining, bare-LF line ends, HEAD); each one is decoded
with the config layer, run through the VMM's action registry, and answered with
cloud-hypervisor's status codes: 200 with a JSON body, 204 without one, and on errors a JSON
array of the error chain with 400 (bad request, invalid config), 404 (no such route, VM or
device), 408 (a request that does not arrive in time), 409 (duplicate id or path), 413 (body
over 4 MiB), 429 (busy), 500 or 501 (a transfer coding other than chunked).

File descriptors sent as SCM_RIGHTS (``vm.add-net``, ``vm.restore``) are collected per
request; every one a request does not take is closed. A client that misbehaves never takes the
server down: each connection has header, body and idle deadlines, at most
:attr:`ApiServer.max_connections` are served at once (further ones wait in the listen queue),
and the accept loop backs off and goes on when descriptors or threads run out.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h11

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
#: the listen queue: a burst of clients waits there instead of being refused
LISTEN_BACKLOG = 128
#: sockaddr_un's sun_path, with its terminating NUL (unix(7))
_SUN_PATH_MAX = 108
REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests",
    500: "Internal Server Error", 501: "Not Implemented",
}
SERVER_NAME = "Cloud Hypervisor API"

#: accept() errors that mean "out of a resource for now": back off and try again
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 1.0
# After an error reply: how long and how much of the rest of the request is read and dropped
_LINGER_SECONDS = 2.0
_LINGER_QUIET = 0.2
_LINGER_BYTES = 2 * MAX_BODY
#: seconds close() waits for the requests being answered (vmm.shutdown's own reply among them)
_CLOSE_GRACE = 2.0
# The end of a request head, with CRLF or bare-LF line ends (as h11 accepts them).
_HEAD_END = re.compile(rb"\n\r?\n")


class HttpError(Exception):
    """A request the server answers with an error status (never raised out of the server)."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(messages[0] if messages else REASONS[status])
        self.status = status
        self.messages = list(messages)


class _Timeout(Exception):
    """A connection missed its deadline; ``status`` is 408 mid-request, None when idle."""

    def __init__(self, status: int | None, what: str) -> None:
        super().__init__(what)
        self.status = status


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
    """Serves the API of ``vmm`` on a unix socket (a path, or an inherited descriptor).

    The limits are attributes so that a test (or an embedder) can change them before
    :meth:`start`.
    """

    #: seconds from a request's first byte to the end of its head
    header_timeout = 10.0
    #: seconds from the end of a request's head to the end of its body
    body_timeout = 30.0
    #: seconds a keep-alive connection may wait for its next request
    idle_timeout = 60.0
    #: connections served at once; the next one waits in the listen queue until one ends
    max_connections = 64

    def __init__(self, vmm: Vmm, path: str | None = None, fd: int | None = None) -> None:
        self.vmm = vmm
        self.path = path
        self._lock_fd: int | None = None
        self._closing = threading.Event()
        if fd is not None:
            self.sock = socket.socket(fileno=fd)
            self.sock.listen(LISTEN_BACKLOG)
        elif path is not None:
            self._lock_fd = lock_socket_path(path)
            try:
                if os.path.exists(path):
                    os.unlink(path)  # stale: its owner is gone, we hold the lock
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                # Bound under a temporary name and renamed once listening: a client that waits
                # for the socket file to appear never finds one that refuses its connection.
                # (A path too long for a temporary name next to it is bound as it is.)
                staging = f"{path}.{os.getpid()}.tmp"
                if len(os.fsencode(staging)) >= _SUN_PATH_MAX:
                    staging = path
                elif os.path.exists(staging):
                    os.unlink(staging)
                self.sock.bind(staging)
                self.sock.listen(LISTEN_BACKLOG)
                if staging != path:
                    os.rename(staging, path)
            except OSError as err:
                self._release_lock()
                raise VmshError(f"Cannot bind the API socket {path}") from err
        else:
            raise ValueError("ApiServer needs a path or a descriptor")
        self._slots: threading.BoundedSemaphore | None = None
        #: requests being answered; close() lets them finish
        self._answering = 0
        self._answered = threading.Condition()
        self._thread = threading.Thread(target=seccomp.confined(seccomp.ThreadKind.API_SERVER, self._accept_loop),
                                        name="http-server", daemon=True)

    def start(self) -> ApiServer:
        self._slots = threading.BoundedSemaphore(self.max_connections)
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
        """Stop accepting, let the requests being answered finish (``_CLOSE_GRACE`` at most: the
        process may exit next, and a ``vmm.shutdown`` is owed its reply), remove the socket
        file and the lock."""
        self._closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._answered:
            self._answered.wait_for(lambda: self._answering == 0, timeout=_CLOSE_GRACE)
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._release_lock()

    # --- accepting ------------------------------------------------------------------------------

    def _accept(self) -> socket.socket:
        """One ``accept()`` (a seam for tests that make it fail)."""
        conn, _ = self.sock.accept()
        return conn

    def _spawn(self, conn: socket.socket) -> None:
        """Start the thread that serves ``conn`` (a seam for tests that make it fail)."""
        threading.Thread(target=seccomp.confined(seccomp.ThreadKind.API_CONNECTION, self._serve), args=(conn,),
                         name="http-conn", daemon=True).start()

    def _accept_loop(self) -> None:
        assert self._slots is not None, "start() made the slots"
        backoff = _BACKOFF_FIRST
        while not self._closing.is_set():
            # A slot first: beyond the bound, clients wait in the listen queue, not in threads.
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                conn = self._accept()
            except OSError as err:
                self._slots.release()
                if self._closing.is_set():
                    return
                if err.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                if err.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    LOG.error("API socket is unusable, no longer accepting: %s", err)
                    return
                # EMFILE, ENFILE, ENOBUFS, ENOMEM and anything unexpected: the condition may pass
                level = logging.WARNING if err.errno in _TRANSIENT_ACCEPT_ERRORS else logging.ERROR
                LOG.log(level, "API accept failed, retrying in %.2f s: %s", backoff, err)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            try:
                self._spawn(conn)
            except Exception as err:  # RuntimeError "can't start new thread", MemoryError
                self._slots.release()
                conn.close()
                LOG.warning("API connection dropped, no thread to serve it (retrying in %.2f s): %s", backoff, err)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_FIRST

    # --- one connection -------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        assert self._slots is not None
        reader = _Reader(conn, self)
        try:
            while not self._closing.is_set():
                try:
                    request = reader.read_request()
                except HttpError as err:
                    self._send_raw(conn, err.status, _error_body(err.messages or [str(err)]))
                    return
                except _Timeout as err:
                    LOG.debug("API connection timed out: %s", err)
                    if err.status is not None:
                        self._send_raw(conn, err.status, _error_body([str(err)]))
                    return
                if request is None:
                    return
                with self._answered:
                    self._answering += 1
                try:
                    try:
                        status, payload = self.handle(request.method, request.target, request.body, request.fds)
                    finally:
                        _close_fds(request.fds)  # the ones the request did not take
                    if not reader.respond(request, status, payload):
                        return
                finally:
                    with self._answered:
                        self._answering -= 1
                        self._answered.notify_all()
        except OSError as err:
            LOG.debug("API connection closed: %s", err)
        finally:
            reader.close_fds()
            conn.close()
            self._slots.release()

    @staticmethod
    def _send_raw(conn: socket.socket, status: int, payload: bytes) -> None:
        """An error reply outside h11's request cycle (the request was not framed); then close."""
        head = [f"HTTP/1.1 {status} ", f"Server: {SERVER_NAME}", "Connection: close",
                "Content-Type: application/json", f"Content-Length: {len(payload)}"]
        try:
            conn.settimeout(1.0)
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            conn.shutdown(socket.SHUT_WR)
            # Closing with unread bytes would reset the connection and could discard the reply
            # before the client reads it: read what the client still sends, for a short while.
            deadline = time.monotonic() + _LINGER_SECONDS
            conn.settimeout(_LINGER_QUIET)
            drained = 0
            while time.monotonic() < deadline and drained < _LINGER_BYTES:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def handle(self, method: str, path: str, body: bytes | None, fds: list[int]) -> tuple[int, bytes | None]:
        """Answer one request: ``(status, JSON body or None)``.

        Descriptors the request takes are removed from ``fds``; when the action then fails they
        are closed here, unless the engine already closed them.
        """
        taken: list[_PassedFd] = []
        try:
            action = ACTIONS_BY_PATH.get(path.split("?", 1)[0])
            if action is None:
                raise HttpError(404, f"No API endpoint {path}")
            if method not in ("GET", "PUT") or method != action.http_method:
                raise HttpError(400, f"{path} takes {action.http_method}, not {method}")
            request = _decode_body(action, body)
            if fds:
                taken = [_PassedFd.of(fd) for fd in fds]
                request = _attach_fds(action, request, fds)
                taken = [entry for entry in taken if entry.fd not in fds]
            result = self.vmm.call(action, request)
            taken = []  # the engine owns them now
            if result is None:
                return 204, None
            return 200, _compact_json(result)
        except HttpError as err:
            return err.status, _error_body(err.messages)
        except VmshError as err:
            return status_of(err), _error_body(["Error from API", *error_chain(err)])
        except Exception as err:  # a bug must not take the VMM down with it
            LOG.exception("API request %s %s failed", method, path)
            return 500, _error_body(["Error from API", f"internal error: {err!r}"])
        finally:
            for entry in taken:
                entry.close_if_unchanged()


def _compact_json(value: object) -> bytes:
    """JSON without spaces, as serde_json's ``to_string`` writes cloud-hypervisor's bodies (scripts
    match ``vmsh remote``'s output, which is the body as sent)."""
    return json.dumps(value, separators=(",", ":")).encode()


def _error_body(messages: list[str]) -> bytes:
    return _compact_json(messages)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


@dataclass(frozen=True)
class _PassedFd:
    """A received descriptor and the file it named, so that a failed action's descriptors are
    closed only while the number still names that file (not one the engine closed and the
    process reused)."""

    fd: int
    identity: tuple[int, int] | None

    @classmethod
    def of(cls, fd: int) -> _PassedFd:
        try:
            st = os.fstat(fd)
        except OSError:
            return cls(fd, None)
        return cls(fd, (st.st_dev, st.st_ino))

    def close_if_unchanged(self) -> None:
        if self.identity is None:
            return
        try:
            st = os.fstat(self.fd)
        except OSError:
            return  # already closed
        if (st.st_dev, st.st_ino) == self.identity:
            os.close(self.fd)


def _decode_body(action: Action, body: bytes | None) -> Any:
    if action.body is None:
        if body:
            raise HttpError(400, f"{action.path} takes no body")
        return None
    if not body:
        raise HttpError(400, f"{action.path} needs a JSON body")
    try:
        value = json.loads(body)
    except RecursionError:
        raise HttpError(400, "Error from API", "Malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        if not isinstance(err, json.JSONDecodeError | UnicodeDecodeError):
            # an integer over Python's digit limit for str -> int
            limit = sys.get_int_max_str_digits()
            raise HttpError(400, "Error from API", f"Malformed JSON body: a number has more than {limit} digits") \
                from None
        raise HttpError(400, "Error from API", f"Malformed JSON body: {err}") from None
    try:
        return from_json_value(action.body, value)
    except JsonValueError as err:
        raise HttpError(400, "Error from API", f"Invalid {action.body.__name__}", str(err)) from None
    except RecursionError:
        raise HttpError(400, "Error from API", f"Invalid {action.body.__name__}", "nested too deeply") from None
    except ValueError as err:  # an integer too long to convert or print
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


@dataclass
class _Request:
    method: str
    target: str
    body: bytes | None
    fds: list[int] = field(default_factory=list)
    #: the h11 connection that framed it (one per request, see _Reader)
    framer: h11.Connection | None = None


class _Reader:
    """Reads HTTP/1.1 requests (and SCM_RIGHTS descriptors) from one connection, and writes the
    replies.

    Each request gets a fresh h11 connection. Its head is gathered here first, for what h11 does
    differently: h11 merges repeated identical Content-Length headers and takes Content-Length
    with Transfer-Encoding (both refused here: request smuggling needs them), and h11 requires
    a Host header of HTTP/1.1 requests (cloud-hypervisor's server does not; one is supplied).
    """

    def __init__(self, conn: socket.socket, server: ApiServer) -> None:
        self.conn = conn
        self.server = server
        self.buf = b""  # bytes of the next request head not yet given to h11
        self.fds: list[int] = []

    def _recv(self, deadline: float, on_timeout: _Timeout) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise on_timeout
        self.conn.settimeout(remaining)
        fds = array.array("i")
        try:
            data, ancdata, _, _ = self.conn.recvmsg(
                65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise on_timeout from None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        self.fds.extend(fds)
        return data

    def close_fds(self) -> None:
        _close_fds(self.fds)

    def _read_head(self) -> bytes | None:
        """The next request head (with its line ends), or None when the client hung up
        between requests."""
        server = self.server
        idle = _Timeout(None, "idle keep-alive connection")
        while True:
            self.buf = self.buf.lstrip(b"\r\n")  # empty lines before a request line are ignored
            if self.buf:
                break
            chunk = self._recv(time.monotonic() + server.idle_timeout, idle)
            if not chunk:
                return None
            self.buf += chunk
        deadline = time.monotonic() + server.header_timeout
        late = _Timeout(408, "The request header did not arrive in time")
        while True:
            end = _HEAD_END.search(self.buf)
            if end is not None:
                head, self.buf = self.buf[: end.end()], self.buf[end.end():]
                if len(head) > MAX_HEADER:
                    raise HttpError(400, "Request header too large")
                return head
            if len(self.buf) > MAX_HEADER:
                raise HttpError(400, "Request header too large")
            chunk = self._recv(deadline, late)
            if not chunk:
                return None
            self.buf += chunk

    @staticmethod
    def _check_head(head: bytes) -> bytes:
        lines = head.split(b"\n")
        names = [line.split(b":", 1)[0].strip().lower() for line in lines[1:] if b":" in line]
        if names.count(b"content-length") > 1:
            raise HttpError(400, "Duplicate Content-Length header")
        if b"content-length" in names and b"transfer-encoding" in names:
            # RFC 9112 section 6.3: a sign of request smuggling, which a server may refuse
            raise HttpError(400, "Content-Length and Transfer-Encoding in one request")
        if b"host" not in names and lines[0].rstrip(b"\r").endswith(b" HTTP/1.1"):
            head = lines[0] + b"\nHost: localhost\r\n" + b"\n".join(lines[1:])
        return head

    def read_request(self) -> _Request | None:
        head = self._read_head()
        if head is None:
            return None
        framer = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        framer.receive_data(self._check_head(head))
        if self.buf:  # (receive_data(b"") would tell h11 the client hung up)
            framer.receive_data(self.buf)
            self.buf = b""
        deadline = time.monotonic() + self.server.header_timeout
        late = _Timeout(408, "The request body did not arrive in time")
        request: _Request | None = None
        body = bytearray()
        try:
            while True:
                event = framer.next_event()
                if event is h11.NEED_DATA:
                    chunk = self._recv(deadline, late)
                    if not chunk:
                        return None
                    framer.receive_data(chunk)
                elif isinstance(event, h11.Request):
                    request = _Request(event.method.decode("latin-1"), event.target.decode("latin-1"), None,
                                       framer=framer)
                    for name, value in event.headers:
                        if name == b"content-length" and int(value) > MAX_BODY:
                            raise HttpError(413, f"Request body too large: {int(value)} bytes (at most {MAX_BODY})")
                    deadline = time.monotonic() + self.server.body_timeout
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise HttpError(413, f"Request body too large: over {MAX_BODY} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    request.body = bytes(body) or None
                    # The descriptors that came with this request's bytes are its own.
                    request.fds, self.fds = self.fds, []
                    # Bytes after this request (pipelined) start the next head.
                    self.buf = framer.trailing_data[0]
                    return request
                else:  # ConnectionClosed mid-request
                    return None
        except h11.RemoteProtocolError as err:
            status = err.error_status_hint if err.error_status_hint in REASONS else 400
            raise HttpError(status, f"Malformed request: {err}") from None

    def respond(self, request: _Request, status: int, payload: bytes | None) -> bool:
        """Send the reply to ``request``; False when the connection must close after it."""
        framer = request.framer
        assert framer is not None
        headers = [("Server", SERVER_NAME), ("Connection", "keep-alive")]
        # micro_http's head: every status but 204 has a type and a length, even when empty
        if status != 204:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload or b"")))]
        # no reason phrase ("HTTP/1.1 200 "), as micro_http writes it: ch-remote v40 parses
        # everything after the version as the status code
        data = framer.send(h11.Response(status_code=status, headers=headers, reason=b""))
        # HEAD: the head as a GET would get it, no body (h11 would refuse one)
        if payload and request.method != "HEAD":
            data += framer.send(h11.Data(data=payload)) or b""
        data += framer.send(h11.EndOfMessage()) or b""
        self.conn.settimeout(self.server.body_timeout)
        self.conn.sendall(data or b"")
        # h11 has decided: DONE keeps the connection (HTTP/1.1 without "Connection: close"),
        # MUST_CLOSE ends it
        return framer.our_state is h11.DONE
