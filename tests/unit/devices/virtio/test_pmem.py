"""virtio-pmem: the region in config, FLUSH answers, hostile requests, state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeRouter, PciDriver
from vmsh.config.model import PmemConfig
from vmsh.devices.virtio.pci import VirtioPciDevice
from vmsh.devices.virtio.pmem import (
    VIRTIO_PMEM_RESP_TYPE_EIO,
    VIRTIO_PMEM_RESP_TYPE_OK,
    VirtioPmem,
    VirtioPmemState,
)
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceError, DeviceStateError

START = 0x1_0000_0000
SIZE = 2 << 20


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    path = tmp_path / "pmem.img"
    path.write_bytes(b"\0" * SIZE)
    return path


def probe(dev: VirtioPmem, mem: GuestMemoryMmap, alloc: Allocator) -> tuple[VirtioPciDevice, PciDriver]:
    pci = VirtioPciDevice(dev, mem, FakeRouter())
    driver = PciDriver(pci, mem, alloc)
    driver.probe()
    return pci, driver


def request(driver: PciDriver, mem: GuestMemoryMmap, alloc: Allocator, body: bytes | None,
            resp_len: int = 4) -> tuple[int, int]:
    bufs = []
    if body is not None:
        req = alloc.alloc(max(1, len(body)))
        mem.write(req, body)
        bufs.append((req, len(body), False))
    resp = alloc.alloc(max(resp_len, 1))
    mem.write_u32(resp, 0xDEAD) if resp_len >= 4 else None
    if resp_len:
        bufs.append((resp, resp_len, True))
    head = driver.rings[0].add(bufs)
    driver.kick(0)
    [(used_head, length)] = driver.rings[0].take_used()
    assert used_head == head
    return length, mem.read_u32(resp) if resp_len >= 4 else -1


def test_pmem_config_and_flush(backing: Path, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioPmem.from_config(PmemConfig(file=str(backing)), START)
    assert dev.size == SIZE and dev.device_type == 27
    pci, driver = probe(dev, mem, alloc)
    assert driver.device_config(0, 8) == START and driver.device_config(8, 8) == SIZE
    assert request(driver, mem, alloc, (0).to_bytes(4, "little")) == (4, VIRTIO_PMEM_RESP_TYPE_OK)
    assert dev.counters() == {"flush_ops": 1, "errors": 0}
    pci.close()
    assert dev.fd == -1


def test_pmem_bad_requests(backing: Path, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioPmem(str(backing), START, SIZE)
    pci, driver = probe(dev, mem, alloc)
    assert request(driver, mem, alloc, (7).to_bytes(4, "little")) == (4, VIRTIO_PMEM_RESP_TYPE_EIO)
    assert request(driver, mem, alloc, b"\0\0") == (4, VIRTIO_PMEM_RESP_TYPE_EIO)  # short request
    assert request(driver, mem, alloc, None) == (4, VIRTIO_PMEM_RESP_TYPE_EIO)  # no request at all
    assert request(driver, mem, alloc, (0).to_bytes(4, "little"), resp_len=2)[0] == 0  # no room to answer
    assert request(driver, mem, alloc, (0).to_bytes(4, "little"), resp_len=0)[0] == 0
    assert dev.counters()["errors"] == 5 and not dev.needs_reset
    pci.close()


def test_pmem_fsync_failure_is_eio(backing: Path, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    dev = VirtioPmem(str(backing), START, SIZE)
    pci, driver = probe(dev, mem, alloc)
    real = dev.fd
    dev.fd = os.open("/dev/null", os.O_RDONLY)  # fsync on /dev/null: EINVAL
    try:
        assert request(driver, mem, alloc, (0).to_bytes(4, "little")) == (4, VIRTIO_PMEM_RESP_TYPE_EIO)
    finally:
        os.close(dev.fd)
        dev.fd = real
    pci.close()


def test_pmem_discard_writes(backing: Path, mem: GuestMemoryMmap, alloc: Allocator) -> None:
    backing.chmod(0o444)  # read-only is enough: writes never reach the file
    dev = VirtioPmem.from_config(PmemConfig(file=str(backing), discard_writes=True, size=SIZE), START)
    pci, driver = probe(dev, mem, alloc)
    assert request(driver, mem, alloc, (0).to_bytes(4, "little")) == (4, VIRTIO_PMEM_RESP_TYPE_OK)
    pci.close()


def test_pmem_bad_construction(backing: Path, tmp_path: Path) -> None:
    for start, size in ((START + 1, SIZE), (START, 0), (START, SIZE + 1), (-4096, SIZE)):
        with pytest.raises(DeviceError):
            VirtioPmem(str(backing), start, size)
    with pytest.raises(DeviceError):
        VirtioPmem(str(tmp_path / "missing"), START, SIZE)
    with pytest.raises(DeviceError):
        VirtioPmem.from_config(PmemConfig(file=str(tmp_path / "missing")), START)


def test_pmem_state(backing: Path) -> None:
    dev = VirtioPmem(str(backing), START, SIZE)
    dev.flush_ops = 3
    state = from_plain(VirtioPmemState, to_plain(dev.state()))
    other = VirtioPmem(str(backing), START, SIZE)
    other.restore(state)
    assert other.state() == dev.state()
    with pytest.raises(DeviceStateError):
        VirtioPmem(str(backing), START + SIZE, SIZE).restore(state)
    dev.close()
    other.close()
