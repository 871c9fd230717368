"""The parts of the vsock package on their own: header encoding, the CONNECT line, credit."""

from __future__ import annotations

import socket
import struct

import pytest

from vmsh.devices.virtio.vsock.connection import CONN_TX_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, ESTABLISHED, Connection
from vmsh.devices.virtio.vsock.multiplexer import parse_connect
from vmsh.devices.virtio.vsock.packet import (
    HDR_SIZE,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
    PacketHeader,
    host_header,
)


def test_header_layout_is_virtio_vsock_hdr() -> None:
    raw = host_header(3, 1 << 30, 1234, VIRTIO_VSOCK_OP_RW, flags=0, length=5, buf_alloc=4096, fwd_cnt=7)
    assert len(raw) == HDR_SIZE == 44
    # le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len; le16 type; le16 op; le32 flags;
    # le32 buf_alloc; le32 fwd_cnt (virtio 1.2 §5.10.6)
    assert struct.unpack("<QQIIIHHIII", raw) == (VSOCK_HOST_CID, 3, 1 << 30, 1234, 5, VIRTIO_VSOCK_TYPE_STREAM,
                                                  VIRTIO_VSOCK_OP_RW, 0, 4096, 7)
    hdr = PacketHeader.decode(raw + b"payload")
    assert (hdr.dst_cid, hdr.src_port, hdr.length, hdr.fwd_cnt) == (3, 1 << 30, 5, 7)
    assert hdr.encode() == raw


@pytest.mark.parametrize(("line", "port"), [
    (b"CONNECT 1234\n", 1234), (b"connect 5\n", 5), (b"CONNECT  77 \n", 77), (b"CONNECT 4294967295\n", 0xFFFF_FFFF),
    (b"CONNECT 4294967296\n", None), (b"CONNECT 12", None), (b"CONNECT x\n", None), (b"LISTEN 1\n", None),
    (b"CONNECT -1\n", None), (b"CONNECT \xff\n", None),
])
def test_connect_line(line: bytes, port: int | None) -> None:
    assert parse_connect(line) == port


def test_credit_wraps_at_32_bits_and_asks_for_an_update_at_the_threshold() -> None:
    a, b = socket.socketpair()
    try:
        conn = Connection(a, 1 << 30, 99, ESTABLISHED, peer_buf_alloc=1000, peer_fwd_cnt=0xFFFF_FFF0)
        conn.rx_cnt = 0xFFFF_FFF0
        conn.sent_to_guest(0x20)  # wraps
        assert conn.rx_cnt == 0x10 and conn.peer_credit() == 1000 - 0x20
        assert not conn.forwarded(CREDIT_UPDATE_THRESHOLD - 1)
        assert conn.forwarded(1)
        assert conn.advertise_credit() == (CONN_TX_BUF_SIZE, CREDIT_UPDATE_THRESHOLD)
        assert not conn.forwarded(1)  # the guest heard our fwd_cnt
    finally:
        a.close()
        b.close()
