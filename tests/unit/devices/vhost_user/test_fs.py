"""The virtio-fs device on top of the vhost-user frontend, against the scripted backend: what the
guest's driver reads (device type, tag, request queues, queue sizes) and the queue count checked
against what the backend serves."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.devices.vhost_user.fake_backend import FakeBackend
from vmsh.devices.vhost_user import protocol as p
from vmsh.devices.vhost_user.fs import TAG_SIZE, VIRTIO_ID_FS, VhostUserFs
from vmsh.errors import VhostUserError

VERSION_1 = 1 << 32
#: what virtiofsd offers, in short: virtio 1 and the protocol-features bit
FEATURES = VERSION_1 | 1 << p.VHOST_USER_F_PROTOCOL_FEATURES


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Callable[..., FakeBackend]]:
    made: list[FakeBackend] = []

    def make(queues: int | None) -> FakeBackend:
        made.append(FakeBackend(str(tmp_path / f"fs{len(made)}.sock"), features=FEATURES,
                                protocol=0 if queues is None else 1 << p.PROTOCOL_F_MQ, queues=queues or 0))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_config_space_is_the_tag_and_the_request_queues(backend: Callable[..., FakeBackend]) -> None:
    served = backend(4)
    dev = VhostUserFs("fs0", served.path, lambda: [], "hostshare", num_queues=3, queue_size=256)
    try:
        assert dev.device_type == VIRTIO_ID_FS == 26
        config = dev.read_config(0, 40)
        assert config[:TAG_SIZE] == b"hostshare".ljust(TAG_SIZE, b"\0")
        assert struct.unpack("<I", config[TAG_SIZE:]) == (3,)
        # the hiprio queue, then the request queues, each of queue_size
        assert tuple(dev.queue_max_sizes) == (256,) * 4
        assert dev.avail_features == VERSION_1
        assert served.requests()[:2] == [p.SET_OWNER, p.GET_FEATURES]
        assert p.GET_QUEUE_NUM in served.requests()
    finally:
        dev.close()


def test_a_tag_of_36_bytes_fills_the_field_without_a_nul(backend: Callable[..., FakeBackend]) -> None:
    served = backend(2)
    dev = VhostUserFs("fs0", served.path, lambda: [], "t" * TAG_SIZE)
    try:
        assert dev.read_config(0, TAG_SIZE) == b"t" * TAG_SIZE
        assert tuple(dev.queue_max_sizes) == (1024, 1024)
    finally:
        dev.close()


@pytest.mark.parametrize("tag", ["", "t" * (TAG_SIZE + 1)])
def test_an_empty_or_too_long_tag_is_refused(backend: Callable[..., FakeBackend], tag: str) -> None:
    with pytest.raises(VhostUserError, match="a virtio-fs tag has 1 to 36 bytes"):
        VhostUserFs("fs0", backend(2).path, lambda: [], tag)


def test_more_queues_than_the_backend_serves_are_refused(backend: Callable[..., FakeBackend]) -> None:
    served = backend(2)
    with pytest.raises(VhostUserError, match="the backend serves 2 queues, 3 were asked for"):
        VhostUserFs("fs0", served.path, lambda: [], "x", num_queues=2)


def test_a_backend_without_mq_is_taken_to_serve_two_queues(backend: Callable[..., FakeBackend]) -> None:
    """As cloud-hypervisor takes it: the hiprio queue and one request queue."""
    VhostUserFs("fs0", backend(None).path, lambda: [], "x", num_queues=1).close()
    with pytest.raises(VhostUserError, match="the backend serves 2 queues, 3 were asked for"):
        VhostUserFs("fs0", backend(None).path, lambda: [], "x", num_queues=2)
