"""Fuzz campaign: the HTTP API server on raw bytes.

One :class:`vmsh.api.http.ApiServer` serves a VMM with a stand-in VM (``tests/unit/api/fake_vm.py``:
no KVM, lifecycle only). Each input is a byte stream for one connection: valid requests (every
endpoint, bodies, chunked and pipelined requests) with their bytes mutated, or requests assembled
from pools of methods, targets, headers (duplicate, signed and huge Content-Length, transfer
codings, bare-LF line ends) and bodies. The stream is sent on a socketpair, the write side is
shut, and the server's connection handler (``ApiServer._serve``, what each connection thread
runs) serves it while the campaign reads the reply until the server closes.

Checked for every input: the handler returns (an exception out of it would end a connection
thread with a traceback); the reply is empty (a clean close) or a sequence of HTTP/1.1
responses; no response is a 500 that reports an internal error (the server's catch-all for a bug).
A fresh VMM per input keeps one input's ``vm.create`` from shaping the next.

Usage: ``python3 ci/fuzz/fuzz_http.py --inputs 100000``
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
from pathlib import Path

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz import fuzzlib
from tests.unit.api.fake_vm import FakeVm
from vmsh.api.http import ApiServer
from vmsh.engine.actions import ACTIONS_BY_PATH
from vmsh.engine.events import EventMonitor
from vmsh.engine.vmm import Vmm

CREATE = b'{"payload": {"kernel": "/k"}, "disks": [{"path": "/a", "id": "d0"}]}'
SEEDS = [
    b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(CREATE), CREATE),
    b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"%x\r\n%s\r\n0\r\n\r\n" % (len(CREATE), CREATE),
    b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%sPUT /api/v1/vm.boot HTTP/1.1\r\n"
    b"Host: x\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\nPUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\n\r\n"
    b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nContent-Length: 19\r\n\r\n{\"desired_vcpus\": 2}"
    % (len(CREATE), CREATE),
    b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n{\"path\": \"/b\"}",
    b"GET /api/v1/vm.counters HTTP/1.1\nHost: x\n\n",
    b"HEAD /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n"
    b"{\"destination_url\": \"file:///nonexistent\"}",
]

METHODS = ["GET", "PUT", "HEAD", "POST", "DELETE", "OPTIONS", "get", "", "G\x00T", "PUT PUT"]
TARGETS = [*ACTIONS_BY_PATH, "/", "*", "/api/v1/", "/api/v1/vm.create?x=1", "/api/v1/%00", "/" + "a" * 9000,
           "http://localhost/api/v1/vmm.ping", "/api/v1/vm.info#f", ""]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "", "http/1.1"]
HEADERS = [
    "Host: localhost", "Content-Length: 0", "Content-Length: 5", "Content-Length: +5", "Content-Length: -1",
    "Content-Length: 99999999999999999999999", "Content-Length: 0x10", "Content-Length: 5, 5",
    "Content-Length: 4194305", "Transfer-Encoding: chunked", "Transfer-Encoding: gzip",
    "Transfer-Encoding: gzip, chunked", "Connection: close", "Connection: keep-alive", "Expect: 100-continue",
    "Content-Type: application/json", " folded", "X: " + "y" * 20000, "NoColon", ": empty", "X-\x00: 1",
]
BODIES = [b"", CREATE, b"{}", b"[]", b"null", b'{"desired_vcpus": 99999999999999999999}', b"{" * 5000,
          b'{"id": "d0"}', b'{"path": "/x", "num_queues": -1}', b"\xff\xfe", b"9" * 5000,
          b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n"]


@st.composite
def _assembled(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        eol = draw(st.sampled_from(["\r\n", "\n", "\r\n", "\r"]))
        line = " ".join([draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)),
                         draw(st.sampled_from(VERSIONS))])
        headers = draw(st.lists(st.sampled_from(HEADERS), max_size=5))
        body = draw(st.sampled_from(BODIES))
        if draw(st.booleans()):
            headers.append(f"Content-Length: {len(body) + draw(st.integers(-3, 3))}")
        head = eol.join([line, *headers]) + eol + eol
        out += head.encode("utf-8", "replace") + body
    return out


def inputs() -> st.SearchStrategy[bytes]:
    return st.one_of(fuzzlib.mutated(SEEDS, max_rounds=10), _assembled(), st.binary(max_size=256))


class _Harness:
    """One server (no accept thread: the campaign hands it connections) and its socket directory."""

    server: ApiServer | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None

    def setup(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vmsh-fuzz-http-")
        server = ApiServer(Vmm(EventMonitor(None), vm_factory=FakeVm), path=f"{self.tmp.name}/api.sock")
        # short deadlines: the write side is shut, so only a server bug would wait on them
        server.header_timeout = server.body_timeout = server.idle_timeout = 1.0
        server._slots = threading.BoundedSemaphore(server.max_connections)
        self.server = server

    def teardown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    def target(self, data: bytes) -> None:
        server = self.server
        assert server is not None and server._slots is not None
        server.vmm = Vmm(EventMonitor(None), vm_factory=FakeVm)
        client, conn = socket.socketpair()
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                server._serve(conn)
            except BaseException as err:
                errors.append(err)

        with client:
            server._slots.acquire()  # _serve releases its slot when it ends
            thread = threading.Thread(target=serve, name="fuzz-http-conn", daemon=True)
            thread.start()
            try:
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed early (an error reply): what it sent is still readable
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
            thread.join()
        if errors:
            raise errors[0]
        check_reply(reply)


def check_reply(reply: bytes) -> None:
    """A clean close, or HTTP/1.1 responses none of which is a 500 for an internal error."""
    if reply and not reply.startswith(b"HTTP/1.1 "):
        raise AssertionError(f"not an HTTP response: {reply[:80]!r}")
    for part in reply.split(b"HTTP/1.1 ")[1:]:
        if part.startswith(b"500") and b"internal error" in part:
            raise AssertionError(f"500 for an internal error: {part[:300]!r}")


HARNESS = _Harness()
CAMPAIGN = fuzzlib.Campaign("http", inputs(), HARNESS.target, (), time_limit=5.0,
                            setup=HARNESS.setup, teardown=HARNESS.teardown)

if __name__ == "__main__":
    sys.exit(fuzzlib.main(CAMPAIGN))
