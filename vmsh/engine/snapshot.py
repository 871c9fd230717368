"""A VM's snapshot tree: assembled from a paused VM, and read back and checked for a restore.

The tree (``vmsh.engine.persist`` writes and reads the files) is cloud-hypervisor's layout:

* the root: vmsh's format version and the in-kernel irqchip, PIT and clock (``VmKvmState``);
* ``cpu-manager``: one child per vCPU (``VcpuState``);
* ``memory-manager``: the RAM range table;
* ``device-manager``: one child per device id, the device manager's one device tree
  (``__serial``, ``__cmos``, ``__ged``, ``__pci_hotplug``, ``__cpu_hotplug`` when ``max_vcpus``
  is over 1, then the PCI devices).

A snapshot is untrusted input: :func:`read_saved_vm` checks that it fits its own config before
anything is built from it, and every state is type-checked as it is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmsh.config import model as m
from vmsh.config import normalize, vm_config_from_json
from vmsh.engine.kvm_state import VcpuState, VmKvmState
from vmsh.engine.memory import ram_ranges
from vmsh.engine.persist import (
    FORMAT_VERSION,
    SnapshotError,
    from_plain,
    node,
    node_children,
    node_data,
    read_snapshot,
    to_plain,
)
from vmsh.errors import ConfigError


@dataclass
class SavedVm:
    """What a snapshot directory holds, checked against its config."""

    config: m.VmConfig
    kvm: VmKvmState
    vcpus: list[VcpuState]
    #: device id -> plain state, for ``DeviceManager.restore``
    devices: dict[str, Any]
    memory_path: Path


def build_tree(kvm: VmKvmState, vcpus: list[VcpuState], ram_size: int, devices: dict[str, Any]) -> dict[str, Any]:
    """The state tree of a paused VM (``vcpus`` in vCPU order; ``devices``: the device manager's
    ``states()``)."""
    return node(
        {"version": FORMAT_VERSION, "kvm": to_plain(kvm)},
        {
            # keyed by the vCPU's number, as cloud-hypervisor's cpu-manager (its APIC id, the
            # KVM id, may be sparse: VcpuState.vcpu_id)
            "cpu-manager": node(children={str(index): node(to_plain(v)) for index, v in enumerate(vcpus)}),
            "memory-manager": node({"ranges": [list(r) for r in ram_ranges(ram_size)]}),
            "device-manager": node(children={dev_id: node(state) for dev_id, state in devices.items()}),
        },
    )


def read_saved_vm(directory: str) -> SavedVm:
    """Read ``directory`` and check its parts against its config.

    :raises SnapshotError: naming what does not fit.
    """
    config_text, tree, memory_path = read_snapshot(directory)
    try:
        config = normalize(vm_config_from_json(config_text))
    except ConfigError as err:
        raise SnapshotError(f"{directory}/config.json is not a valid VmConfig") from err
    root = node_data(tree, "")
    if not isinstance(root, dict) or root.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"Unsupported snapshot format (vmsh writes version {FORMAT_VERSION})")
    kvm = from_plain(VmKvmState, root.get("kvm"), "vm.kvm")
    table = node_data(tree, "memory-manager")
    ranges = table.get("ranges") if isinstance(table, dict) else None
    expected = [list(r) for r in ram_ranges(config.memory.total_size())]
    if ranges != expected:
        raise SnapshotError(f"The snapshot's RAM ranges {ranges} do not match its config ({expected})")
    size = memory_path.stat().st_size
    if size != config.memory.total_size():
        raise SnapshotError(f"{memory_path} holds {size} bytes, the config says {config.memory.total_size()}")
    vcpu_ids = node_children(tree, "cpu-manager")
    boot = config.cpus.boot_vcpus
    if sorted(vcpu_ids, key=lambda x: (len(x), x)) != [str(i) for i in range(boot)]:
        raise SnapshotError(f"The snapshot has vCPUs {vcpu_ids}, its config {boot}")
    vcpus = [from_plain(VcpuState, node_data(tree, f"cpu-manager/{i}"), f"vcpu{i}") for i in range(boot)]
    devices = {name: node_data(tree, f"device-manager/{name}") for name in node_children(tree, "device-manager")}
    return SavedVm(config, kvm, vcpus, devices, memory_path)
