"""The common runner of the fuzz campaigns: Hypothesis generates, this module counts.

A campaign is a Hypothesis strategy of inputs, a target that consumes one input, and the
exception classes the target may raise on purpose (vmsh's error tree for the input's kind).
:func:`run` feeds ``inputs`` generated inputs to the target with Hypothesis in generate-only
mode (no shrinking, no example database: a campaign must go on after a finding and count it,
not stop at the first one) and reports:

* inputs run;
* uncaught exceptions: anything outside the allowed classes (the first few are kept with
  their input and traceback, to turn into regression tests);
* hangs: inputs that ran past the per-input time limit (``SIGALRM`` through ``setitimer``,
  which interrupts the target in the main thread);
* peak RSS of the process (``getrusage``) and the wall time.

Each ``fuzz_*.py`` script calls :func:`main` with its campaign; the smoke tests (``test_fuzz_smoke.py`` in
the unit test folder of each target) call :func:`smoke` with a few hundred inputs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

#: findings kept in full (input and traceback); the rest are only counted
KEEP_FINDINGS = 5
#: inputs per Hypothesis run (a campaign is a series of runs with derived seeds)
BATCH = 2000


class Hang(BaseException):
    """An input ran past its time limit (a BaseException, so that ``except Exception`` in the target
    does not swallow it)."""


@dataclass
class Finding:
    kind: str  # "exception" or "hang"
    input: str
    error: str
    traceback: str


@dataclass
class Result:
    name: str
    inputs: int = 0
    exceptions: int = 0
    hangs: int = 0
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    #: how many inputs ended in each allowed error class (a sanity check that the target is reached)
    allowed: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exceptions == 0 and self.hangs == 0

    def summary(self) -> str:
        return (f"{self.name}: {self.inputs} inputs, {self.exceptions} uncaught exceptions, {self.hangs} hangs, "
                f"peak RSS {self.peak_rss_mib:.0f} MiB, {self.seconds:.1f} s")


@dataclass
class Campaign:
    name: str
    #: a Hypothesis strategy of inputs
    strategy: st.SearchStrategy[Any]
    #: consumes one input; raises only ``allowed`` on purpose
    target: Callable[[Any], object]
    allowed: tuple[type[BaseException], ...]
    #: seconds one input may take
    time_limit: float = 2.0
    #: called once before the first input and once after the last (set up and tear down shared state)
    setup: Callable[[], object] | None = None
    teardown: Callable[[], object] | None = None


def _on_alarm(signum: int, frame: object) -> None:
    raise Hang


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(campaign: Campaign, inputs: int, seed: int = 0) -> Result:
    """Run ``inputs`` inputs of ``campaign`` (fewer if Hypothesis runs out of distinct ones)."""
    result = Result(campaign.name)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    # Devices log a warning for every malformed queue, the config layer for odd options: by the
    # thousand, they would drown the figures.
    logging.disable(logging.CRITICAL)
    if campaign.setup is not None:
        campaign.setup()
    start = time.monotonic()

    def record(kind: str, value: Any, err: BaseException) -> None:
        if len(result.findings) < KEEP_FINDINGS:
            text = repr(value)
            result.findings.append(Finding(kind, text[:400] + ("..." if len(text) > 400 else ""), repr(err),
                                           "".join(traceback.format_exception(err))))

    def body(value: Any) -> None:
        result.inputs += 1
        try:
            with _time_limit(campaign.time_limit):
                campaign.target(value)
        except Hang as err:
            result.hangs += 1
            record("hang", value, err)
        except campaign.allowed as err:
            name = type(err).__name__
            result.allowed[name] = result.allowed.get(name, 0) + 1
        except Exception as err:
            result.exceptions += 1
            record("exception", value, err)

    try:
        # In batches: Hypothesis remembers every input of a run (to avoid repeats), which would
        # make the peak RSS grow with the number of inputs instead of measuring the target.
        done = 0
        batch = 0
        while done < inputs:
            size = min(BATCH, inputs - done)
            before = result.inputs
            runner = settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
                              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)(
                given(campaign.strategy)(body))
            hypothesis_seed(seed * 1_000_003 + batch)(runner)()
            batch += 1
            done += size
            if result.inputs == before:
                break  # the strategy has no new inputs left
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        logging.disable(logging.NOTSET)
        if campaign.teardown is not None:
            campaign.teardown()
    result.seconds = time.monotonic() - start
    result.peak_rss_mib = peak_rss_mib()
    return result


# --- mutation ------------------------------------------------------------------------------------

#: bytes that tend to matter to parsers: separators, quotes, brackets, digits, NUL, high bytes
INTERESTING_BYTES = b",=[]{}()\"'\\:;@-+. \t\r\n\x000123456789xXkKmMgGtT\xff\x80"


def mutate(data: bytes, rnd: random.Random, rounds: int) -> bytes:
    """``data`` with ``rounds`` random edits: bit flips, interesting bytes, deletions, duplications."""
    buf = bytearray(data)
    for _ in range(rounds):
        op = rnd.randrange(7)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1:  # insert an interesting byte
            buf[pos:pos] = bytes([rnd.choice(INTERESTING_BYTES)])
        elif op == 2 and buf:  # replace with an interesting byte
            buf[min(pos, len(buf) - 1)] = rnd.choice(INTERESTING_BYTES)
        elif op == 3 and buf:  # delete a run
            del buf[pos:pos + rnd.randint(1, 8)]
        elif op == 4 and buf:  # duplicate a run somewhere else
            a = rnd.randrange(len(buf))
            chunk = buf[a:a + rnd.randint(1, 16)]
            buf[pos:pos] = chunk
        elif op == 5:  # insert a random byte
            buf[pos:pos] = bytes([rnd.randrange(256)])
        elif op == 6 and buf:  # set a run of bytes to an extreme
            buf[pos:pos + rnd.randint(1, 8)] = bytes([rnd.choice((0, 0xFF, 0x7F, 0x80))]) * rnd.randint(1, 8)
    return bytes(buf)


def mutated(seeds: list[bytes], max_rounds: int = 8) -> st.SearchStrategy[bytes]:
    """A seed, mutated 0..``max_rounds`` times."""
    return st.builds(lambda s, r, n: mutate(s, r, n), st.sampled_from(seeds), st.randoms(use_true_random=False),
                     st.integers(0, max_rounds))


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (the keys and indexes that lead to it), the root first."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += json_paths(item, (*prefix, i))
    return out


def json_replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of a JSON value with the place at ``path`` replaced by ``new``."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = json_replace(value[path[0]], path[1:], new)
    return copy


def smoke(module: str, inputs: int, seed: int = 1) -> Result:
    """A short run of the campaign of ``ci.fuzz.<module>``, for the unit tests: fails (AssertionError
    with the findings) on any uncaught exception or hang."""
    campaign: Campaign = importlib.import_module(f"ci.fuzz.{module}").CAMPAIGN
    result = run(campaign, inputs, seed)
    details = "\n".join(f"{f.kind}: {f.error}\ninput: {f.input}\n{f.traceback}" for f in result.findings)
    assert result.ok, f"{result.summary()}\n{details}"
    # Hypothesis stops early only when it runs out of distinct inputs, which these strategies do not
    assert result.inputs >= inputs * 0.9, result.summary()
    return result


# --- the command line ----------------------------------------------------------------------------

def main(campaign: Campaign, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Fuzz campaign {campaign.name}")
    parser.add_argument("--inputs", type=int, default=10_000, help="inputs to run (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument("--time-limit", type=float, default=campaign.time_limit,
                        help=f"seconds per input before it counts as a hang (default {campaign.time_limit})")
    args = parser.parse_args(argv)
    campaign.time_limit = args.time_limit
    result = run(campaign, args.inputs, args.seed)
    for finding in result.findings:
        print(f"--- {finding.kind}: {finding.error}\ninput: {finding.input}\n{finding.traceback}", file=sys.stderr)
    if result.allowed:
        print("refused on purpose: " + ", ".join(f"{k} {v}" for k, v in sorted(result.allowed.items())))
    print(result.summary())
    return 0 if result.ok else 1
