"""Every bad launcher input gives one error naming the option and what was wrong, in
cloud-hypervisor's wording (parse errors and validation errors alike)."""

from __future__ import annotations

import pytest

from vmsh.config import vm_config_from_argv
from vmsh.errors import ConfigError, error_chain

K = ["--kernel", "/k"]

PARSE_ERRORS = [
    (["--cpus", "boot=x"], "Error parsing --cpus: Unable to convert x for boot"),
    (["--cpus", "boot=256"], "Error parsing --cpus: Unable to convert 256 for boot"),
    (["--cpus", "topology=1:2"], "Error parsing --cpus: Unable to convert 1:2 for topology"),
    (["--cpus", "features=[sse]"], "Error parsing --cpus: Invalid feature in --cpus features list: sse"),
    (["--cpus", "affinity=0@[1]"], "Error parsing --cpus: Unable to convert 0@[1] for affinity"),
    (["--cpus", "foo=1"], "Error parsing --cpus: Unknown option: foo"),
    (["--memory", "size=1T"], "Error parsing --memory: Unable to convert 1T for size"),
    (["--memory", "size=1g"], "Error parsing --memory: Unable to convert 1g for size"),
    (["--memory", "hotplug_method=dimm"], "Error parsing --memory: Unable to convert dimm for hotplug_method"),
    (["--memory", "shared=maybe"], "Error parsing --memory: Unable to convert maybe for shared"),
    (["--memory-zone", "size=1G"], "Error parsing --memory-zone: id missing"),
    (["--disk", "path=/a,foo=1"], "Error parsing --disk: Unknown option: foo"),
    (["--disk", "path=[/a"], "Error parsing --disk: Invalid syntax: path=[/a"),
    (["--disk", 'path="/a'], 'Error parsing --disk: Invalid syntax: path="/a'),
    (["--disk", "path=/a]"], "Error parsing --disk: Invalid syntax: path=/a]"),
    (["--disk", "num_queues=-1"], "Error parsing --disk: Unable to convert -1 for num_queues"),
    (["--disk", "queue_size=70000"], "Error parsing --disk: Unable to convert 70000 for queue_size"),
    (["--disk", "readonly"], "Error parsing --disk: Invalid syntax: readonly"),
    (["--net", "ip=300.1.1.1"], "Error parsing --net: Unable to convert 300.1.1.1 for ip"),
    (["--net", "mac=zz:34:56:78:90:ab"], "Error parsing --net: Unable to convert zz:34:56:78:90:ab for mac"),
    (["--net", "vhost_mode=both"], "Error parsing --net: Unable to convert both for vhost_mode"),
    (["--net", "fd=[3,x]"], "Error parsing --net: Unable to convert [3,x] for fd"),
    (["--rng", "source=/dev/random"], "Error parsing --rng: Unknown option: source"),
    (["--balloon", "size=lots"], "Error parsing --balloon: Unable to convert lots for size"),
    (["--fs", "socket=/s"], "Error parsing --fs: tag missing"),
    (["--fs", "tag=t"], "Error parsing --fs: socket missing"),
    (["--fs", "tag=" + "x" * 37 + ",socket=/s"], "Error parsing --fs: max tag length is 36"),
    (["--pmem", "size=1G"], "Error parsing --pmem: file missing"),
    (["--serial", "tcp"], "Error parsing --serial: Unknown option: tcp"),
    (["--serial", "iommu=on"], "Error parsing --serial: invalid console mode given"),
    (["--serial", "file="], "Error parsing --serial: Path missing when using file console mode"),
    (["--console", "socket="], "Error parsing --console: Path missing when using socket console mode"),
    (["--debug-console", "tty,iobase=e9"], "Error parsing --debug-console: The IO port was not properly provided in hex or a `0x` prefix is missing: e9"),
    (["--debug-console", "file="], "Error parsing --debug-console: Path missing when using file mode for debug console"),
    (["--device", "iommu=on"], "Error parsing --device: path missing"),
    (["--user-device", "id=u"], "Error parsing --user-device: socket missing"),
    (["--vdpa", "num_queues=2"], "Error parsing --vdpa: path missing"),
    (["--vsock", "cid=3"], "Error parsing --vsock: socket missing"),
    (["--vsock", "socket=/s"], "Error parsing --vsock: cid missing"),
    (["--numa", "cpus=[0]"], "Error parsing --numa: guest_numa_id is required for all NUMA nodes"),
    (["--numa", "guest_numa_id=0,distances=[1@300]"], "Error parsing --numa: Unable to convert [1@300] for distances"),
    (["--pci-segment", "pci_segment=x"], "Error parsing --pci-segment: Unable to convert x for pci_segment"),
    (["--tpm", "path=/s"], "Error parsing --tpm: Unknown option: path"),
    (["--tpm", ""], "Error parsing --tpm: path missing"),
    (["--sgx-epc", "size=1G"], "Error parsing --sgx-epc: id missing"),
    (["--platform", "num_pci_segments=x"], "Error parsing --platform: Unable to convert x for num_pci_segments"),
    (["--rate-limit-group", "bw_size=1M"], "Error parsing --rate-limit-group: Unable to convert 1M for bw_size"),
]

