"""The POST diagnostic port 0x80: logs each code with the time since the VM was created.

Firmware, boot loaders and Linux (``io_delay`` and the boot progress codes) write here. The
code ranges follow cloud-hypervisor's debug port (its ``docs/debug-port.md``):
0x00-0x1f firmware, 0x20-0x3f boot loader, 0x40-0x5f kernel, 0x60-0x7f user space, rest custom.
Linux's ``native_io_delay`` also writes port 0x80 and must stay cheap, so codes are logged at
WARNING only when ``verbose`` is set, and at DEBUG otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.devices.state import expect_state
from vmsh.state_types import U8, U64

LOG = logging.getLogger(__name__)

_RANGES = ((0x20, "Firmware"), (0x40, "Bootloader"), (0x60, "Kernel"), (0x80, "Userspace"), (0x100, "Custom"))


def code_range(code: int) -> str:
    """The name of the range ``code`` belongs to."""
    for limit, name in _RANGES:
        if code < limit:
            return name
    return "Custom"


@dataclass(frozen=True, slots=True)
class PostState:
    """The last code written (what a read returns; None before any) and how many were written."""

    last_code: U8 | None = None
    count: U64 = 0


class PostPort:
    """POST code sink.

    Its one guest-visible register is the last code written (reads return it): that and the
    write count are its state; the elapsed time it logs restarts with the process.

    :param clock: monotonic time source (seconds); injectable for tests.
    """

    state_type = PostState

    def __init__(self, verbose: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.verbose = verbose
        self.clock = clock
        self.start = clock()
        #: the last code written, or None
        self.last_code: int | None = None
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        """Reading the POST port returns the last code (0 before any)."""
        return bytes([self.last_code or 0]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        """Record the code and log it."""
        if len(data) != 1:
            return
        code = data[0]
        self.last_code = code
        self.count += 1
        elapsed = self.clock() - self.start
        LOG.log(logging.WARNING if self.verbose else logging.DEBUG,
                "[Debug I/O port: %s code 0x%x] %d.%06d seconds", code_range(code), code,
                int(elapsed), int((elapsed % 1) * 1_000_000))

    def state(self) -> PostState:
        return PostState(self.last_code, self.count)

    def restore(self, state: PostState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class or a code over 8 bits.
        """
        s = expect_state(state, PostState)
        self.last_code, self.count = s.last_code, s.count
