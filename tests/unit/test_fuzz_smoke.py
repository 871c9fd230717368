"""A short run of every fuzz campaign in ci/fuzz (the long runs are by hand, figures in
ci/fuzz/README.md): a few hundred inputs each, no uncaught exception, no hang."""

from __future__ import annotations

import importlib

import pytest

from ci.fuzz import fuzzlib

#: campaign module -> inputs for the smoke run (a few seconds each on a shared core)
CAMPAIGNS = {
    "fuzz_options": 300,
    "fuzz_json": 300,
    "fuzz_http": 300,
    "fuzz_virtio": 300,
    "fuzz_snapshot": 300,
    "fuzz_loader": 400,
}


@pytest.mark.parametrize("name", sorted(CAMPAIGNS))
def test_campaign_smoke(name: str) -> None:
    module = importlib.import_module(f"ci.fuzz.{name}")
    inputs = CAMPAIGNS[name]
    result = fuzzlib.run(module.CAMPAIGN, inputs, seed=1)
    details = "\n".join(f"{f.kind}: {f.error}\ninput: {f.input}\n{f.traceback}" for f in result.findings)
    assert result.ok, f"{result.summary()}\n{details}"
    # Hypothesis stops early only when it runs out of distinct inputs, which these strategies do not
    assert result.inputs >= inputs * 0.9, result.summary()


def test_runner_counts_exceptions_and_hangs() -> None:
    """The runner itself: an allowed error is counted as refused, anything else as an exception,
    an input over its time limit as a hang (and the campaign goes on after each)."""
    from hypothesis import strategies as st

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
