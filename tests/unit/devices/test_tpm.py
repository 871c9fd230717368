"""The CRB TPM's register model against a scripted backend, and against a real swtpm (Debian
``swtpm``) through the control channel and data socket: TPM2_Startup then TPM2_GetRandom written
into the CRB buffer the way Linux's tpm_crb does, and what happens when swtpm is missing or dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmsh.devices import tpm as crb
from vmsh.devices.backends.swtpm import Swtpm, SwtpmError
from vmsh.errors import DeviceError

BASE = 0xFED4_0000
SWTPM = shutil.which("swtpm")
_MISSING = "swtpm not found: the TPM was NOT checked against swtpm; install Debian's swtpm (CI must)"
if SWTPM is None:
    warnings.warn(_MISSING, stacklevel=1)
needs_swtpm = pytest.mark.needs(SWTPM is not None, _MISSING)

TPM2_CC_STARTUP, TPM2_CC_GET_RANDOM = 0x144, 0x17B
TPM_ST_NO_SESSIONS, TPM_SU_CLEAR = 0x8001, 0


def startup_command() -> bytes:
    return struct.pack(">HIIH", TPM_ST_NO_SESSIONS, 12, TPM2_CC_STARTUP, TPM_SU_CLEAR)


def get_random_command(count: int) -> bytes:
    return struct.pack(">HIIH", TPM_ST_NO_SESSIONS, 12, TPM2_CC_GET_RANDOM, count)


@dataclass
class FakeBackend:
    """Answers each command with the next scripted response (or raises it)."""

    responses: list[bytes | DeviceError] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    established: bool = False
    startups: int = 0
    cancels: int = 0

    def startup(self, buffer_size: int) -> int:
        self.startups += 1
        return buffer_size

    def execute(self, command: bytes) -> bytes:
        self.commands.append(command)
        answer = self.responses.pop(0)
        if isinstance(answer, DeviceError):
            raise answer
        return answer

    def cancel(self) -> None:
        self.cancels += 1


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def reg(dev: crb.CrbTpm, offset: int) -> int:
    return int.from_bytes(dev.read(offset, 4), "little")


def run_command(dev: crb.CrbTpm, command: bytes) -> bytes:
    """What tpm_crb does for one command: locality, cmdReady, fill the buffer in 8-byte writes,
    START, poll START, read the header then the rest."""
    dev.write(crb.LOC_CTRL, u32(crb.LOC_CTRL_REQUEST_ACCESS))
    assert reg(dev, crb.LOC_STATE) & (crb.LOC_STATE_ASSIGNED | crb.LOC_STATE_REG_VALID) == 0x82
    dev.write(crb.CTRL_REQ, u32(crb.CTRL_REQ_CMD_READY))
    assert not reg(dev, crb.CTRL_STS) & crb.CTRL_STS_IDLE
    addr = int.from_bytes(dev.read(crb.CTRL_CMD_LADDR, 4), "little") - BASE
    for i in range(0, len(command), 8):
        dev.write(addr + i, command[i:i + 8])
    dev.write(crb.CTRL_START, u32(crb.START_INVOKE))
    assert not reg(dev, crb.CTRL_START) & crb.START_INVOKE
    rsp = int.from_bytes(dev.read(crb.CTRL_RSP_ADDR, 8), "little") - BASE
    header = dev.read(rsp, 8) + dev.read(rsp + 8, 2)
    size = int.from_bytes(header[2:6], "big")
    return header + dev.read(rsp + 10, size - 10)


def test_fixed_registers_point_at_the_buffer() -> None:
    dev = crb.CrbTpm(FakeBackend(), BASE)
    assert reg(dev, crb.INTF_ID) & 0xF == 1 and reg(dev, crb.INTF_ID) & (1 << 14)
    assert reg(dev, crb.INTF_ID_HI) == 0x1014
    assert reg(dev, crb.CTRL_CMD_LADDR) == BASE + 0x80 and reg(dev, crb.CTRL_CMD_HADDR) == 0
    assert reg(dev, crb.CTRL_CMD_SIZE) == reg(dev, crb.CTRL_RSP_SIZE) == 0x1000 - 0x80
    assert int.from_bytes(dev.read(crb.CTRL_RSP_ADDR, 8), "little") == BASE + 0x80
    assert reg(dev, crb.CTRL_STS) == crb.CTRL_STS_IDLE
    # no locality until asked for; not established
    assert reg(dev, crb.LOC_STATE) == crb.LOC_STATE_REG_VALID | crb.LOC_STATE_NOT_ESTABLISHED
    dev.write(crb.LOC_CTRL, u32(crb.LOC_CTRL_REQUEST_ACCESS))
    assert reg(dev, crb.LOC_STS) == crb.LOC_STS_GRANTED
    dev.write(crb.LOC_CTRL, u32(crb.LOC_CTRL_RELINQUISH))
    assert reg(dev, crb.LOC_STS) == 0 and not reg(dev, crb.LOC_STATE) & crb.LOC_STATE_ASSIGNED
    dev.write(crb.CTRL_REQ, u32(crb.CTRL_REQ_CMD_READY))
    dev.write(crb.CTRL_REQ, u32(crb.CTRL_REQ_GO_IDLE))
    assert reg(dev, crb.CTRL_STS) == crb.CTRL_STS_IDLE


def test_command_goes_to_the_backend_and_the_response_comes_back() -> None:
    response = struct.pack(">HIIH", TPM_ST_NO_SESSIONS, 16, 0, 4) + b"\x01\x02\x03\x04"
    backend = FakeBackend([response])
    dev = crb.CrbTpm(backend, BASE)
    assert run_command(dev, get_random_command(4)) == response
    assert backend.commands == [get_random_command(4)]
    assert reg(dev, crb.CTRL_STS) & crb.CTRL_STS_ERROR == 0


def test_start_without_locality_does_nothing() -> None:
    backend = FakeBackend([b""])
    dev = crb.CrbTpm(backend, BASE)
    dev.write(crb.DATA_BUFFER, get_random_command(4))
    dev.write(crb.CTRL_START, u32(crb.START_INVOKE))
    assert backend.commands == []


def test_backend_failure_gives_the_guest_an_error_response() -> None:
    dev = crb.CrbTpm(FakeBackend([DeviceError("swtpm went away")]), BASE)
    assert run_command(dev, get_random_command(4)) == crb.FAILURE_RESPONSE
    assert reg(dev, crb.CTRL_STS) & crb.CTRL_STS_ERROR


def test_oversized_writes_and_garbage_are_ignored() -> None:
    backend = FakeBackend([crb.FAILURE_RESPONSE])
    dev = crb.CrbTpm(backend, BASE)
    dev.write(crb.TPM_SIZE - 4, b"\xff" * 8)  # past the page's end
    dev.write(crb.LOC_CTRL, u32(0x55))
    dev.write(crb.CTRL_REQ, u32(0x55))
    dev.write(crb.CTRL_CMD_LADDR, u32(0))  # read-only
    assert reg(dev, crb.CTRL_CMD_LADDR) == BASE + 0x80
    # a header claiming more than the buffer: only what was written is sent
    dev.write(crb.LOC_CTRL, u32(crb.LOC_CTRL_REQUEST_ACCESS))
    dev.write(crb.DATA_BUFFER, struct.pack(">HII", TPM_ST_NO_SESSIONS, 0xFFFF_FFFF, TPM2_CC_GET_RANDOM))
    dev.write(crb.CTRL_START, u32(crb.START_INVOKE))
    assert backend.commands == [struct.pack(">HII", TPM_ST_NO_SESSIONS, 0xFFFF_FFFF, TPM2_CC_GET_RANDOM)]


# --- a real swtpm ---------------------------------------------------------------------------------


def listening(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections (swtpm binds, then listens: the
    file appears before a connection is taken)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    ctrl = tmp_path / "ctrl.sock"
    proc = subprocess.Popen([SWTPM or "swtpm", "socket", "--tpm2", "--ctrl", f"type=unixio,path={ctrl}",
                             "--tpmstate", f"dir={tmp_path}", "--log", f"file={tmp_path / 'log'},level=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not listening(ctrl):
        assert proc.poll() is None and time.monotonic() < deadline, "swtpm did not start"
        time.sleep(0.02)
    yield proc, ctrl
    proc.kill()
    proc.wait()


@needs_swtpm
def test_get_random_through_swtpm(swtpm: tuple[subprocess.Popen[bytes], Path]) -> None:
    backend = Swtpm(str(swtpm[1]))
    try:
        dev = crb.CrbTpm(backend, BASE)
        assert dev.buffer_size == crb.BUFFER_SIZE
        startup = run_command(dev, startup_command())
        assert struct.unpack(">HII", startup) == (TPM_ST_NO_SESSIONS, 10, 0)
        answers = set()
        for _ in range(2):
            rsp = run_command(dev, get_random_command(16))
            tag, size, rc, count = struct.unpack_from(">HIIH", rsp)
            assert (tag, size, rc, count) == (TPM_ST_NO_SESSIONS, 12 + 16, 0, 16) and len(rsp) == 28
            answers.add(rsp[12:])
        assert len(answers) == 2, "two GetRandom calls gave the same bytes"
    finally:
        backend.close()


@needs_swtpm
def test_swtpm_dying_mid_run_is_an_error_response(swtpm: tuple[subprocess.Popen[bytes], Path]) -> None:
    backend = Swtpm(str(swtpm[1]), timeout=5)
    try:
        dev = crb.CrbTpm(backend, BASE)
        run_command(dev, startup_command())
        swtpm[0].send_signal(signal.SIGKILL)
        swtpm[0].wait()
        assert run_command(dev, get_random_command(8)) == crb.FAILURE_RESPONSE
        assert reg(dev, crb.CTRL_STS) & crb.CTRL_STS_ERROR
    finally:
        backend.close()


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SwtpmError, match="does not exist"):
        Swtpm(str(tmp_path / "nothing"))


def test_nobody_listening_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nothing listens: a dead swtpm's socket
    with pytest.raises(SwtpmError, match="Cannot connect"):
        Swtpm(str(path))


def test_a_peer_that_hangs_up_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ctrl.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # a "swtpm" that accepts and closes at once
        try:
            conn, _ = server.accept()
            conn.close()
        finally:
            os._exit(0)
    try:
        with pytest.raises(SwtpmError, match=r"did not (take|answer) control command 16"):
            Swtpm(str(path), timeout=5)
    finally:
        os.waitpid(pid, 0)
        server.close()


@needs_swtpm
def test_a_second_connection_after_the_first_closed(swtpm: tuple[subprocess.Popen[bytes], Path]) -> None:
    # a reboot shuts the VM down (closing its connection) and builds a new one against the same swtpm
    for _ in range(2):
        backend = Swtpm(str(swtpm[1]))
        try:
            dev = crb.CrbTpm(backend, BASE)
            assert struct.unpack(">HII", run_command(dev, startup_command()))[2] == 0
            assert struct.unpack_from(">HIIH", run_command(dev, get_random_command(4)))[2:] == (0, 4)
        finally:
            backend.close()
