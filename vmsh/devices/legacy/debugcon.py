"""The debug console port (Bochs/QEMU ``debugcon``, I/O 0xe9 by default).

Each byte the guest writes goes unchanged to an output callback (Linux: ``earlyprintk`` is
not needed, firmware and test guests write here directly). Reading the port returns 0xe9,
the Bochs convention by which software detects that the port is present.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

LOG = logging.getLogger(__name__)

#: default I/O base (cloud-hypervisor ``--debug-console iobase=``)
DEFAULT_IOBASE = 0xE9
#: value a read returns: "debug console present"
DETECT_VALUE = 0xE9


class DebugConsole:
    """Write-only byte console.

    Stateless: bytes leave at once and reads return a constant, so there is nothing to snapshot.

    :param out: called with the written bytes.
    """

    def __init__(self, out: Callable[[bytes], object] | None) -> None:
        self.out = out

    def read(self, offset: int, size: int) -> bytes:
        """Return the detection value."""
        return bytes([DETECT_VALUE]) * size

    def write(self, offset: int, data: bytes) -> None:
        """Pass the bytes on."""
        if self.out is not None:
            try:
                self.out(bytes(data))
            except OSError as err:
                LOG.warning("debug console output failed: %s", err)