VALIDATION_ERRORS = [
    ([], "Payload configuration is not bootable: No bootitem provided: neither firmware nor kernel"),
    (["--firmware", "/f"], "Payload configuration is not bootable: Specifying a kernel is not supported when a firmware is provided"),
    (["--cpus", "boot=4,max=2"], "Max CPUs (2) lower than boot CPUs (4)"),
    (["--cpus", "boot=2,topology=1:0:1:2"], "No part of the CPU topology can be zero"),
    (["--cpus", "boot=4,topology=1:2:1:1"], "Product of CPU topology parts does not match maximum vCPUs"),
    (["--cpus", "boot=8,topology=4:1:1:1"], "Product of CPU topology parts does not match maximum vCPUs"),
    (["--memory", "hugepage_size=2M"], "Huge page size specified but huge pages not enabled"),
    (["--memory", "hugepages=on,hugepage_size=3M"], f"Huge page size is not power of 2: {3 << 20}"),
    (["--memory", "shared=on,mergeable=on"], "Invalid to set both 'mergeable' and 'shared' for memory"),
    (["--memory-zone", "id=z,hugepage_size=2M"], "Huge page size specified but huge pages not enabled"),
    (["--disk", "path=/a,num_queues=2"], "Queue count (2) must not exceed boot vCPUs (1)"),
    (["--disk", "path=/a,queue_size=100"], "Queue size must be a power of 2 no greater than 32768: 100"),
    (["--disk", "path=/a,queue_size=2"], "Block queue size must be greater than 2: 2"),
    (["--disk", "path=/a,socket=/s"], "Disk path and vhost socket both provided"),
    (["--disk", "vhost_user=on,socket=/s"], "Using vhost-user requires using shared memory or huge pages"),
    (["--memory", "shared=on", "--disk", "vhost_user=on"], "No socket provided when using vhost-user"),
    (["--memory", "shared=on", "--disk", "vhost_user=on,socket=/s,iommu=on"], "Device does not support being placed behind IOMMU"),
    (["--memory", "shared=on", "--disk", "vhost_user=on,socket=/s,bw_size=1,bw_refill_time=1"], "Rate limiting is not supported with vhost-user"),
    (["--disk", "path=/a,rate_limit_group=g"], "Invalid rate-limiter group"),
    (["--rate-limit-group", "id=g"], "Invalid rate-limiter group"),
    (["--rate-limit-group", "bw_size=1,bw_refill_time=1"], "Invalid rate-limiter group"),
    (["--rate-limit-group", "id=g,bw_size=1,bw_refill_time=1", "--disk", "path=/a,rate_limit_group=g,bw_size=1,bw_refill_time=1"], "Invalid rate-limiter group"),
    (["--disk", "path=/a,serial=" + "s" * 21], "Block device serial length (21) exceeds maximum allowed length (20)"),
    (["--disk", "path=/a,id=__x"], "Identifier __x is not valid"),
    (["--disk", "path=/a,id=d", "path=/b,id=d"], "Identifier d is not unique"),
    (["--disk", "path=/a,id=z", "--memory-zone", "id=z"], "Identifier z is not unique"),
    (["--disk", "path=/a,pci_segment=1", "--platform", "num_pci_segments=1"], "Invalid PCI segment id: 1"),
    (["--disk", "path=/a,pci_segment=1", "--platform", "num_pci_segments=2,iommu_segments=[1]"], "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU"),
    (["--net", "num_queues=1"], "Number of queues (1) to virtio_net should be higher than 2"),
    (["--net", "fd=[3,4]"], "Number of queues (2) to virtio_net does not match the number of FDs (2)"),
    (["--net", "fd=[2]"], "Reserved fd number (<= 2): 2"),
    (["--net", "num_queues=4"], "Queue count (2) must not exceed boot vCPUs (1)"),
    (["--net", "queue_size=100"], "Queue size must be a power of 2 no greater than 32768: 100"),
    (["--net", "mtu=1000"], "Provided MTU 1000 is lower than 1280 (expected by VIRTIO specification)"),
    (["--net", "offload_csum=off"], '"offload_tso" and "offload_ufo" depend on "offload_csum"'),
    (["--net", "vhost_user=on,socket=/s"], "Using vhost-user requires using shared memory or huge pages"),
    (["--fs", "tag=t,socket=/s"], "Using vhost-user requires using shared memory or huge pages"),
    (["--memory", "shared=on", "--fs", "tag=t,socket=/s,num_queues=2"], "Queue count (2) must not exceed boot vCPUs (1)"),
    (["--user-device", "socket=/s"], "Using user devices requires using shared memory or huge pages"),
    (["--vsock", "cid=2,socket=/s"], "2 is a special VSOCK CID"),
    (["--vsock", "cid=4294967295,socket=/s"], "4294967295 is a special VSOCK CID"),
    (["--balloon", "size=512M"], f"Balloon size ({512 << 20}) greater than RAM ({512 << 20})"),
    (["--device", "path=/d", "path=/d"], "Duplicated device path: /d"),
    (["--numa", "guest_numa_id=0,memory_zones=[z]", "--numa", "guest_numa_id=1,memory_zones=[z]"], "Memory zone: z belongs to multiple NUMA nodes: 0 and 1"),
    (["--numa", "guest_numa_id=1,pci_segments=[0]"], "Default PCI segment assigned to non-zero NUMA node 1"),
    (["--platform", "num_pci_segments=3", "--numa", "guest_numa_id=0,pci_segments=[1]", "--numa", "guest_numa_id=1,pci_segments=[1]"], "PCI segment: 1 belongs to multiple NUMA nodes 0 and 1"),
    (["--numa", "guest_numa_id=0,pci_segments=[2]"], "Invalid PCI segment id: 2"),
    (["--pci-segment", "pci_segment=1"], "Invalid PCI segment id: 1"),
    (["--pci-segment", "pci_segment=0,mmio32_aperture_weight=0"], "Invalid PCI segment aperture weight: 0"),
    (["--platform", "num_pci_segments=0"], "Number of PCI segments (0) not in range of 1 to 96"),
    (["--platform", "num_pci_segments=97"], "Number of PCI segments (97) not in range of 1 to 96"),
    (["--platform", "iommu_segments=[1]"], "Invalid PCI segment id: 1"),
    (["--sgx-epc", "id=__e"], "Identifier __e is not valid"),
]


