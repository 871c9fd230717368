"""Fixtures shared across the test trees."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmsh.script.session import Session


@pytest.fixture
def session() -> Iterator[Session]:
    """A script session (the shell's command language) whose output lines are in ``.captured``."""
    out: list[str] = []
    s = Session(out=out.append)
    s.captured = out  # type: ignore[attr-defined]  # a test-only attribute: the fixture's output sink
    yield s
    s.close()
