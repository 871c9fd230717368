"""Fixtures shared by the device tests (PCI and virtio): a fake MSI router."""

from __future__ import annotations

import pytest

from tests.unit.devices.virtio.driver import FakeRouter


@pytest.fixture
def router() -> FakeRouter:
    return FakeRouter()
