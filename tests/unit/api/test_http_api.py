"""The HTTP API against a VMM with a stand-in VM: routes, bodies, status codes, events."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient, ApiError
from vmsh.api.http import MAX_BODY, ApiServer
from vmsh.engine.events import EventMonitor
from vmsh.engine.vmm import Vmm
from vmsh.errors import VmshError

from .fake_vm import FakeVm

BODY = {"payload": {"kernel": "/k"}, "disks": [{"path": "/a", "id": "d0"}]}


@pytest.fixture
def api(tmp_path: Path):
    events_path = tmp_path / "events"
    vmm = Vmm(EventMonitor.open(path=str(events_path)), vm_factory=FakeVm)
    sock = str(tmp_path / "api.sock")
    server = ApiServer(vmm, path=sock).start()
    client = ApiClient(sock)
    yield client, vmm, events_path, sock
    client.close()
    server.close()


def events(path: Path) -> list[tuple[str, str]]:
    records = [json.loads(r) for r in path.read_text().split("\n\n") if r.strip()]
    return [(r["source"], r["event"]) for r in records]


def status_of(call) -> tuple[int, list[str]]:
    with pytest.raises(ApiError) as info:
        call()
    return info.value.status, info.value.messages


def test_ping(api) -> None:
    client, *_ = api
    reply = client.get("vmm.ping")
    assert reply["pid"] == os.getpid() and "version" in reply


def test_lifecycle_and_events(api) -> None:
    client, _vmm, events_path, _ = api
    assert client.put("vm.create", BODY) is None
    assert client.get("vm.info")["state"] == "Created"
    client.put("vm.boot")
    info = client.get("vm.info")
    assert info["state"] == "Running"
    assert info["config"]["disks"][0]["id"] == "d0"
    client.put("vm.pause")
    assert client.get("vm.info")["state"] == "Paused"
    client.put("vm.snapshot", {"destination_url": "file:///tmp/snap"})
    client.put("vm.resume")
    client.put("vm.shutdown")
    assert client.get("vm.info")["state"] == "Created"
    client.put("vm.delete")
    assert events(events_path) == [
        ("vm", "booting"), ("vm", "booted"), ("vm", "pausing"), ("vm", "paused"),
        ("vm", "snapshotting"), ("vm", "snapshotted"), ("vm", "resuming"), ("vm", "resumed"),
        ("vm", "shutdown"), ("vm", "deleted"),
    ]


def test_wrong_state_is_500_naming_both_states(api) -> None:
    client, *_ = api
    client.put("vm.create", BODY)
    client.put("vm.boot")
    client.put("vm.pause")
    status, messages = status_of(lambda: client.put("vm.pause"))
    assert status == 500
    assert messages[-1] == "Invalid transition from Paused to Paused"
    client.put("vm.resume")
    status, messages = status_of(lambda: client.put("vm.snapshot", {"destination_url": "file:///tmp/x"}))
    assert (status, messages[-1]) == (500, "Trying to snapshot while VM is running")
    status, _ = status_of(lambda: client.put("vm.create", BODY))
    assert status == 500


def test_no_vm_is_404(api) -> None:
    client, *_ = api
    assert status_of(lambda: client.get("vm.info"))[0] == 404
    assert status_of(lambda: client.put("vm.boot"))[0] == 404
    assert status_of(lambda: client.put("vm.remove-device", {"id": "x"}))[0] == 404
    client.put("vm.delete")  # no error without a VM


def test_cold_add_and_remove(api) -> None:
    client, vmm, *_ = api
    client.put("vm.create", BODY)
    assert client.put("vm.add-disk", {"path": "/b", "id": "d1"}) is None
    status, messages = status_of(lambda: client.put("vm.add-disk", {"path": "/c", "id": "d1"}))
    assert (status, messages[-1]) == (409, "Identifier d1 is not unique")
    status, messages = status_of(lambda: client.put("vm.add-disk", {"path": "/c", "num_queues": 4}))
    assert (status, messages[-1]) == (400, "Queue count (4) must not exceed boot vCPUs (1)")
    client.put("vm.remove-device", {"id": "d1"})
    assert [d.id for d in vmm.config.disks] == ["d0"]
    assert status_of(lambda: client.put("vm.remove-device", {"id": "nope"})) == (
        404, ["Error from API", "No device with id nope"])


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("GET", "/api/v1/vm.nothing", None, 404),
        ("POST", "/api/v1/vm.boot", None, 400),
        ("GET", "/api/v1/vm.boot", None, 400),
        ("PUT", "/api/v1/vm.boot", b"{}", 400),
        ("PUT", "/api/v1/vm.create", None, 400),
        ("PUT", "/api/v1/vm.create", b"{not json", 400),
        ("PUT", "/api/v1/vm.create", b'{"cpus": {"boot_vcpus": "x", "max_vcpus": 1}}', 400),
        ("PUT", "/api/v1/vm.snapshot", b'{"url": "file:///x"}', 400),
    ],
)
def test_bad_requests(api, method: str, path: str, body: bytes | None, status: int) -> None:
    client, *_ = api
    got, payload = client.raw(method, path, body)
    assert got == status
    assert isinstance(json.loads(payload), list)
    assert client.get("vmm.ping")["pid"]  # the connection and the server live on


def test_oversized_body_is_413_and_server_survives(api) -> None:
    client, _, _, sock = api
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(sock)
    raw.sendall(f"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    reply = raw.recv(4096).decode()
    raw.close()
    assert reply.startswith("HTTP/1.1 413 ")
    assert client.get("vmm.ping")["pid"]


def test_garbage_connection_does_not_hurt(api) -> None:
    client, _, _, sock = api
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(sock)
    raw.sendall(b"\x00\x01garbage\r\n\r\n")
    assert raw.recv(4096).startswith(b"HTTP/1.1 400 ")
    raw.close()
    assert client.get("vmm.ping")["pid"]


def test_second_server_on_same_path_is_refused(api, tmp_path: Path) -> None:
    _, vmm, _, sock = api
    with pytest.raises(VmshError, match="in use"):
        ApiServer(vmm, path=sock)


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    server = ApiServer(Vmm(), path=path).start()
    with ApiClient(path) as client:
        assert client.get("vmm.ping")["pid"]
    server.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def test_vmm_shutdown(api) -> None:
    client, vmm, events_path, _ = api
    client.put("vm.create", BODY)
    client.put("vm.boot")
    client.put("vmm.shutdown")
    assert vmm.exited.is_set()
    assert events(events_path)[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]


def test_restore_takes_net_fds_as_scm_rights(tmp_path: Path) -> None:
    seen = []

    def restore_factory(directory, request, events, on_guest_event, post):
        seen.append([(e.id, e.fds) for e in request.net_fds])
        raise VmshError("stop here")

    vmm = Vmm(EventMonitor(None), vm_factory=FakeVm, restore_factory=restore_factory)
    sock = str(tmp_path / "api.sock")
    server = ApiServer(vmm, path=sock).start()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        body = {"source_url": "file:///s", "net_fds": [{"id": "net0", "num_fds": 1}, {"id": "net1", "num_fds": 1}]}
        with ApiClient(sock) as client, pytest.raises(ApiError):
            client.put("vm.restore", body, fds=[r1, r2])
        # each entry got its own descriptor (received as new numbers), in order
        (entries,) = seen
        assert [e[0] for e in entries] == ["net0", "net1"] and all(len(e[1]) == 1 for e in entries)
        with ApiClient(sock) as client, pytest.raises(ApiError) as err:
            client.put("vm.restore", body, fds=[r1])
        assert err.value.status == 400 and "asks for 2 file descriptors" in str(err.value)
    finally:
        server.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)
