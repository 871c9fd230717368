"""A short run of the fuzz campaign ``ci/fuzz/fuzz_loader.py`` (the long runs are by hand, figures in
ci/fuzz/README.md): a few hundred inputs, no uncaught exception, no hang."""

from __future__ import annotations

from ci.fuzz import fuzzlib


def test_loader_campaign() -> None:
    """The kernel loaders and boot tables."""
    fuzzlib.smoke("fuzz_loader", 400)
