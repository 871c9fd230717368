"""Which pytest-xdist worker this is, for host resources that each worker needs its own of
(tap names, subnets)."""

from __future__ import annotations

import os


def worker_index() -> int:
    """0 for ``gw0`` (or no xdist), 1 for ``gw1``, ... modulo 200 (a byte of an address)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:] or 0) % 200
