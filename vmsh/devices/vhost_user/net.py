"""vhost-user-net: a virtio-net device whose packets a vhost-user backend moves
(``--net vhost_user=on,socket=...,vhost_mode=client|server``; cloud-hypervisor's
``virtio-devices/src/vhost_user/net.rs``).

The MAC address (and the MTU when one is set) live in this device's own configuration space
(virtio 1.2 §5.1.4); the backend serves one receive and one transmit queue. Offloads are offered
to the driver when the options allow them and the backend has them.
"""

from __future__ import annotations

import struct

from vmsh.devices.ratelimit import FdWatcher
from vmsh.devices.vhost_user.device import DEFAULT_FEATURES, VhostUserDevice
from vmsh.devices.vhost_user.frontend import Frontend, MemoryTable
from vmsh.devices.virtio.device import VIRTIO_ID_NET
from vmsh.devices.virtio.net import (  # virtio-net feature bits (virtio 1.2 §5.1.3)
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
)
from vmsh.errors import VhostUserError

_TSO = (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN)
_UFO = (VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_UFO)
_CSUM = (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM)


class VhostUserNet(VhostUserDevice):
    """virtio-net served by a vhost-user-net backend: one queue pair."""

    device_type = VIRTIO_ID_NET

    def __init__(self, dev_id: str, socket_path: str, memory_table: MemoryTable, mac: bytes, *,
                 server: bool = False, queue_size: int = 256, mtu: int | None = None, offload_csum: bool = True,
                 offload_tso: bool = True, offload_ufo: bool = True, watcher: FdWatcher | None = None) -> None:
        if len(mac) != 6:
            raise VhostUserError(f"{dev_id}: a MAC address has 6 bytes")
        self.mac = mac
        self.mtu = mtu
        bits = [VIRTIO_NET_F_MRG_RXBUF]
        if offload_csum:
            bits += _CSUM
            if offload_tso:
                bits += _TSO
            if offload_ufo:
                bits += _UFO
        self.offered_features = DEFAULT_FEATURES | sum(1 << b for b in bits)
        super().__init__(dev_id, Frontend(socket_path, server=server), memory_table, (queue_size, queue_size), watcher)

    def setup(self) -> None:
        # set here, not by the backend: the MAC (and MTU) are this device's configuration
        self.avail_features |= 1 << VIRTIO_NET_F_MAC
        if self.mtu is not None:
            self.avail_features |= 1 << VIRTIO_NET_F_MTU

    def config_bytes(self) -> bytes:
        # mac, status (no STATUS feature: unused), max_virtqueue_pairs, mtu
        return self.mac + struct.pack("<HHH", 0, 1, self.mtu or 0)
