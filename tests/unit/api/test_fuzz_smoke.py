"""A short run of the fuzz campaign ``ci/fuzz/fuzz_http.py`` (the long runs are by hand, figures in
ci/fuzz/README.md): a few hundred inputs, no uncaught exception, no hang."""

from __future__ import annotations

from ci.fuzz import fuzzlib


def test_http_campaign() -> None:
    """The HTTP API server on raw bytes."""
    fuzzlib.smoke("fuzz_http", 300)
