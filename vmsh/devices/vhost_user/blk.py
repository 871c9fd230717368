"""vhost-user-blk: a virtio-blk device whose requests a vhost-user backend serves
(``--disk vhost_user=on,socket=...``; cloud-hypervisor's ``virtio-devices/src/vhost_user/blk.rs``).

The configuration space is the backend's (GET_CONFIG of the 60-byte ``virtio_blk_config``, virtio
1.2 §5.2.4) with ``num_queues`` set to the queues this device has; a driver's write to it (the
writeback flag) is passed on with SET_CONFIG.
"""

from __future__ import annotations

import struct

from vmsh.devices.ratelimit import FdWatcher
from vmsh.devices.vhost_user import protocol as p
from vmsh.devices.vhost_user.device import DEFAULT_FEATURES, DEFAULT_PROTOCOL, VhostUserDevice
from vmsh.devices.vhost_user.frontend import Frontend, MemoryTable
from vmsh.devices.virtio.device import VIRTIO_ID_BLOCK
from vmsh.errors import VhostUserError

# virtio-blk feature bits (virtio 1.2 §5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

#: sizeof(struct virtio_blk_config) as cloud-hypervisor asks the backend for it
BLK_CONFIG_SIZE = 60
#: offset of ``num_queues`` (le16) in it
NUM_QUEUES_OFFSET = 34


class VhostUserBlk(VhostUserDevice):
    """virtio-blk served by a vhost-user-blk backend (always a client of its socket)."""

    device_type = VIRTIO_ID_BLOCK
    offered_features = DEFAULT_FEATURES | sum(1 << b for b in (
        VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES))
    offered_protocol = DEFAULT_PROTOCOL | (1 << p.PROTOCOL_F_CONFIG)

    def __init__(self, dev_id: str, socket_path: str, memory_table: MemoryTable, *, num_queues: int = 1,
                 queue_size: int = 128, watcher: FdWatcher | None = None) -> None:
        self._config = bytearray(BLK_CONFIG_SIZE)
        self._num_queues = num_queues
        super().__init__(dev_id, Frontend(socket_path), memory_table, (queue_size,) * num_queues, watcher)

    def setup(self) -> None:
        if self._num_queues > 1:
            if self.frontend.backend_queues is None:
                raise VhostUserError(f"{self.dev_id}: the backend at {self.frontend.path} serves one queue, "
                                     f"{self._num_queues} were asked for")
            self.offered_features |= 1 << VIRTIO_BLK_F_MQ
            self.avail_features |= self.frontend.backend_features & (1 << VIRTIO_BLK_F_MQ)
        self._config[:] = self.frontend.get_config(BLK_CONFIG_SIZE)
        struct.pack_into("<H", self._config, NUM_QUEUES_OFFSET, self._num_queues)

    def config_bytes(self) -> bytes:
        return bytes(self._config)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > BLK_CONFIG_SIZE:
            return
        self._config[offset:offset + len(data)] = data
        self.frontend.set_config(offset, data)
