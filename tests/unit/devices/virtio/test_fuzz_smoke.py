"""A short run of the fuzz campaign ``ci/fuzz/fuzz_virtio.py`` (the long runs are by hand, figures in
ci/fuzz/README.md): a few hundred inputs, no uncaught exception, no hang."""

from __future__ import annotations

from ci.fuzz import fuzzlib


def test_virtio_campaign() -> None:
    """Descriptor chains of every virtio device model."""
    fuzzlib.smoke("fuzz_virtio", 300)
