"""virtio-vsock: cloud-hypervisor's unix-socket protocol both ways, credit, hostile packets, state.

The test plays the guest's vsock driver on rings in a ``GuestMemoryMmap`` and the engine's I/O loop
with a watcher it pumps by hand; the host side is real unix sockets.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeInterrupt, Ring
from vmsh.config.model import VsockConfig
from vmsh.devices.virtio.device import COMMON_FEATURES
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.devices.virtio.vsock import (
    CONN_TX_BUF_SIZE,
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_TYPE_STREAM,
    VirtioVsock,
    VirtioVsockState,
)
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceError, DeviceStateError

CID = 3
HDR = struct.Struct("<QQIIIHHIII")
RX_BUF = 4096


class FakeWatcher:
    """The I/O loop, pumped by the test: calls the callbacks of readable fds."""

    def __init__(self) -> None:
        self.fds: dict[int, Callable[[], None]] = {}

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        assert fd not in self.fds, "fd watched twice"
        self.fds[fd] = callback

    def remove(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def pump(self, rounds: int = 50) -> int:
        """Serve readable fds until nothing is readable; returns how many callbacks ran."""
        ran = 0
        for _ in range(rounds):
            if not self.fds:
                break
            readable, _, _ = select.select(list(self.fds), [], [], 0)
            if not readable:
                break
            for fd in readable:
                cb = self.fds.get(fd)
                if cb is not None:
                    cb()
                    ran += 1
        return ran


class Packet:
    def __init__(self, raw: bytes) -> None:
        (self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op, self.flags,
         self.buf_alloc, self.fwd_cnt) = HDR.unpack(raw[:HDR_SIZE])
        self.data = raw[HDR_SIZE:HDR_SIZE + self.len]

    def __repr__(self) -> str:
        return f"Packet(op={self.op}, {self.src_port}->{self.dst_port}, len={self.len}, flags={self.flags})"


class Guest:
    """The guest's virtio_transport: rx buffers split header/data like Linux 6.1, tx packets."""

    def __init__(self, dev: VirtioVsock, mem: GuestMemoryMmap, alloc: Allocator, rx_buffers: int = 8) -> None:
        self.dev, self.mem, self.alloc = dev, mem, alloc
        self.rings = [Ring.create(mem, alloc, 64) for _ in range(3)]
        queues = [r.attach(VirtQueue(mem, 256), event_idx=False) for r in self.rings]
        self.irq = FakeInterrupt()
        self.bufs: dict[int, tuple[int, int]] = {}
        self.fill(rx_buffers, kick=False)
        self.event_bufs = []
        for _ in range(2):
            buf = alloc.alloc(4)
            self.event_bufs.append(buf)
            self.rings[2].add([(buf, 4, True)])
        dev.activate(mem, queues, self.irq, COMMON_FEATURES)

    def fill(self, n: int, kick: bool = True, size: int = RX_BUF) -> None:
        for _ in range(n):
            hdr, data = self.alloc.alloc(HDR_SIZE), self.alloc.alloc(size)
            head = self.rings[0].add([(hdr, HDR_SIZE, True), (data, size, True)])
            self.bufs[head] = (hdr, data)
        if kick:
            self.dev.queue_notify(0)

    def recv(self) -> list[Packet]:
        out = []
        for head, length in self.rings[0].take_used():
            hdr, data = self.bufs.pop(head)
            raw = self.mem.read(hdr, HDR_SIZE) + self.mem.read(data, max(0, length - HDR_SIZE))
            out.append(Packet(raw))
        return out

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", *, flags: int = 0,
             buf_alloc: int = 1 << 20, fwd_cnt: int = 0, length: int | None = None,
             ptype: int = VIRTIO_VSOCK_TYPE_STREAM,
             src_cid: int = CID, dst_cid: int = 2) -> None:
        hdr = HDR.pack(src_cid, dst_cid, src_port, dst_port, len(data) if length is None else length, ptype, op,
                       flags, buf_alloc, fwd_cnt)
        addr = self.alloc.alloc(HDR_SIZE + max(1, len(data)))
        self.mem.write(addr, hdr + data)
        bufs = [(addr, HDR_SIZE, False)]
        if data:
            bufs.append((addr + HDR_SIZE, len(data), False))
        self.rings[1].add(bufs)
        self.dev.queue_notify(1)
        assert self.rings[1].take_used()  # tx buffers always come back


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vsock.sock")


