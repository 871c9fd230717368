"""virtio-net (virtio 1.2 §5.1) over a host tap.

Queues: receiveq/transmitq pairs (0, 1), (2, 3), ..., then a control queue when there is more
than one pair (VIRTIO_NET_F_MQ needs VIRTIO_NET_F_CTRL_VQ, §5.1.5). Pair *i* uses the tap's
fd *i* (a multi-queue tap).

Frames keep their 12-byte ``virtio_net_hdr`` (§5.1.6) on both sides: the tap is opened with
``IFF_VNET_HDR`` and the same header size, so checksum and segmentation offloads negotiated
by the guest pass straight through to the host stack. A tap handed over as an fd
(``--net fd=``) is given that header size and made non-blocking when the device is built.

- Transmit: each chain's readable part goes to the tap with one ``writev`` from guest RAM.
- Receive: the tap fd is watched by the engine's I/O loop while the guest has receive
  buffers. A frame is read once and copied into as many chains as it needs (with
  VIRTIO_NET_F_MRG_RXBUF, ``num_buffers`` says how many; §5.1.6.4). When the ring runs dry
  mid-frame the chains taken are given back (``next_avail`` rewound), the frame waits, and
  the fd is unwatched until the guest kicks the receive queue: no busy loop, and nothing
  half-delivered is ever visible in a snapshot.
- Rate limiting (``bw_*``/``ops_*``): each direction of each queue pair has its own limiter
  (as in cloud-hypervisor). A transmit chain the limiter refuses stays in the ring; a received
  frame it refuses waits as the pending frame with the tap unwatched. A timer re-runs the queue
  once the limiter has tokens again.
- Snapshot: :class:`NetState` holds the counters. A frame read from the tap but not yet in the
  ring (the pending frame) is not saved: to the guest it is a frame lost on the wire, which
  its protocols recover from; the tap itself belongs to the host and comes from the config.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import functools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from vmsh.devices.backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    TUNSETVNETHDRSZ,
    Tap,
)
from vmsh.devices.ratelimit import RateLimiter, ThrottleTimer
from vmsh.devices.state import expect_state
from vmsh.devices.virtio.device import VIRTIO_ID_NET, VirtioDevice, has_feature
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue, window_views
from vmsh.errors import DeviceError, VirtQueueError
from vmsh.state_types import U64

LOG = logging.getLogger(__name__)

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1  # config status (§5.1.4)

# Control queue (§5.1.6.5)
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1

#: struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
VNET_HDR_SIZE = 12
NUM_BUFFERS_OFFSET = 10
#: the largest frame a tap hands out: header + 64 KiB GSO frame + Ethernet header
MAX_FRAME = VNET_HDR_SIZE + 65535 + 14
CTRL_QUEUE_SIZE = 64
#: most buffers one readv takes (Linux's UIO_MAXIOV)
IOV_MAX = 1024
_NUM_BUFFERS = struct.Struct("<H")


class _Rx(enum.Enum):
    """What reading one frame from the tap into the receive ring came to."""

    DELIVERED = enum.auto()  # the frame is in the ring (or dropped), used buffers added
    EMPTY = enum.auto()  # the tap had nothing
    STARVED = enum.auto()  # no receive buffer to read into: the frame stays in the tap
    PENDING = enum.auto()  # read, but it waits as the pending frame


class FdWatcher(Protocol):
    """The engine's I/O loop: call ``callback`` whenever ``fd`` is readable."""

    def add(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def fit_tap_fds(tap: Tap) -> None:
    """Make the tap's fds behave as this device needs, however they were opened.

    A tap handed over by the caller (``--net fd=``) comes as the caller opened it: often
    blocking (the receive path reads until EAGAIN, so a blocking fd would hang the I/O
    thread) and with the kernel's default 10-byte header (frames here carry 12).

    :raises DeviceError: if the header size is refused.
    """
    for fd in tap.fds:
        try:
            os.set_blocking(fd, False)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("<i", VNET_HDR_SIZE))
        except OSError as err:
            # Not a tap at all: nothing to size here (activation's TUNSETOFFLOAD will say so).
            if err.errno != errno.ENOTTY:
                raise DeviceError(f"tap {tap.name}: cannot use fd {fd}: {err.strerror}") from err


