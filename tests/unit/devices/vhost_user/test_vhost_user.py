"""The vhost-user frontend against a scripted backend: the messages of creation, DRIVER_OK and
reset in cloud-hypervisor's order, the guest RAM and eventfds passed as fds, REPLY_ACK, the
blk configuration space, virtio-net's local MAC, reconnection, and the refusals."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.devices.vhost_user.fake_backend import FakeBackend, unpack_regions, vring_fd_index
from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver
from vmsh.devices.vhost_user import protocol as p
from vmsh.devices.vhost_user.blk import BLK_CONFIG_SIZE, NUM_QUEUES_OFFSET, VhostUserBlk
from vmsh.devices.vhost_user.device import VhostUserState
from vmsh.devices.vhost_user.frontend import Frontend
from vmsh.devices.vhost_user.net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VhostUserNet
from vmsh.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.engine.memory import GuestMemoryMmap, MemoryOptions
from vmsh.engine.memory_manager import shared_memory_table
from vmsh.errors import DeviceStateError, VhostUserError

PROTOCOL_FEATURES = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
BLK_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << 9) | PROTOCOL_FEATURES  # FLUSH
ALL_PROTOCOL = sum(1 << b for b in (p.PROTOCOL_F_MQ, p.PROTOCOL_F_REPLY_ACK, p.PROTOCOL_F_CONFIG,
                                    p.PROTOCOL_F_LOG_SHMFD, p.PROTOCOL_F_INFLIGHT_SHMFD))
CAPACITY = 16384


class IrqfdRouter(FakeRouter):
    """A router with one eventfd per vector, as the engine's KvmMsiRouter has."""

    def __init__(self, vectors: int = 4) -> None:
        super().__init__()
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(vectors)]

    def eventfd(self, vector: int) -> int | None:
        return self.fds[vector] if 0 <= vector < len(self.fds) else None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def shared_mem() -> Iterator[GuestMemoryMmap]:
    mem = GuestMemoryMmap.create(16 << 20, MemoryOptions(shared=True))
    yield mem
    mem.close()


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "backend.sock")


def blk_config() -> bytes:
    config = bytearray(BLK_CONFIG_SIZE)
    struct.pack_into("<Q", config, 0, CAPACITY)
    return bytes(config)


def test_blk_creation_negotiates_in_order(shared_mem: GuestMemoryMmap, sock: str) -> None:
    backend = FakeBackend(sock, features=BLK_FEATURES, protocol=ALL_PROTOCOL, config=blk_config())
    dev = VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem))
    try:
        assert backend.requests() == [p.SET_OWNER, p.GET_FEATURES, p.GET_PROTOCOL_FEATURES, p.SET_PROTOCOL_FEATURES,
                                      p.GET_QUEUE_NUM, p.GET_CONFIG]
        # vmsh uses neither inflight tracking nor dirty logging: not acked
        acked = backend.messages[3].u64()
        assert acked == ALL_PROTOCOL & ~((1 << p.PROTOCOL_F_LOG_SHMFD) | (1 << p.PROTOCOL_F_INFLIGHT_SHMFD))
        # after REPLY_ACK every request without an answer of its own asks for one
        assert not backend.messages[3].flags & p.FLAG_NEED_REPLY
        # the driver sees the backend's features it may use, not the protocol bit
        assert dev.avail_features == BLK_FEATURES & ~PROTOCOL_FEATURES
        config = dev.read_config(0, BLK_CONFIG_SIZE)
        assert struct.unpack_from("<Q", config)[0] == CAPACITY
        assert struct.unpack_from("<H", config, NUM_QUEUES_OFFSET)[0] == 1
    finally:
        dev.close()
        backend.close()