@pytest.fixture
def env(sock_path: str, mem: GuestMemoryMmap) -> Iterator[tuple[VirtioVsock, FakeWatcher]]:
    watcher = FakeWatcher()
    dev = VirtioVsock.from_config(VsockConfig(cid=CID, socket=sock_path), watcher)
    yield dev, watcher
    dev.close()


def host_listen(path: str) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(2)
    return srv


def recv_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(2)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def assert_closed(sock: socket.socket) -> None:
    """The device closed its end (EOF, or a reset when it left data unread)."""
    sock.settimeout(2)
    try:
        assert sock.recv(10) == b""
    except ConnectionResetError:
        pass


def test_vsock_config_and_socket(env: tuple[VirtioVsock, FakeWatcher], sock_path: str) -> None:
    dev, _ = env
    assert dev.device_type == 19 and len(dev.queue_max_sizes) == 3
    assert dev.read_config(0, 8) == struct.pack("<Q", CID)
    assert Path(sock_path).is_socket()


def test_vsock_socket_setup_errors(tmp_path: Path) -> None:
    watcher = FakeWatcher()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    dev = VirtioVsock(CID, str(stale), watcher)
    dev.close()
    assert not stale.exists()
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(DeviceError):
        VirtioVsock(CID, str(plain), watcher)
    for cid in (0, 1, 2, 0xFFFF_FFFF):
        with pytest.raises(DeviceError):
            VirtioVsock(cid, str(tmp_path / "x.sock"), watcher)


def test_vsock_guest_to_host(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                             sock_path: str) -> None:
    dev, watcher = env
    srv = host_listen(f"{sock_path}_1234")
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 5000, 1234)
    host, _ = srv.accept()
    [resp] = guest.recv()
    assert (resp.op, resp.src_port, resp.dst_port, resp.src_cid, resp.dst_cid) == (VIRTIO_VSOCK_OP_RESPONSE, 1234,
                                                                                   5000, 2, CID)
    assert resp.buf_alloc == CONN_TX_BUF_SIZE and resp.type == VIRTIO_VSOCK_TYPE_STREAM
    guest.send(VIRTIO_VSOCK_OP_RW, 5000, 1234, b"hello")
    assert recv_exact(host, 5) == b"hello"
    host.sendall(b"world")
    watcher.pump()
    [rw] = guest.recv()
    assert (rw.op, rw.data, rw.fwd_cnt) == (VIRTIO_VSOCK_OP_RW, b"world", 5)
    # the host closes: the guest hears SHUTDOWN, answers RST, the connection is gone
    host.close()
    guest.fill(2)
    watcher.pump()
    [shut] = guest.recv()
    assert shut.op == VIRTIO_VSOCK_OP_SHUTDOWN and shut.flags == 3
    guest.send(VIRTIO_VSOCK_OP_RST, 5000, 1234)
    assert dev.counters()["connections"] == 0 and dev.counters()["guest_connections"] == 1
    assert dev.counters()["tx_bytes"] == 5 and dev.counters()["rx_bytes"] == 5
    srv.close()


def test_vsock_guest_connect_refused(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap,
                                     alloc: Allocator) -> None:
    dev, _ = env
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 5000, 4321)  # nobody listens on <socket>_4321
    [rst] = guest.recv()
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 4321, 5000)
    # packets for unknown connections are reset, RSTs are not answered
    guest.send(VIRTIO_VSOCK_OP_RW, 5000, 4321, b"x")
    guest.send(VIRTIO_VSOCK_OP_RST, 5000, 4321)
    assert [p.op for p in guest.recv()] == [VIRTIO_VSOCK_OP_RST]


def test_vsock_host_to_guest(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                             sock_path: str) -> None:
    dev, watcher = env
    guest = Guest(dev, mem, alloc)
    host = socket.socket(socket.AF_UNIX)
    host.connect(sock_path)
    host.sendall(b"CONNECT 52\nearly")  # the bytes after the line are the stream's
    watcher.pump()
    [req] = guest.recv()
    assert (req.op, req.dst_port, req.src_port, req.dst_cid) == (VIRTIO_VSOCK_OP_REQUEST, 52, 1 << 30, CID)
    assert req.buf_alloc == CONN_TX_BUF_SIZE
    guest.send(VIRTIO_VSOCK_OP_RESPONSE, 52, 1 << 30)
    assert recv_exact(host, len(b"OK 1073741824\n")) == b"OK 1073741824\n"
    watcher.pump()
    [rw] = guest.recv()
    assert rw.op == VIRTIO_VSOCK_OP_RW and rw.data == b"early"
    guest.send(VIRTIO_VSOCK_OP_RW, 52, 1 << 30, b"pong")
    assert recv_exact(host, 4) == b"pong"
    # a second host connection gets the next port; the guest refuses it
    host2 = socket.socket(socket.AF_UNIX)
    host2.connect(sock_path)
    host2.sendall(b"connect 53\n")
    watcher.pump()
    [req2] = guest.recv()
    assert req2.src_port == (1 << 30) + 1
    guest.send(VIRTIO_VSOCK_OP_RST, 53, (1 << 30) + 1)
    host2.settimeout(2)
    assert host2.recv(10) == b""  # closed
    assert dev.counters()["host_connections"] == 2 and dev.counters()["connections"] == 1
    host.close()
    host2.close()


