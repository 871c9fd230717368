"""The ``gdb`` thread: serves the GDB remote serial protocol on the ``--gdb`` unix socket.

One debugger at a time (as cloud-hypervisor's stub). Attaching pauses the VM; ``c``/``s``
(and ``vCont``) resume it and the stop reply comes when a vCPU stops at a breakpoint, after a
step or on Ctrl-C; ``D`` (or the connection closing) removes every breakpoint, switches guest
debugging off and lets the VM run (unless it was paused through the API before the debugger
came and the debugger never resumed it). Threads are vCPUs (thread id = index + 1).

Threading (``docs/threading.md``): the thread runs the VMM's ``vm.pause`` / ``vm.resume``
actions through :meth:`Vmm.do` (holding ``Vmm.lock``, as an API connection does), and touches
vCPU registers, debug registers and guest RAM only while the VM is paused. vCPU threads tell
it about a stop through :attr:`Vm.debug_listener`, which only writes a byte to a pipe.

Packets handled: ``qSupported``, ``QStartNoAckMode``, ``qXfer:features:read`` (the target
description), ``qAttached``, ``qC``, ``qfThreadInfo``/``qsThreadInfo``, ``qThreadExtraInfo``,
``H``, ``T``, ``?``, ``g``/``G``, ``p``/``P``, ``m``/``M``/``X``, ``c``/``s``, ``vCont``,
``Z0``-``Z4``/``z0``-``z4``, ``D``, ``k``; anything else gets the empty reply ("not
supported"), which gdb understands. Errors are ``Exx`` (``E14``, EFAULT: an address the
guest's page tables do not map).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
from typing import Any

from vmsh.engine import seccomp
from vmsh.engine.gdb import packets
from vmsh.engine.gdb.guest_debug import RW_ACCESS, RW_EXECUTE, RW_WRITE, HwBreakpoint
from vmsh.engine.gdb.registers import LAYOUT, split_block, target_xml
from vmsh.engine.gdb.session import Control, DebugSession, Stop
from vmsh.engine.gdb.target import DebugTarget
from vmsh.engine.pvm import is_pvm_host
from vmsh.engine.state import VmState
from vmsh.errors import GuestMemoryError, VmshError
from vmsh.thread_names import NamedThread

LOG = logging.getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
#: errno values in error replies
EBUSY, EFAULT, EINVAL, ENOSPC = 16, 14, 22, 28
#: the largest packet gdb may send us (hex digits of a memory write, a ``G`` block)
PACKET_SIZE = 0x4000


class GdbStub:
    """The listening socket and the ``gdb`` thread.

    :param control: the VMM whose VM is debugged.
    :param path: the unix socket to create (a stale socket file is replaced, any other file
        makes it fail).
    """

    def __init__(self, control: Control, path: str) -> None:
        self.control = control
        self.path = path
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread: NamedThread | None = None

    def start(self) -> GdbStub:
        """Bind the socket (here, so that a bad path fails the launch) and start the thread.

        :raises VmshError: when the socket cannot be created.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # a stale socket of an earlier run is replaced; any other file is left alone (bind fails)
            if os.path.exists(self.path) and stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
            sock.bind(self.path)
            sock.listen(1)
        except OSError as err:
            sock.close()
            raise VmshError(f"Cannot listen on the gdb socket {self.path}") from err
        self._listener = sock
        self._thread = NamedThread(target=self._serve, name="gdb", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (a connected debugger is detached) and remove the socket file."""
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        try:
            seccomp.apply(seccomp.ThreadKind.GDB)
        except VmshError as err:
            LOG.error("gdb: %s", err)
            return
        assert self._listener is not None
        while True:
            ready, _, _ = select.select([self._listener.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            conn, _ = self._listener.accept()
            LOG.info("gdb: debugger connected")
            try:
                with conn:
                    _Session(self.control, conn, self._stop_r).run()
            except Exception:
                LOG.exception("gdb: the debugger session failed")
            LOG.info("gdb: debugger detached")


class _Detach(Exception):
    """The session ends (``D``, ``k``, the connection closed, the stub closing)."""


class _Session:
    """One debugger connection."""

    def __init__(self, control: Control, conn: socket.socket, stop_r: int) -> None:
        self.control = control
        self.conn = conn
        self.stop_r = stop_r
        self.decoder = packets.Decoder()
        self.ack = True
        self.debug = DebugSession(control)
        self.target: DebugTarget | None = None
        self.g_tid = 1
        self.last_stop = f"T{SIGTRAP:02x}thread:1;"

    @property
    def vm(self) -> Any:
        return self.debug.vm

    # --- connection ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            try:
                self.target = self.debug.attach()
            except VmshError as err:
                LOG.warning("gdb: %s", err)
                return
            self.last_stop = self._reply_for(self.debug.why(self.g_tid), SIGTRAP)
            while True:
                timeout = 0.5 if self.debug.running else None
                ready, _, _ = select.select([self.conn.fileno(), self.debug.wake_fd, self.stop_r], [], [], timeout)
                if self.stop_r in ready:
                    return
                if self.debug.wake_fd in ready and self.debug.running:
                    self._stop(SIGTRAP)
                if self.conn.fileno() in ready:
                    data = self.conn.recv(PACKET_SIZE)
                    if not data:
                        return
                    for event in self.decoder.feed(data):
                        self._event(event)
                if self.debug.running and not self.debug.attached:
                    self._send(b"W00")  # the VM went away (poweroff, delete)
                    return
        except (_Detach, OSError):
            return
        finally:
            self.debug.close()

    def _send(self, data: bytes) -> None:
        self.conn.sendall(packets.frame(data))

    def _event(self, event: packets.Event) -> None:
        if isinstance(event, packets.BadChecksum):
            if self.ack:
                self.conn.sendall(b"-")
            return
        if isinstance(event, packets.Interrupt):
            if self.debug.running:
                self._stop(SIGINT)
            return
        if self.ack:
            self.conn.sendall(b"+")
        reply = self._dispatch(event.data)
        if reply is not None:
            self._send(reply)

    # --- stop and resume -------------------------------------------------------------------------

    def _stop(self, signal: int) -> None:
        stop = self.debug.stop(self.g_tid)
        self.last_stop = self._reply_for(stop, signal)
        self._send(self.last_stop.encode())

    def _reply_for(self, stop: Stop, signal: int) -> str:
        """The ``T`` stop reply (gdb manual, "Stop Reply Packets")."""
        self.g_tid = stop.tid
        head = f"T{(signal if stop.kind == 'interrupt' else SIGTRAP):02x}thread:{stop.tid:x};"
        if stop.kind in ("swbreak", "hwbreak"):
            return head + f"{stop.kind}:;"
        if stop.kind in ("watch", "awatch"):
            return head + f"{stop.kind}:{stop.addr:x};"
        return head

    def _resume(self, step_tid: int | None) -> bytes | None:
        try:
            self.debug.resume(step_tid)
        except VmshError as err:
            LOG.warning("gdb: cannot set guest debugging: %s", err)
            return b"E%02x" % EINVAL
        return None

    # --- packets ---------------------------------------------------------------------------------

    def _dispatch(self, data: bytes) -> bytes | None:
        """The reply to one packet (None: the reply comes later, a stop reply)."""
        text = data.decode("latin-1")
        head = text[:1]
        try:
            if text.startswith("qSupported"):
                return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                        "QStartNoAckMode+;vContSupported+").encode()
            if text == "QStartNoAckMode":
                self.ack = False
                return b"OK"
            if text.startswith("qXfer:features:read:"):
                return self._xfer(text)
            if text == "qAttached":
                return b"1"
            if text == "qC":
                return f"QC{self.g_tid:x}".encode()
            if text == "qfThreadInfo":
                assert self.target is not None
                return ("m" + ",".join(f"{t:x}" for t in self.target.thread_ids())).encode()
            if text == "qsThreadInfo":
                return b"l"
            if text.startswith("qThreadExtraInfo,"):
                tid = int(text.split(",", 1)[1], 16)
                return f"vCPU {tid - 1}".encode().hex().encode()
            if text == "vCont?":
                return b"vCont;c;C;s;S"
            if text.startswith("vCont;"):
                return self._vcont(text[6:])
            if text == "vMustReplyEmpty" or head == "q" or head == "Q" or head == "v":
                return b""
            if head == "?":
                return self.last_stop.encode()
            if head and head in "gGpPmMXZz" and not self._paused():
                # resumed behind the debugger's back (vm.resume through the API): the vCPUs are
                # not the debugger's to touch until it stops them again
                return b"E%02x" % EBUSY
            if head == "H":
                return self._select_thread(text[1:])
            if head == "T":
                assert self.target is not None
                return b"OK" if int(text[1:], 16) in self.target.thread_ids() else b"E01"
            if head == "g":
                return self._read_registers()
            if head == "G":
                return self._write_registers(bytes.fromhex(text[1:]))
            if head == "p":
                return self._read_register(int(text[1:], 16))
            if head == "P":
                number, value = text[1:].split("=", 1)
                return self._write_register(int(number, 16), bytes.fromhex(value))
            if head == "m":
                addr, length = (int(x, 16) for x in text[1:].split(","))
                return self._read_memory(addr, length)
            if head == "M":
                where, hexdata = text[1:].split(":", 1)
                addr = int(where.split(",")[0], 16)
                return self._write_memory(addr, bytes.fromhex(hexdata))
            if head == "X":
                where, _, _rest = text[1:].partition(":")
                addr = int(where.split(",")[0], 16)
                payload = data[data.index(b":") + 1:]
                return self._write_memory(addr, packets.unescape(payload))
            if head in "cs" and head:
                if len(text) > 1:
                    self._set_pc(int(text[1:], 16))
                return self._resume(self.g_tid if head == "s" else None)
            if head in "Zz" and head:
                return self._breakpoint(head == "Z", text[1:])
            if head == "D":
                self._send(b"OK")
                raise _Detach()
            if head == "k":
                raise _Detach()
        except (ValueError, IndexError) as err:
            LOG.debug("gdb: malformed packet %r: %s", text[:80], err)
            return b"E%02x" % EINVAL
        return b""

    def _paused(self) -> bool:
        with self.control.lock:
            return self.debug.attached and self.vm.state is VmState.PAUSED

    def _xfer(self, text: str) -> bytes:
        # qXfer:features:read:ANNEX:OFFSET,LENGTH
        annex, span = text[len("qXfer:features:read:"):].rsplit(":", 1)
        if annex != "target.xml":
            return b"E00"
        offset, length = (int(x, 16) for x in span.split(","))
        doc = target_xml().encode()
        chunk = doc[offset:offset + length]
        return (b"l" if offset + length >= len(doc) else b"m") + packets.escape(chunk)

    def _select_thread(self, arg: str) -> bytes:
        assert self.target is not None
        kind, tid = arg[:1], int(arg[1:], 16) if arg[1:] not in ("", "-1") else -1
        if tid > 0 and tid not in self.target.thread_ids():
            return b"E01"
        if kind == "g" and tid > 0:
            self.g_tid = tid
        return b"OK"

    def _vcont(self, actions: str) -> bytes | None:
        step: int | None = None
        for action in actions.split(";"):
            verb, _, tid_text = action.partition(":")
            if verb[:1] in ("s", "S"):
                tid = int(tid_text, 16) if tid_text and tid_text != "-1" else self.g_tid
                step = tid if step is None else step
        return self._resume(step)

    def _set_pc(self, pc: int) -> None:
        assert self.target is not None
        self.target.write_registers(self.g_tid, {"rip": pc.to_bytes(8, "little")})

    # --- registers and memory --------------------------------------------------------------------

    def _read_registers(self) -> bytes:
        assert self.target is not None
        return self.target.registers(self.g_tid).block().hex().encode()

    def _read_register(self, number: int) -> bytes:
        assert self.target is not None
        if not 0 <= number < len(LAYOUT):
            return b"E%02x" % EINVAL
        return self.target.registers(self.g_tid).encode(LAYOUT[number].name).hex().encode()

    def _write_registers(self, block: bytes) -> bytes:
        assert self.target is not None
        current = self.target.registers(self.g_tid)
        # the block holds every register; only those that differ need to be writable
        changed = {name: raw for name, raw in split_block(block).items() if raw != current.encode(name)}
        try:
            self.target.write_registers(self.g_tid, changed)
        except KeyError as err:
            LOG.info("gdb: register %s cannot be written", err)
            return b"E%02x" % EINVAL
        return b"OK"

    def _write_register(self, number: int, raw: bytes) -> bytes:
        assert self.target is not None
        if not 0 <= number < len(LAYOUT):
            return b"E%02x" % EINVAL
        try:
            self.target.write_registers(self.g_tid, {LAYOUT[number].name: raw})
        except KeyError:
            return b"E%02x" % EINVAL
        return b"OK"

    def _read_memory(self, addr: int, length: int) -> bytes:
        assert self.target is not None
        length = min(length, PACKET_SIZE // 2 - 8)
        try:
            return self.target.read(self.g_tid, addr, length).hex().encode()
        except GuestMemoryError:
            return b"E%02x" % EFAULT

    def _write_memory(self, addr: int, data: bytes) -> bytes:
        assert self.target is not None
        try:
            self.target.write(self.g_tid, addr, data)
        except GuestMemoryError:
            return b"E%02x" % EFAULT
        return b"OK"

    def _breakpoint(self, insert: bool, spec: str) -> bytes:
        assert self.target is not None
        kind_text, addr_text, length_text = ([*spec.split(";")[0].split(","), "1"])[:3]
        kind, addr, length = int(kind_text), int(addr_text, 16), int(length_text, 16)
        try:
            if kind == 0:
                if insert:
                    self.target.insert_sw(self.g_tid, addr)
                    return b"OK"
                self.target.remove_sw(addr)
                return b"OK"
        except GuestMemoryError:
            return b"E%02x" % EFAULT
        if kind in (1, 2, 3, 4):
            rw = {1: RW_EXECUTE, 2: RW_WRITE, 3: RW_ACCESS, 4: RW_ACCESS}[kind]
            if rw != RW_EXECUTE and (length not in (1, 2, 4, 8) or addr % length):
                return b"E%02x" % EINVAL
            if rw != RW_EXECUTE and insert and is_pvm_host():
                # PVM's instruction emulator never raises data breakpoints: a watchpoint that
                # would never fire is refused ("not supported"), not accepted (README)
                return b""
            bp = HwBreakpoint(addr, rw, 1 if rw == RW_EXECUTE else length)
            if insert:
                return b"OK" if self.target.insert_hw(bp) else b"E%02x" % ENOSPC
            self.target.remove_hw(bp)
            return b"OK"
        return b""
