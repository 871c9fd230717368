"""vhost-user-fs: a virtio-fs device whose FUSE requests a vhost-user backend such as virtiofsd
serves (``--fs tag=,socket=,num_queues=,queue_size=``; cloud-hypervisor's
``virtio-devices/src/vhost_user/fs.rs``).

virtio 1.2 §5.11: the device has one high-priority queue (FUSE interrupts and forgets) followed by
``num_request_queues`` request queues, and its configuration space is the tag the guest mounts
(36 bytes, NUL-padded) and that number. Everything else is the backend's. There is no DAX window
(the optional shared-memory cache): cloud-hypervisor v40 has none either.
"""

from __future__ import annotations

import struct

from vmsh.devices.ratelimit import FdWatcher
from vmsh.devices.vhost_user.device import VhostUserDevice
from vmsh.devices.vhost_user.frontend import Frontend, MemoryTable
from vmsh.errors import VhostUserError

VIRTIO_ID_FS = 26
#: the tag field of ``struct virtio_fs_config``
TAG_LEN = 36
#: the high-priority queue, before the request queues
HIPRIO_QUEUES = 1
#: the queues a backend that does not say (no MQ protocol feature) is taken to serve, as
#: cloud-hypervisor takes it: the hiprio queue and one request queue
BACKEND_DEFAULT_QUEUES = 2


class VhostUserFs(VhostUserDevice):
    """virtio-fs served by a vhost-user-fs backend (always a client of its socket).

    :param tag: what the guest mounts (``mount -t virtiofs TAG DIR``); longer than 36 bytes it is
        cut, as cloud-hypervisor cuts it (the option parser already refuses such a tag).
    :param num_request_queues: request queues; the device has one more (the hiprio queue).
    :raises VhostUserError: when the backend cannot be reached or serves fewer queues.
    """

    device_type = VIRTIO_ID_FS

    def __init__(self, dev_id: str, socket_path: str, memory_table: MemoryTable, *, tag: str,
                 num_request_queues: int = 1, queue_size: int = 1024, watcher: FdWatcher | None = None) -> None:
        self.tag = tag.encode()[:TAG_LEN]
        self.num_request_queues = num_request_queues
        super().__init__(dev_id, Frontend(socket_path), memory_table,
                         (queue_size,) * (HIPRIO_QUEUES + num_request_queues), watcher)

    def setup(self) -> None:
        # a backend that said (MQ) was checked by the generic device
        queues = len(self.queue_max_sizes)
        if self.frontend.backend_queues is None and queues > BACKEND_DEFAULT_QUEUES:
            raise VhostUserError(f"{self.dev_id}: the backend serves {BACKEND_DEFAULT_QUEUES} queues, "
                                 f"{queues} were asked for")

    def config_bytes(self) -> bytes:
        return self.tag.ljust(TAG_LEN, b"\0") + struct.pack("<I", self.num_request_queues)
