"""A guest profiler: sample each vCPU's instruction pointer at a fixed rate, report by symbol.

On a PVM host a guest kernel costs about a microsecond per instruction it executes, so where
the boot spends its time is where it executes the most instructions; sampling rip shows it
(issue 4, "A guest profiler"). Each sample kicks the vCPU out of KVM_RUN and reads its
registers in the vCPU thread (``Vcpu.run_on_vcpu``), so the rate should stay modest
(100-1000 Hz). Symbols come from a ``System.map`` (``nm`` format: address, type, name).

Besides the totals, every sample keeps its time since ``start()``, and the report ends with a
timeline: for each slice of ``slice_seconds`` the symbols that dominate it, which shows which
phase of a boot is slow (memmap init, initcalls, initramfs unpacking, ``/init``) rather than
only which functions are hot overall.

Given the guest's memory, a sample taken in 64-bit kernel mode also keeps the kernel text
addresses found on the stack above rsp (up to the top of the 16 KiB kernel stack), the way
Linux's "guess" unwinder finds return addresses without frame pointers. The report then has an
inclusive view too: the share of samples in which each function was running *or on the stack*,
which is what says that, say, ``acpi_init`` and everything it calls takes a fifth of a boot.
Like the guess unwinder it can count a function whose stale return address is still on the
stack; the shares are upper bounds. A kernel built with frame pointers
(``CONFIG_UNWINDER_FRAME_POINTER``) gets exact stacks instead: when rbp starts a chain of
frames inside the read stack (each saved rbp above the last, each return address in kernel
text) that ends where a task's stack ends (a zero saved rbp, or the encoded ``pt_regs``
pointer that ``ret_from_fork`` and the entry code leave), the chain is used rather than the
scan. A stale rbp in a kernel without frame pointers almost never forms such a chain, and
when it does not the scan is used as before.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from vmsh.engine.paging import PageFault, PagingMode, read_virt
from vmsh.errors import GuestMemoryError
from vmsh.guest_memory import GuestMemory
from vmsh.thread_names import NamedThread

if TYPE_CHECKING:
    from vmsh.engine.kvm_vcpu import VcpuFd
    from vmsh.engine.vcpu import Vcpu

LOG = logging.getLogger(__name__)

#: the upper (kernel) half of the x86-64 address space starts here (48-bit addresses)
KERNEL_SPACE_LOW = 0xFFFF_8000_0000_0000
#: x86-64 Linux maps its kernel image in [KERNEL_TEXT_LOW, KERNEL_TEXT_HIGH)
KERNEL_TEXT_LOW = 0xFFFF_FFFF_8000_0000
KERNEL_TEXT_HIGH = 0xFFFF_FFFF_C000_0000
#: x86-64 Linux kernel stacks: 16 KiB, aligned (THREAD_SIZE; IRQ stacks are as big)
KERNEL_STACK_SIZE = 0x4000


#: where the saved rbp and rip are in a ``struct pt_regs`` (arch/x86/include/asm/ptrace.h), in words
_PT_REGS_BP, _PT_REGS_IP = 4, 16


def _frame_chain(words: array[int], base: int, rbp: int) -> tuple[int, ...] | None:
    """The return addresses along the frame-pointer chain from ``rbp`` in a stack read from
    ``base`` as ``words``, innermost first; None unless it is a whole chain: 8-byte aligned
    frames inside the stack, each saved rbp above the last and each return address in kernel
    text, up to a saved rbp of 0 or an encoded ``pt_regs`` pointer (``regs + 1``, which
    ``copy_thread()`` and the entry code leave, arch/x86/include/asm/frame.h). From a
    ``pt_regs`` of interrupted kernel code the walk goes on with its rip and rbp as far as
    the chain stays whole."""
    out: list[int] = []
    complete = None
    while rbp % 8 == 0 and base <= rbp and (rbp - base) // 8 + 1 < len(words):
        index = (rbp - base) // 8
        saved, ret = words[index], words[index + 1]
        if not KERNEL_TEXT_LOW <= ret < KERNEL_TEXT_HIGH:
            break
        out.append(ret)
        if saved == 0:
            return tuple(out)
        if saved % 8 == 1 and saved > rbp:
            complete = tuple(out)
            regs = (saved - 1 - base) // 8
            if regs + _PT_REGS_IP >= len(words):
                return complete
            interrupted = words[regs + _PT_REGS_IP]
            if not KERNEL_TEXT_LOW <= interrupted < KERNEL_TEXT_HIGH:
                return complete  # user code
            out.append(interrupted)
            complete = tuple(out)
            saved = words[regs + _PT_REGS_BP]
        elif saved <= rbp:
            break
        rbp = saved
    return complete


def stack_return_addresses(data: bytes, base: int, rbp: int) -> tuple[int, ...]:
    """The return addresses on a kernel stack read from ``base`` (``data``), innermost first:
    the frame-pointer chain from ``rbp`` when it is a whole one, else every kernel text address
    on the stack (the "guess" unwinder's scan; it may include stale ones)."""
    words = array("Q", data[: len(data) // 8 * 8])
    chain = _frame_chain(words, base, rbp)
    if chain is None:
        chain = tuple(w for w in words if KERNEL_TEXT_LOW <= w < KERNEL_TEXT_HIGH)
    return chain


class Symbolizer:
    """Address -> ``symbol+offset`` from a System.map."""

    def __init__(self, symbols: Iterable[tuple[int, str]]) -> None:
        pairs = sorted(symbols)
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]
        where = dict(zip(self._names, self._addrs, strict=True))
        #: kernel text and init text (boot-time functions and initcalls run from the latter)
        self._code: list[tuple[int, int]] = []
        if "_etext" in where:
            self._code.append((where.get("_stext", 0), where["_etext"]))
            if "_sinittext" in where and "_einittext" in where:
                self._code.append((where["_sinittext"], where["_einittext"]))

    def is_code(self, addr: int) -> bool:
        """Whether ``addr`` is in kernel text (``_stext``.. ``_etext``) or init text
        (``_sinittext``.. ``_einittext``); True for any address when the map has no ``_etext``."""
        return not self._code or any(start <= addr < end for start, end in self._code)

    @classmethod
    def from_system_map(cls, path: str) -> Symbolizer:
        """Read ``path``; text symbols only (types t/T/w/W)."""
        out = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("t", "T", "w", "W"):
                    out.append((int(parts[0], 16), parts[2]))
        return cls(out)

    def lookup(self, addr: int) -> str:
        """The symbol containing ``addr`` (or the hex address)."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return f"{addr:#x}"
        return self._names[i]


class RipSampler:
    """Samples the rip of ``vcpus`` (``Vcpu`` objects) ``hz`` times a second in a thread."""

    #: width of one timeline slice in the report, seconds (0: no timeline)
    slice_seconds: float = 2.0
    #: symbols shown per timeline slice
    slice_top: int = 4

    def __init__(self, vcpus: Sequence[Vcpu], hz: float = 200.0, memory: GuestMemory | None = None) -> None:
        """``memory`` (the guest's ``GuestMemory``): also scan kernel stacks (see the module)."""
        self.vcpus = vcpus
        self.period = 1.0 / hz
        self.memory = memory
        self.samples: Counter[int] = Counter()
        #: (seconds since start, rip) of every sample, in order
        self.timeline: list[tuple[float, int]] = []
        #: how many samples had each (rip, kernel text addresses on its stack), of those whose
        #: stack was read
        self.stacks: Counter[tuple[int, tuple[int, ...]]] = Counter()
        #: (rip, rbp, the stack's first address, the stack's bytes from there)
        self._raw: list[tuple[int, int, int, bytes]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _take(self, vcpu: Vcpu) -> None:
        """In the vCPU thread: the rip, and the raw kernel stack (parsed later, off this thread)."""
        fd = vcpu.fd
        regs = fd.get_regs()
        t = time.monotonic() - self._t0
        stack = self._read_stack(fd, regs.rsp) if self.memory is not None else None
        with self._lock:
            self.samples[regs.rip] += 1
            self.timeline.append((t, regs.rip))
            if stack is not None:
                self._raw.append((regs.rip, regs.rbp, regs.rsp & ~7, stack))

    def _read_stack(self, fd: VcpuFd, rsp: int) -> bytes | None:
        """The bytes from ``rsp`` to the top of its kernel stack; None outside 64-bit kernel mode
        or when the stack is not mapped."""
        memory = self.memory
        if memory is None:
            return None
        sregs = fd.get_sregs()
        if sregs.cs.dpl != 0 or not sregs.cs.l or rsp < KERNEL_SPACE_LOW:
            return None
        top = (rsp | (KERNEL_STACK_SIZE - 1)) + 1
        mode = PagingMode(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
        try:
            return read_virt(mode, rsp & ~7, top - (rsp & ~7), memory.read_u64, memory.read)
        except (PageFault, GuestMemoryError):
            return None

    def _parse_stacks(self) -> None:
        """Turn the raw stacks taken so far into their kernel text addresses."""
        with self._lock:
            raw, self._raw = self._raw, []
        parsed: Counter[tuple[int, tuple[int, ...]]] = Counter()
        for rip, rbp, base, data in raw:
            parsed[rip, stack_return_addresses(data, base, rbp)] += 1
        with self._lock:
            self.stacks.update(parsed)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            for v in self.vcpus:
                v.run_on_vcpu(self._take)
            self._parse_stacks()

    def start(self) -> None:
        """Begin sampling."""
        self._t0 = time.monotonic()
        self._thread = NamedThread(target=self._loop, name="rip-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._parse_stacks()

    def report(self, symbolizer: Symbolizer | None = None, top: int = 20, granularity: int = 0x100) -> str:
        """The ``top`` symbols (or address buckets of ``granularity`` bytes) by sample share,
        then the timeline (see :meth:`timeline_report`)."""
        with self._lock:
            samples = Counter(self.samples)
        total = sum(samples.values()) or 1
        by_key: Counter[str] = Counter()
        for rip, n in samples.items():
            key = self._key(rip, symbolizer, granularity)
            by_key[key] += n
        lines = [f"{n * 100 / total:6.2f}% {n:7d}  {key}" for key, n in by_key.most_common(top)]
        text = f"{total} samples\n" + "\n".join(lines)
        inclusive = self.inclusive_report(symbolizer, top=top) if symbolizer else ""
        if inclusive:
            text = f"{text}\n\n{inclusive}"
        timeline = self.timeline_report(symbolizer, granularity=granularity)
        return f"{text}\n\n{timeline}" if timeline else text

    def _symbolized_stacks(self, symbolizer: Symbolizer) -> list[tuple[list[str], int]]:
        """Each distinct stack-scanned sample as its frames, outermost caller first and the
        sampled function last, with how many samples had it."""
        with self._lock:
            stacks = list(self.stacks.items())
        out = []
        for (rip, addrs), n in stacks:
            # the scan went from rsp up, innermost caller first; outside the text it is not code
            frames = [symbolizer.lookup(a) for a in reversed(addrs) if symbolizer.is_code(a)]
            frames.append(symbolizer.lookup(rip))
            out.append((frames, n))
        return out

    def folded_stacks(self, symbolizer: Symbolizer) -> str:
        """The stack-scanned samples as "folded stacks", the input of flame graph tools: one line
        per distinct stack, ``outermost;...;innermost count``, most frequent first."""
        counts: Counter[str] = Counter()
        for frames, n in self._symbolized_stacks(symbolizer):
            chain = [f for i, f in enumerate(frames) if i == 0 or f != frames[i - 1]]
            counts[";".join(chain)] += n
        return "".join(f"{chain} {n}\n" for chain, n in counts.most_common())

    def inclusive_report(self, symbolizer: Symbolizer, top: int = 20) -> str:
        """The ``top`` functions by share of the stack-scanned samples in which they were running
        or had a return address on the stack; empty when no stack was scanned."""
        stacks = self._symbolized_stacks(symbolizer)
        if not stacks:
            return ""
        counts: Counter[str] = Counter()
        for frames, n in stacks:
            for name in set(frames):
                counts[name] += n
        total = sum(n for _, n in stacks)
        lines = [f"inclusive ({total} samples with their kernel stack: running or on the stack)"]
        lines += [f"{c * 100 / total:6.2f}% {c:7d}  {name}" for name, c in counts.most_common(top)]
        return "\n".join(lines)

    @staticmethod
    def _key(rip: int, symbolizer: Symbolizer | None, granularity: int) -> str:
        return symbolizer.lookup(rip) if symbolizer else f"{rip & ~(granularity - 1):#x}"

    def timeline_report(self, symbolizer: Symbolizer | None = None, slice_seconds: float | None = None,
                        top: int | None = None, granularity: int = 0x100) -> str:
        """One line per ``slice_seconds`` slice that has samples: its start time, its sample count
        and its ``top`` symbols with their share of the slice. Empty without samples or when
        ``slice_seconds`` is 0."""
        width = self.slice_seconds if slice_seconds is None else slice_seconds
        top = self.slice_top if top is None else top
        with self._lock:
            timeline = list(self.timeline)
        if width <= 0 or not timeline:
            return ""
        slices: dict[int, Counter[str]] = {}
        for t, rip in timeline:
            slices.setdefault(int(t // width), Counter())[self._key(rip, symbolizer, granularity)] += 1
        lines = [f"timeline ({width:g} s slices: start, samples, top symbols)"]
        for index in sorted(slices):
            counts = slices[index]
            n = sum(counts.values())
            tops = "  ".join(f"{key} {c * 100 // n}%" for key, c in counts.most_common(top))
            lines.append(f"{index * width:7.1f}s {n:5d}  {tops}")
        return "\n".join(lines)
