"""What the shell's debugger (:mod:`vmsh.script.debug_commands`) drives: a VM in this process
(:class:`LocalBackend`, over :class:`vmsh.engine.gdb.session.DebugSession`) or a VMM's gdb stub
over its ``--gdb`` socket (:class:`GdbBackend`, the GDB remote protocol as gdb speaks it), so
the same commands work on a local VM and after ``connect``.

Both stop the VM on attach, keep software breakpoints, resume it (or step one vCPU) and
report the next stop as a :class:`~vmsh.engine.gdb.session.Stop`. Registers come back as
``(rip, rsp, rbp)``; memory by guest virtual address, an unmapped one being a
:class:`~vmsh.errors.GuestMemoryError`.
"""

from __future__ import annotations

import logging
import select
import socket
from typing import Any, Protocol

from vmsh.engine.gdb import packets
from vmsh.engine.gdb.registers import NUMBERS
from vmsh.engine.gdb.session import DebugSession, Stop
from vmsh.errors import GuestMemoryError, VmshError

LOG = logging.getLogger(__name__)


class Backend(Protocol):
    """One attached debugger."""

    @property
    def attached(self) -> bool: ...
    def registers(self, tid: int) -> tuple[int, int, int]: ...
    def read(self, tid: int, addr: int, length: int) -> bytes: ...
    def insert(self, tid: int, addr: int) -> None: ...
    def remove(self, addr: int) -> None: ...
    def run(self, step_tid: int | None, timeout: float) -> tuple[bool, Stop]: ...
    def close(self) -> None: ...


class LocalBackend:
    """The VM of a VMM in this process."""

    def __init__(self, vmm: Any) -> None:
        self.debug = DebugSession(vmm)
        try:
            self.target = self.debug.attach()
        except BaseException:
            self.debug.close()
            raise

    @property
    def attached(self) -> bool:
        return self.debug.attached

    def registers(self, tid: int) -> tuple[int, int, int]:
        regs = self.target.vcpu(tid).fd.get_regs()
        return int(regs.rip), int(regs.rsp), int(regs.rbp)

    def read(self, tid: int, addr: int, length: int) -> bytes:
        return self.target.read(tid, addr, length)

    def insert(self, tid: int, addr: int) -> None:
        self.target.insert_sw(tid, addr)

    def remove(self, addr: int) -> None:
        self.target.remove_sw(addr)

    def run(self, step_tid: int | None, timeout: float) -> tuple[bool, Stop]:
        self.debug.resume(step_tid)
        hit = False
        try:
            hit = self.debug.wait(timeout)
        finally:
            # a timeout (or Ctrl-C) stops the VM all the same
            stop = self.debug.stop(step_tid or 1)
        return hit, stop

    def close(self) -> None:
        self.debug.close()


class GdbBackend:
    """A VMM's gdb stub, reached on its unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise VmshError(f"Cannot connect to the gdb socket {path}") from err
        self.decoder = packets.Decoder()
        self._pending: list[bytes] = []
        self._open = True
        try:
            self._ask(b"QStartNoAckMode")
            self.last = self._parse_stop(self._ask(b"?"))
        except BaseException:
            self.close()
            raise

    # --- the protocol ----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.sock.sendall(packets.frame(data))

    def _reply(self, timeout: float | None = 60.0) -> bytes | None:
        while not self._pending:
            if not select.select([self.sock], [], [], timeout)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                self._open = False
                raise VmshError("The gdb stub closed the connection")
            self._pending += [e.data for e in self.decoder.feed(chunk) if isinstance(e, packets.Packet)]
        return self._pending.pop(0)

    def _ask(self, data: bytes) -> bytes:
        self._send(data)
        reply = self._reply()
        if reply is None:
            raise VmshError(f"The gdb stub did not answer {data[:20]!r}")
        return reply

    @staticmethod
    def _parse_stop(reply: bytes) -> Stop:
        text = reply.decode("latin-1")
        if not text.startswith("T"):
            raise VmshError(f"The gdb stub stopped oddly: {text[:40]}")
        fields = dict(part.partition(":")[::2] for part in text[3:].split(";") if part)
        tid = int(fields.get("thread", "1"), 16)
        for kind in ("swbreak", "hwbreak"):
            if kind in fields:
                return Stop(tid, kind)
        for kind in ("watch", "awatch", "rwatch"):
            if kind in fields:
                return Stop(tid, kind if kind != "rwatch" else "awatch", int(fields[kind], 16))
        return Stop(tid, "interrupt" if text[1:3] == "02" else "step")

    def _select(self, tid: int) -> None:
        if self._ask(b"Hg%x" % tid) != b"OK":
            raise VmshError(f"No thread {tid}")

    # --- the backend -----------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._open

    def registers(self, tid: int) -> tuple[int, int, int]:
        self._select(tid)
        out = []
        for name in ("rip", "rsp", "rbp"):
            reply = self._ask(b"p%x" % NUMBERS[name])
            if reply.startswith(b"E"):
                raise VmshError(f"The gdb stub cannot read {name}")
            out.append(int.from_bytes(bytes.fromhex(reply.decode()), "little"))
        return out[0], out[1], out[2]

    def read(self, tid: int, addr: int, length: int) -> bytes:
        self._select(tid)
        data = b""
        while len(data) < length:
            n = min(length - len(data), 0x800)
            reply = self._ask(b"m%x,%x" % (addr + len(data), n))
            if reply.startswith(b"E") or not reply:
                raise GuestMemoryError(f"The guest does not map {addr + len(data):#x}")
            data += bytes.fromhex(reply.decode())
        return data

    def insert(self, tid: int, addr: int) -> None:
        self._select(tid)
        if self._ask(b"Z0,%x,1" % addr) != b"OK":
            raise GuestMemoryError(f"The guest does not map {addr:#x}")

    def remove(self, addr: int) -> None:
        self._ask(b"z0,%x,1" % addr)

    def run(self, step_tid: int | None, timeout: float) -> tuple[bool, Stop]:
        self._send(b"vCont;s:%x" % step_tid if step_tid is not None else b"vCont;c")
        reply = self._reply(timeout)
        hit = reply is not None
        if reply is None:
            self.sock.sendall(bytes((packets.INTERRUPT,)))
            reply = self._reply()
            if reply is None:
                raise VmshError("The gdb stub did not stop the VM")
        self.last = self._parse_stop(reply)
        return hit, self.last

    def close(self) -> None:
        if self._open:
            try:
                self._ask(b"D")
            except (OSError, VmshError) as err:
                LOG.debug("gdb detach: %s", err)
        self._open = False
        self.sock.close()