@pytest.mark.parametrize("line", [b"HELLO 1\n", b"CONNECT x\n", b"CONNECT " + b"1" * 40, b"CONN"])
def test_vsock_bad_host_command(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                                sock_path: str, line: bytes) -> None:
    dev, watcher = env
    guest = Guest(dev, mem, alloc)
    host = socket.socket(socket.AF_UNIX)
    host.connect(sock_path)
    host.sendall(line)
    if line == b"CONN":
        host.shutdown(socket.SHUT_WR)  # EOF before the line ends
    watcher.pump()
    assert_closed(host)
    assert guest.recv() == [] and dev.counters()["connections"] == 0
    assert len(watcher.fds) == 1  # only the listener is watched
    host.close()


def test_vsock_no_rx_buffers_no_busy_loop(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap,
                                          alloc: Allocator, sock_path: str) -> None:
    dev, watcher = env
    srv = host_listen(f"{sock_path}_80")
    guest = Guest(dev, mem, alloc, rx_buffers=1)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 6000, 80)
    host, _ = srv.accept()
    assert [p.op for p in guest.recv()] == [VIRTIO_VSOCK_OP_RESPONSE]
    host.sendall(b"data!")
    watcher.pump()
    # no receive buffer left: the stream is no longer watched and pumping does nothing
    assert len(watcher.fds) == 1 and watcher.pump() == 0
    guest.fill(1)
    watcher.pump()
    [rw] = guest.recv()
    assert rw.data == b"data!"
    host.close()
    srv.close()


def test_vsock_credit(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                      sock_path: str) -> None:
    dev, watcher = env
    srv = host_listen(f"{sock_path}_81")
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 6001, 81, buf_alloc=4)
    host, _ = srv.accept()
    guest.recv()
    host.sendall(b"0123456789")
    watcher.pump()
    pkts = guest.recv()
    assert [(p.op, p.data) for p in pkts] == [(VIRTIO_VSOCK_OP_RW, b"0123"), (VIRTIO_VSOCK_OP_CREDIT_REQUEST, b"")]
    assert watcher.pump() == 0  # out of credit: not watched
    guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 6001, 81, buf_alloc=4, fwd_cnt=4)
    watcher.pump()
    assert guest.recv()[0].data == b"4567"
    # the guest asks for our credit
    guest.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 6001, 81, buf_alloc=4, fwd_cnt=8)
    [upd] = [p for p in guest.recv() if p.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE]
    assert upd.buf_alloc == CONN_TX_BUF_SIZE
    host.close()
    srv.close()


def test_vsock_buffered_writes_flush(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                                     sock_path: str) -> None:
    dev, watcher = env
    srv = host_listen(f"{sock_path}_82")
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 6002, 82)
    host, _ = srv.accept()
    guest.recv()
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = b""
    while not any(c.txbuf for c in dev.mux.conns.values()):  # until the host stream is full
        guest.send(VIRTIO_VSOCK_OP_RW, 6002, 82, chunk)
        sent += chunk
        assert len(sent) < 64 << 20
    assert watcher.pump() == 0  # the host has not read: not writable yet
    got = b""
    host.settimeout(0.5)
    while len(got) < len(sent):
        got += host.recv(1 << 20)
        watcher.pump()
    assert got == sent
    assert not any(c.txbuf for c in dev.mux.conns.values()) and len(watcher.fds) == 2  # listener + stream
    host.close()
    srv.close()


def test_vsock_guest_overrunning_credit_is_reset(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap,
                                                 alloc: Allocator, sock_path: str) -> None:
    dev, _ = env
    srv = host_listen(f"{sock_path}_83")
    guest = Guest(dev, mem, alloc, rx_buffers=16)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 6003, 83)
    host, _ = srv.accept()
    guest.recv()
    chunk = b"\xee" * MAX_PKT_PAYLOAD
    for _ in range(400):
        guest.send(VIRTIO_VSOCK_OP_RW, 6003, 83, chunk)
        if dev.counters()["connections"] == 0:
            break
    assert dev.counters()["connections"] == 0
    assert guest.recv()[-1].op == VIRTIO_VSOCK_OP_RST
    host.close()
    srv.close()


