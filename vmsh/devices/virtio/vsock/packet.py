"""The virtio-vsock packet header (virtio 1.2 §5.10.6): its fields, operations and encoding.

Every packet either way starts with the 44-byte little-endian ``struct virtio_vsock_hdr``::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

followed by ``len`` payload bytes (only for OP_RW).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size  # 44

# Operations (§5.10.6)
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
VIRTIO_VSOCK_TYPE_STREAM = 1
# SHUTDOWN flags (§5.10.6.5): the sender will receive / send no more
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
# Event queue (§5.10.6.6)
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

#: the host's CID (§5.10.4: 2 is the host, 0 and 1 are reserved)
VSOCK_HOST_CID = 2
#: the largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PKT_PAYLOAD = 64 << 10


class PacketHeader(NamedTuple):
    """One ``virtio_vsock_hdr``, field by field."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    length: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def decode(cls, data: bytes) -> PacketHeader:
        """The header at the start of ``data`` (which holds at least ``HDR_SIZE`` bytes)."""
        return cls._make(_HDR.unpack_from(data))

    def encode(self) -> bytes:
        return _HDR.pack(*self)


def host_header(cid: int, local_port: int, peer_port: int, op: int, flags: int = 0, length: int = 0,
                buf_alloc: int = 0, fwd_cnt: int = 0) -> bytes:
    """The encoded header of a stream packet from the host's ``local_port`` to guest ``cid``'s ``peer_port``."""
    return PacketHeader(VSOCK_HOST_CID, cid, local_port, peer_port, length, VIRTIO_VSOCK_TYPE_STREAM, op, flags,
                        buf_alloc, fwd_cnt).encode()
