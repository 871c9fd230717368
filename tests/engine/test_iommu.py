"""The virtio-iommu of a built VM (KVM, a tiny kernel): its VIOT table in guest RAM, a device
hot-added onto an IOMMU segment placed behind it, and its mappings carried by the device
states a snapshot saves into a second VM of the same config."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_argv
from vmsh.devices.dma import MAP_F_READ, TranslatedMemory, endpoint_id
from vmsh.devices.virtio.device import VIRTIO_F_ACCESS_PLATFORM, has_feature
from vmsh.engine.builder import build_for_boot
from vmsh.engine.describe import walk_acpi
from vmsh.engine.events import EventMonitor
from vmsh.engine.vm import Vm


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    out = {"kernel": str(kernel)}
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
        out[name] = str(tmp_path / name)
    return out


def _build(files: dict[str, str]) -> Vm:
    argv = ["--kernel", files["kernel"], "--serial", "null", "--console", "off", "--memory", "size=64M",
            "--platform", "num_pci_segments=2,iommu_segments=[1]", "--disk", f"path={files['a']},iommu=on"]
    return build_for_boot(normalize(vm_config_from_argv(argv)), EventMonitor(None), lambda kind, detail: None,
                          run_now)


@pytest.fixture
def vm(files: dict[str, str]) -> Iterator[Vm]:
    machine = _build(files)
    yield machine
    machine.shutdown()


def test_viot_in_guest_ram(vm: Vm) -> None:
    assert vm.memory is not None
    tables = {t["signature"]: t for t in walk_acpi(vm.memory.read, 0xA0000)}
    viot = bytes.fromhex(tables["VIOT"]["hex"])
    count, first = struct.unpack_from("<HH", viot, 36)
    assert (count, first) == (1 + 1 + 32, 48)  # the IOMMU, _disk0, segment 1's 32 slots
    kind, _, segment, bdf = struct.unpack_from("<BxHHH", viot, 48)
    assert (kind, segment, bdf) == (3, 0, 3 << 3)  # __iommu after _disk0 and __rng
    assert struct.unpack_from("<BxHI", viot, 64) == (1, 24, endpoint_id(0, 1))


def test_hot_added_disk_on_the_iommu_segment_is_behind_it(vm: Vm, files: dict[str, str]) -> None:
    vm.hotplug_device("disks", m.DiskConfig(path=files["b"], iommu=True, pci_segment=1, id="hot0"))
    assert vm.devices is not None and vm.devices.iommu is not None
    transport = vm.devices.devices["hot0"].transport
    assert isinstance(transport.memory, TranslatedMemory)
    assert has_feature(transport.device.avail_features, VIRTIO_F_ACCESS_PLATFORM)
    endpoint = endpoint_id(1, vm.devices.devices["hot0"].slot)
    assert transport.memory.endpoint == endpoint and endpoint in vm.devices.iommu.endpoints


def test_mappings_travel_with_the_device_states(vm: Vm, files: dict[str, str]) -> None:
    assert vm.devices is not None and vm.devices.iommu is not None
    table = vm.devices.iommu
    assert table.attach(3, endpoint_id(0, 1), bypass=False) == "ok"
    assert table.map(3, 0x10_0000, 0x10_0FFF, 0x20_0000, MAP_F_READ) == "ok"
    saved = vm.devices.states()
    other = _build(files)
    try:
        assert other.devices is not None and other.devices.iommu is not None
        other.devices.restore(saved)
        assert other.devices.iommu.attached == {endpoint_id(0, 1): 3}
        memory = other.devices.devices["_disk0"].transport.memory
        assert isinstance(memory, TranslatedMemory)
        assert memory.read(0x10_0000, 16) == other.memory.read(0x20_0000, 16)  # type: ignore[union-attr]
    finally:
        other.shutdown()