@dataclass(frozen=True, slots=True)
class NetState:
    """Plain-data state of a ``VirtioNet``: its counters (the throttle counts stay 0 without a
    rate limiter). Snapshots of releases before this class saved ``null``: a fresh device."""

    fresh_when_null: ClassVar[bool] = True

    rx_bytes: U64 = 0
    rx_frames: U64 = 0
    tx_bytes: U64 = 0
    tx_frames: U64 = 0
    rx_dropped: U64 = 0
    tx_dropped: U64 = 0
    rx_throttled: U64 = 0
    tx_throttled: U64 = 0


class VirtioNet(VirtioDevice):
    """A virtio-net device on the queues of one tap."""

    device_type = VIRTIO_ID_NET
    state_type = NetState

    def __init__(self, tap: Tap, mac: bytes, watcher: FdWatcher, *, queue_size: int = 256, mtu: int | None = None,
                 offload_csum: bool = True, offload_tso: bool = True, offload_ufo: bool = True,
                 rate_limiter: Callable[[], RateLimiter | None] | None = None) -> None:
        """``rate_limiter`` makes one limiter (or None) for each direction of each queue pair."""
        self.pairs = len(tap.fds)
        self.queue_max_sizes = (queue_size,) * (2 * self.pairs) + ((CTRL_QUEUE_SIZE,) if self.pairs > 1 else ())
        super().__init__()
        fit_tap_fds(tap)
        self.tap = tap
        self.mac = mac
        self.mtu = mtu
        self.watcher = watcher
        features = self.avail_features | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF
        if mtu is not None:
            features |= 1 << VIRTIO_NET_F_MTU
        if self.pairs > 1:
            features |= 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_MQ
        if offload_csum:
            features |= 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM
            if offload_tso:
                features |= (1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN)
                features |= (1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6
                             | 1 << VIRTIO_NET_F_GUEST_ECN)
            if offload_ufo:
                features |= 1 << VIRTIO_NET_F_HOST_UFO | 1 << VIRTIO_NET_F_GUEST_UFO
        self.avail_features = features
        self._armed = [False] * self.pairs
        self._pending: list[bytes | None] = [None] * self.pairs
        self._rx_paid = [False] * self.pairs
        #: where the part of a frame that does not fit its first receive chain is read to
        self._spill = bytearray(MAX_FRAME)
        self.stats = {"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0, "tx_frames": 0, "rx_dropped": 0, "tx_dropped": 0}
        #: limiter of queue index 2*pair (rx) and 2*pair+1 (tx); None where unlimited
        self.limiters: list[RateLimiter | None] = [rate_limiter() if rate_limiter else None
                                                   for _ in range(2 * self.pairs)]
        self._throttle = ThrottleTimer(self.queue_notify, watcher) if any(self.limiters) else None
        if self._throttle is not None:
            self.stats.update(rx_throttled=0, tx_throttled=0)

    # -- configuration (§5.1.4) ------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, self.pairs, self.mtu or 0)

    # -- lifecycle -------------------------------------------------------------------------------

    def on_activate(self) -> None:
        acked = self.acked_features
        offload = 0
        if has_feature(acked, VIRTIO_NET_F_GUEST_CSUM):
            offload |= TUN_F_CSUM
            for bit, flag in ((VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4), (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                              (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN), (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO)):
                if has_feature(acked, bit):
                    offload |= flag
        self.tap.set_offload(offload)
        for pair in range(self.pairs):
            self._arm(pair)

    def on_reset(self) -> None:
        for pair in range(self.pairs):
            self._disarm(pair)
        self._pending = [None] * self.pairs
        self._rx_paid = [False] * self.pairs
        if self._throttle is not None:
            self._throttle.cancel()

    def close(self) -> None:
        super().close()
        if self._throttle is not None:
            self._throttle.close()
        self.tap.close()

    def _hold_back(self, index: int, limiter: RateLimiter) -> None:
        """``limiter`` refused queue ``index``: come back when it has tokens."""
        assert self._throttle is not None
        self.stats["tx_throttled" if index % 2 else "rx_throttled"] += 1
        self._throttle.wait(index, limiter.delay())

    def _arm(self, pair: int) -> None:
        if not self._armed[pair] and pair < len(self.tap.fds):
            self._armed[pair] = True
            self.watcher.add(self.tap.fds[pair], functools.partial(self._tap_readable, pair))

    def _disarm(self, pair: int) -> None:
        if self._armed[pair]:
            self._armed[pair] = False
            self.watcher.remove(self.tap.fds[pair])

    # -- queues ----------------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index == 2 * self.pairs:
            self._control(queue)
        elif index % 2:
            self._transmit(index, queue)
        else:
            # New receive buffers: deliver what waits and watch the tap again.
            self._receive(index // 2)

    def _transmit(self, index: int, queue: VirtQueue) -> None:
        fd = self.tap.fds[index // 2]
        limiter = self.limiters[index]
        used = False
        while True:
            if limiter is not None and limiter.blocked():
                self._hold_back(index, limiter)
                break
            chain = queue.pop()
            if chain is None:
                break
            if limiter is not None and not limiter.consume(chain.readable_len, 1):
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # stays in the ring
                self._hold_back(index, limiter)
                break
            if chain.readable_len > VNET_HDR_SIZE:
                try:
                    os.writev(fd, chain.readable_views())
                    self.stats["tx_frames"] += 1
                    self.stats["tx_bytes"] += chain.readable_len - VNET_HDR_SIZE
                except OSError as err:
                    # A full or downed tap drops the frame, as a real NIC would.
                    self.stats["tx_dropped"] += 1
                    LOG.debug("tap %s: frame dropped: %s", self.tap.name, err)
            queue.add_used(chain.head, 0)
            used = True
        if used:
            self.signal_used(index)

    def _tap_readable(self, pair: int) -> None:
        """The I/O loop saw the tap readable (runs on the I/O thread)."""
        index = 2 * pair
        with self._locks[index]:
            if not self.activated or self.needs_reset:
                return
            try:
                self._receive(pair)
            except (VirtQueueError, OSError) as err:
                self._disarm(pair)
                self.fail(err)

    def _receive(self, pair: int) -> None:
        """Move frames from the tap into receive buffers until either runs out."""
        index = 2 * pair
        queue = self.queues[index] if index < len(self.queues) else None
        if queue is None or not queue.ready:
            return
        mergeable = has_feature(self.acked_features, VIRTIO_NET_F_MRG_RXBUF)
        limiter = self.limiters[index]
        delivered = False
        starved = False
        while True:
            frame = self._pending[pair]
            if frame is None:
                outcome = self._receive_direct(pair, queue, mergeable, limiter)
                if outcome is _Rx.DELIVERED:
                    delivered = True
                    continue
                if outcome is _Rx.STARVED:
                    starved = True  # frames wait in the tap until the guest adds buffers
                if outcome is not _Rx.PENDING:
                    break
                frame = self._pending[pair]
                assert frame is not None
            if limiter is not None and not self._rx_paid[pair]:
                if not limiter.consume(len(frame), 1):
                    self._pending[pair] = frame
                    self._disarm(pair)  # until the timer re-runs the receive queue
                    self._hold_back(index, limiter)
                    break
                self._rx_paid[pair] = True  # a frame waiting for buffers is not charged twice
            if not self._deliver(queue, frame, mergeable):
                self._pending[pair] = frame
                self._disarm(pair)  # until the guest adds buffers
                break
            self._pending[pair] = None
            self._rx_paid[pair] = False
            delivered = True
        if starved:
            self._disarm(pair)
        elif self._pending[pair] is None:
            self._arm(pair)
        if delivered:
            self.signal_used(index)

    def _receive_direct(self, pair: int, queue: VirtQueue, mergeable: bool, limiter: RateLimiter | None) -> _Rx:
        """Read one frame from the tap straight into the next receive chain (the part that does
        not fit lands in a spill buffer and is copied into further chains with
        VIRTIO_NET_F_MRG_RXBUF). A frame that cannot be finished now - the limiter refuses it,
        the ring runs dry in the middle, or the first chain cannot even hold the header -
        becomes the pending frame, and the chains taken are given back."""
        chain = queue.pop()
        if chain is None:
            return _Rx.STARVED
        views = chain.writable_views()
        room = chain.writable_len
        if len(views) >= IOV_MAX:
            # more pieces than one readv takes (a hostile chain): the frame goes to the spill
            # buffer and through the copying path
            views, room = [], 0
        try:
            n = os.readv(self.tap.fds[pair], [*views, self._spill])
        except BlockingIOError:
            queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # give the chain back
            return _Rx.EMPTY
        except OSError:
            queue.next_avail = (queue.next_avail - 1) & 0xFFFF
            raise
        paid = limiter is None or limiter.consume(n, 1)
        if n > room and not mergeable and paid:
            # The guest's buffer cannot hold the frame (it did not ask for big packets).
            self.stats["rx_dropped"] += 1
            queue.add_used(chain.head, 0)
            return _Rx.DELIVERED
        chains = [chain]
        have = room
        while have < n and paid and room >= VNET_HDR_SIZE:
            more = queue.pop()
            if more is None:
                break
            chains.append(more)
            have += more.writable_len
        if not paid or have < n or room < VNET_HDR_SIZE:
            head = b"".join(window_views(views, 0, min(n, room)))
            self._pending[pair] = head + bytes(self._spill[:max(0, n - room)])
            self._rx_paid[pair] = paid  # charged once, however long it waits
            queue.next_avail = (queue.next_avail - len(chains)) & 0xFFFF
            return _Rx.PENDING
        # num_buffers (§5.1.6.4): how many chains the frame took; the tap leaves it unset
        chain.write(_NUM_BUFFERS.pack(len(chains)), NUM_BUFFERS_OFFSET)
        queue.add_used(chain.head, min(n, room))
        spill = memoryview(self._spill)[:max(0, n - room)]
        pos = 0
        for more in chains[1:]:
            written = more.write(spill[pos:])
            queue.add_used(more.head, written)
            pos += written
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += n - VNET_HDR_SIZE
        return _Rx.DELIVERED

    def _deliver(self, queue: VirtQueue, frame: bytes, mergeable: bool) -> bool:
        """Copy ``frame`` into receive chains; False (and nothing taken) if there are too few."""
        chains: list[DescriptorChain] = []
        room = 0
        while room < len(frame):
            chain = queue.pop()
            if chain is None:
                queue.next_avail = (queue.next_avail - len(chains)) & 0xFFFF
                return False
            chains.append(chain)
            room += chain.writable_len
            if not mergeable:
                break
        if len(chains) == 1 and room < len(frame) and not mergeable:
            # The guest's buffer cannot hold the frame (it did not ask for big packets).
            self.stats["rx_dropped"] += 1
            queue.add_used(chains[0].head, 0)
            return True
        header = bytearray(frame[:VNET_HDR_SIZE])
        struct.pack_into("<H", header, NUM_BUFFERS_OFFSET, len(chains))
        data = memoryview(bytes(header) + frame[VNET_HDR_SIZE:])
        pos = 0
        for chain in chains:
            written = chain.write(data[pos:])
            queue.add_used(chain.head, written)
            pos += written
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += len(frame) - VNET_HDR_SIZE
        return True

    def _control(self, queue: VirtQueue) -> None:
        """Control commands (§5.1.6.5): queue-pair count and RX filters are acknowledged."""
        used = False
        while (chain := queue.pop()) is not None:
            command = chain.read(0, 2)
            status = VIRTIO_NET_ERR
            if len(command) == 2:
                cls, cmd = command
                if cls == VIRTIO_NET_CTRL_MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
                    pairs = int.from_bytes(chain.read(2, 2), "little")
                    status = VIRTIO_NET_OK if 1 <= pairs <= self.pairs else VIRTIO_NET_ERR
                elif cls in (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_MAC):
                    status = VIRTIO_NET_OK  # the tap delivers everything; filtering is the guest's
            written = chain.write(bytes([status]))
            queue.add_used(chain.head, written)
            used = True
        if used:
            self.signal_used(2 * self.pairs)

    # -- snapshot and counters ---------------------------------------------------------------------

    def state(self) -> NetState:
        return NetState(**{name: self.stats.get(name, 0) for name in _STATE_COUNTERS})

    def restore(self, state: NetState) -> None:
        """Load the counters (those of throttling only where this device has a limiter).

        :raises DeviceStateError: for another state class or a counter beyond 64 bits.
        """
        s = expect_state(state, NetState)
        for name in _STATE_COUNTERS:
            if name in self.stats:
                self.stats[name] = getattr(s, name)

    def counters(self) -> dict[str, int]:
        return dict(self.stats)


_STATE_COUNTERS = tuple(f.name for f in dataclasses.fields(NetState))
