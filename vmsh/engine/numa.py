"""Guest NUMA: the ``--numa`` nodes of a config turned into the ACPI tables' NUMA topology.

:func:`numa_errors` refuses what cloud-hypervisor refuses when it creates its NUMA nodes
(``vmm/src/vm.rs``, ``create_numa_nodes``: one error, "Invalid NUMA configuration", with the
reason it logs), plus two things it lets through and vmsh does not: a vCPU that does not exist
and a vCPU in two nodes (the SRAT would give it two proximity domains).

:func:`numa_spec` gives the :class:`~vmsh.engine.acpi.spec.NumaSpec` the SRAT, SLIT and ``_PXM``
are built from. A node's memory is the guest-physical ranges of its memory zones
(:func:`~vmsh.engine.memory_manager.zone_layout`, so below and above the 32-bit hole as the zones
really are); without ``--memory-zone`` all of RAM is the zone ``mem0``, as in cloud-hypervisor.
Hotpluggable ranges of a zone (memory hotplug) are passed in by the caller and listed in the
same node, flagged hot-pluggable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from vmsh.config import model as m
from vmsh.engine.acpi.spec import MemoryAffinity, NumaNode, NumaSpec
from vmsh.engine.memory_manager import zone_layout

LOG = logging.getLogger(__name__)

#: the id of the one memory zone that RAM is when no ``--memory-zone`` is given
#: (cloud-hypervisor's ``DEFAULT_MEMORY_ZONE``)
DEFAULT_MEMORY_ZONE = "mem0"
#: cloud-hypervisor's error for every NUMA node problem found when the VM is created
INVALID_NUMA = "Invalid NUMA configuration"


def memory_zone_ranges(mem: m.MemoryConfig) -> dict[str, list[tuple[int, int]]]:
    """Each memory zone's boot RAM as ``(guest address, length)`` ranges, by zone id."""
    if not mem.zones:
        return {DEFAULT_MEMORY_ZONE: zone_layout([mem.size])[0]} if mem.size else {}
    layout = zone_layout([z.size for z in mem.zones])
    return {zone.id: ranges for zone, ranges in zip(mem.zones, layout, strict=True)}


def zone_node(cfg: m.VmConfig, zone_id: str) -> int | None:
    """The guest NUMA node whose ``memory_zones`` lists ``zone_id``, or None (no ``--numa``, or no
    node lists it): a zone's virtio-mem device tells the guest this node (``node_id`` with
    VIRTIO_MEM_F_ACPI_PXM, cloud-hypervisor's ``virtio-devices/src/mem.rs``)."""
    return next((n.guest_numa_id for n in cfg.numa or [] if zone_id in (n.memory_zones or [])), None)


def numa_errors(cfg: m.VmConfig) -> list[str]:
    """What is wrong with ``cfg.numa`` for building the VM, each as
    ``Invalid NUMA configuration: <reason>``; empty when nothing is (or there is no ``--numa``)."""
    nodes = cfg.numa or []
    zones = memory_zone_ranges(cfg.memory)
    ids = {n.guest_numa_id for n in nodes}
    reasons: list[str] = []
    seen: set[int] = set()
    cpu_nodes: dict[int, int] = {}
    for node in nodes:
        if node.guest_numa_id in seen:
            reasons.append("Can't define twice the same NUMA node")
        seen.add(node.guest_numa_id)
        reasons.extend(f"Unknown memory zone '{zone}'" for zone in node.memory_zones or [] if zone not in zones)
        dests: set[int] = set()
        for distance in node.distances or []:
            if distance.destination not in ids:
                reasons.append(f"Unknown destination NUMA node {distance.destination}")
            elif distance.destination in dests:
                reasons.append(f"Destination NUMA node {distance.destination} has been already set")
            dests.add(distance.destination)
        if node.sgx_epc_sections:
            sections = {epc.id for epc in cfg.sgx_epc or []}
            if not sections:
                reasons.append("Missing SGX EPC region")
            else:
                reasons.extend(f"Unknown SGX EPC section '{s}'" for s in node.sgx_epc_sections if s not in sections)
        for cpu in node.cpus or []:
            if cpu >= cfg.cpus.max_vcpus:
                reasons.append(f"vCPU {cpu} of NUMA node {node.guest_numa_id} does not exist "
                               f"(max_vcpus is {cfg.cpus.max_vcpus})")
            elif cpu in cpu_nodes:
                reasons.append(f"vCPU {cpu} belongs to multiple NUMA nodes: {cpu_nodes[cpu]} "
                               f"and {node.guest_numa_id}")
            else:
                cpu_nodes[cpu] = node.guest_numa_id
    return [f"{INVALID_NUMA}: {reason}" for reason in reasons]


def numa_spec(cfg: m.VmConfig,
              hotplug_ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> NumaSpec | None:
    """The NUMA topology of ``cfg`` for the ACPI tables, or None without ``--numa``.

    ``hotplug_ranges`` maps a memory zone id to ``(guest address, length)`` ranges that RAM can
    be hot-added to; they go to the zone's node as hot-pluggable memory affinity (a zone no node
    lists contributes nothing, as its boot RAM). ``cfg`` must have passed :func:`numa_errors`.
    """
    if not cfg.numa:
        return None
    zones = memory_zone_ranges(cfg.memory)
    nodes = []
    memory: list[MemoryAffinity] = []
    for node in cfg.numa:
        nodes.append(NumaNode(
            id=node.guest_numa_id,
            cpus=tuple(node.cpus or ()),
            distances=tuple((d.destination, d.distance) for d in node.distances or []),
            pci_segments=tuple(node.pci_segments or ()),
        ))
        for zone in node.memory_zones or []:
            memory.extend(MemoryAffinity(base, size, node.guest_numa_id) for base, size in zones[zone])
            memory.extend(MemoryAffinity(base, size, node.guest_numa_id, hotpluggable=True)
                          for base, size in (hotplug_ranges or {}).get(zone, ()))
    spec = NumaSpec(nodes=tuple(nodes), memory=tuple(memory))
    LOG.debug("guest NUMA: %s", spec)
    return spec
