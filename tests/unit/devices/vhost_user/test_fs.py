"""The virtio-fs device on top of the vhost-user frontend, against a scripted backend: what the
guest's driver reads (device type, tag, request queues, queue sizes) and the queue check against
what the backend serves."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsh.devices.vhost_user import protocol as p
from vmsh.devices.vhost_user.fs import VIRTIO_ID_FS, VhostUserFs
from vmsh.errors import VhostUserError

VERSION_1 = 1 << 32


class ScriptedBackend:
    """Answers the creation-time conversation (SET_OWNER, GET_FEATURES, the protocol features and
    GET_QUEUE_NUM) like a virtio-fs backend serving ``queues`` queues, and records the requests."""

    def __init__(self, path: Path, queues: int | None) -> None:
        self.queues = queues
        self.requests: list[int] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while header := conn.recv(p.HEADER.size, socket.MSG_WAITALL):
                request, _flags, size = p.HEADER.unpack(header)
                if size:
                    conn.recv(size, socket.MSG_WAITALL)
                self.requests.append(request)
                protocol = 1 << p.PROTOCOL_F_MQ if self.queues is not None else 0
                answers = {p.GET_FEATURES: VERSION_1 | 1 << p.VHOST_USER_F_PROTOCOL_FEATURES,
                           p.GET_PROTOCOL_FEATURES: protocol, p.GET_QUEUE_NUM: self.queues or 0}
                if request in answers:
                    conn.sendall(p.HEADER.pack(request, p.VERSION | p.FLAG_REPLY, 8) + p.U64.pack(answers[request]))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[str, ScriptedBackend]]:
    made: list[ScriptedBackend] = []

    def make(queues: int | None) -> tuple[str, ScriptedBackend]:
        path = tmp_path / f"fs{len(made)}.sock"
        made.append(ScriptedBackend(path, queues))
        return str(path), made[-1]

    yield make  # type: ignore[misc]  # a factory fixture
    for b in made:
        b.close()


def test_config_space_is_the_tag_and_the_request_queues(backend) -> None:
    path, served = backend(4)
    dev = VhostUserFs("fs0", path, lambda: [], tag="hostshare", num_request_queues=3, queue_size=256)
    try:
        assert dev.device_type == VIRTIO_ID_FS == 26
        config = dev.read_config(0, 40)
        assert config[:36] == b"hostshare".ljust(36, b"\0")
        assert struct.unpack("<I", config[36:]) == (3,)
        # the hiprio queue, then the request queues, each of queue_size
        assert tuple(dev.queue_max_sizes) == (256,) * 4
        assert dev.avail_features == VERSION_1
        assert served.requests[:2] == [p.SET_OWNER, p.GET_FEATURES]
        assert p.GET_QUEUE_NUM in served.requests
    finally:
        dev.close()


def test_a_tag_of_36_bytes_fills_the_field_without_a_nul(backend) -> None:
    path, _ = backend(2)
    dev = VhostUserFs("fs0", path, lambda: [], tag="t" * 36)
    try:
        assert dev.read_config(0, 36) == b"t" * 36
        assert tuple(dev.queue_max_sizes) == (1024, 1024)
    finally:
        dev.close()


def test_more_queues_than_the_backend_serves_are_refused(backend) -> None:
    path, _ = backend(2)
    with pytest.raises(VhostUserError, match="the backend serves 2 queues, 3 were asked for"):
        VhostUserFs("fs0", path, lambda: [], tag="x", num_request_queues=2)


def test_a_backend_without_mq_is_taken_to_serve_two_queues(backend) -> None:
    """As cloud-hypervisor takes it: the hiprio queue and one request queue."""
    path, _ = backend(None)
    VhostUserFs("fs0", path, lambda: [], tag="x", num_request_queues=1).close()
    path, _ = backend(None)
    with pytest.raises(VhostUserError, match="the backend serves 2 queues, 3 were asked for"):
        VhostUserFs("fs0", path, lambda: [], tag="x", num_request_queues=2)
