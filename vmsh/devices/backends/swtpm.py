"""The host side of a TPM: a connection to swtpm's control channel and its data channel.

swtpm (``swtpm socket --tpm2 --ctrl type=unixio,path=CTRL``) listens on a Unix socket for its
control protocol (swtpm's ``man swtpm-ioctls``: a 4-byte big-endian command code, then the
command's big-endian fields; most answers start with a 4-byte result code, 0 for success). The
TPM commands themselves travel on a separate data channel: vmsh makes a socket pair and hands one
end to swtpm with ``CMD_SET_DATAFD`` (the descriptor as SCM_RIGHTS ancillary data), as
cloud-hypervisor's ``tpm`` crate (``emulator.rs``, ``socket.rs``) does.

Every method runs on the thread that calls it (a vCPU thread for :meth:`Swtpm.execute`): it
blocks until swtpm answers or the socket timeout passes.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct

from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

# control commands (swtpm's tpm_ioctl.h, PTM_* / CMD_*)
CMD_GET_CAPABILITY = 1
CMD_INIT = 2
CMD_SHUTDOWN = 3
CMD_GET_TPMESTABLISHED = 4
CMD_SET_LOCALITY = 5
CMD_CANCEL_TPM_CMD = 9
CMD_RESET_TPMESTABLISHED = 11
CMD_STOP = 14
CMD_SET_DATAFD = 16
CMD_SET_BUFFERSIZE = 17

# capability bits of CMD_GET_CAPABILITY's answer
CAP_INIT = 1 << 0
CAP_SHUTDOWN = 1 << 1
CAP_GET_TPMESTABLISHED = 1 << 2
CAP_SET_LOCALITY = 1 << 3
CAP_CANCEL_TPM_CMD = 1 << 5
CAP_RESET_TPMESTABLISHED = 1 << 7
CAP_STOP = 1 << 10
CAP_SET_DATAFD = 1 << 12
CAP_SET_BUFFERSIZE = 1 << 13
#: what the CRB device needs from swtpm (cancelling is optional)
REQUIRED_CAPS = (CAP_INIT | CAP_SHUTDOWN | CAP_GET_TPMESTABLISHED | CAP_SET_LOCALITY
                 | CAP_RESET_TPMESTABLISHED | CAP_STOP | CAP_SET_DATAFD | CAP_SET_BUFFERSIZE)

#: CMD_INIT flag: start without the volatile state a previous run may have stored
INIT_DELETE_VOLATILE = 1

#: a TPM response header: tag (u16), size (u32), response code (u32), big-endian
TPM_HEADER = struct.Struct(">HII")
#: how long swtpm may take over one control command or TPM command (key generation is slow)
TIMEOUT = 60.0


class SwtpmError(DeviceError):
    """swtpm is missing, refused a command or went away."""


class Swtpm:
    """One connection to swtpm: :meth:`execute` sends a TPM command and returns its response."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        """Connect to swtpm's control socket at ``path`` and set up the data channel.

        :raises SwtpmError: the socket is missing or refuses, or swtpm lacks a needed capability.
        """
        self.path = path
        if not os.path.exists(path):
            raise SwtpmError(f"The TPM socket {path} does not exist (is swtpm running?)")
        self._ctrl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._data: socket.socket | None = None
        try:
            self._ctrl.settimeout(timeout)
            try:
                self._ctrl.connect(path)
            except OSError as err:
                raise SwtpmError(f"Cannot connect to the TPM socket {path}") from err
            self._set_data_fd(timeout)
            caps = self.capabilities()
            missing = REQUIRED_CAPS & ~caps
            if missing:
                raise SwtpmError(f"swtpm at {path} lacks capabilities {missing:#x} (has {caps:#x})")
            self.can_cancel = bool(caps & CAP_CANCEL_TPM_CMD)
            #: the TPM's "established" flag, read once the TPM runs (:meth:`startup`)
            self.established = False
        except BaseException:
            self.close()
            raise

    # --- control channel ------------------------------------------------------------------------

    def _send(self, cmd: int, payload: bytes, fds: list[int] | None) -> None:
        message = struct.pack(">I", cmd) + payload
        try:
            if fds:
                self._ctrl.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self._ctrl.sendall(message)
        except OSError as err:
            raise SwtpmError(f"swtpm at {self.path} did not take control command {cmd}") from err

    def _receive(self, cmd: int, size: int) -> bytes:
        try:
            return _recv_exact(self._ctrl, size)
        except OSError as err:
            raise SwtpmError(f"swtpm at {self.path} did not answer control command {cmd}") from err

    def _checked(self, cmd: int, payload: bytes = b"", answer_size: int = 4,
                 fds: list[int] | None = None) -> bytes:
        """A control command whose answer starts with a result code, which must be 0 (a failed
        command's answer is only that code)."""
        self._send(cmd, payload, fds)
        answer = self._receive(cmd, 4)
        (result,) = struct.unpack(">I", answer)
        if result != 0:
            raise SwtpmError(f"swtpm at {self.path} failed control command {cmd} with result {result:#x}")
        return answer + self._receive(cmd, answer_size - 4)

    def _set_data_fd(self, timeout: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._checked(CMD_SET_DATAFD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # swtpm holds its own copy now
        ours.settimeout(timeout)
        self._data = ours

    def capabilities(self) -> int:
        """CMD_GET_CAPABILITY: the 64-bit capability mask (this answer has no result code)."""
        self._send(CMD_GET_CAPABILITY, b"", None)
        (caps,) = struct.unpack(">Q", self._receive(CMD_GET_CAPABILITY, 8))
        return int(caps)

    def tpm_established(self) -> bool:
        """CMD_GET_TPMESTABLISHED: whether the TPM's "established" flag is set."""
        answer = self._checked(CMD_GET_TPMESTABLISHED, answer_size=8)
        return bool(answer[4] & 1)

    def stop(self) -> None:
        """CMD_STOP: stop the TPM so that its buffer size can change."""
        self._checked(CMD_STOP)

    def set_buffer_size(self, size: int) -> tuple[int, int, int]:
        """CMD_SET_BUFFERSIZE (0 only asks): returns (buffer size, minimum, maximum)."""
        answer = self._checked(CMD_SET_BUFFERSIZE, struct.pack(">I", size), answer_size=16)
        current, minimum, maximum = struct.unpack_from(">III", answer, 4)
        return int(current), int(minimum), int(maximum)

    def init(self) -> None:
        """CMD_INIT: (re)start the TPM, dropping volatile state, as at a machine reset."""
        self._checked(CMD_INIT, struct.pack(">I", INIT_DELETE_VOLATILE))

    def startup(self, buffer_size: int) -> int:
        """Stop the TPM, agree on a buffer size no larger than ``buffer_size`` and start it.

        :returns: the buffer size swtpm uses.
        """
        self.stop()
        current, _, maximum = self.set_buffer_size(0)
        wanted = min(buffer_size, maximum or current)
        self.stop()
        agreed, _, _ = self.set_buffer_size(wanted)
        self.init()
        self.established = self.tpm_established()
        LOG.debug("swtpm at %s started with buffer size %d", self.path, agreed)
        return agreed

    def cancel(self) -> None:
        """CMD_CANCEL_TPM_CMD, when swtpm can; a failure is only logged."""
        if not self.can_cancel:
            return
        try:
            self._checked(CMD_CANCEL_TPM_CMD)
        except SwtpmError as err:
            LOG.warning("%s", err)

    # --- data channel ---------------------------------------------------------------------------

    def execute(self, command: bytes) -> bytes:
        """Send one TPM command on the data channel and return swtpm's whole response.

        :raises SwtpmError: when swtpm is gone or answers with something that is not a response.
        """
        if self._data is None:
            raise SwtpmError(f"The TPM at {self.path} is closed")
        try:
            self._data.sendall(command)
            header = _recv_exact(self._data, TPM_HEADER.size)
            _, size, _ = TPM_HEADER.unpack(header)
            if size < TPM_HEADER.size:
                raise SwtpmError(f"swtpm at {self.path} sent a response of size {size}")
            return header + _recv_exact(self._data, size - TPM_HEADER.size)
        except OSError as err:
            raise SwtpmError(f"swtpm at {self.path} did not answer a TPM command") from err

    def close(self) -> None:
        """Drop both channels; swtpm keeps its state (and exits if it runs with ``--terminate``)."""
        if self._data is not None:
            self._data.close()
            self._data = None
        self._ctrl.close()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the peer closed the connection")
        data += chunk
    return bytes(data)