def _message(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        vm_config_from_argv(argv)
    return ": ".join(error_chain(info.value))


@pytest.mark.parametrize("argv, message", PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_parse_error_message(argv: list[str], message: str) -> None:
    assert _message(K + argv) == message


@pytest.mark.parametrize("argv, message", VALIDATION_ERRORS, ids=[" ".join(a) or "no-payload" for a, _ in VALIDATION_ERRORS])
def test_validation_error_message(argv: list[str], message: str) -> None:
    payload = [] if not argv or argv[0] == "--firmware" else K
    if argv[:1] == ["--firmware"]:
        argv = argv + K
    assert _message(payload + argv) == message


@pytest.mark.parametrize("cpus", ["boot=8,topology=4:2:1:1", "boot=8,topology=8:1:1:1", "boot=8,topology=1:2:2:2",
                                  "boot=6,topology=3:1:1:2"])
def test_topologies_v40_accepts(cpus: str) -> None:
    """v40 checks only for zero parts and the product (no "at most 2 threads per core", which a
    later release added): these are valid machines."""
    topology = vm_config_from_argv([*K, "--cpus", cpus]).cpus.topology
    assert topology is not None
    parts = [int(p) for p in cpus.split("topology=")[1].split(":")]
    assert [topology.threads_per_core, topology.cores_per_die, topology.dies_per_package, topology.packages] == parts
