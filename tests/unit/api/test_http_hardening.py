"""The API server against hostile or unlucky clients: framing (h11), passed descriptors,
resource exhaustion, deadlines, the connection bound and the listen queue."""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import select
import socket
import time
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient, ApiError
from vmsh.api.http import MAX_BODY, ApiServer
from vmsh.engine.events import EventMonitor
from vmsh.engine.vmm import Vmm
from vmsh.errors import VmshError

from .fake_vm import FakeVm

BODY = {"payload": {"kernel": "/k"}, "disks": [{"path": "/a", "id": "d0"}]}
PING = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n"


def make_server(tmp_path: Path, **limits: float) -> tuple[ApiServer, str]:
    sock = str(tmp_path / "api.sock")
    server = ApiServer(Vmm(EventMonitor(None), vm_factory=FakeVm), path=sock)
    for name, value in limits.items():
        setattr(server, name, value)
    return server, sock


@pytest.fixture
def served(tmp_path: Path):
    server, sock = make_server(tmp_path)
    server.start()
    yield server, sock
    server.close()


def connect(sock: str, timeout: float = 5.0) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(timeout)
    raw.connect(sock)
    return raw


def read_all(raw: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := raw.recv(65536):
        data += chunk
    return data


def exchange(sock: str, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with connect(sock) as raw:
        raw.sendall(data)
        return read_all(raw)


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of replies by their Content-Length: ``[(status, body)]``."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next((int(v) for n, _, v in (ln.partition(":") for ln in lines[1:])
                       if n.lower() == "content-length"), 0)
        out.append((int(lines[0].split(" ")[1]), data[:length]))
        data = data[length:]
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- passed descriptors -------------------------------------------------------------------------


def test_fds_of_rejected_requests_are_closed(served) -> None:
    _server, sock = served
    r, w = os.pipe()
    with ApiClient(sock) as client:
        client.put("vm.create", BODY)
    before = open_fds()
    try:
        for _ in range(20):
            with ApiClient(sock) as client:
                # a route that takes no descriptors
                with pytest.raises(ApiError):
                    client.put("vm.boot", None, fds=[r, w])
                # fewer descriptors than net_fds asks for
                body = {"source_url": "file:///s", "net_fds": [{"id": "n", "num_fds": 3}]}
                with pytest.raises(ApiError):
                    client.put("vm.restore", body, fds=[r, w])
                # a body that does not decode
                status, _ = client.raw("PUT", "/api/v1/vm.add-net", b"{bad", fds=[r, w])
                assert status == 400
                # taken by add-net, then refused by validation (two fds for one queue pair is wrong)
                with pytest.raises(ApiError):
                    client.put("vm.add-net", {"num_queues": 4}, fds=[r, w])
            # a request the framing refuses
            with connect(sock) as raw:
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))
                raw.sendmsg([b"\x00garbage\r\n\r\n"], [rights])
                assert read_all(raw).startswith(b"HTTP/1.1 400 ")
        assert wait_for(lambda: open_fds() <= before), f"{open_fds() - before} descriptors leaked"
    finally:
        os.close(r)
        os.close(w)


def test_fds_taken_by_a_request_reach_it(tmp_path: Path) -> None:
    seen: list[list[int]] = []

    def restore_factory(directory, request, events, on_guest_event, post):
        seen.append([fd for e in request.net_fds for fd in e.fds])
        raise VmshError("stop here")

    vmm = Vmm(EventMonitor(None), vm_factory=FakeVm, restore_factory=restore_factory)
    sock = str(tmp_path / "api.sock")
    server = ApiServer(vmm, path=sock).start()
    r, w = os.pipe()
    try:
        body = {"source_url": "file:///s", "net_fds": [{"id": "net0", "num_fds": 2}]}
        with ApiClient(sock) as client, pytest.raises(ApiError):
            client.put("vm.restore", body, fds=[r, w])
        ((a, b),) = seen
        assert a not in (r, w) and b not in (r, w)  # received as new numbers
        # the action failed, so the server closed them again
        assert wait_for(lambda: not os.path.exists(f"/proc/self/fd/{a}") or os.readlink(f"/proc/self/fd/{a}")
                        != os.readlink(f"/proc/self/fd/{r}"))
    finally:
        server.close()
        os.close(r)
        os.close(w)


# --- the accept loop ----------------------------------------------------------------------------


def test_accept_loop_survives_emfile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server, sock = make_server(tmp_path)
    real_accept = server._accept
    failures = {"left": 3}

    def flaky_accept() -> socket.socket:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept()

    server._accept = flaky_accept  # type: ignore[method-assign]  # the test's seam
    caplog.set_level(logging.WARNING, logger="vmsh.api.http")
    server.start()
    try:
        with ApiClient(sock, timeout=5) as client:
            assert client.get("vmm.ping")["pid"] == os.getpid()
        assert failures["left"] == 0
        assert sum("accept failed" in r.getMessage() for r in caplog.records) == 3
    finally:
        server.close()


