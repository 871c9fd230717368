"""GDB remote serial protocol framing (gdb manual, "Remote Protocol", "Overview").

A packet is ``$data#cc`` (``cc``: the modulo-256 sum of ``data``'s bytes, in two hex digits),
acknowledged with ``+`` (or ``-`` to ask for it again) until no-ack mode is agreed
(``QStartNoAckMode``). A lone ``0x03`` byte outside a packet is an interrupt (Ctrl-C). Binary
data (``X``, ``qXfer`` replies) escapes ``#``, ``$``, ``}`` and ``*`` as ``}`` followed by the
byte XOR 0x20.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LOG = logging.getLogger(__name__)

INTERRUPT = 0x03
_ESCAPED = frozenset(b"#$}*")


def checksum(data: bytes) -> int:
    """The packet checksum: the sum of the bytes modulo 256."""
    return sum(data) & 0xFF


def frame(data: bytes) -> bytes:
    """``data`` as one packet."""
    return b"$" + data + b"#" + f"{checksum(data):02x}".encode()


def escape(data: bytes) -> bytes:
    """Binary data with the four special bytes escaped."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Escaped binary data (an ``X`` packet's payload) as it was."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            out.append(next(it, 0x20) ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet's data (checksum checked)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Interrupt:
    """A Ctrl-C (0x03) from the debugger."""


@dataclass(frozen=True, slots=True)
class BadChecksum:
    """A packet whose checksum did not match (answered with ``-``)."""


Event = Packet | Interrupt | BadChecksum


class Decoder:
    """Turns the bytes read from the debugger into :data:`Event` s (acks are dropped)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        buf = self._buf
        while buf:
            first = buf[0]
            if first == ord("$"):
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    break  # the rest of the packet has not come yet
                body = bytes(buf[1:end])
                try:
                    ok = int(buf[end + 1:end + 3], 16) == checksum(body)
                except ValueError:
                    ok = False
                del buf[:end + 3]
                events.append(Packet(body) if ok else BadChecksum())
            elif first == INTERRUPT:
                del buf[:1]
                events.append(Interrupt())
            else:
                del buf[:1]  # '+', '-' and stray bytes between packets
        return events
