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
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable

LOG = logging.getLogger(__name__)


class Symbolizer:
    """Address -> ``symbol+offset`` from a System.map."""

    def __init__(self, symbols: Iterable[tuple[int, str]]) -> None:
        pairs = sorted(symbols)
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

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

    def __init__(self, vcpus: list[object], hz: float = 200.0) -> None:
        self.vcpus = vcpus
        self.period = 1.0 / hz
        self.samples: Counter[int] = Counter()
        #: (seconds since start, rip) of every sample, in order
        self.timeline: list[tuple[float, int]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _take(self, vcpu: object) -> None:
        rip = vcpu.fd.get_regs().rip  # type: ignore[attr-defined]
        t = time.monotonic() - self._t0
        with self._lock:
            self.samples[rip] += 1
            self.timeline.append((t, rip))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            for v in self.vcpus:
                v.run_on_vcpu(self._take)  # type: ignore[attr-defined]

    def start(self) -> None:
        """Begin sampling."""
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="rip-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

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
        timeline = self.timeline_report(symbolizer, granularity=granularity)
        return f"{text}\n\n{timeline}" if timeline else text

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