def test_vsock_hostile_packets(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                               sock_path: str) -> None:
    dev, _ = env
    srv = host_listen(f"{sock_path}_90")
    guest = Guest(dev, mem, alloc, rx_buffers=32)

    def connect(port: int) -> socket.socket:
        guest.send(VIRTIO_VSOCK_OP_REQUEST, port, 90)
        assert guest.recv()[0].op == VIRTIO_VSOCK_OP_RESPONSE
        return srv.accept()[0]

    # a length beyond the buffer, or beyond the largest packet: the connection is reset
    h1 = connect(7001)
    guest.send(VIRTIO_VSOCK_OP_RW, 7001, 90, b"abc", length=1 << 30)
    guest.send(VIRTIO_VSOCK_OP_RW, 7001, 90, b"abc", length=MAX_PKT_PAYLOAD + 1)
    assert [p.op for p in guest.recv()] == [VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RST]
    h1.settimeout(2)
    assert h1.recv(10) == b""
    # an unknown op on a live connection: reset
    h2 = connect(7002)
    guest.send(99, 7002, 90)
    assert [p.op for p in guest.recv()] == [VIRTIO_VSOCK_OP_RST]
    # a non-stream type: reset; a spoofed source CID or other destination: dropped
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 7003, 90, ptype=2)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 7004, 90, src_cid=7)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 7005, 90, dst_cid=9)
    assert [p.op for p in guest.recv()] == [VIRTIO_VSOCK_OP_RST]
    # a chain shorter than a header is dropped
    addr = alloc.alloc(8)
    guest.rings[1].add([(addr, 8, False)])
    dev.queue_notify(1)
    assert guest.rings[1].take_used()
    assert dev.counters()["dropped_packets"] >= 4 and not dev.needs_reset
    # receive buffers too small for a header are handed back empty
    dev_bufs = guest.rings[0]
    small = alloc.alloc(8)
    dev_bufs.add([(small, 8, True)])
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 7006, 4444)  # refused: an RST to deliver
    assert not dev.needs_reset
    h2.close()
    srv.close()


def test_vsock_connection_limit(sock_path: str, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    watcher = FakeWatcher()
    dev = VirtioVsock(CID, sock_path, watcher, max_connections=1)
    srv = host_listen(f"{sock_path}_91")
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 8001, 91)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 8002, 91)
    assert [p.op for p in guest.recv()] == [VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST]
    host = socket.socket(socket.AF_UNIX)
    host.connect(sock_path)
    watcher.pump()
    host.settimeout(2)
    assert host.recv(10) == b""  # refused: closed at once
    host.close()
    srv.close()
    dev.close()


def test_vsock_reset_closes_everything(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap, alloc: Allocator,
                                       sock_path: str) -> None:
    dev, watcher = env
    srv = host_listen(f"{sock_path}_92")
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 9000, 92)
    host, _ = srv.accept()
    pending = socket.socket(socket.AF_UNIX)
    pending.connect(sock_path)
    watcher.pump()
    dev.reset()
    assert watcher.fds == {}
    host.settimeout(2)
    assert host.recv(10) == b""
    host.close()
    pending.close()
    srv.close()


def test_vsock_state_round_trip_and_transport_reset(env: tuple[VirtioVsock, FakeWatcher], mem: GuestMemoryMmap,
                                                    alloc: Allocator, sock_path: str) -> None:
    dev, _ = env
    guest = Guest(dev, mem, alloc)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 5000, 4321)
    state = from_plain(VirtioVsockState, to_plain(dev.state()))
    assert state == dev.state() and state.resets_sent == 1
    dev.reset()
    dev.restore(state)
    guest2 = Guest(dev, mem, alloc)  # re-activation after the restore
    [(_, length)] = guest2.rings[2].take_used()
    assert length == 4 and 2 in guest2.irq.used
    assert mem.read_u32(guest2.event_bufs[0]) == 0  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert dev.counters()["resets_sent"] == 1
    # a plain re-activation (no restore) sends no event
    dev.reset()
    guest3 = Guest(dev, mem, alloc)
    assert guest3.rings[2].take_used() == []
    with pytest.raises(DeviceStateError):
        dev.restore(VirtioVsockState(cid=99))
