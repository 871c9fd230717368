"""The virtio-iommu in a machine: where it is plugged, which devices are behind it (and offer
VIRTIO_F_ACCESS_PLATFORM, with a translated memory), and the VIOT table that describes them."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.devices.virtio.driver import Allocator, FakeInterrupt, Ring
from tests.unit.engine.device_machine import RAM, Machines
from vmsh.devices.dma import FAULT_R_DOMAIN, TranslatedMemory, endpoint_id
from vmsh.devices.virtio.device import VIRTIO_F_ACCESS_PLATFORM, has_feature
from vmsh.devices.virtio.iommu import VirtioIommu
from vmsh.devices.virtio.queue import VirtQueue
from vmsh.engine.acpi import AcpiSpec, build_acpi
from vmsh.engine.acpi.spec import ViotSpec
from vmsh.engine.acpi.tables import SDT_HEADER_SIZE
from vmsh.engine.builder import viot_spec
from vmsh.engine.device_manager import DeviceManager
from vmsh.errors import GuestMemoryError
from vmsh.harness.waiting import wait_until


@pytest.fixture
def machine() -> Iterator[Machines]:
    machines = Machines()
    yield machines
    machines.close()


def _disk(tmp_path: Path, name: str, **extra: object) -> dict[str, object]:
    path = tmp_path / name
    path.write_bytes(bytes(1 << 20))
    return {"path": str(path), **extra}


def test_devices_behind_the_iommu(machine: Machines, tmp_path: Path) -> None:
    devices = machine({"disks": [_disk(tmp_path, "a", iommu=True), _disk(tmp_path, "b")],
                       "rng": {"src": "/dev/urandom", "iommu": True}, "watchdog": True, "pvpanic": True})
    slots = {dev_id: (e.segment, e.slot) for dev_id, e in devices.devices.items()}
    # cloud-hypervisor's order: the virtio devices, the virtio-iommu, then pvpanic
    assert slots == {"_disk0": (0, 1), "_disk1": (0, 2), "__rng": (0, 3), "__watchdog": (0, 4),
                     "__iommu": (0, 5), "__pvpanic": (0, 6)}
    iommu = devices.devices["__iommu"].transport.device
    assert isinstance(iommu, VirtioIommu) and iommu.table is devices.iommu
    for dev_id, behind in (("_disk0", True), ("_disk1", False), ("__rng", True), ("__iommu", False)):
        transport = devices.devices[dev_id].transport
        assert has_feature(transport.device.avail_features, VIRTIO_F_ACCESS_PLATFORM) is behind, dev_id
        assert isinstance(transport.memory, TranslatedMemory) is behind, dev_id
        assert all(q.memory is transport.memory for q in transport.queues)
    assert devices.devices["_disk0"].transport.memory.endpoint == endpoint_id(0, 1)
    assert devices.iommu is not None and devices.iommu.endpoints == {endpoint_id(0, 1), endpoint_id(0, 3)}
    assert devices.iommu_endpoints() == [(0, 1), (0, 3)]
    assert viot_spec(devices) == ViotSpec(0, 5 << 3, ((0, 1 << 3), (0, 3 << 3)))


def test_no_iommu_no_table(machine: Machines, tmp_path: Path) -> None:
    devices = machine({"disks": [_disk(tmp_path, "a")]})
    assert devices.iommu is None and "__iommu" not in devices.devices and viot_spec(devices) is None
    assert not isinstance(devices.devices["_disk0"].transport.memory, TranslatedMemory)


def test_iommu_segments_put_every_slot_behind(machine: Machines, tmp_path: Path) -> None:
    devices = machine({"platform": {"num_pci_segments": 2, "iommu_segments": [1]},
                       "disks": [_disk(tmp_path, "a", pci_segment=1, iommu=True), _disk(tmp_path, "b")]})
    assert (devices.devices["_disk0"].segment, devices.devices["_disk0"].slot) == (1, 1)
    assert devices.devices["__iommu"].segment == 0
    endpoints = devices.iommu_endpoints()
    assert endpoints[0] == (1, 1) and len(endpoints) == 32 and {s for s, _ in endpoints} == {1}
    assert devices.iommu is not None and endpoint_id(1, 31) in devices.iommu.endpoints
    assert endpoint_id(0, 1) not in devices.iommu.endpoints  # _disk1, segment 0, not behind


def test_unplug_detaches_the_endpoint(machine: Machines, tmp_path: Path) -> None:
    devices: DeviceManager = machine({"disks": [_disk(tmp_path, "a", iommu=True)]})
    table = devices.iommu
    assert table is not None
    assert table.attach(1, endpoint_id(0, 1), bypass=False) == "ok"
    devices.remove("_disk0")
    assert table.endpoints == set() and table.attached == {} and table.domains == {}


def test_viot_bytes() -> None:
    spec = ViotSpec(0, 5 << 3, ((0, 1 << 3), (1, 3 << 3)))
    built = build_acpi(AcpiSpec(boot_vcpus=1, viot=spec))
    table = built.table("VIOT")
    signature, length, revision = struct.unpack_from("<4sIB", table)
    assert (signature, length, revision) == (b"VIOT", 36 + 12 + 16 + 2 * 24, 0) and len(table) == length
    assert sum(table) % 256 == 0 and table[10:16] == b"CLOUDH" and table[16:24] == b"CHVIOT  "
    assert struct.unpack_from("<I", table, 24) == (0,)  # OEM revision
    assert struct.unpack_from("<HH8x", table, SDT_HEADER_SIZE) == (3, 48)
    assert struct.unpack_from("<BxHHH8x", table, 48) == (3, 16, 0, 5 << 3)
    assert struct.unpack_from("<BxHIHHHHH6x", table, 64) == (1, 24, 1 << 3, 0, 0, 1 << 3, 1 << 3, 48)
    assert struct.unpack_from("<BxHIHHHHH6x", table, 88) == (1, 24, 1 << 16 | 3 << 3, 1, 1, 3 << 3, 3 << 3, 48)
    xsdt = built.table("XSDT")
    entries = struct.unpack_from(f"<{(len(xsdt) - SDT_HEADER_SIZE) // 8}Q", xsdt, SDT_HEADER_SIZE)
    assert built.address("VIOT") in entries
    assert "VIOT" not in build_acpi(AcpiSpec(boot_vcpus=1)).tables


def test_viot_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError):
        ViotSpec(0, 1 << 16)
    with pytest.raises(ValueError):
        ViotSpec(0, 8, ((1 << 16, 0),))


def test_a_fault_reaches_the_event_queue_through_the_io_loop(machine: Machines, tmp_path: Path) -> None:
    devices = machine({"disks": [_disk(tmp_path, "a", iommu=True)]})
    iommu = devices.devices["__iommu"].transport.device
    assert isinstance(iommu, VirtioIommu)
    alloc = Allocator(0x10_0000, RAM)
    req, evt = Ring.create(machine.memory, alloc, 8), Ring.create(machine.memory, alloc, 8)
    irq = FakeInterrupt()
    iommu.activate(machine.memory, [req.attach(VirtQueue(machine.memory, 256)),
                                    evt.attach(VirtQueue(machine.memory, 256))], irq, 1 << 32)
    buf = alloc.alloc(64)
    head = evt.add([(buf, 64, True)])
    devices.start()
    iommu.table.set_bypass(False)
    disk = devices.devices["_disk0"].transport
    with pytest.raises(GuestMemoryError):
        disk.memory.read(0x1234_5000, 8)  # the disk's endpoint is in no domain
    wait_until(lambda: evt.used_idx() == 1, 10, "the fault in the event queue", interval=0.01)
    assert evt.take_used() == [(head, 24)] and irq.used == [1]
    reason, _, endpoint, address = struct.unpack("<B3xII4xQ", machine.memory.read(buf, 24))
    assert (reason, endpoint, address) == (FAULT_R_DOMAIN, endpoint_id(0, 1), 0x1234_5000)
