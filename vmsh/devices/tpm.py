"""A TPM 2.0 with the Command Response Buffer interface (CRB), locality 0 only.

The register layout is the TCG PC Client Platform TPM Profile's CRB (PTP 1.05 §6.4.2), one 4 KiB
page at cloud-hypervisor's ``TPM_START`` (its ``devices/src/tpm.rs``): the locality registers,
the control area the ACPI TPM2 table points at (``CTRL_REQ`` at +0x40) and, from +0x80 to the
end of the page, the one buffer that holds the command and then the response.

The guest requests locality 0, writes ``cmdReady``, fills the buffer, writes 1 to ``CTRL_START``
and polls until that bit clears; the command runs synchronously on the vCPU thread that wrote
``CTRL_START`` (as in cloud-hypervisor). When the backend fails, the guest reads a TPM response
with ``TPM_RC_FAILURE`` and ``CTRL_STS.tpmSts`` set (Linux's tpm_crb then returns -EIO): the
VMM itself stays up.

The device knows nothing of swtpm: it talks to a :class:`TpmBackend`.
"""

from __future__ import annotations

import logging
import struct
from typing import Protocol

from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

#: the register page's size (cloud-hypervisor's TPM_SIZE)
TPM_SIZE = 0x1000

# register offsets (PTP §6.4.2, Table 16)
LOC_STATE = 0x00
LOC_CTRL = 0x08
LOC_STS = 0x0C
INTF_ID = 0x30
INTF_ID_HI = 0x34
CTRL_EXT = 0x38
CTRL_REQ = 0x40
CTRL_STS = 0x44
CTRL_CANCEL = 0x48
CTRL_START = 0x4C
CTRL_INT_ENABLE = 0x50
CTRL_INT_STS = 0x54
CTRL_CMD_SIZE = 0x58
CTRL_CMD_LADDR = 0x5C
CTRL_CMD_HADDR = 0x60
CTRL_RSP_SIZE = 0x64
CTRL_RSP_ADDR = 0x68
DATA_BUFFER = 0x80
#: the command/response buffer fills the rest of the page
BUFFER_SIZE = TPM_SIZE - DATA_BUFFER

# LOC_STATE bits
LOC_STATE_NOT_ESTABLISHED = 1 << 0
LOC_STATE_ASSIGNED = 1 << 1
LOC_STATE_REG_VALID = 1 << 7
# LOC_CTRL requests
LOC_CTRL_REQUEST_ACCESS = 1 << 0
LOC_CTRL_RELINQUISH = 1 << 1
LOC_CTRL_RESET_ESTABLISHMENT = 1 << 3
# LOC_STS bits
LOC_STS_GRANTED = 1 << 0
# CTRL_REQ requests
CTRL_REQ_CMD_READY = 1 << 0
CTRL_REQ_GO_IDLE = 1 << 1
# CTRL_STS bits
CTRL_STS_ERROR = 1 << 0
CTRL_STS_IDLE = 1 << 1
# CTRL_START / CTRL_CANCEL
START_INVOKE = 1 << 0
CANCEL_INVOKE = 1 << 0

#: INTF_ID: CRB interface active (type 1, version 1), 64-byte transfers, CRB capable, CRB selected
INTF_ID_VALUE = (1 << 0) | (1 << 4) | (3 << 11) | (1 << 14) | (1 << 17)
#: INTF_ID_HI: vendor id (IBM's, as swtpm's and cloud-hypervisor's)
INTF_ID_HI_VALUE = 0x1014

#: the response the guest gets when the backend failed: TPM_ST_NO_SESSIONS, 10 bytes, TPM_RC_FAILURE
TPM_ST_NO_SESSIONS = 0x8001
TPM_RC_FAILURE = 0x101
FAILURE_RESPONSE = struct.pack(">HII", TPM_ST_NO_SESSIONS, 10, TPM_RC_FAILURE)


class TpmBackend(Protocol):
    """What executes TPM commands (swtpm through :class:`vmsh.devices.backends.swtpm.Swtpm`)."""

    established: bool

    def startup(self, buffer_size: int) -> int:
        """(Re)start the TPM with a buffer of at most ``buffer_size`` bytes; returns the size used."""
        ...

    def execute(self, command: bytes) -> bytes:
        """Run one command and return its response; raises DeviceError when that fails."""
        ...

    def cancel(self) -> None:
        """Ask the TPM to cancel the command in progress."""
        ...