def test_accept_loop_survives_a_failed_thread_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server, sock = make_server(tmp_path)
    real_spawn = server._spawn
    failures = {"left": 1}

    def flaky_spawn(conn: socket.socket) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("can't start new thread")
        real_spawn(conn)

    server._spawn = flaky_spawn  # type: ignore[method-assign]  # the test's seam
    caplog.set_level(logging.WARNING, logger="vmsh.api.http")
    server.start()
    try:
        with ApiClient(sock, timeout=5) as client, pytest.raises(VmshError):
            client.get("vmm.ping")
        with ApiClient(sock, timeout=5) as client:
            assert client.get("vmm.ping")["pid"] == os.getpid()
        assert any("no thread" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


# --- bodies the decoder cannot take -------------------------------------------------------------


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"cpus": {"boot_vcpus": 1' + b"0" * 5000 + b', "max_vcpus": 1}}', "digits"),
        (b'{"payload": {"kernel": "/k"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["5000-digit-integer", "deep-in-field", "deep-top"],
)
def test_undecodable_numbers_and_nesting_are_400(served, body: bytes, words: str) -> None:
    _server, sock = served
    with ApiClient(sock) as client:
        status, payload = client.raw("PUT", "/api/v1/vm.create", body)
        assert status == 400
        assert words in " ".join(json.loads(payload))
        assert client.get("vmm.ping")["pid"]


# --- framing ------------------------------------------------------------------------------------


