"""Per-option parse tables: each option string and the JSON fields it yields."""

from __future__ import annotations

import pytest

from vmsh.config import to_json_value
from vmsh.config.parse import OPTION_PARSERS

G = 1 << 30
M = 1 << 20

CASES = [
    ("cpus", "boot=2", {"boot_vcpus": 2, "max_vcpus": 2, "max_phys_bits": 46, "kvm_hyperv": False}),
    ("cpus", "boot=2,max=8,topology=2:2:1:2", {"max_vcpus": 8, "topology": {"threads_per_core": 2, "cores_per_die": 2, "dies_per_package": 1, "packages": 2}}),
    ("cpus", "affinity=[0@[0,2],1@[1-3]]", {"affinity": [{"vcpu": 0, "host_cpus": [0, 2]}, {"vcpu": 1, "host_cpus": [1, 2, 3]}]}),
    ("cpus", "features=[amx],kvm_hyperv=on,max_phys_bits=40", {"features": {"amx": True}, "kvm_hyperv": True, "max_phys_bits": 40}),
    ("platform", "num_pci_segments=2,iommu_segments=[1],serial_number=S1,uuid=U,oem_strings=[a,b]",
     {"num_pci_segments": 2, "iommu_segments": [1], "serial_number": "S1", "uuid": "U", "oem_strings": ["a", "b"]}),
    ("platform", "system_serial_number=S2,system_uuid=U2", {"serial_number": "S2", "uuid": "U2"}),
    ("memory", "size=1G,mergeable=on,hotplug_method=virtio-mem,hotplug_size=2G,hotplugged_size=1G,prefault=on,thp=off",
     {"size": G, "mergeable": True, "hotplug_method": "VirtioMem", "hotplug_size": 2 * G, "hotplugged_size": G, "prefault": True, "thp": False}),
    ("memory", "size=0,shared=on,hugepages=on,hugepage_size=2M", {"size": 0, "shared": True, "hugepages": True, "hugepage_size": 2 * M}),
    ("memory", "", {"size": 512 * M, "hotplug_method": "Acpi", "thp": True}),
    ("memory-zone", "id=z0,size=1G,file=/dev/shm/z,shared=on,host_numa_node=1,prefault=on",
     {"id": "z0", "size": G, "file": "/dev/shm/z", "shared": True, "host_numa_node": 1, "prefault": True}),
    ("memory-zone", "id=z1", {"id": "z1", "size": 512 * M}),
    ("rate-limit-group", "id=g,bw_size=1000,bw_refill_time=100,ops_size=10,ops_one_time_burst=5,ops_refill_time=10",
     {"id": "g", "rate_limiter_config": {"bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 100}, "ops": {"size": 10, "one_time_burst": 5, "refill_time": 10}}}),
    ("disk", "path=/a,readonly=on,direct=on,num_queues=2,queue_size=64,serial=SER,id=d0,pci_segment=0",
     {"path": "/a", "readonly": True, "direct": True, "num_queues": 2, "queue_size": 64, "serial": "SER", "id": "d0"}),
    ("disk", "vhost_user=on,socket=/s", {"vhost_user": True, "vhost_socket": "/s", "path": None}),
    ("disk", "path=/a,bw_size=1M,bw_refill_time=10".replace("1M", "1048576"),
     {"rate_limiter_config": {"bandwidth": {"size": M, "one_time_burst": 0, "refill_time": 10}, "ops": None}}),
    ("disk", "path=/a,bw_size=100", {"rate_limiter_config": None}),
    ("disk", "path=/a,queue_affinity=[0@[1],1@[2,3]]", {"queue_affinity": [{"queue_index": 0, "host_cpus": [1]}, {"queue_index": 1, "host_cpus": [2, 3]}]}),
    ("disk", 'path="/a,b=c"', {"path": "/a,b=c"}),
    ("disk", "path=/a,_disable_io_uring=on,_disable_aio=on,rate_limit_group=g", {"disable_io_uring": True, "disable_aio": True, "rate_limit_group": "g"}),
    ("net", "", {"tap": None, "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": None, "num_queues": 2, "queue_size": 256,
                 "offload_tso": True, "offload_ufo": True, "offload_csum": True, "vhost_mode": "Client"}),
    ("net", "tap=,ip=10.0.0.1,mask=255.0.0.0,mac=12:34:56:78:90:AB,host_mac=02:00:00:00:00:01,mtu=9000",
     {"tap": None, "ip": "10.0.0.1", "mask": "255.0.0.0", "mac": "12:34:56:78:90:ab", "host_mac": "02:00:00:00:00:01", "mtu": 9000}),
    ("net", "fd=[3,4],num_queues=4,vhost_mode=server,offload_tso=off", {"fds": [-1, -1], "num_queues": 4, "vhost_mode": "Server", "offload_tso": False}),
    ("rng", "src=/dev/random,iommu=on", {"src": "/dev/random", "iommu": True}),
    ("rng", "", {"src": "/dev/urandom", "iommu": False}),
    ("balloon", "size=256M,deflate_on_oom=on,free_page_reporting=on", {"size": 256 * M, "deflate_on_oom": True, "free_page_reporting": True}),
    ("fs", "tag=myfs,socket=/s,num_queues=2,queue_size=512,id=fs0", {"tag": "myfs", "socket": "/s", "num_queues": 2, "queue_size": 512, "id": "fs0"}),
    ("pmem", "file=/p,size=128M,iommu=on,discard_writes=on", {"file": "/p", "size": 128 * M, "iommu": True, "discard_writes": True}),
    ("pmem", "file=/p", {"size": None}),
    ("serial", "off", {"mode": "Off", "file": None, "socket": None}),
    ("serial", "pty", {"mode": "Pty"}),
    ("serial", "null", {"mode": "Null"}),
    ("serial", "file=/tmp/ser", {"mode": "File", "file": "/tmp/ser"}),
    ("serial", "socket=/tmp/ser.sock", {"mode": "Socket", "socket": "/tmp/ser.sock"}),
    ("console", "off,iommu=on", {"mode": "Off", "iommu": True}),
    ("debug-console", "off,iobase=0xe9", {"mode": "Off", "iobase": 0xE9}),
    ("debug-console", "file=/tmp/dbg,iobase=0x402", {"mode": "File", "file": "/tmp/dbg", "iobase": 0x402}),
    ("debug-console", "tty", {"mode": "Tty", "iobase": None}),
    ("device", "path=/sys/bus/pci/devices/0000:01:00.0/,iommu=on,id=v0,x_nv_gpudirect_clique=1",
     {"path": "/sys/bus/pci/devices/0000:01:00.0/", "iommu": True, "id": "v0", "x_nv_gpudirect_clique": 1}),
    ("user-device", "socket=/u,id=u0", {"socket": "/u", "id": "u0"}),
    ("vdpa", "path=/dev/vhost-vdpa-0,num_queues=2,iommu=on", {"path": "/dev/vhost-vdpa-0", "num_queues": 2, "iommu": True}),
    ("vsock", "cid=3,socket=/v,id=vs", {"cid": 3, "socket": "/v", "id": "vs"}),
    ("numa", "guest_numa_id=0,cpus=[0-3,6],distances=[1@20,2@30],memory_zones=[z0,z1],pci_segments=[0]",
     {"guest_numa_id": 0, "cpus": [0, 1, 2, 3, 6], "distances": [{"destination": 1, "distance": 20}, {"destination": 2, "distance": 30}],
      "memory_zones": ["z0", "z1"], "pci_segments": [0]}),
    ("pci-segment", "pci_segment=1,mmio32_aperture_weight=4", {"pci_segment": 1, "mmio32_aperture_weight": 4, "mmio64_aperture_weight": 1}),
    ("tpm", "socket=/tpm.sock", {"socket": "/tpm.sock"}),
    ("sgx-epc", "id=epc0,size=64M,prefault=on", {"id": "epc0", "size": 64 * M, "prefault": True}),
    ("profile", "path=/tmp/p.txt,hz=500,system_map=/boot/System.map", {"path": "/tmp/p.txt", "hz": 500, "system_map": "/boot/System.map"}),
    ("profile", "", {"path": None, "hz": 200}),
    ("restore", "source_url=file:///snap,prefault=on,resume=true,net_fds=[net0@[3,4]]",
     {"source_url": "file:///snap", "prefault": True, "resume": True, "net_fds": [{"id": "net0", "num_fds": 2, "fds": [-1, -1]}]}),
]


@pytest.mark.parametrize("option, text, fields", CASES, ids=[f"{o}:{t}" for o, t, _ in CASES])
def test_option_parses_to_fields(option: str, text: str, fields: dict) -> None:
    parsed = to_json_value(OPTION_PARSERS[option][0](text))
    for key, value in fields.items():
        assert parsed[key] == value, key