class CrbTpm:
    """The CRB register page at ``base`` (its guest physical address) backed by ``backend``."""

    def __init__(self, backend: TpmBackend, base: int) -> None:
        self.backend = backend
        self.base = base
        self.buffer = bytearray(BUFFER_SIZE)
        #: bytes of the command written so far since the guest started writing at DATA_BUFFER
        self.command_size = 0
        self.loc_state = 0
        self.loc_sts = 0
        self.ctrl_sts = 0
        self.ctrl_start = 0
        self.buffer_size = BUFFER_SIZE
        self.reset()

    def reset(self) -> None:
        """The state after a machine reset; restarts the backend's TPM.

        :raises DeviceError: when the backend cannot start.
        """
        self.buffer[:] = bytes(BUFFER_SIZE)
        self.command_size = 0
        self.loc_state = LOC_STATE_REG_VALID
        self.loc_sts = 0
        self.ctrl_sts = CTRL_STS_IDLE
        self.ctrl_start = 0
        self.buffer_size = self.backend.startup(BUFFER_SIZE)

    # --- registers ------------------------------------------------------------------------------

    def _register(self, offset: int) -> int:
        if offset == LOC_STATE:
            established = 0 if self.backend.established else LOC_STATE_NOT_ESTABLISHED
            return self.loc_state | established
        values = {
            LOC_STS: self.loc_sts,
            INTF_ID: INTF_ID_VALUE,
            INTF_ID_HI: INTF_ID_HI_VALUE,
            CTRL_STS: self.ctrl_sts,
            CTRL_START: self.ctrl_start,
            CTRL_CMD_SIZE: self.buffer_size,
            CTRL_CMD_LADDR: self.base + DATA_BUFFER,
            CTRL_CMD_HADDR: 0,
            CTRL_RSP_SIZE: self.buffer_size,
            CTRL_RSP_ADDR: self.base + DATA_BUFFER,
        }
        return values.get(offset, 0)

    def read(self, offset: int, size: int) -> bytes:
        if offset >= DATA_BUFFER:
            start = offset - DATA_BUFFER
            end = min(start + size, BUFFER_SIZE)
            return bytes(self.buffer[start:end]).ljust(size, b"\0")
        aligned = offset & ~3
        # a read may cover two registers (an 8-byte read of the response address)
        value = self._register(aligned) | (self._register(aligned + 4) << 32)
        shift = (offset - aligned) * 8
        return ((value >> shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset >= DATA_BUFFER:
            self._write_buffer(offset - DATA_BUFFER, data)
            return
        value = int.from_bytes(data[:4], "little")
        if offset == LOC_CTRL:
            self._locality_request(value)
        elif offset == CTRL_REQ:
            if value == CTRL_REQ_CMD_READY:
                self.ctrl_sts &= ~CTRL_STS_IDLE
            elif value == CTRL_REQ_GO_IDLE:
                self.ctrl_sts |= CTRL_STS_IDLE
            else:
                LOG.warning("TPM: ignoring CTRL_REQ write %#x", value)
        elif offset == CTRL_CANCEL:
            if value == CANCEL_INVOKE and self.ctrl_start & START_INVOKE:
                self.backend.cancel()
        elif offset == CTRL_START:
            if value & START_INVOKE and not self.ctrl_start & START_INVOKE and self._locality_granted():
                self._start()
        else:
            # the rest is read-only (the addresses and sizes) or unused (interrupts)
            LOG.debug("TPM: ignoring a write of %#x at %#x", value, offset)

    def _locality_granted(self) -> bool:
        return bool(self.loc_sts & LOC_STS_GRANTED)

    def _locality_request(self, value: int) -> None:
        if value == LOC_CTRL_REQUEST_ACCESS:
            self.loc_sts = LOC_STS_GRANTED
            self.loc_state |= LOC_STATE_ASSIGNED
        elif value == LOC_CTRL_RELINQUISH:
            self.loc_sts &= ~LOC_STS_GRANTED
            self.loc_state &= ~LOC_STATE_ASSIGNED
        elif value == LOC_CTRL_RESET_ESTABLISHMENT:
            pass  # only meaningful from locality 3 or 4, which this TPM does not have
        else:
            LOG.warning("TPM: ignoring LOC_CTRL write %#x", value)

    def _write_buffer(self, start: int, data: bytes) -> None:
        end = start + len(data)
        if end > BUFFER_SIZE:
            LOG.warning("TPM: ignoring a write past the buffer (%#x+%d)", start, len(data))
            return
        if start == 0:
            # a command is written from the buffer's start: a new command begins
            self.buffer[:] = bytes(BUFFER_SIZE)
            self.command_size = 0
        self.buffer[start:end] = data
        self.command_size = max(self.command_size, end)

    def _start(self) -> None:
        self.ctrl_start |= START_INVOKE
        command = self._command()
        try:
            response = self.backend.execute(command)
            if len(response) > BUFFER_SIZE:
                raise DeviceError(f"TPM response of {len(response)} bytes exceeds the buffer")
        except DeviceError as err:
            LOG.error("TPM command failed: %s", err, exc_info=LOG.isEnabledFor(logging.DEBUG))
            self.ctrl_sts |= CTRL_STS_ERROR
            response = FAILURE_RESPONSE
        self.buffer[:] = bytes(BUFFER_SIZE)
        self.buffer[: len(response)] = response
        self.command_size = 0
        self.ctrl_start &= ~START_INVOKE

    def _command(self) -> bytes:
        """The command in the buffer: as long as its header says when that fits, else what was written."""
        size = self.command_size
        if size >= 6:
            declared = int.from_bytes(self.buffer[2:6], "big")
            if 10 <= declared <= BUFFER_SIZE:
                size = declared
        return bytes(self.buffer[:size])
