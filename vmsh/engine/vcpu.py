"""A vCPU: the thread that calls ``KVM_RUN`` and dispatches its exits.

The loop does nothing but run and dispatch (as rust-vmm's vCPU loops do): a port-I/O exit goes to the
PIO bus, an MMIO exit to the MMIO bus, an emulation failure to the internal-error handler (the
PVM instruction handler on PVM hosts, see ``pvm.py``), and anything else (HLT, shutdown, a
system event, a kick) ends the loop with a ``VcpuStop`` that the owner acts on.

``KVM_RUN`` is called through cffi with the GIL released, so other Python threads run while the
guest does. A vCPU is stopped from another thread by ``kick()``: it sets
``kvm_run.immediate_exit`` (so a KVM_RUN about to start returns at once) and sends the thread
a signal (so one already running returns EINTR). Linux Documentation/virt/kvm/api.rst,
"KVM_RUN" and "immediate_exit".
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmsh._native import ffi, lib
from vmsh.engine import seccomp
from vmsh.engine.bus import Bus
from vmsh.engine.kvm_ioctl import KvmIoctlError
from vmsh.engine.kvm_vcpu import (
    EXIT_DEBUG,
    EXIT_FAIL_ENTRY,
    EXIT_HLT,
    EXIT_INTERNAL_ERROR,
    EXIT_INTR,
    EXIT_IO,
    EXIT_IO_OUT,
    EXIT_MMIO,
    EXIT_NAMES,
    EXIT_SHUTDOWN,
    EXIT_SYSTEM_EVENT,
    VcpuFd,
)
from vmsh.errors import KvmError
from vmsh.thread_names import NamedThread

LOG = logging.getLogger(__name__)

#: the signal that kicks a vCPU thread out of KVM_RUN; a real-time one so it clashes with nothing
KICK_SIGNAL = signal.SIGRTMIN + 2

_U32 = struct.Struct("<I")
# struct kvm_run.io: direction u8, size u8, port u16, count u32, data_offset u64
_IO = struct.Struct("<BBHIQ")
# struct kvm_run.mmio: phys_addr u64, data[8], len u32, is_write u8
_MMIO = struct.Struct("<Q8sIB")
_SYSTEM_EVENT = struct.Struct("<I")
# vmsh_kvm_run_packed: low 10 bits = reason | direction | multi; an error is negative, and
# (-errno) & 0x3ff never equals these two values for errno < 256.
_PACKED_KIND_MASK = 0x3FF
_PACKED_IO_OUT = EXIT_IO | lib.VMSH_PACKED_DIR_OUT
_PACKED_IO_IN = EXIT_IO


class VcpuStop(enum.Enum):
    """Why ``Vcpu.run`` returned."""

    KICKED = "kicked"  # kick() was called (pause, shutdown or snapshot requested)
    HLT = "hlt"  # HLT exit (only without an in-kernel irqchip)
    SHUTDOWN = "shutdown"  # triple fault: the VMM treats it as a reset
    RESET = "reset"  # KVM_SYSTEM_EVENT_RESET
    POWEROFF = "poweroff"  # KVM_SYSTEM_EVENT_SHUTDOWN
    CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    DEBUG = "debug"  # KVM_EXIT_DEBUG, or a debugger's breakpoint (see ``debug_filter``)


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """The report of a ``KVM_EXIT_INTERNAL_ERROR`` exit, as read from the run page (a record, not an exception)."""

    suberror: int
    #: instruction bytes KVM reported (emulation failures with the INSTRUCTION_BYTES flag)
    insn_bytes: bytes
    data: tuple[int, ...]


#: an internal-error handler returns True when it fixed the vCPU state so KVM_RUN can go on
InternalErrorHandler = Callable[["Vcpu", InternalErrorExit], bool]
#: a debugger's look at an emulation failure: True when it is the debugger's breakpoint (the
#: loop then stops with ``VcpuStop.DEBUG`` instead of handing it to the internal-error handler)
DebugFilter = Callable[["Vcpu", InternalErrorExit], bool]

# struct kvm_run: the exit union starts at byte 32 (include/uapi/linux/kvm.h); its
# ``debug.arch`` (struct kvm_debug_exit_arch): exception u32, pad u32, pc u64, dr6 u64, dr7 u64
_RUN_UNION = 32
_DEBUG_EXIT = struct.Struct("<IIQQQ")
#: the breakpoint exception's vector (SDM vol. 3A Table 6-1)
_VECTOR_BP = 3


def install_kick_handler() -> None:
    """Install a no-op handler for ``KICK_SIGNAL`` (must run in the main thread).

    A handler, not SIG_IGN, is what makes a blocked KVM_RUN return EINTR on the signal.
    """
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda _sig, _frame: None)


class Vcpu:
    """One vCPU and its exit loop.

    :param fd: the vCPU fd.
    :param pio: the port-I/O bus.
    :param mmio: the MMIO bus.
    :param on_internal_error: handler for emulation failures (None: every one is fatal).
    :param index: the vCPU's number (default: its KVM id).
    """

    def __init__(self, fd: VcpuFd, pio: Bus, mmio: Bus,
                 on_internal_error: InternalErrorHandler | None = None, *, index: int | None = None) -> None:
        self.fd = fd
        #: the vCPU's number (vcpuN, affinity, counters); KVM's id is its APIC id, which a
        #: sparse topology makes differ
        self.index = fd.vcpu_id if index is None else index
        self.pio = pio
        self.mmio = mmio
        self.on_internal_error = on_internal_error
        self.log = LOG.getChild(f"vcpu{self.index}")
        self._stop_requested = False
        #: set whenever the loop must look at _stop_requested or _calls before the next KVM_RUN
        self._pending = False
        self._calls: list[Callable[[Vcpu], None]] = []
        self._calls_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        #: how the last run in a thread ended, and the error if it failed
        self.stop_reason: VcpuStop | None = None
        self.error: BaseException | None = None
        #: exits served by the Python loop, by KVM exit reason
        self.exit_counts: dict[int, int] = {}
        #: set by a debugger while it is attached (``vmsh.engine.gdb``); read by this thread
        self.debug_filter: DebugFilter | None = None
        #: the last KVM_EXIT_DEBUG: (exception vector, pc, dr6, dr7); written by this thread
        #: before its loop returns ``VcpuStop.DEBUG``, read by the debugger once it has
        self.debug_exit: tuple[int, int, int, int] | None = None

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> VcpuStop:
        """Run the vCPU in the calling thread until something other than I/O happens.

        :raises KvmError: on a KVM_RUN failure, a failed entry or an unhandled internal error.
        """
        self._thread_id = threading.get_ident()
        vcpu_fd = self.fd.fd
        page = self.fd.run_mmap
        # INVARIANTS: run_ptr points at this vCPU's kvm_run mapping, which outlives the loop
        # (the VcpuFd is closed only after its thread has ended).
        run_ptr = ffi.cast("struct kvm_run *", ffi.from_buffer(page))
        kvm_run = lib.vmsh_kvm_run_packed
        pio_read = self.pio.read
        pio_write = self.pio.write
        pio_fast_writer = self.pio.fast_writer
        fast_writers = self.pio.fast_writers
        counts = self.exit_counts
        io_count = counts.get(EXIT_IO, 0)
        try:
            while True:
                if self._pending:
                    stop = self._service()
                    if stop is not None:
                        return stop
                r = kvm_run(vcpu_fd, run_ptr)
                # The common exits, decoded in C (see native/build_kvm.py vmsh_kvm_run_packed).
                kind = r & _PACKED_KIND_MASK
                if kind == _PACKED_IO_OUT:
                    io_count += 1
                    off = r >> 32
                    # (r >> 12) & 0xFFFFF is "size | port << 4", the bus's fast_writers key.
                    writer = fast_writers.get((r >> 12) & 0xFFFFF)
                    if writer is not None:
                        writer(page[off:off + ((r >> 12) & 0xF)])
                    else:
                        port, size = (r >> 16) & 0xFFFF, (r >> 12) & 0xF
                        if pio_fast_writer(port, size) is None:
                            pio_write(port, page[off:off + size])
                            continue
                        fast_writers[size | port << 4](page[off:off + size])
                    continue
                if kind == _PACKED_IO_IN:
                    io_count += 1
                    off = r >> 32
                    size = (r >> 12) & 0xF
                    page[off:off + size] = pio_read((r >> 16) & 0xFFFF, size)
                    continue
                if r < 0:
                    if r == -4 or r == -11:  # EINTR (kick, signal), EAGAIN
                        continue
                    raise KvmIoctlError("KVM_RUN", -r)
                reason = r & 0xFF
                if reason == EXIT_IO:
                    io_count += 1
                    self._string_io()
                    continue
                counts[reason] = counts.get(reason, 0) + 1
                stop = self._slow_exit(reason)
                if stop is not None:
                    return stop
        finally:
            counts[EXIT_IO] = io_count
            self._thread_id = None

    def _string_io(self) -> None:
        # INS/OUTS with a rep count: count elements of size bytes each at data_offset.
        page = self.fd.run_mmap
        direction, size, port, count, data_off = _IO.unpack_from(page, lib.VMSH_RUN_IO_DIRECTION)
        if direction == EXIT_IO_OUT:
            for i in range(count):
                self.pio.write(port, page[data_off + i * size:data_off + (i + 1) * size])
        else:
            for i in range(count):
                page[data_off + i * size:data_off + (i + 1) * size] = self.pio.read(port, size)

    def _slow_exit(self, reason: int) -> VcpuStop | None:
        page = self.fd.run_mmap
        if reason == EXIT_MMIO:
            addr, data, length, is_write = _MMIO.unpack_from(page, lib.VMSH_RUN_MMIO_PHYS_ADDR)
            if is_write:
                self.mmio.write(addr, data[:length])
            else:
                value = self.mmio.read(addr, length)
                page[lib.VMSH_RUN_MMIO_DATA:lib.VMSH_RUN_MMIO_DATA + length] = value
            return None
        if reason == EXIT_INTR:
            return None
        if reason == EXIT_DEBUG:
            exc, _pad, pc, dr6, dr7 = _DEBUG_EXIT.unpack_from(page, _RUN_UNION)
            if exc == _VECTOR_BP and not self._debugger_owns_int3():
                self._deliver_bp()
                return None
            self.debug_exit = (exc, pc, dr6, dr7)
            return VcpuStop.DEBUG
        if reason == EXIT_INTERNAL_ERROR:
            err = self.internal_error()
            debug_filter = self.debug_filter
            if debug_filter is not None and debug_filter(self, err):
                self.debug_exit = None
                return VcpuStop.DEBUG
            if self.on_internal_error is not None and self.on_internal_error(self, err):
                return None
            raise KvmError(self.describe_internal_error(err))
        if reason == EXIT_HLT:
            return VcpuStop.HLT
        if reason == EXIT_SHUTDOWN:
            return VcpuStop.SHUTDOWN
        if reason == EXIT_SYSTEM_EVENT:
            kind = _SYSTEM_EVENT.unpack_from(page, lib.VMSH_RUN_SYSTEM_EVENT_TYPE)[0]
            if kind == lib.KVM_SYSTEM_EVENT_RESET:
                return VcpuStop.RESET
            if kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                return VcpuStop.POWEROFF
            return VcpuStop.CRASH
        if reason == EXIT_FAIL_ENTRY:
            hw = struct.unpack_from("<Q", page, lib.VMSH_RUN_FAIL_ENTRY_REASON)[0]
            raise KvmError(f"vcpu{self.index}: KVM_RUN entry failed (hardware reason {hw:#x})")
        raise KvmError(f"vcpu{self.index}: unexpected exit {EXIT_NAMES.get(reason, reason)}")

    def _debugger_owns_int3(self) -> bool:
        """Whether the INT3 this vCPU stopped at (KVM_GUESTDBG_USE_SW_BP) is a debugger's."""
        debug_filter = self.debug_filter
        return debug_filter is None or debug_filter(self, InternalErrorExit(0, b"\xcc", ()))

    def _deliver_bp(self) -> None:
        """Give the guest the #BP of its own INT3 (a kernel text-patching one), which
        KVM_GUESTDBG_USE_SW_BP turned into an exit: a trap, so rip moves past the 0xCC first
        (SDM vol. 3A §6.5); KVM delivers the injected exception on the next KVM_RUN."""
        regs = self.fd.get_regs()
        regs.rip += 1
        self.fd.set_regs(regs)
        events = self.fd.get_vcpu_events()
        events.exception_injected = 1
        events.exception_nr = _VECTOR_BP
        events.exception_has_error_code = 0
        events.exception_error_code = 0
        events.exception_pending = 0
        events.flags = 0
        self.fd.set_vcpu_events(events)

    def internal_error(self) -> InternalErrorExit:
        """Decode the ``internal`` / ``emulation_failure`` union of the run page."""
        page = self.fd.run_mmap
        suberror, ndata = struct.unpack_from("<II", page, lib.VMSH_RUN_INTERNAL_SUBERROR)
        ndata = min(ndata, 16)
        data = struct.unpack_from(f"<{ndata}Q", page, lib.VMSH_RUN_INTERNAL_DATA)
        insn = b""
        if suberror == lib.KVM_INTERNAL_ERROR_EMULATION and ndata >= 1:
            flags = struct.unpack_from("<Q", page, lib.VMSH_RUN_EMUL_FLAGS)[0]
            if flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                n = min(page[lib.VMSH_RUN_EMUL_INSN_SIZE], 15)
                insn = bytes(page[lib.VMSH_RUN_EMUL_INSN_BYTES:lib.VMSH_RUN_EMUL_INSN_BYTES + n])
        return InternalErrorExit(suberror, insn, tuple(data))

    def describe_internal_error(self, err: InternalErrorExit) -> str:
        """A one-line message naming the failure, the rip and the instruction bytes."""
        try:
            rip = f"{self.fd.get_regs().rip:#x}"
        except KvmError:
            rip = "?"
        what = {1: "emulation failure", 2: "simultaneous exceptions", 3: "event delivery failure",
                4: "unexpected exit reason"}.get(err.suberror, f"internal error {err.suberror}")
        return f"vcpu{self.index}: {what} at rip {rip}, instruction bytes {err.insn_bytes.hex(' ') or 'unknown'}"

    def _service(self) -> VcpuStop | None:
        # Between two KVM_RUNs, in the vCPU thread: run queued calls, then honour a stop.
        self._pending = False
        self.fd.set_immediate_exit(False)
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for call in calls:
            try:
                call(self)
            except Exception:
                self.log.exception("call on vcpu%d failed", self.index)
        if self._stop_requested:
            self._stop_requested = False
            return VcpuStop.KICKED
        return None

    def run_on_vcpu(self, call: Callable[[Vcpu], None]) -> None:
        """Have ``call(self)`` run in the vCPU thread between two KVM_RUNs (any thread).

        This is how registers are read while the guest runs (KVM_GET_REGS would otherwise wait
        for the next exit): the vCPU is kicked out of KVM_RUN, runs the call, and re-enters.
        """
        with self._calls_lock:
            self._calls.append(call)
        self._interrupt()

    # -- threads ---------------------------------------------------------------------------

    def start(self, on_stop: Callable[[Vcpu], None] | None = None,
              affinity: set[int] | None = None) -> threading.Thread:
        """Run the loop in a new thread ``vcpu<N>``; ``on_stop(self)`` is called when it ends.

        :param affinity: host CPUs to pin the thread to (``--cpus affinity``); None: no pinning.

        ``stop_reason`` / ``error`` say how it ended.
        """
        def body() -> None:
            self.stop_reason, self.error = None, None
            try:
                if affinity:
                    # pid 0 = the calling thread: sched_setaffinity is per thread on Linux.
                    os.sched_setaffinity(0, affinity)
                seccomp.apply(seccomp.ThreadKind.VCPU)  # setup done: only the loop's calls from here
                self.stop_reason = self.run()
            except BaseException as err:
                self.error = err
                self.log.error("%s", err)
            finally:
                if on_stop is not None:
                    on_stop(self)

        # A kick that came after the last loop had already ended (a pause that found this vCPU
        # stopped at a breakpoint) is stale: the new loop must not stop on it.
        self._stop_requested = False
        self._thread = NamedThread(target=body, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()
        return self._thread

    def kick(self) -> None:
        """Ask the loop to return ``VcpuStop.KICKED`` as soon as possible (any thread)."""
        self._stop_requested = True
        self._interrupt()

    def cancel_kick(self) -> None:
        """Withdraw a ``kick`` the loop has not acted on yet (a pause that gave up waiting)."""
        self._stop_requested = False

    def _interrupt(self) -> None:
        self._pending = True
        self.fd.set_immediate_exit(True)
        tid = self._thread_id
        if tid is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
