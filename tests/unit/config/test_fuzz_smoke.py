"""A short run of the fuzz campaigns ``ci/fuzz/fuzz_options.py`` and ``ci/fuzz/fuzz_json.py`` (the
long runs are by hand, figures in ci/fuzz/README.md): a few hundred inputs, no uncaught
exception, no hang."""

from __future__ import annotations

from hypothesis import strategies as st

from ci.fuzz import fuzzlib


def test_options_campaign() -> None:
    """The option grammar of every launcher flag."""
    fuzzlib.smoke("fuzz_options", 300)


def test_json_campaign() -> None:
    """A JSON VmConfig."""
    fuzzlib.smoke("fuzz_json", 300)


def test_runner_counts_exceptions_and_hangs() -> None:
    """The campaigns' runner (ci/fuzz/fuzzlib.py) itself: an allowed error is counted as refused,
    anything else as an exception, an input over its time limit as a hang, and the campaign goes
    on after each."""

    def target(n: int) -> None:
        if n % 3 == 0:
            raise ValueError("allowed")
        if n % 3 == 1:
            raise KeyError("a bug")
        while True:  # a hang, cut by the time limit
            pass

    campaign = fuzzlib.Campaign("selftest", st.integers(0, 1_000_000), target, (ValueError,), time_limit=0.05)
    result = fuzzlib.run(campaign, 12)
    assert result.inputs == 12
    assert result.allowed.get("ValueError", 0) + result.exceptions + result.hangs == 12
    assert result.exceptions > 0 and result.hangs > 0 and not result.ok
    assert {f.kind for f in result.findings} == {"exception", "hang"}
