"""A VM's snapshot tree: assembled from a paused VM, and read back and checked for a restore.

The tree (``vmsh.engine.persist`` writes and reads the files) is cloud-hypervisor's layout:

* the root: vmsh's format version and the in-kernel irqchip, PIT and clock (``VmKvmState``);
* ``cpu-manager``: one child per vCPU (``VcpuState``);
* ``memory-manager``: the RAM range table (boot RAM, then each hotplug region) and, when an ACPI
  resize made the config's size differ from it, ``boot_ram``;
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
from vmsh.engine.memory import PAGE_SIZE, GuestMemoryMmap, ram_ranges
from vmsh.engine.memory_manager import boot_ram_size, check_hotplug_config, hotplug_areas
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
from vmsh.errors import ConfigError, VmshError


@dataclass
class SavedVm:
    """What a snapshot directory holds, checked against its config."""

    config: m.VmConfig
    kvm: VmKvmState
    vcpus: list[VcpuState]
    #: device id -> plain state, for ``DeviceManager.restore``
    devices: dict[str, Any]
    memory_path: Path
    #: the RAM ranges of the memory file, in its order: boot RAM, then hotplugged RAM
    ranges: list[tuple[int, int]]
    #: the RAM the VM booted with (its hotplug areas follow it)
    boot_ram: int


def build_tree(kvm: VmKvmState, vcpus: list[VcpuState], ranges: list[tuple[int, int]],
               devices: dict[str, Any], boot_ram: int | None = None) -> dict[str, Any]:
    """The state tree of a paused VM (``vcpus`` in vCPU order; ``ranges``: ``memory_table``;
    ``devices``: the device manager's ``states()``; ``boot_ram``: the RAM it booted with, saved
    when memory hotplug changed the config's size since)."""
    memory: dict[str, Any] = {"ranges": [list(r) for r in ranges]}
    if boot_ram is not None:
        memory["boot_ram"] = boot_ram
    return node(
        {"version": FORMAT_VERSION, "kvm": to_plain(kvm)},
        {
            # keyed by the vCPU's number, as cloud-hypervisor's cpu-manager (its APIC id, the
            # KVM id, may be sparse: VcpuState.vcpu_id)
            "cpu-manager": node(children={str(index): node(to_plain(v)) for index, v in enumerate(vcpus)}),
            "memory-manager": node(memory),
            "device-manager": node(children={dev_id: node(state) for dev_id, state in devices.items()}),
        },
    )


def read_saved_vm(directory: str) -> SavedVm:
    """Read ``directory`` and check its parts against its config.

    :raises SnapshotError: naming what does not fit.
    """
    config_text, tree, memory_path = read_snapshot(directory)
    saved = saved_vm_from(config_text, tree, memory_path, f"{directory}/config.json")
    size = memory_path.stat().st_size
    if size != sum(length for _, length in saved.ranges):
        raise SnapshotError(f"{memory_path} holds {size} bytes, its RAM ranges {sum(n for _, n in saved.ranges)}")
    return saved


def saved_vm_from(config_text: str, tree: dict[str, Any], memory_path: Path, what: str = "config.json") -> SavedVm:
    """A :class:`SavedVm` from a config's JSON text and a state tree (a snapshot's files, or what a
    live migration sends: ``vmsh.engine.migration``), checked as :func:`read_saved_vm` does
    except for the memory file, which the caller checks.

    :raises SnapshotError: naming what does not fit.
    """
    try:
        config = normalize(vm_config_from_json(config_text))
    except ConfigError as err:
        raise SnapshotError(f"{what} is not a valid VmConfig") from err
    root = node_data(tree, "")
    if not isinstance(root, dict) or root.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"Unsupported snapshot format (vmsh writes version {FORMAT_VERSION})")
    kvm = from_plain(VmKvmState, root.get("kvm"), "vm.kvm")
    try:
        check_hotplug_config(config.memory)
    except VmshError as err:
        raise SnapshotError("The snapshot's memory config is refused") from err
    table = node_data(tree, "memory-manager")
    table = table if isinstance(table, dict) else {}
    boot_ram = table.get("boot_ram", boot_ram_size(config.memory))
    ranges = check_memory_table(table.get("ranges"), config.memory, boot_ram)
    vcpu_ids = node_children(tree, "cpu-manager")
    boot = config.cpus.boot_vcpus
    if sorted(vcpu_ids, key=lambda x: (len(x), x)) != [str(i) for i in range(boot)]:
        raise SnapshotError(f"The snapshot has vCPUs {vcpu_ids}, its config {boot}")
    vcpus = [from_plain(VcpuState, node_data(tree, f"cpu-manager/{i}"), f"vcpu{i}") for i in range(boot)]
    devices = {name: node_data(tree, f"device-manager/{name}") for name in node_children(tree, "device-manager")}
    return SavedVm(config, kvm, vcpus, devices, memory_path, ranges, boot_ram)


def memory_table(memory: GuestMemoryMmap) -> list[tuple[int, int]]:
    """The RAM range table of ``memory``, in address order: boot RAM as its config lays it out
    (``ram_ranges``: memory zones coalesced, as before hotplug existed), then each hotplug
    region (ACPI hot-added RAM, virtio-mem regions) on its own."""
    return ram_ranges(memory.boot_size) + [(r.start, r.size) for r in memory.regions if r.hotplug]


def check_memory_table(ranges: Any, mem: m.MemoryConfig, boot_ram: Any = None) -> list[tuple[int, int]]:
    """A snapshot's RAM range table, checked against its memory config: ``boot_ram`` (default:
    the config's) laid out as at boot, then regions inside the hotplug areas, in order, not
    overlapping; with ACPI hotplug, boot RAM and those regions make the config's size (a resize
    sets it), else the boot RAM is the config's.

    :raises SnapshotError: naming what does not fit.
    """
    configured = boot_ram_size(mem)
    boot_ram = configured if boot_ram is None else boot_ram
    acpi = any(a.method is m.HotplugMethod.ACPI for a in hotplug_areas(mem))
    if type(boot_ram) is not int or boot_ram <= 0 or boot_ram % PAGE_SIZE or (boot_ram != configured and not acpi):
        raise SnapshotError(f"The snapshot's boot RAM {boot_ram!r} does not fit its config ({configured})")
    boot = ram_ranges(boot_ram)
    if (not isinstance(ranges, list) or len(ranges) < len(boot)
            or any(not isinstance(r, list) or len(r) != 2 or not all(type(v) is int for v in r) for r in ranges)):
        raise SnapshotError(f"The snapshot's RAM ranges {ranges!r} are not a list of [address, length]")
    if [list(r) for r in boot] != ranges[:len(boot)]:
        raise SnapshotError(f"The snapshot's RAM ranges {ranges} do not match its config ({[list(r) for r in boot]})")
    areas = hotplug_areas(mem, boot_ram)
    cursor = boot[-1][0] + boot[-1][1]
    for start, length in ranges[len(boot):]:
        if length <= 0 or length % PAGE_SIZE or start % PAGE_SIZE or start < cursor or not any(
                a.base <= start and start + length <= a.end for a in areas):
            raise SnapshotError(f"The snapshot's RAM range {start:#x}+{length:#x} is not in its config's "
                                "memory hotplug areas")
        cursor = start + length
    if acpi and boot_ram + sum(length for _, length in ranges[len(boot):]) != configured:
        raise SnapshotError(f"The snapshot's RAM ({boot_ram} bytes at boot and {len(ranges) - len(boot)} hot-added "
                            f"ranges) is not its config's size {configured}")
    return [(start, length) for start, length in ranges]
