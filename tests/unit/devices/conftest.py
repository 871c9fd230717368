"""Fixtures shared by the device tests (PCI, virtio, storage): a fake MSI router, a small guest
RAM and an allocator over it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeRouter
from vmsh.engine.memory import GuestMemoryMmap

RAM_SIZE = 16 << 20


@pytest.fixture
def router() -> FakeRouter:
    return FakeRouter()


@pytest.fixture
def mem() -> Iterator[GuestMemoryMmap]:
    m = GuestMemoryMmap.create(RAM_SIZE)
    yield m
    m.close()


@pytest.fixture
def alloc() -> Allocator:
    return Allocator(0x1000, RAM_SIZE)
