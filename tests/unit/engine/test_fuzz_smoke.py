"""A short run of the fuzz campaign ``ci/fuzz/fuzz_snapshot.py`` (the long runs are by hand, figures in
ci/fuzz/README.md): a few hundred inputs, no uncaught exception, no hang."""

from __future__ import annotations

from ci.fuzz import fuzzlib


def test_snapshot_campaign() -> None:
    """The snapshot loader on mutated snapshots."""
    fuzzlib.smoke("fuzz_snapshot", 300)