def test_chunked_body_is_read_and_the_connection_stays_in_step(served) -> None:
    _server, sock = served
    body = json.dumps(BODY).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) + b"0\r\n\r\n"
    data = exchange(sock, b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunked + b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    (created, _), (info, payload) = responses(data)
    assert (created, info) == (204, 200)
    assert json.loads(payload)["config"]["disks"][0]["id"] == "d0"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_sent_after_the_head_in_pieces(served, chunked: bool) -> None:
    _server, sock = served
    body = json.dumps(BODY).encode()
    if chunked:
        head = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        pieces = [b"%x\r\n%s\r\n" % (len(body), body), b"0\r\n\r\n"]
    else:
        head = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        pieces = [body[:5], body[5:]]
    with connect(sock) as raw:
        for data in (head, *pieces):
            raw.sendall(data)
            time.sleep(0.1)  # each its own read on the server's side
        raw.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        (created, _), (info, _) = responses(read_all(raw))
    assert (created, info) == (204, 200)


def test_chunked_body_over_the_limit_is_413(served) -> None:
    _server, sock = served
    chunk = b"x" * (1 << 20)
    head = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(sock) as raw:
        raw.sendall(head)
        try:
            for _ in range(MAX_BODY // len(chunk) + 1):
                raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server answered and closed
        assert read_all(raw).startswith(b"HTTP/1.1 413 ")


def test_unknown_transfer_coding_is_501_and_closes(served) -> None:
    _server, sock = served
    data = exchange(sock, b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
                    b"junk" + PING)
    assert [status for status, _ in responses(data)] == [501]  # the rest is not taken as a request


@pytest.mark.parametrize(
    "lengths",
    [(b"5", b"5"), (b"5", b"6"), (b"+5",), (b"-5",), (b"5, 6",)],
    ids=["duplicate", "conflicting", "signed", "negative", "list"],
)
def test_bad_content_length_is_400(served, lengths: tuple[bytes, ...]) -> None:
    _server, sock = served
    head = b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: x\r\n" + b"".join(b"Content-Length: %s\r\n" % v for v in lengths)
    data = exchange(sock, head + b"\r\n{}\r\n" + PING)
    ((status, payload),) = responses(data)
    assert status == 400 and isinstance(json.loads(payload), list)


def test_length_and_transfer_coding_together_are_400(served) -> None:
    _server, sock = served
    data = exchange(sock, b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + PING)
    assert [status for status, _ in responses(data)] == [400]


def test_head_gets_no_body(served) -> None:
    _server, sock = served
    data = exchange(sock, b"HEAD /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Length: " in head
    assert rest.startswith(b"HTTP/1.1 200 ")  # the HEAD reply carried no body
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["pid"] == os.getpid()


def test_replies_are_framed_as_micro_http_frames_them(served) -> None:
    """cloud-hypervisor's server (micro_http) writes ``HTTP/1.1 200 `` with no reason phrase,
    a type and a length on every reply but a 204, and compact JSON (serde_json): ch-remote v40
    cannot parse a reason phrase, and scripts match the body as ``ch-remote`` prints it."""
    _server, sock = served
    data = exchange(sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    + str(len(json.dumps(BODY))).encode() + b"\r\n\r\n" + json.dumps(BODY).encode()
                    + b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    ping, rest = data.split(b"\r\n\r\n", 1)
    assert ping.split(b"\r\n")[0] == b"HTTP/1.1 200 "
    assert b"Content-Type: application/json" in ping
    length = int(ping.partition(b"Content-Length: ")[2].split(b"\r\n")[0])
    body, rest = rest[:length], rest[length:]
    assert b" " not in body and json.loads(body)["pid"] == os.getpid()
    created, rest = rest.split(b"\r\n\r\n", 1)
    assert created.split(b"\r\n")[0] == b"HTTP/1.1 204 " and b"Content-Length" not in created
    refused, error = rest.split(b"\r\n\r\n", 1)
    assert refused.split(b"\r\n")[0].startswith(b"HTTP/1.1 ") and refused.split(b"\r\n")[0].endswith(b" ")
    assert error.startswith(b'["') and b'", "' not in error


def test_bare_lf_line_ends_are_answered(served) -> None:
    _server, sock = served
    data = exchange(sock, b"GET /api/v1/vmm.ping HTTP/1.1\nHost: x\nConnection: close\n\n")
    ((status, payload),) = responses(data)
    assert status == 200 and json.loads(payload)["pid"] == os.getpid()


def test_request_without_host_is_still_answered(served) -> None:
    _server, sock = served
    ((status, _),) = responses(exchange(sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert status == 200


def test_pipelined_requests_are_answered_in_order(served) -> None:
    _server, sock = served
    data = exchange(sock, PING + b"GET /api/v1/vm.nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                    + PING.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert [status for status, _ in responses(data)] == [200, 404, 200]


def test_http_1_0_closes_after_the_reply(served) -> None:
    _server, sock = served
    ((status, _),) = responses(exchange(sock, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n" + PING))
    assert status == 200


# --- deadlines ----------------------------------------------------------------------------------


def test_slow_loris_header_is_cut_off(tmp_path: Path) -> None:
    server, sock = make_server(tmp_path, header_timeout=0.5)
    server.start()
    try:
        with connect(sock) as raw:
            start = time.monotonic()
            try:
                for byte in PING[:-2]:  # one byte at a time, never the end of the head
                    if select.select([raw], [], [], 0.05)[0]:
                        break  # the server answered
                    raw.sendall(bytes([byte]))
            except OSError:
                pass
            reply = read_all(raw)
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - start < 3
    finally:
        server.close()


def test_slow_body_is_cut_off(tmp_path: Path) -> None:
    server, sock = make_server(tmp_path, body_timeout=0.5)
    server.start()
    try:
        with connect(sock) as raw:
            raw.sendall(b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            assert read_all(raw).startswith(b"HTTP/1.1 408 ")
    finally:
        server.close()


def test_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    server, sock = make_server(tmp_path, idle_timeout=0.3)
    server.start()
    try:
        with connect(sock) as raw:
            raw.sendall(PING)
            time.sleep(0.1)
            start = time.monotonic()
            ((status, _),) = responses(read_all(raw))  # the reply, then the close
            assert status == 200 and time.monotonic() - start < 3
    finally:
        server.close()


# --- the connection bound and the listen queue --------------------------------------------------


def test_connections_over_the_bound_wait_for_a_free_slot(tmp_path: Path) -> None:
    server, sock = make_server(tmp_path, max_connections=2)
    server.start()
    try:
        first, second = ApiClient(sock), ApiClient(sock)
        assert first.get("vmm.ping") and second.get("vmm.ping")
        with connect(sock, timeout=0.5) as third:
            third.sendall(PING)
            with pytest.raises(TimeoutError):
                third.recv(4096)  # both slots are busy
            first.close()
            third.settimeout(5)
            assert third.recv(4096).startswith(b"HTTP/1.1 200 ")
        second.close()
    finally:
        server.close()


def test_a_burst_of_100_connects_is_queued_and_answered(tmp_path: Path) -> None:
    server, sock = make_server(tmp_path)
    clients = []
    try:
        # nobody accepts yet: every connect must fit in the listen queue
        for _ in range(100):
            raw = socket.socket(socket.AF_UNIX)
            raw.setblocking(False)
            raw.connect(sock)  # BlockingIOError when the queue is full
            clients.append(raw)
        server.start()
        for raw in clients:
            raw.settimeout(5)
            raw.sendall(PING.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            assert read_all(raw).startswith(b"HTTP/1.1 200 ")
            raw.close()
    finally:
        for raw in clients:
            raw.close()
        server.close()


def test_closed_server_stops_its_accept_loop(tmp_path: Path) -> None:
    server, _ = make_server(tmp_path)
    server.start()
    server.close()
    server._thread.join(timeout=5)
    assert not server._thread.is_alive()


def test_the_socket_file_appears_only_once_it_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that waits for the socket file and then connects (as scripts driving
    cloud-hypervisor do) is never refused: the file appears under its name after listen()."""
    seen: list[bool] = []
    real_listen = socket.socket.listen

    def listen(sock: socket.socket, *args: int) -> None:
        seen.append(os.path.exists(tmp_path / "api.sock"))
        real_listen(sock, *args)

    monkeypatch.setattr(socket.socket, "listen", listen)
    server, sock = make_server(tmp_path)
    try:
        assert seen == [False], "the socket file was there before listen()"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["api.sock", "api.sock.lock"]
        raw = connect(sock)
        raw.close()
    finally:
        server.close()
