"""vhost-user-fs: virtio-fs served by a vhost-user backend such as virtiofsd (``--fs
tag=,socket=,num_queues=,queue_size=``; cloud-hypervisor's ``virtio-devices/src/vhost_user/fs.rs``).

The device has one high-priority queue (FUSE interrupts and forgets) and ``num_queues`` request
queues (virtio 1.2 §5.11.2); its configuration space is the mount tag and the request-queue count
(§5.11.4), both this device's own. No DAX window: cloud-hypervisor v40 passes no cache either.
"""

from __future__ import annotations

import struct

from vmsh.devices.ratelimit import FdWatcher
from vmsh.devices.vhost_user.device import VhostUserDevice
from vmsh.devices.vhost_user.frontend import Frontend, MemoryTable
from vmsh.errors import VhostUserError

VIRTIO_ID_FS = 26
#: bytes of the tag field of ``struct virtio_fs_config``
TAG_SIZE = 36
#: the queues a backend that does not say (no MQ protocol feature) is taken to serve, as
#: cloud-hypervisor takes it: the hiprio queue and one request queue
BACKEND_DEFAULT_QUEUES = 2


class VhostUserFs(VhostUserDevice):
    """virtio-fs served by a vhost-user backend (always a client of its socket).

    :param tag: what the guest mounts (``mount -t virtiofs TAG DIR``), 1 to 36 bytes.
    :param num_queues: request queues; the device has one more (the hiprio queue).
    :raises VhostUserError: for a bad tag, a backend that cannot be reached or serves fewer queues.
    """

    device_type = VIRTIO_ID_FS

    def __init__(self, dev_id: str, socket_path: str, memory_table: MemoryTable, tag: str, *,
                 num_queues: int = 1, queue_size: int = 1024, watcher: FdWatcher | None = None) -> None:
        raw = tag.encode()
        if not raw or len(raw) > TAG_SIZE:
            raise VhostUserError(f"{dev_id}: a virtio-fs tag has 1 to {TAG_SIZE} bytes")
        self.tag = raw
        self.num_request_queues = num_queues
        super().__init__(dev_id, Frontend(socket_path), memory_table, (queue_size,) * (1 + num_queues), watcher)

    def setup(self) -> None:
        # a backend that said how many queues it serves (MQ) was checked by the generic device
        queues = len(self.queue_max_sizes)
        if self.frontend.backend_queues is None and queues > BACKEND_DEFAULT_QUEUES:
            raise VhostUserError(f"{self.dev_id}: the backend serves {BACKEND_DEFAULT_QUEUES} queues, "
                                 f"{queues} were asked for")

    def config_bytes(self) -> bytes:
        return self.tag.ljust(TAG_SIZE, b"\0") + struct.pack("<I", self.num_request_queues)