def test_driver_ok_hands_the_rings_and_fds_to_the_backend(shared_mem: GuestMemoryMmap, sock: str) -> None:
    backend = FakeBackend(sock, features=BLK_FEATURES, protocol=ALL_PROTOCOL, config=blk_config())
    router = IrqfdRouter()
    dev = VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem), queue_size=64)
    transport = VirtioPciDevice(dev, shared_mem, router)
    transport.set_bar_address(0xE000_0000)
    driver = PciDriver(transport, shared_mem, Allocator(0x10000, 8 << 20))
    try:
        before = len(backend.messages)
        (ring,) = driver.probe()
        assert transport.activated and not transport.needs_reset
        sent = backend.messages[before:]
        assert [m.request for m in sent] == [p.SET_FEATURES, p.SET_MEM_TABLE, p.SET_VRING_NUM, p.SET_VRING_ADDR,
                                             p.SET_VRING_BASE, p.SET_VRING_CALL, p.SET_VRING_KICK,
                                             p.SET_VRING_ENABLE]
        assert all(m.flags & p.FLAG_NEED_REPLY for m in sent)
        # the driver's features, plus the protocol bit the backend needs to keep its rings disabled
        assert sent[0].u64() == (driver.device_features() & BLK_FEATURES) | PROTOCOL_FEATURES
        # guest RAM: one region, its memfd passed along, at this process's address
        ((gpa, size, user, offset),) = unpack_regions(sent[1].payload)
        region = shared_mem.regions[0]
        assert (gpa, size, user, offset) == (0, 16 << 20, region.host_addr, 0)
        assert len(sent[1].fds) == 1 and os.fstat(sent[1].fds[0]).st_ino == os.fstat(region.fd).st_ino
        assert p.VRING_STATE.unpack(sent[2].payload) == (0, 64)
        index, flags, desc, used, avail, log = p.VRING_ADDR.unpack(sent[3].payload)
        assert (index, flags, log) == (0, 0, 0)
        assert (desc, used, avail) == tuple(region.host_addr + a for a in (ring.desc, ring.used, ring.avail))
        assert p.VRING_STATE.unpack(sent[4].payload) == (0, 0)
        # call: the irqfd of the queue's vector (1); kick: the device's own eventfd
        assert vring_fd_index(sent[5]) == (0, True)
        assert os.fstat(sent[5].fds[0]).st_ino == os.fstat(router.fds[1]).st_ino
        assert os.fstat(sent[6].fds[0]).st_ino == os.fstat(dev.kick_fds[0]).st_ino
        assert p.VRING_STATE.unpack(sent[7].payload) == (0, 1)
        # a notification that did not come through the ioeventfd reaches the backend's kick fd
        driver.kick(0)
        assert os.eventfd_read(sent[6].fds[0]) == 1

        # a paused VM's backend stops serving the rings, and starts again on resume
        before = len(backend.messages)
        dev.pause()
        dev.resume()
        assert [(m.request, p.VRING_STATE.unpack(m.payload)) for m in backend.messages[before:]] == [
            (p.SET_VRING_ENABLE, (0, 0)), (p.SET_VRING_ENABLE, (0, 1))]

        # reset: the rings are disabled and their positions fetched
        before = len(backend.messages)
        driver.set_common(0x14, 0, 1)
        assert backend.requests()[before:] == [p.SET_VRING_ENABLE, p.GET_VRING_BASE]
        assert p.VRING_STATE.unpack(backend.messages[before].payload) == (0, 0)
    finally:
        transport.close()
        router.close()
        backend.close()


def test_a_refused_request_fails_activation(shared_mem: GuestMemoryMmap, sock: str) -> None:
    backend = FakeBackend(sock, features=BLK_FEATURES, protocol=ALL_PROTOCOL, config=blk_config(),
                          refuse=p.SET_MEM_TABLE)
    router = IrqfdRouter()
    transport = VirtioPciDevice(VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem)),
                                shared_mem, router)
    transport.set_bar_address(0xE000_0000)
    try:
        PciDriver(transport, shared_mem, Allocator(0x10000, 8 << 20)).probe()
        assert not transport.activated and transport.needs_reset  # DEVICE_NEEDS_RESET for the driver
    finally:
        transport.close()
        router.close()
        backend.close()


