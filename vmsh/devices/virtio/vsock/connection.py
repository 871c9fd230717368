"""One vsock stream between a guest socket and a host unix stream: its state and its credit.

States: a host-initiated stream starts in ``LOCAL_INIT`` (REQUEST sent to the guest, no answer
yet) and becomes ``ESTABLISHED`` on the guest's RESPONSE; a guest-initiated one is established
at once. ``CLOSING`` means the host closed its end, SHUTDOWN went to the guest and its RST is
awaited (bounded by ``deadline``).

Flow control (virtio 1.2 §5.10.6.3): each side advertises ``buf_alloc`` (its receive buffer) and
``fwd_cnt`` (bytes it has consumed); a sender keeps ``tx_cnt - peer_fwd_cnt <= peer_buf_alloc``.
The device advertises ``CONN_TX_BUF_SIZE`` for each stream and buffers in ``txbuf`` what the host
stream does not take at once. All counters wrap at 32 bits, as the header fields do.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

#: the mask of the header's 32-bit counters
U32_MASK = 0xFFFF_FFFF
#: receive buffer advertised for each connection: the most guest data buffered per connection
CONN_TX_BUF_SIZE = 256 << 10
#: send a CREDIT_UPDATE once this much was forwarded since the guest last heard our fwd_cnt
CREDIT_UPDATE_THRESHOLD = CONN_TX_BUF_SIZE // 2
#: a connection the guest does not answer (REQUEST) or close (after SHUTDOWN) within this is reset
CONN_TIMEOUT = 2.0

# Connection states
LOCAL_INIT = "local-init"  # host connected, REQUEST sent to the guest, no answer yet
ESTABLISHED = "established"
CLOSING = "closing"  # SHUTDOWN sent to the guest after the host closed; waiting for its RST


@dataclass(eq=False)
class Connection:
    """One guest-host stream."""

    sock: socket.socket
    local_port: int  # the host side's port
    peer_port: int  # the guest side's port
    state: str
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    rx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # guest bytes written to the host stream
    last_fwd_sent: int = 0  # fwd_cnt as the guest last heard it
    txbuf: bytearray = field(default_factory=bytearray)
    armed: bool = False  # host stream watched for reading
    want_write: bool = False  # registered in the writability epoll
    guest_shut_rcv: bool = False  # the guest will receive no more
    guest_shut_send: bool = False  # the guest will send no more: SHUT_WR once txbuf drains
    credit_requested: bool = False
    credit_update_queued: bool = False
    deadline: float | None = None

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def key(self) -> tuple[int, int]:
        """(local port, peer port): how packets name the connection."""
        return self.local_port, self.peer_port

    def peer_credit(self) -> int:
        """Bytes the guest can still take."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    def sent_to_guest(self, n: int) -> None:
        self.rx_cnt = (self.rx_cnt + n) & U32_MASK

    def forwarded(self, n: int) -> bool:
        """``n`` guest bytes reached the host stream; True when the guest should hear our credit."""
        self.fwd_cnt = (self.fwd_cnt + n) & U32_MASK
        return ((self.fwd_cnt - self.last_fwd_sent) & U32_MASK) >= CREDIT_UPDATE_THRESHOLD

    def advertise_credit(self) -> tuple[int, int]:
        """``(buf_alloc, fwd_cnt)`` for a header going to the guest, which then knows our credit."""
        self.last_fwd_sent = self.fwd_cnt
        self.credit_update_queued = False
        return CONN_TX_BUF_SIZE, self.fwd_cnt

    def shut_wr(self) -> None:
        """The guest sends no more: the host end reads EOF."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
