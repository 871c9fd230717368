"""virtio-console (virtio 1.2 §5.3) with one port and no multiport: the guest's ``hvc0``.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) guest output to the
host. Output goes to a callback (what is still queued when the VM is torn down too); input
arrives through ``enqueue_input`` (from whatever thread reads the host side) and waits in a
bounded buffer until the guest has posted receive buffers - its kick on queue 0 flushes it.
Configuration (§5.3.4): cols, rows, max_nr_ports, emerg_wr.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.state import check_max_length, expect_state
from vmsh.devices.virtio.device import (
    COMMON_FEATURES,
    VIRTIO_ID_CONSOLE,
    VirtioDevice,
    has_feature,
)
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.errors import GuestMemoryError, VirtQueueError
from vmsh.state_types import U16, U64

LOG = logging.getLogger(__name__)

# Feature bits (§5.3.3)
VIRTIO_CONSOLE_F_SIZE = 0  # cols and rows are valid
VIRTIO_CONSOLE_F_MULTIPORT = 1  # several ports and a control queue (not offered)
VIRTIO_CONSOLE_F_EMERG_WRITE = 2  # emerg_wr writes a character out

RECEIVEQ = 0
TRANSMITQ = 1
#: cloud-hypervisor's console queue size
CONSOLE_QUEUE_SIZE = 256
#: host input buffered while the guest has no receive buffers; more is refused
MAX_PENDING_INPUT = 64 << 10
#: guest output taken from one chain at most (a hostile chain may describe gigabytes)
MAX_OUTPUT_CHAIN = 1 << 20
# struct virtio_console_config offsets (§5.3.4)
CONFIG_COLS = 0
CONFIG_ROWS = 2
CONFIG_MAX_NR_PORTS = 4
CONFIG_EMERG_WR = 8
CONFIG_SIZE = 12


@dataclass(frozen=True, slots=True)
class VirtioConsoleState:
    """Plain-data state of a ``VirtioConsole``."""

    cols: U16 = 0
    rows: U16 = 0
    pending_input: bytes = b""
    out_bytes: U64 = 0
    in_bytes: U64 = 0


class VirtioConsole(VirtioDevice):
    """A single-port console.

    :param out: called with each chunk the guest writes (a ``bytes``).

    Example::

        con = VirtioConsole(out=sys.stdout.buffer.write)
        con.enqueue_input(b"ls\\n")   # typed into hvc0
    """

    state_type = VirtioConsoleState

    device_type = VIRTIO_ID_CONSOLE

    def __init__(self, out: Callable[[bytes], object] | None = None, *, cols: int = 0, rows: int = 0) -> None:
        self.queue_max_sizes = (CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE)
        super().__init__()
        self.avail_features = COMMON_FEATURES | 1 << VIRTIO_CONSOLE_F_SIZE | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        self.out = out
        self.cols, self.rows = cols, rows
        self.pending = bytearray()
        self.out_bytes = 0
        self.in_bytes = 0

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # emerg_wr (§5.3.4): the low byte of a write is output at once, even before DRIVER_OK.
        if offset == CONFIG_EMERG_WR and data and has_feature(self.acked_features, VIRTIO_CONSOLE_F_EMERG_WRITE):
            self._emit(data[:1])

    def resize(self, cols: int, rows: int) -> None:
        """The host terminal changed size: update the config and tell the driver."""
        self.cols, self.rows = cols & 0xFFFF, rows & 0xFFFF
        if self.activated and self.interrupt is not None:
            self.interrupt.signal_config_change()

    # -- host input --------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue ``data`` for the guest; returns how many bytes were accepted (the rest is dropped)."""
        with self._locks[RECEIVEQ]:
            room = MAX_PENDING_INPUT - len(self.pending)
            accepted = data[:max(room, 0)]
            self.pending += accepted
            self._flush_input()
        return len(accepted)

    def _flush_input(self) -> None:
        """Copy pending input into receive buffers (called with the receiveq lock held)."""
        if not self.pending or not self.activated or self.needs_reset or not self.queues:
            return
        queue = self.queues[RECEIVEQ]
        if not queue.ready:
            return
        used = False
        try:
            while self.pending and (chain := queue.pop()) is not None:
                n = chain.write(memoryview(self.pending))
                del self.pending[:n]
                self.in_bytes += n
                queue.add_used(chain.head, n)
                used = True
        except (VirtQueueError, GuestMemoryError) as err:
            self.fail(err)
            return
        if used:
            self.signal_used(RECEIVEQ)

    # -- queues ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == RECEIVEQ:
            self._flush_input()
            return
        used = False
        while (chain := queue.pop()) is not None:
            data = chain.read(0, MAX_OUTPUT_CHAIN)
            self._emit(data)
            queue.add_used(chain.head, 0)
            used = True
        if used:
            self.signal_used(index)

    def close(self) -> None:
        """VM teardown, the vCPUs stopped: first hand on what the guest put on the transmit queue
        and the I/O thread has not taken yet (its kick may still be pending, or another vCPU's
        write raced the poweroff), so the guest's last output reaches the backend before the
        VMM reports the VM gone; then reset."""
        self.queue_notify(TRANSMITQ)
        super().close()

    def _emit(self, data: bytes) -> None:
        self.out_bytes += len(data)
        if self.out is not None and data:
            try:
                self.out(data)
            except OSError as err:
                LOG.warning("virtio-console output failed: %s", err)

    # -- snapshot and counters ---------------------------------------------------------------

    def state(self) -> VirtioConsoleState:
        return VirtioConsoleState(self.cols, self.rows, bytes(self.pending), self.out_bytes, self.in_bytes)

    def restore(self, state: VirtioConsoleState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, an oversized input buffer or a
            size or counter wider than its field.
        """
        s = expect_state(state, VirtioConsoleState)
        check_max_length("pending_input", s.pending_input, MAX_PENDING_INPUT)
        self.cols, self.rows = s.cols, s.rows
        self.pending = bytearray(s.pending_input)
        self.out_bytes, self.in_bytes = s.out_bytes, s.in_bytes

    def counters(self) -> dict[str, int]:
        return {"out_bytes": self.out_bytes, "in_bytes": self.in_bytes}
