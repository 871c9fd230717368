"""virtio-vsock (virtio 1.2 §5.10) with cloud-hypervisor's unix-socket backend.

Guest stream sockets (AF_VSOCK) are connected to host unix sockets as cloud-hypervisor's
multiplexer does. The package is split by responsibility:

- :mod:`.packet` - the ``virtio_vsock_hdr`` fields, operations, encoding and decoding;
- :mod:`.connection` - one stream's state and its credit (flow control, §5.10.6.3);
- :mod:`.multiplexer` - the host side: the listening socket, the ``CONNECT <port>`` protocol,
  the connection table and the routing of the guest's packets;
- :mod:`.device` - the virtio device: its three queues and the packets between them and the
  multiplexer.
"""

from vmsh.devices.virtio.vsock.connection import CONN_TX_BUF_SIZE, CREDIT_UPDATE_THRESHOLD
from vmsh.devices.virtio.vsock.device import (
    EVENTQ,
    RXQ,
    TXQ,
    VIRTIO_ID_VSOCK,
    VSOCK_QUEUE_SIZE,
    VirtioVsock,
    VirtioVsockState,
)
from vmsh.devices.virtio.vsock.multiplexer import MAX_CONNECTIONS, FdWatcher
from vmsh.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_INVALID,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
)

__all__ = [
    "CONN_TX_BUF_SIZE",
    "CREDIT_UPDATE_THRESHOLD",
    "EVENTQ",
    "HDR_SIZE",
    "MAX_CONNECTIONS",
    "MAX_PKT_PAYLOAD",
    "RXQ",
    "TXQ",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET",
    "VIRTIO_VSOCK_OP_CREDIT_REQUEST",
    "VIRTIO_VSOCK_OP_CREDIT_UPDATE",
    "VIRTIO_VSOCK_OP_INVALID",
    "VIRTIO_VSOCK_OP_REQUEST",
    "VIRTIO_VSOCK_OP_RESPONSE",
    "VIRTIO_VSOCK_OP_RST",
    "VIRTIO_VSOCK_OP_RW",
    "VIRTIO_VSOCK_OP_SHUTDOWN",
    "VIRTIO_VSOCK_SHUTDOWN_RCV",
    "VIRTIO_VSOCK_SHUTDOWN_SEND",
    "VIRTIO_VSOCK_TYPE_STREAM",
    "VSOCK_HOST_CID",
    "VSOCK_QUEUE_SIZE",
    "FdWatcher",
    "VirtioVsock",
    "VirtioVsockState",
]
