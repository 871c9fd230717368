"""Guest tests: real Linux guests through vmsh's pytest plugin (``vmsh.harness.pytest_plugin``:
``vmsh_guest``, ``vmsh_clone``, ``vmsh_image``). They are marked ``guest``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/guest/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)
