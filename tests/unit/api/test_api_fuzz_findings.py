"""Regression tests for what ``ci/fuzz/api.sh`` (schemathesis against vmsh's openapi.json and
cloud-hypervisor's v40 document) found; ``ci/fuzz/README.md`` lists the findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmsh.api.client import ApiClient, ApiError
from vmsh.api.http import ApiServer
from vmsh.engine.vmm import Vmm

from .fake_vm import FakeVm


@pytest.fixture
def client(tmp_path: Path):
    server = ApiServer(Vmm(vm_factory=FakeVm), path=str(tmp_path / "api.sock")).start()
    with ApiClient(str(tmp_path / "api.sock")) as c:
        yield c
    server.close()


@pytest.mark.parametrize("fd", [1 << 31, -(1 << 31) - 1, 1 << 64])
def test_a_net_fd_beyond_i32_is_refused(client, fd: int) -> None:
    """Was: vm.create took ``"fds": [2147483648]`` (204) while the document says int32 and
    cloud-hypervisor's serde refuses it (its fds are i32s)."""
    body = {"payload": {"kernel": "/k"}, "net": [{"fds": [fd]}]}
    with pytest.raises(ApiError) as info:
        client.put("vm.create", body)
    assert info.value.status == 400
    assert info.value.messages[-1] == f"net[0].fds[0]: invalid value: integer `{fd}`, expected i32"


def test_net_fds_within_i32_are_taken(client) -> None:
    client.put("vm.create", {"payload": {"kernel": "/k"}, "net": [{"fds": [(1 << 31) - 1, 0]}]})


def test_hot_add_on_a_segment_a_vm_without_platform_lacks_is_a_400(client) -> None:
    """Was: a 500 ("PCI segment 65534 does not exist" from the hotplug manager, an internal error
    with the stand-in VM); a VM without ``--platform`` has one segment, which validation now
    knows, as cloud-hypervisor's does."""
    client.put("vm.create", {"payload": {"kernel": "/k"}})
    client.put("vm.boot")
    for action, body in (("vm.add-pmem", {"file": "/p", "pci_segment": 65534}),
                         ("vm.add-disk", {"path": "/d", "pci_segment": 1})):
        with pytest.raises(ApiError) as info:
            client.put(action, body)
        assert info.value.status == 400
        assert info.value.messages[-1] == f"Invalid PCI segment id: {body['pci_segment']}"
    # the config is unchanged
    assert not client.get("vm.info")["config"].get("pmem")


def test_vmm_shutdown_is_answered_before_the_server_closes(tmp_path: Path, monkeypatch) -> None:
    """Was: ``vmm.shutdown`` of a VMM with a created VM often got no reply at all: the
    launcher closes the server as soon as the VMM has exited and the process ends, while the
    connection thread had not written the reply yet. close() now lets the requests being
    answered finish (the reply is held back here to make the race certain)."""
    import socket
    import threading
    import time

    from vmsh.api import http

    respond = http._Reader.respond

    def slow_respond(self: Any, request: Any, status: int, payload: bytes | None) -> bool:
        time.sleep(0.3)
        return respond(self, request, status, payload)

    monkeypatch.setattr(http._Reader, "respond", slow_respond)
    vmm = Vmm(vm_factory=FakeVm)
    sock = str(tmp_path / "api.sock")
    server = ApiServer(vmm, path=sock).start()
    closed = threading.Event()

    def launcher() -> None:  # what vmsh.launcher.run does once the control loop has ended
        vmm.exited.wait(10)
        server.close()
        closed.set()

    threading.Thread(target=launcher, daemon=True).start()
    with ApiClient(sock) as c:
        c.put("vm.create", {"payload": {"kernel": "/k"}})
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(sock)
    conn.sendall(b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    assert closed.wait(10)
    # the process would exit now: the reply must already be there
    reply = conn.recv(65536, socket.MSG_DONTWAIT)
    assert reply.startswith(b"HTTP/1.1 204 ")
    conn.close()
