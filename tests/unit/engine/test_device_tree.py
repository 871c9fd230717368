"""``vm.info``'s device tree (``DeviceManager.device_tree``) on a machine built as the builder
builds it (platform devices, then every PCI device of a config), with a stand-in for the KVM VM
file descriptor: the nodes cloud-hypervisor v40's device manager has for the same devices
(its ``vmm/src/device_manager.rs``), their links, resources and PCI addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.engine.device_machine import Machines
from vmsh.devices.virtio.pci import BAR_SIZE as VIRTIO_BAR_SIZE


@pytest.fixture
def machine():
    machines = Machines()
    yield machines
    machines.close()

def test_nodes_links_and_addresses_of_every_device(machine, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    pmem = tmp_path / "pmem.img"
    with open(pmem, "wb") as f:
        f.truncate(2 << 20)
    devices = machine({"disks": [{"path": str(disk)}], "rng": {"src": "/dev/urandom"},
                       "pmem": [{"file": str(pmem)}], "pvpanic": True})
    tree = devices.device_tree()
    assert set(tree) == {"__ioapic", "__serial", "_disk0", "_virtio-pci-_disk0", "__rng", "_virtio-pci-__rng",
                         "_pmem1", "_virtio-pci-_pmem1", "__pvpanic"}
    for node_id, node in tree.items():
        assert set(node) == {"id", "resources", "parent", "children", "pci_bdf"} and node["id"] == node_id
        # links go both ways
        if node["parent"] is not None:
            assert node_id in tree[node["parent"]]["children"]
        for child in node["children"]:
            assert tree[child]["parent"] == node_id
    # the platform devices cloud-hypervisor names: no resources, no PCI address
    for node_id in ("__ioapic", "__serial"):
        assert tree[node_id] == {"id": node_id, "resources": [], "parent": None, "children": [], "pci_bdf": None}
    for dev_id, bar_type in (("_disk0", "Mmio32"), ("__rng", "Mmio64"), ("_pmem1", "Mmio64")):
        entry = devices.devices[dev_id]
        transport = tree[f"_virtio-pci-{dev_id}"]
        assert transport["parent"] is None and transport["children"] == [dev_id]
        assert transport["pci_bdf"] == f"0000:00:{entry.slot:02x}.0"
        assert transport["resources"] == [{"PciBar": {
            "index": 0, "base": entry.transport.bar_address(), "size": VIRTIO_BAR_SIZE, "type_": bar_type,
            "prefetchable": False}}]
        assert tree[dev_id]["pci_bdf"] is None and tree[dev_id]["children"] == []
    # the pmem region is its device's resource
    (region,) = tree["_pmem1"]["resources"]
    assert region["MmioAddressRange"]["size"] == 2 << 20
    assert region["MmioAddressRange"]["base"] == devices.devices["_pmem1"].transport.device.start
    assert tree["_disk0"]["resources"] == [] and tree["__rng"]["resources"] == []
    # pvpanic is a plain PCI device: its own node has the BAR and the address, no transport
    pvpanic = tree["__pvpanic"]
    entry = devices.devices["__pvpanic"]
    assert pvpanic["parent"] is None and pvpanic["children"] == []
    assert pvpanic["pci_bdf"] == f"0000:00:{entry.slot:02x}.0"
    assert pvpanic["resources"] == [{"PciBar": {"index": 0, "base": entry.transport.bar_address(),
                                                "size": entry.transport.BAR_SIZE, "type_": "Mmio32",
                                                "prefetchable": False}}]
    # distinct slots, one per PCI device
    bdfs = [node["pci_bdf"] for node in tree.values() if node["pci_bdf"]]
    assert len(bdfs) == len(set(bdfs)) == 4


def test_tree_follows_the_machine(machine, tmp_path: Path) -> None:
    """No serial port, no node; a debug console to a file has one; a moved BAR and an
    unplugged device show."""
    log = tmp_path / "debugcon.log"
    devices = machine({"serial": {"mode": "Off"}, "debug_console": {"mode": "File", "file": str(log)},
                       "rng": {"src": "/dev/urandom"}})
    tree = devices.device_tree()
    assert list(tree)[:2] == ["__ioapic", "__debug_console"] and "__serial" not in tree
    entry = devices.devices["__rng"]
    moved = entry.transport.bar_address() + VIRTIO_BAR_SIZE * 4
    with entry.lock:
        entry.transport.set_bar_address(moved)
        devices._moved(entry, moved)
    assert devices.device_tree()["_virtio-pci-__rng"]["resources"][0]["PciBar"]["base"] == moved
    devices.remove("__rng")
    assert set(devices.device_tree()) == {"__ioapic", "__debug_console"}
