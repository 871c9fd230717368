"""The language's debugging commands: a kernel debugger in the shell and in scripts, and
``coredump FILE``.

``break SYMBOL|ADDR``, ``delete N|all``, ``continue [timeout=DUR]``, ``step [N]``, ``bt``,
``vx ADDR [LEN]`` (guest virtual memory), ``detach``: the same debugger as the gdb stub,
driven from the shell (:mod:`vmsh.script.debug_backends`: the VMM in this process, or after
``connect`` the VMM's gdb stub on the socket ``$gdb_socket`` names). The first ``break``
attaches it, which stops the VM; ``continue`` lets the guest run until a breakpoint (or the
timeout) and stops it again; while it is stopped ``regs`` and ``x`` (the existing commands) and
``bt`` / ``vx`` show its state; ``detach`` removes the breakpoints and lets the guest run on.
Symbols come from a System.map: ``$system_map`` if the script set it, else the default
kernel's. After a stop ``$pc`` holds the address and ``$stop`` the function it is in.

``delete`` with no argument is still ``vm.delete``. The module registers its commands in
:mod:`vmsh.script.commands`' table when it is imported (:mod:`vmsh.script.session` does).
"""

from __future__ import annotations

import bisect
import logging
import os
import weakref

from vmsh.engine.gdb.session import Stop
from vmsh.engine.profiler import KERNEL_STACK_SIZE, stack_return_addresses
from vmsh.errors import GuestMemoryError, UsageError, VmshError
from vmsh.script.commands import COMMANDS, command, parse_duration
from vmsh.script.debug_backends import Backend, GdbBackend, LocalBackend
from vmsh.script.interface import SessionApi as Session
from vmsh.script.interface import Target

LOG = logging.getLogger(__name__)

#: ``continue`` waits this long for a breakpoint unless told otherwise
DEFAULT_CONTINUE_TIMEOUT = 60.0
#: ``bt`` shows at most this many frames
MAX_FRAMES = 32