def test_without_protocol_features_no_ack_and_no_enable(shared_mem: GuestMemoryMmap, sock: str) -> None:
    backend = FakeBackend(sock, features=BLK_FEATURES & ~PROTOCOL_FEATURES)
    frontend = Frontend(sock, connect_timeout=2)
    try:
        frontend.connect()
        frontend.negotiate(ALL_PROTOCOL)
        assert backend.requests() == [p.SET_OWNER, p.GET_FEATURES]
        with pytest.raises(VhostUserError, match="does not offer its configuration space"):
            frontend.get_config(BLK_CONFIG_SIZE)
        frontend.close()  # the fake serves one connection at a time
        # a blk backend without CONFIG cannot tell the disk's size: creation fails
        with pytest.raises(VhostUserError):
            VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem))
    finally:
        frontend.close()
        backend.close()


def test_net_mac_is_local_and_not_sent_to_the_backend(shared_mem: GuestMemoryMmap, sock: str) -> None:
    features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF) | PROTOCOL_FEATURES
    backend = FakeBackend(sock, features=features, protocol=ALL_PROTOCOL, queues=2)
    router = IrqfdRouter()
    mac = bytes.fromhex("525400123456")
    dev = VhostUserNet("_net0", sock, lambda: shared_memory_table(shared_mem), mac, queue_size=64)
    transport = VirtioPciDevice(dev, shared_mem, router)
    transport.set_bar_address(0xE000_0000)
    try:
        assert dev.avail_features >> VIRTIO_NET_F_MAC & 1
        assert dev.read_config(0, 6) == mac
        before = len(backend.messages)
        driver = PciDriver(transport, shared_mem, Allocator(0x10000, 8 << 20))
        driver.probe(features=dev.avail_features)
        set_features = backend.messages[before]
        assert set_features.request == p.SET_FEATURES
        assert set_features.u64() == features  # the MAC bit stays here
        assert backend.requests().count(p.SET_VRING_KICK) == 2
    finally:
        transport.close()
        router.close()
        backend.close()


def test_private_ram_is_refused_before_connecting(sock: str) -> None:
    mem = GuestMemoryMmap.create(4 << 20)
    try:
        with pytest.raises(VhostUserError, match="is not shared memory: vhost-user needs --memory shared=on"):
            VhostUserBlk("_disk0", sock, lambda: shared_memory_table(mem))
        assert not os.path.exists(sock)
    finally:
        mem.close()


def test_no_backend_is_a_clear_error_after_the_retries(shared_mem: GuestMemoryMmap, sock: str) -> None:
    frontend = Frontend(sock, connect_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(VhostUserError, match=f"cannot connect to the vhost-user backend at {sock}"):
        frontend.connect()
    assert time.monotonic() - start >= 0.2  # it retried


def test_backend_restart_is_followed_by_a_replay(shared_mem: GuestMemoryMmap, sock: str) -> None:
    backend = FakeBackend(sock, features=BLK_FEATURES, protocol=ALL_PROTOCOL, config=blk_config())
    router = IrqfdRouter()
    watcher = CallingWatcher()
    dev = VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem), watcher=watcher)
    transport = VirtioPciDevice(dev, shared_mem, router)
    transport.set_bar_address(0xE000_0000)
    try:
        PciDriver(transport, shared_mem, Allocator(0x10000, 8 << 20)).probe()
        backend.drop()
        watcher.fire()  # what the I/O loop does when the socket turns readable
        with backend.changed:
            # the backend's thread may still be recording the first set-up's last messages
            # (those that need no reply): count the second connection's own
            assert backend.changed.wait_for(lambda: len(backend.requests(connection=2)) >= 13, 5), \
                backend.requests()
        again = backend.requests(connection=2)
        assert again[:5] == [p.SET_OWNER, p.GET_FEATURES, p.GET_PROTOCOL_FEATURES, p.SET_PROTOCOL_FEATURES,
                             p.GET_QUEUE_NUM]
        assert again[5:13] == [p.SET_FEATURES, p.SET_MEM_TABLE, p.SET_VRING_NUM, p.SET_VRING_ADDR, p.SET_VRING_BASE,
                               p.SET_VRING_CALL, p.SET_VRING_KICK, p.SET_VRING_ENABLE]
        assert transport.activated and not dev.needs_reset
    finally:
        transport.close()
        router.close()
        backend.close()


