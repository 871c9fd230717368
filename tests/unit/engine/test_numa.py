"""``--numa`` turned into the ACPI NUMA topology (vmsh/engine/numa.py): each node's memory is its
zones' real guest-physical ranges, the build-time errors are cloud-hypervisor's, and a config
with ``--numa`` is no longer refused."""

from __future__ import annotations

import pytest

from vmsh.config import vm_config_from_argv
from vmsh.config.model import VmConfig
from vmsh.engine.acpi import MemoryAffinity, NumaNode
from vmsh.engine.builder import config_errors, unsupported_options
from vmsh.engine.memory import RAM_64BIT_START
from vmsh.engine.memory_manager import ZoneSpec, create_zones, zone_layout
from vmsh.engine.numa import numa_errors, numa_spec, zone_node

MIB, GIB = 1 << 20, 1 << 30
K = ["--kernel", "/k"]
TWO_ZONES = ["--memory", "size=0", "--memory-zone", "id=m0,size=128M", "id=m1,size=128M"]


def config(*argv: str) -> VmConfig:
    return vm_config_from_argv([*K, *argv])


def test_two_zones_two_nodes() -> None:
    cfg = config("--cpus", "boot=2", *TWO_ZONES,
                 "--numa", "guest_numa_id=0,cpus=[0],distances=[1@20],memory_zones=[m0]",
                 "guest_numa_id=1,cpus=[1],distances=[0@20],memory_zones=[m1]")
    assert numa_errors(cfg) == []
    assert "--numa" not in " ".join(unsupported_options(cfg))
    spec = numa_spec(cfg)
    assert spec is not None
    assert spec.nodes == (NumaNode(0, cpus=(0,), distances=((1, 20),)), NumaNode(1, cpus=(1,), distances=((0, 20),)))
    assert spec.memory == (MemoryAffinity(0, 128 * MIB, 0), MemoryAffinity(128 * MIB, 128 * MIB, 1))
    assert spec.distance_matrix() == [[10, 20], [20, 10]]
    assert (zone_node(cfg, "m0"), zone_node(cfg, "m1"), zone_node(cfg, "mem0")) == (0, 1, None)


def test_a_zone_across_the_32bit_hole_is_two_ranges_where_ram_really_is() -> None:
    cfg = config("--memory", "size=0", "--memory-zone", "id=a,size=2G", "id=b,size=2G",
                 "--numa", "guest_numa_id=0,memory_zones=[a]", "guest_numa_id=1,memory_zones=[b]")
    spec = numa_spec(cfg)
    assert spec is not None
    assert spec.memory == (MemoryAffinity(0, 2 * GIB, 0), MemoryAffinity(2 * GIB, GIB, 1),
                           MemoryAffinity(RAM_64BIT_START, GIB, 1))
    # the same ranges create_zones maps (small zones here, the layout is the same function)
    assert zone_layout([2 * GIB, 2 * GIB]) == [[(0, 2 * GIB)], [(2 * GIB, GIB), (RAM_64BIT_START, GIB)]]
    memory = create_zones([ZoneSpec(8 * MIB), ZoneSpec(4 * MIB)])
    try:
        assert [(r.start, r.size) for r in memory.regions] == [
            r for zone in zone_layout([8 * MIB, 4 * MIB]) for r in zone]
    finally:
        memory.close()


def test_without_zones_ram_is_zone_mem0() -> None:
    cfg = config("--memory", "size=4G", "--numa", "guest_numa_id=0,memory_zones=[mem0]")
    spec = numa_spec(cfg)
    assert spec is not None
    assert [(m.base, m.size) for m in spec.memory] == [(0, 3 * GIB), (RAM_64BIT_START, GIB)]


def test_hotplug_ranges_go_to_the_zones_node_flagged() -> None:
    cfg = config(*TWO_ZONES, "--numa", "guest_numa_id=0,memory_zones=[m0]", "guest_numa_id=1,memory_zones=[m1]")
    spec = numa_spec(cfg, {"m1": [(8 * GIB, GIB)], "other": [(16 * GIB, GIB)]})
    assert spec is not None
    assert spec.memory[-1] == MemoryAffinity(8 * GIB, GIB, 1, hotpluggable=True)
    assert len(spec.memory) == 3


def test_no_numa_no_topology() -> None:
    cfg = config(*TWO_ZONES)
    assert numa_spec(cfg) is None and numa_errors(cfg) == [] and zone_node(cfg, "m0") is None


@pytest.mark.parametrize("argv, reason", [
    (["--numa", "guest_numa_id=0,memory_zones=[zz]"], "Unknown memory zone 'zz'"),
    (["--numa", "guest_numa_id=0,memory_zones=[m0]"], "Unknown memory zone 'm0'"),  # no zones: only mem0
    (["--numa", "guest_numa_id=0,distances=[1@20]"], "Unknown destination NUMA node 1"),
    (["--numa", "guest_numa_id=0", "guest_numa_id=1,distances=[0@20,0@30]"],
     "Destination NUMA node 0 has been already set"),
    (["--numa", "guest_numa_id=0,cpus=[0]", "guest_numa_id=0,cpus=[1]", "--cpus", "boot=2"],
     "Can't define twice the same NUMA node"),
    (["--numa", "guest_numa_id=0,cpus=[0,1]", "guest_numa_id=1,cpus=[1]", "--cpus", "boot=2"],
     "vCPU 1 belongs to multiple NUMA nodes: 0 and 1"),
    (["--numa", "guest_numa_id=0,cpus=[0-2]", "--cpus", "boot=1,max=2"],
     "vCPU 2 of NUMA node 0 does not exist (max_vcpus is 2)"),
    (["--numa", "guest_numa_id=0,sgx_epc_sections=[e0]"], "Missing SGX EPC region"),
    (["--numa", "guest_numa_id=0,sgx_epc_sections=[e1]", "--sgx-epc", "id=e0,size=64M"],
     "Unknown SGX EPC section 'e1'"),
])
def test_build_errors(argv: list[str], reason: str) -> None:
    cfg = config(*argv)
    assert numa_errors(cfg) == [f"Invalid NUMA configuration: {reason}"]
    assert f"Invalid NUMA configuration: {reason}" in config_errors(cfg)
