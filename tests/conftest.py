"""Fixtures shared across the test trees, and the ``needs`` mark: a test that needs a tool CI
installs (``ci/debian-packages.txt``) fails in CI without it and is skipped elsewhere
(:mod:`vmsh.harness.requirements`), instead of being skipped everywhere."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmsh.harness.requirements import require
from vmsh.script.session import Session


@pytest.fixture
def session() -> Iterator[Session]:
    """A script session (the shell's command language) whose output lines are in ``.captured``."""
    out: list[str] = []
    s = Session(out=out.append)
    s.captured = out  # type: ignore[attr-defined]  # a test-only attribute: the fixture's output sink
    yield s
    s.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(available, reason): fail in CI unless available, else skip")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        require(*mark.args)
