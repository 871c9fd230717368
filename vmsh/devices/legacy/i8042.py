"""The i8042 keyboard controller, reduced to what a VM needs: CPU reset by command 0xFE.

Linux reboots through it (arch/x86/kernel/reboot.c, BOOT_KBD: ``outb(0xfe, 0x64)``). Mapped
at 0x60 with length 5 so that offset 4 is the command/status port 0x64; port 0x61 (system
control port B) is served by KVM's in-kernel PIT and never reaches this model. Reads return
0: status "output buffer empty, input buffer empty", so the driver's probe finds nothing to
read and gives up quietly.
"""

from __future__ import annotations

import logging

from vmsh.devices.base import Trigger

LOG = logging.getLogger(__name__)

DATA_OFFSET = 0  # port 0x60
COMMAND_OFFSET = 4  # port 0x64: command on write, status on read
#: "pulse output line 0 low": resets the CPU (8042 command set; Linux BOOT_KBD)
CMD_RESET_CPU = 0xFE


class I8042:
    """Reset-only i8042.

    Stateless: no register keeps a value (reads are 0, the reset command acts at once), so there
    is nothing to snapshot.

    :param reset: triggered when the guest writes 0xFE to the command port.
    """

    def __init__(self, reset: Trigger) -> None:
        self.reset = reset

    def read(self, offset: int, size: int) -> bytes:
        """Status and data both read 0."""
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        """Fire the reset trigger on command 0xFE; ignore everything else."""
        if offset == COMMAND_OFFSET and data and data[0] == CMD_RESET_CPU:
            LOG.info("i8042: guest requested a CPU reset")
            self.reset.trigger()