def test_a_replay_that_breaks_is_tried_again(shared_mem: GuestMemoryMmap, sock: str) -> None:
    """The new connection reached a backend that went away during the replay (the old one, still
    closing): the device connects again instead of giving up."""
    backend = FakeBackend(sock, features=BLK_FEATURES, protocol=ALL_PROTOCOL, config=blk_config(),
                          hang_up_on=(2, p.SET_MEM_TABLE))
    router = IrqfdRouter()
    watcher = CallingWatcher()
    dev = VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem), watcher=watcher)
    transport = VirtioPciDevice(dev, shared_mem, router)
    transport.set_bar_address(0xE000_0000)
    try:
        PciDriver(transport, shared_mem, Allocator(0x10000, 8 << 20)).probe()
        backend.drop()
        watcher.fire()
        with backend.changed:
            assert backend.changed.wait_for(lambda: backend.connections == 3, 5)
        deadline = time.monotonic() + 5
        while p.SET_VRING_ENABLE not in backend.requests()[-1:] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.requests()[-1] == p.SET_VRING_ENABLE and not dev.needs_reset
    finally:
        transport.close()
        router.close()
        backend.close()


class CallingWatcher:
    """An I/O loop stand-in: remembers the callbacks and calls them on ``fire``."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        self.callbacks.pop(fd, None)

    def fire(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for callback in list(self.callbacks.values()):
                callback()
            if not self.callbacks:
                return
            time.sleep(0.01)
        raise AssertionError("the device did not notice the hang-up")


def test_restore_is_refused(shared_mem: GuestMemoryMmap, sock: str) -> None:
    backend = FakeBackend(sock, features=BLK_FEATURES, protocol=ALL_PROTOCOL, config=blk_config())
    dev = VhostUserBlk("_disk0", sock, lambda: shared_memory_table(shared_mem))
    try:
        with pytest.raises(DeviceStateError, match="cannot be restored"):
            dev.restore(VhostUserState(sock))
    finally:
        dev.close()
        backend.close()


def test_fs_is_a_small_subclass_with_its_own_config(shared_mem: GuestMemoryMmap, sock: str) -> None:
    from vmsh.devices.vhost_user.fs import TAG_SIZE, VIRTIO_ID_FS, VhostUserFs

    backend = FakeBackend(sock, features=(1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES, protocol=ALL_PROTOCOL,
                          queues=2)
    router = IrqfdRouter()
    dev = VhostUserFs("_fs0", sock, lambda: shared_memory_table(shared_mem), "myfs", queue_size=64)
    transport = VirtioPciDevice(dev, shared_mem, router)
    transport.set_bar_address(0xE000_0000)
    try:
        assert dev.device_type == VIRTIO_ID_FS and len(dev.queue_max_sizes) == 2  # hiprio + one request queue
        assert dev.read_config(0, TAG_SIZE + 4) == b"myfs".ljust(TAG_SIZE, b"\0") + struct.pack("<I", 1)
        PciDriver(transport, shared_mem, Allocator(0x10000, 8 << 20)).probe()
        assert backend.requests().count(p.SET_VRING_KICK) == 2 and transport.activated
    finally:
        transport.close()
        router.close()
        backend.close()


def test_shared_memory_zones_are_passed_as_their_files(tmp_path: Path) -> None:
    from vmsh.engine.memory_manager import ZoneSpec, create_zones

    shared, private = tmp_path / "shared.ram", tmp_path / "private.ram"
    mem = create_zones([ZoneSpec(2 << 20, MemoryOptions(shared=True), file=str(shared)),
                        ZoneSpec(2 << 20, MemoryOptions(shared=True))])
    try:
        first, second = shared_memory_table(mem)
        assert (first.guest_addr, first.size, first.offset) == (0, 2 << 20, 0)
        assert os.fstat(first.fd).st_ino == shared.stat().st_ino
        assert (second.guest_addr, second.size) == (2 << 20, 2 << 20)
        assert second.user_addr == mem.regions[1].host_addr
    finally:
        mem.close()
    mem = create_zones([ZoneSpec(2 << 20, MemoryOptions(shared=False), file=str(private))])
    try:
        with pytest.raises(VhostUserError, match="guest RAM at 0x0 is not shared memory"):
            shared_memory_table(mem)
    finally:
        mem.close()