class SymbolMap:
    """A System.map: name -> address, and address -> ``name+offset``."""

    def __init__(self, path: str) -> None:
        pairs = []
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3:
                        pairs.append((int(parts[0], 16), parts[2]))
        except OSError as err:
            raise VmshError(f"Cannot read the System.map {path}") from err
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]
        self.by_name = {n: a for a, n in pairs}

    def name(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return f"{addr:#x}"
        off = addr - self._addrs[i]
        return self._names[i] + (f"+{off:#x}" if off else "")

    def function(self, addr: int) -> str:
        return self.name(addr).split("+", 1)[0]


class ShellDebugger:
    """The shell's debugger for one target: breakpoints by number, the stopped thread."""

    def __init__(self, session: Session) -> None:
        target = session.target
        self._vmm = getattr(target, "vmm", None)
        self._gdb_socket = session.variables.get("gdb_socket")
        if not (target.local and self._vmm is not None) and not self._gdb_socket:
            raise VmshError("After connect the debugger talks to the VMM's gdb stub: "
                            "set gdb_socket PATH (the VMM's --gdb path=) first")
        self.backend: Backend | None = None
        self.breakpoints: dict[int, int] = {}  # number -> address
        self._next = 1
        self.tid = 1
        path = session.variables.get("system_map")
        if not path:
            from vmsh.images import image_path

            path = str(image_path("system-map"))
        self.symbols = SymbolMap(path)

    @property
    def target(self) -> Backend:
        """The attached backend (attaching, which stops the VM, on first use)."""
        if self.backend is None or not self.backend.attached:
            if self.backend is not None:
                self.backend.close()
            self.backend = None
            # the breakpoints of a VM that went away (reboot, restore) are gone with it
            self.breakpoints.clear()
            self.backend = (LocalBackend(self._vmm) if self._vmm is not None
                            else GdbBackend(str(self._gdb_socket)))
        return self.backend

    @property
    def attached(self) -> bool:
        return self.backend is not None and self.backend.attached

    def address(self, text: str) -> int:
        """A symbol, or a number (0x... for hex)."""
        if text in self.symbols.by_name:
            return self.symbols.by_name[text]
        try:
            return int(text, 0)
        except ValueError:
            raise UsageError(f"{text} is neither a symbol of the System.map nor an address") from None

    def step_once(self) -> Stop:
        """One instruction on the stopped vCPU; from a breakpoint of ours, with its INT3 taken
        out for that step and put back after (as gdb steps over its breakpoints)."""
        target = self.target
        rip = target.registers(self.tid)[0]
        lifted = rip in self.breakpoints.values()
        if lifted:
            target.remove(rip)
        try:
            hit, stop = target.run(self.tid, DEFAULT_CONTINUE_TIMEOUT)
            if not hit:
                LOG.warning("a single step did not end within %g s", DEFAULT_CONTINUE_TIMEOUT)
        finally:
            if lifted:
                target.insert(self.tid, rip)
        return stop

    def report(self, session: Session, stop: Stop) -> None:
        self.tid = stop.tid
        rip = self.target.registers(stop.tid)[0]
        what = {"swbreak": "breakpoint", "hwbreak": "breakpoint", "step": "step", "interrupt": "stopped",
                "watch": "watchpoint", "awatch": "watchpoint"}[stop.kind]
        number = next((n for n, a in self.breakpoints.items() if a == rip), None)
        if number is not None and what == "breakpoint":
            what = f"breakpoint {number}"
        session.variables["pc"] = f"{rip:#x}"
        session.variables["stop"] = self.symbols.function(rip)
        session.out(f"{what}: vcpu{stop.tid - 1} at {rip:#x} <{self.symbols.name(rip)}>")

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


_DEBUGGERS: weakref.WeakKeyDictionary[Target, ShellDebugger] = weakref.WeakKeyDictionary()


def _debugger(session: Session) -> ShellDebugger:
    target = session.target
    dbg = _DEBUGGERS.get(target)
    if dbg is None:
        dbg = _DEBUGGERS[target] = ShellDebugger(session)
    return dbg


def _attached(session: Session) -> ShellDebugger:
    dbg = _DEBUGGERS.get(session.target)
    if dbg is None or not dbg.attached:
        raise VmshError("No debugger is attached (break SYMBOL attaches one)")
    return dbg


@command("break", "break [SYMBOL|ADDR]",
         "set a breakpoint at a kernel function or address (stops the VM); no argument: list them", "debug")
def _break(session: Session, args: list[str]) -> None:
    if len(args) > 1:
        raise UsageError("break takes a symbol or an address")
    dbg = _debugger(session)
    target = dbg.target
    if not args:
        session.out("\n".join(f"{n}: {a:#x} <{dbg.symbols.name(a)}>" for n, a in sorted(dbg.breakpoints.items()))
                    or "no breakpoints")
        return
    addr = dbg.address(args[0])
    try:
        target.insert(dbg.tid, addr)
    except GuestMemoryError as err:
        raise VmshError(f"Cannot set a breakpoint at {addr:#x}: the guest does not map it") from err
    number = dbg._next
    dbg._next += 1
    dbg.breakpoints[number] = addr
    session.out(f"breakpoint {number} at {addr:#x} <{dbg.symbols.name(addr)}>")


def _delete(session: Session, args: list[str]) -> None:
    if not args:
        session.target.call("vm.delete")  # the lifecycle command, as before
        return
    dbg = _attached(session)
    numbers = sorted(dbg.breakpoints) if args == ["all"] else []
    if not numbers:
        try:
            numbers = [int(a) for a in args]
        except ValueError:
            raise UsageError("delete takes breakpoint numbers or all (with no argument: delete the VM)") from None
    for n in numbers:
        addr = dbg.breakpoints.pop(n, None)
        if addr is None:
            raise VmshError(f"No breakpoint {n}")
        dbg.target.remove(addr)


COMMANDS["delete"] = type(COMMANDS["delete"])(
    "delete", "delete [N...|all]",
    "no argument: stop the VM and forget its config; with breakpoint numbers (or all): delete those",
    _delete, COMMANDS["delete"].group)


@command("continue", "continue [timeout=DUR]",
         "let the stopped guest run until a breakpoint (default timeout 60 s, then it is stopped)", "debug")
def _continue(session: Session, args: list[str]) -> None:
    timeout = DEFAULT_CONTINUE_TIMEOUT
    for arg in args:
        key, _, value = arg.partition("=")
        if key != "timeout" or not value:
            raise UsageError("continue takes timeout=DUR")
        timeout = parse_duration(value)
    dbg = _attached(session)
    if dbg.target.registers(dbg.tid)[0] in dbg.breakpoints.values():
        stop = dbg.step_once()  # off the breakpoint it stands on
        if stop.kind != "step":
            dbg.report(session, stop)
            return
    hit, stop = dbg.target.run(None, timeout)
    if not hit:
        session.out(f"no breakpoint within {timeout:g} s")
    dbg.report(session, stop)


@command("step", "step [N]", "execute N instructions (default 1) on the stopped vCPU", "debug")
def _step(session: Session, args: list[str]) -> None:
    try:
        count = int(args[0]) if args else 1
    except ValueError:
        raise UsageError("step takes a number of instructions") from None
    if len(args) > 1 or count < 1:
        raise UsageError("step takes a number of instructions (1 or more)")
    dbg = _attached(session)
    stop = None
    for _ in range(count):
        stop = dbg.step_once()
        if stop.kind != "step":
            break
    assert stop is not None
    dbg.report(session, stop)


@command("bt", "bt [VCPU]", "the stopped vCPU's kernel call chain (frame pointers, else a stack scan)", "debug")
def _bt(session: Session, args: list[str]) -> None:
    dbg = _attached(session)
    tid = int(args[0]) + 1 if args else dbg.tid
    target = dbg.target
    rip, rsp, rbp = target.registers(tid)
    lines = [f"#0  {rip:#x} <{dbg.symbols.name(rip)}>"]
    base = rsp & ~7
    top = (rsp | (KERNEL_STACK_SIZE - 1)) + 1
    try:
        data = target.read(tid, base, top - base)
    except GuestMemoryError:
        data = b""
    for i, ret in enumerate(stack_return_addresses(data, base, rbp)[:MAX_FRAMES - 1], 1):
        lines.append(f"#{i:<2} {ret:#x} <{dbg.symbols.name(ret)}>")
    session.out("\n".join(lines))


@command("vx", "vx ADDR|SYMBOL [LEN]",
         "hex dump of guest virtual memory (through the stopped vCPU's page tables)", "debug")
def _vx(session: Session, args: list[str]) -> None:
    if not 1 <= len(args) <= 2:
        raise UsageError("vx takes an address and an optional length")
    dbg = _attached(session)
    addr = dbg.address(args[0])
    try:
        length = int(args[1], 0) if len(args) > 1 else 64
    except ValueError:
        raise UsageError("vx: the length is a number") from None
    if not 0 < length <= 1 << 16:
        raise UsageError("vx: the length must be between 1 and 64 KiB")
    try:
        data = dbg.target.read(dbg.tid, addr, length)
    except GuestMemoryError as err:
        raise VmshError(f"Cannot read {length} bytes at {addr:#x}: the guest does not map them") from err
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{addr + off:016x}  {chunk.hex(' '):<47}  {text}")
    session.out("\n".join(lines))


@command("detach", "detach", "remove every breakpoint and let the guest run on", "debug")
def _detach(session: Session, args: list[str]) -> None:
    if args:
        raise UsageError("detach takes no arguments")
    dbg = _DEBUGGERS.pop(session.target, None)
    if dbg is not None:
        dbg.close()


@command("coredump", "coredump FILE",
         "write the paused VM's memory and vCPU registers as an ELF core file (FILE must not exist)", "inspection")
def _coredump(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("coredump takes one argument: the file to write")
    path = args[0]
    url = path if path.startswith("file://") else "file://" + os.path.abspath(path)
    session.target.call("vm.coredump", {"destination_url": url})
    session.out(f"core dump written to {url[len('file://'):]}")
