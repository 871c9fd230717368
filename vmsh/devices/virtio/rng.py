"""virtio-rng (virtio 1.2 §5.4): one request queue whose writable buffers are filled with entropy.

There is no device configuration and no feature bit of its own (§5.4.3-4). Bytes come from a
host file, ``/dev/urandom`` by default (``--rng src=``), read with ``os.readv`` straight into
the guest's buffers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vmsh.devices.state import expect_state
from vmsh.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from vmsh.devices.virtio.queue import VirtQueue, advance_views
from vmsh.errors import DeviceError
from vmsh.state_types import U64

LOG = logging.getLogger(__name__)

#: cloud-hypervisor's virtio-rng queue size
RNG_QUEUE_SIZE = 256
#: at most this many bytes per request: a guest asking for gigabytes gets a short answer
MAX_REQUEST_BYTES = 1 << 20
DEFAULT_SOURCE = "/dev/urandom"


@dataclass(frozen=True, slots=True)
class VirtioRngState:
    """Plain-data state of a ``VirtioRng`` (only its counters)."""

    read_bytes: U64 = 0
    read_ops: U64 = 0


class VirtioRng(VirtioDevice):
    """An entropy device reading from ``source``.

    :raises DeviceError: if ``source`` cannot be opened.

    Example::

        rng = VirtioRng("/dev/urandom")
    """

    state_type = VirtioRngState

    device_type = VIRTIO_ID_RNG

    def __init__(self, source: str = DEFAULT_SOURCE) -> None:
        self.queue_max_sizes = (RNG_QUEUE_SIZE,)
        super().__init__()
        self.source = source
        try:
            self.fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open entropy source {source}") from err
        self.read_bytes = 0
        self.read_ops = 0

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        used = False
        while (chain := queue.pop()) is not None:
            written = 0
            views = chain.writable_views(0, MAX_REQUEST_BYTES)
            try:
                while views:
                    n = os.readv(self.fd, views)
                    if n <= 0:
                        break  # a file source ran out: give what there was
                    written += n
                    views = advance_views(views, n)
            except OSError as err:
                LOG.warning("virtio-rng: reading %s failed: %s", self.source, err)
            self.read_bytes += written
            self.read_ops += 1
            queue.add_used(chain.head, written)
            used = True
        if used:
            self.signal_used(index)

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def state(self) -> VirtioRngState:
        return VirtioRngState(self.read_bytes, self.read_ops)

    def restore(self, state: VirtioRngState) -> None:
        """Load the counters.

        :raises DeviceStateError: for another state class or a counter beyond 64 bits.
        """
        s = expect_state(state, VirtioRngState)
        self.read_bytes, self.read_ops = s.read_bytes, s.read_ops

    def counters(self) -> dict[str, int]:
        return {"read_bytes": self.read_bytes, "read_ops": self.read_ops}

