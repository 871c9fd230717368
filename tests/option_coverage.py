"""Every field of the config model, and how a test proves that vmsh acts on it or refuses it.

No option may be accepted and then ignored (issue #16). :data:`TABLE` maps each field of
:class:`vmsh.config.model.VmConfig` and of every config dataclass nested in it (``Class.field``)
to one check:

- :class:`Describe`: the machine built with ``variant`` differs from the one built with ``base``
  in its description (``vmsh launch --describe``): ACPI, SMBIOS, boot, RAM, vCPUs, PCI, virtio;
- :class:`Refused`: building the VM raises an error whose text contains ``needle``;
- :class:`Elsewhere`: a named test proves the effect (host-side effects the guest cannot
  describe: a tap's address, a file the serial port writes, a memory policy);
- :class:`Nested`: a container whose own fields are each in the table;
- :class:`Moot`: the option asks vmsh not to use something vmsh never uses (said why).

``tests/unit/config/test_option_coverage.py`` checks that the table covers exactly the model's
fields; ``tests/engine/test_option_coverage.py`` builds the ``Describe`` and ``Refused`` entries
on KVM. Arguments are ``vmsh launch`` flags; ``{kernel}``, ``{kernel2}``, ``{initrd}``, ``{disk}``,
``{disk2}``, ``{pmem}``, ``{pmem2}`` and ``{dir}`` are files the engine test makes, and a flag given
``None`` drops that flag of the base command line.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from vmsh.config import model as m


@dataclass(frozen=True)
class Describe:
    base: tuple[str | None, ...]
    variant: tuple[str | None, ...]


@dataclass(frozen=True)
class Refused:
    args: tuple[str | None, ...]
    needle: str


@dataclass(frozen=True)
class Elsewhere:
    #: ``path/to/test_file.py::test_name``
    test: str


@dataclass(frozen=True)
class Nested:
    pass


@dataclass(frozen=True)
class Moot:
    why: str


Check = Describe | Refused | Elsewhere | Nested | Moot


def D(base: list[str | None], variant: list[str | None]) -> Describe:
    return Describe(tuple(base), tuple(variant))


def R(args: list[str | None], needle: str) -> Refused:
    return Refused(tuple(args), needle)


def E(test: str) -> Elsewhere:
    return Elsewhere(test)


N = Nested()

#: the base of every built command line (an entry's flags replace these)
BASE = {"--kernel": "{kernel}", "--serial": "null", "--console": "off", "--memory": "size=64M",
        "--cpus": "boot=1"}

SHARED = ["--memory", "size=64M,shared=on"]
#: vhost-user devices carrying data in a real guest against qemu-storage-daemon and dpdk-testpmd
VU_BLK_TEST = "tests/guest/test_vhost_user.py::test_vhost_user_blk_reads_and_writes_through_qemu_storage_daemon"
VU_NET_TEST = "tests/guest/test_vhost_user.py::test_vhost_user_net_carries_frames_through_testpmd"
#: a built VM connected to a real swtpm: its TPM2 table, CRB page and a command answered
TPM_TEST = "tests/engine/test_tpm.py::test_guest_view_and_a_command"
SEG2 = ["--platform", "num_pci_segments=2"]
DISK = ["--disk", "path={disk}"]
NET = "tap=vmshcov0,mac=52:54:00:12:34:56"
PMEM = "file={pmem}"
VSOCK = "cid=3,socket={dir}/vsock.sock"
TAP_TEST = "tests/unit/devices/backends/test_tap.py::test_host_side_is_configured"
MEMORY_TEST = "tests/unit/engine/test_memory_bus.py::test_memory_prefault_and_mergeable_options_map"
ZONE_FILE_TEST = ("tests/engine/test_memory_zones.py::"
                  "test_zones_are_laid_out_in_order_and_a_shared_file_zone_is_the_file")
HUGE_ZONE = ["--memory", "size=0", "--memory-zone", "id=z0,size=64M,hugepages=on,hugepage_size=1G"]
PCI_SEG1 = "pci_segment=1,mmio32_aperture_weight=2"
ASYNC_TEST = "tests/guest/test_block_async.py::test_guest_data_goes_through_the_chosen_backend"
RATE_TEST = "tests/unit/devices/virtio/test_ratelimit_devices.py::test_block_bandwidth_limit_holds_requests_in_the_ring"
GROUP_TEST = "tests/unit/devices/virtio/test_ratelimit_devices.py::test_block_group_shared_by_two_disks"
AFFINITY_TEST = "tests/engine/test_launcher.py::test_affinity_pins_and_bad_host_cpu_is_refused"
#: virtio-fs in a real guest against virtiofsd (on PCI segment 1), and its configuration space
FS_TEST = "tests/guest/test_virtiofs.py::test_fs_shares_a_host_directory_with_the_guest"
FS_CONFIG_TEST = "tests/unit/devices/vhost_user/test_fs.py::test_config_space_is_the_tag_and_the_request_queues"
VDPA = ["--vdpa", "path=/dev/vhost-vdpa-0"]
DEVICE = ["--device", "path=/sys/bus/pci/devices/0000:00:01.0"]
ZONES2 = ["--memory", "size=0", "--memory-zone", "id=z0,size=64M", "--memory-zone", "id=z1,size=64M"]
NUMA2 = ["--numa", "guest_numa_id=0,memory_zones=[z0]", "--numa", "guest_numa_id=1,memory_zones=[z1]"]

TABLE: dict[str, Check] = {
    # --- cpus
    "VmConfig.cpus": N,
    "CpusConfig.boot_vcpus": D([], ["--cpus", "boot=2"]),
    "CpusConfig.max_vcpus": D([], ["--cpus", "boot=1,max=2"]),
    "CpusConfig.topology": N,
    "CpuTopology.threads_per_core": D(["--cpus", "boot=2,topology=1:2:1:1"], ["--cpus", "boot=2,topology=2:1:1:1"]),
    # (vmsh's CPUID has no die level: 1:2:1:1 and 1:1:2:1 describe the same machine)
    "CpuTopology.cores_per_die": D(["--cpus", "boot=2,topology=1:1:1:2"], ["--cpus", "boot=2,topology=1:2:1:1"]),
    "CpuTopology.dies_per_package": D(["--cpus", "boot=2,topology=1:1:1:2"], ["--cpus", "boot=2,topology=1:1:2:1"]),
    "CpuTopology.packages": D(["--cpus", "boot=2,topology=1:2:1:1"], ["--cpus", "boot=2,topology=1:1:1:2"]),
    "CpusConfig.kvm_hyperv": E("tests/engine/test_boot.py::test_kvm_hyperv_needs_the_host_kvm_hyper_v_emulation"),
    "CpusConfig.max_phys_bits": D([], ["--cpus", "boot=1,max_phys_bits=36"]),
    "CpusConfig.affinity": E(AFFINITY_TEST),
    "CpuAffinity.vcpu": E(AFFINITY_TEST),
    "CpuAffinity.host_cpus": E(AFFINITY_TEST),
    "CpusConfig.features": N,
    "CpuFeatures.amx": R(["--cpus", "boot=1,features=[amx]"], "--cpus features=[amx]"),
    # --- memory
    "VmConfig.memory": N,
    "MemoryConfig.size": D([], ["--memory", "size=128M"]),
    "MemoryConfig.mergeable": E(MEMORY_TEST),
    # ACPI: the memory hotplug controller in the DSDT; virtio-mem: a virtio-mem device instead
    "MemoryConfig.hotplug_method": D(["--memory", "size=64M,hotplug_size=128M"],
                                     ["--memory", "size=64M,hotplug_size=128M,hotplug_method=virtio-mem"]),
    "MemoryConfig.hotplug_size": D([], ["--memory", "size=64M,hotplug_size=128M"]),
    # what the virtio-mem device asks the guest to plug at boot (with ACPI it is refused, as in v40)
    "MemoryConfig.hotplugged_size": D(["--memory", "size=64M,hotplug_size=256M,hotplug_method=virtio-mem"],
                                      ["--memory", "size=64M,hotplug_size=256M,hotplug_method=virtio-mem,"
                                       "hotplugged_size=128M"]),
    "MemoryConfig.shared": E("tests/unit/engine/test_memory_bus.py::test_memory_create_shared_memfd_region"),
    "MemoryConfig.hugepages": E(
        "tests/unit/engine/test_memory_bus.py::test_memory_hugepages_unavailable_is_a_clean_error"),
    # acted on: this host has no 1 GiB huge pages, so mapping the RAM fails
    "MemoryConfig.hugepage_size": R(["--memory", "size=64M,hugepages=on,hugepage_size=1G"], "cannot map"),
    "MemoryConfig.prefault": E(MEMORY_TEST),
    "MemoryConfig.zones": D([], ["--memory", "size=0", "--memory-zone", "id=z0,size=64M",
                                 "--memory-zone", "id=z1,size=64M"]),
    "MemoryConfig.thp": E(MEMORY_TEST),
    "MemoryZoneConfig.id": Moot("an identifier: validated unique; it names the zone for --numa memory_zones "
                                  "(NumaConfig.memory_zones)"),
    "MemoryZoneConfig.size": D(["--memory", "size=0", "--memory-zone", "id=z0,size=64M"],
                               ["--memory", "size=0", "--memory-zone", "id=z0,size=128M"]),
    "MemoryZoneConfig.file": E(ZONE_FILE_TEST),
    "MemoryZoneConfig.shared": E(ZONE_FILE_TEST),
    "MemoryZoneConfig.hugepages": R(HUGE_ZONE, "cannot map"),
    "MemoryZoneConfig.hugepage_size": R(HUGE_ZONE, "cannot map"),
    "MemoryZoneConfig.host_numa_node": R(["--memory", "size=0", "--memory-zone", "id=z0,size=64M,host_numa_node=99"],
                                         "node 99"),
    # the zone's virtio-mem device, and what it asks the guest to plug at boot
    "MemoryZoneConfig.hotplug_size": D(["--memory", "size=0,hotplug_method=virtio-mem",
                                        "--memory-zone", "id=z0,size=64M"],
                                       ["--memory", "size=0,hotplug_method=virtio-mem",
                                        "--memory-zone", "id=z0,size=64M,hotplug_size=128M"]),
    "MemoryZoneConfig.hotplugged_size": D(["--memory", "size=0,hotplug_method=virtio-mem",
                                           "--memory-zone", "id=z0,size=64M,hotplug_size=128M"],
                                          ["--memory", "size=0,hotplug_method=virtio-mem",
                                           "--memory-zone", "id=z0,size=64M,hotplug_size=128M,hotplugged_size=64M"]),
    "MemoryZoneConfig.prefault": E(MEMORY_TEST),
    # --- payload
    "VmConfig.payload": N,
    "PayloadConfig.firmware": D([], ["--kernel", None, "--firmware", "{kernel2}"]),
    "PayloadConfig.kernel": D([], ["--kernel", "{kernel2}"]),
    "PayloadConfig.cmdline": D([], ["--cmdline", "console=ttyS0"]),
    "PayloadConfig.initramfs": D([], ["--initramfs", "{initrd}"]),
    # --- rate limiting
    "VmConfig.rate_limit_groups": E(GROUP_TEST),
    "RateLimiterGroupConfig.id": E(GROUP_TEST),
    "RateLimiterGroupConfig.rate_limiter_config": E(GROUP_TEST),
    "RateLimiterConfig.bandwidth": E(RATE_TEST),
    "RateLimiterConfig.ops": E(
        "tests/unit/devices/virtio/test_ratelimit_devices.py::test_block_ops_limit_counts_every_request"),
    "TokenBucketConfig.size": E(RATE_TEST),
    "TokenBucketConfig.one_time_burst": E(
        "tests/unit/devices/test_ratelimit.py::test_bucket_one_time_burst_spent_first_and_not_refilled"),
    "TokenBucketConfig.refill_time": E(
        "tests/unit/devices/test_ratelimit.py::test_bucket_starts_full_and_refills_at_its_rate"),
    # --- disks
    "VmConfig.disks": D([], DISK),
    "DiskConfig.path": D(DISK, ["--disk", "path={disk2}"]),
    "DiskConfig.readonly": D(DISK, ["--disk", "path={disk},readonly=on"]),
    "DiskConfig.direct": E("tests/unit/devices/virtio/test_block.py::test_block_direct"),
    "DiskConfig.iommu": D(DISK, ["--disk", "path={disk},iommu=on"]),
    "DiskConfig.num_queues": D([*DISK, "--cpus", "boot=2"], ["--disk", "path={disk},num_queues=2", "--cpus", "boot=2"]),
    "DiskConfig.queue_size": D(DISK, ["--disk", "path={disk},queue_size=64"]),
    "DiskConfig.vhost_user": E(VU_BLK_TEST),
    "DiskConfig.vhost_socket": E(VU_BLK_TEST),
    "DiskConfig.rate_limit_group": E(GROUP_TEST),
    "DiskConfig.rate_limiter_config": E(RATE_TEST),
    "DiskConfig.id": D(DISK, ["--disk", "path={disk},id=mydisk"]),
    "DiskConfig.disable_io_uring": E(ASYNC_TEST),
    "DiskConfig.disable_aio": E(ASYNC_TEST),
    "DiskConfig.pci_segment": D([*SEG2, *DISK], [*SEG2, "--disk", "path={disk},pci_segment=1"]),
    "DiskConfig.serial": D(DISK, ["--disk", "path={disk},serial=vmsh-serial"]),
    "DiskConfig.queue_affinity": R(["--disk", "path={disk},queue_affinity=[0@[0]]"], "--disk queue_affinity"),
    "VirtQueueAffinity.queue_index": R(["--disk", "path={disk},queue_affinity=[0@[0]]"], "--disk queue_affinity"),
    "VirtQueueAffinity.host_cpus": R(["--disk", "path={disk},queue_affinity=[0@[0]]"], "--disk queue_affinity"),
    # --- net
    "VmConfig.net": D([], ["--net", NET]),
    "NetConfig.tap": E(TAP_TEST),
    "NetConfig.ip": E(TAP_TEST),
    "NetConfig.mask": E(TAP_TEST),
    "NetConfig.mac": D(["--net", NET], ["--net", "tap=vmshcov0,mac=52:54:00:12:34:57"]),
    "NetConfig.host_mac": E(TAP_TEST),
    "NetConfig.mtu": D(["--net", NET], ["--net", NET + ",mtu=1400"]),
    "NetConfig.iommu": D(["--net", NET], ["--net", NET + ",iommu=on"]),
    "NetConfig.num_queues": D(["--net", NET], ["--net", NET + ",num_queues=4", "--cpus", "boot=2"]),
    "NetConfig.queue_size": D(["--net", NET], ["--net", NET + ",queue_size=64"]),
    "NetConfig.vhost_user": E(VU_NET_TEST),
    "NetConfig.vhost_socket": E(VU_NET_TEST),
    # parametrized: vmsh as client (testpmd listens) and as server (testpmd connects)
    "NetConfig.vhost_mode": E(VU_NET_TEST),
    "NetConfig.id": D(["--net", NET], ["--net", NET + ",id=mynet"]),
    "NetConfig.fds": E("tests/unit/devices/virtio/test_net_tap_fd.py::test_a_callers_blocking_tap_is_made_fit"),
    "NetConfig.rate_limiter_config": E("tests/unit/devices/virtio/test_ratelimit_devices.py::test_net_tx_ops_limit"),
    "NetConfig.pci_segment": D([*SEG2, "--net", NET], [*SEG2, "--net", NET + ",pci_segment=1"]),
    "NetConfig.offload_tso": D(["--net", NET], ["--net", NET + ",offload_tso=off"]),
    "NetConfig.offload_ufo": D(["--net", NET], ["--net", NET + ",offload_ufo=off"]),
    "NetConfig.offload_csum": D(["--net", NET], ["--net", NET + ",offload_csum=off,offload_tso=off,offload_ufo=off"]),
    # --- rng, balloon
    "VmConfig.rng": N,
    "RngConfig.src": E("tests/unit/devices/virtio/test_rng.py::test_rng_fills_from_source"),
    "RngConfig.iommu": D([], ["--rng", "iommu=on"]),
    "VmConfig.balloon": D([], ["--balloon", "size=0"]),
    "BalloonConfig.size": D(["--balloon", "size=0"], ["--balloon", "size=16M"]),
    "BalloonConfig.deflate_on_oom": D(["--balloon", "size=0"], ["--balloon", "size=0,deflate_on_oom=on"]),
    "BalloonConfig.free_page_reporting": D(["--balloon", "size=0"], ["--balloon", "size=0,free_page_reporting=on"]),
    # --- fs: a vhost-user backend (QEMU's virtiofsd) serves it; the device against a scripted one
    "VmConfig.fs": E(FS_TEST),
    "FsConfig.tag": E(FS_TEST),
    "FsConfig.socket": E(FS_TEST),
    "FsConfig.num_queues": E(FS_CONFIG_TEST),
    "FsConfig.queue_size": E(FS_CONFIG_TEST),
    "FsConfig.id": E("tests/guest/test_virtiofs.py::test_fs_is_hot_added_used_and_removed"),
    "FsConfig.pci_segment": E(FS_TEST),
    # --- pmem
    "VmConfig.pmem": D([], ["--pmem", PMEM]),
    "PmemConfig.file": D(["--pmem", PMEM], ["--pmem", "file={pmem2}"]),
    "PmemConfig.size": D(["--pmem", PMEM], ["--pmem", PMEM + ",size=4M"]),
    "PmemConfig.iommu": D(["--pmem", PMEM], ["--pmem", PMEM + ",iommu=on"]),
    "PmemConfig.discard_writes": E("tests/unit/devices/virtio/test_pmem.py::test_pmem_discard_writes"),
    "PmemConfig.id": D(["--pmem", PMEM], ["--pmem", PMEM + ",id=mypmem"]),
    "PmemConfig.pci_segment": D([*SEG2, "--pmem", PMEM], [*SEG2, "--pmem", PMEM + ",pci_segment=1"]),
    # --- consoles (ConsoleConfig is both --serial and --console)
    "VmConfig.serial": D([], ["--serial", "off"]),
    "VmConfig.console": D([], ["--console", "null"]),
    "ConsoleConfig.file": E("tests/engine/test_launcher.py::test_serial_file_and_debug_console_file"),
    "ConsoleConfig.mode": D([], ["--serial", "off"]),
    "ConsoleConfig.iommu": D(["--console", "null"], ["--console", "null,iommu=on"]),
    "ConsoleConfig.socket": E("tests/engine/test_launcher.py::test_serial_socket_both_ways"),
    "VmConfig.debug_console": N,
    "DebugConsoleConfig.file": E("tests/engine/test_launcher.py::test_serial_file_and_debug_console_file"),
    "DebugConsoleConfig.mode": D([], ["--debug-console", "file={dir}/debugcon.log"]),
    "DebugConsoleConfig.iobase": D(["--debug-console", "file={dir}/debugcon.log"],
                                   ["--debug-console", "file={dir}/debugcon.log,iobase=0x3e8"]),
    # --- passthrough and vhost pieces vmsh does not have
    "VmConfig.devices": R(DEVICE, "--device"),
    "DeviceConfig.path": R(DEVICE, "--device"),
    "DeviceConfig.iommu": R(DEVICE, "--device"),
    "DeviceConfig.id": R(DEVICE, "--device"),
    "DeviceConfig.pci_segment": R(DEVICE, "--device"),
    "DeviceConfig.x_nv_gpudirect_clique": R(DEVICE, "--device"),
    "VmConfig.user_devices": R(["--user-device", "socket={dir}/ud.sock", *SHARED], "--user-device"),
    "UserDeviceConfig.socket": R(["--user-device", "socket={dir}/ud.sock", *SHARED], "--user-device"),
    "UserDeviceConfig.id": R(["--user-device", "socket={dir}/ud.sock", *SHARED], "--user-device"),
    "UserDeviceConfig.pci_segment": R(["--user-device", "socket={dir}/ud.sock", *SHARED], "--user-device"),
    "VmConfig.vdpa": R(VDPA, "--vdpa"),
    "VdpaConfig.path": R(VDPA, "--vdpa"),
    "VdpaConfig.num_queues": R(VDPA, "--vdpa"),
    "VdpaConfig.iommu": R(VDPA, "--vdpa"),
    "VdpaConfig.id": R(VDPA, "--vdpa"),
    "VdpaConfig.pci_segment": R(VDPA, "--vdpa"),
    # --- vsock
    "VmConfig.vsock": D([], ["--vsock", VSOCK]),
    "VsockConfig.cid": D(["--vsock", VSOCK], ["--vsock", "cid=4,socket={dir}/vsock.sock"]),
    "VsockConfig.socket": E("tests/unit/devices/virtio/test_vsock.py::test_vsock_config_and_socket"),
    "VsockConfig.iommu": D(["--vsock", VSOCK], ["--vsock", VSOCK + ",iommu=on"]),
    "VsockConfig.id": D(["--vsock", VSOCK], ["--vsock", VSOCK + ",id=myvsock"]),
    "VsockConfig.pci_segment": D([*SEG2, "--vsock", VSOCK], [*SEG2, "--vsock", VSOCK + ",pci_segment=1"]),
    # --- the rest
    "VmConfig.pvpanic": D([], ["--pvpanic"]),
    "VmConfig.iommu": D(SEG2, ["--platform", "num_pci_segments=2,iommu_segments=[1]"]),
    "VmConfig.sgx_epc": R(["--sgx-epc", "id=e0,size=64M"], "--sgx-epc"),
    "SgxEpcConfig.id": R(["--sgx-epc", "id=e0,size=64M"], "--sgx-epc"),
    "SgxEpcConfig.size": R(["--sgx-epc", "id=e0,size=64M"], "--sgx-epc"),
    "SgxEpcConfig.prefault": R(["--sgx-epc", "id=e0,size=64M,prefault=on"], "--sgx-epc"),
    # --numa: the SRAT, SLIT and _PXM differ (tests/guest/test_numa.py shows a guest reading them)
    "VmConfig.numa": D(ZONES2, [*ZONES2, *NUMA2]),
    "NumaConfig.guest_numa_id": D([*ZONES2, "--numa", "guest_numa_id=0,memory_zones=[z0,z1]"],
                                  [*ZONES2, "--numa", "guest_numa_id=1,memory_zones=[z0,z1]"]),
    "NumaConfig.cpus": D([*ZONES2, "--cpus", "boot=2", *NUMA2],
                         [*ZONES2, "--cpus", "boot=2", "--numa", "guest_numa_id=0,cpus=[1],memory_zones=[z0]",
                          "--numa", "guest_numa_id=1,cpus=[0],memory_zones=[z1]"]),
    "NumaConfig.distances": D([*ZONES2, *NUMA2],
                              [*ZONES2, "--numa", "guest_numa_id=0,memory_zones=[z0]",
                               "--numa", "guest_numa_id=1,distances=[0@30],memory_zones=[z1]"]),
    "NumaDistance.destination": D([*ZONES2, *NUMA2, "--numa", "guest_numa_id=2,distances=[0@30]"],
                                  [*ZONES2, *NUMA2, "--numa", "guest_numa_id=2,distances=[1@30]"]),
    "NumaDistance.distance": D([*ZONES2, *NUMA2, "--numa", "guest_numa_id=2,distances=[0@30]"],
                               [*ZONES2, *NUMA2, "--numa", "guest_numa_id=2,distances=[0@40]"]),
    "NumaConfig.memory_zones": D([*ZONES2, *NUMA2],
                                 [*ZONES2, "--numa", "guest_numa_id=0,memory_zones=[z1]",
                                  "--numa", "guest_numa_id=1,memory_zones=[z0]"]),
    "NumaConfig.sgx_epc_sections": R(["--numa", "guest_numa_id=0,sgx_epc_sections=[e0]",
                                      "--sgx-epc", "id=e0,size=64M"], "--sgx-epc"),
    "NumaConfig.pci_segments": D([*SEG2, "--numa", "guest_numa_id=0,pci_segments=[0]",
                                  "--numa", "guest_numa_id=1,cpus=[0]"],
                                 [*SEG2, "--numa", "guest_numa_id=0,pci_segments=[0]",
                                  "--numa", "guest_numa_id=1,cpus=[0],pci_segments=[1]"]),
    "VmConfig.watchdog": D([], ["--watchdog"]),
    "VmConfig.pci_segments": D(SEG2, [*SEG2, "--pci-segment", PCI_SEG1]),
    "PciSegmentConfig.pci_segment": D([*SEG2, "--pci-segment", "pci_segment=0,mmio32_aperture_weight=2"],
                                      [*SEG2, "--pci-segment", PCI_SEG1]),
    "PciSegmentConfig.mmio32_aperture_weight": D(SEG2, [*SEG2, "--pci-segment", PCI_SEG1]),
    "PciSegmentConfig.mmio64_aperture_weight": D(SEG2, [*SEG2, "--pci-segment",
                                                        "pci_segment=1,mmio64_aperture_weight=2"]),
    "VmConfig.platform": N,
    "PlatformConfig.num_pci_segments": D([], SEG2),
    "PlatformConfig.iommu_segments": D([*SEG2, "--disk", "path={disk},pci_segment=1,iommu=on"],
                                       ["--platform", "num_pci_segments=2,iommu_segments=[1]",
                                        "--disk", "path={disk},pci_segment=1,iommu=on"]),
    "PlatformConfig.serial_number": D([], ["--platform", "serial_number=vmsh-1"]),
    "PlatformConfig.uuid": D([], ["--platform", "uuid=9e9f5a07-3f6c-4d5e-9a7b-2b1c0d9e8f7a"]),
    "PlatformConfig.oem_strings": D([], ["--platform", "oem_strings=[vmsh]"]),
    "VmConfig.tpm": E(TPM_TEST),
    "TpmConfig.socket": E(TPM_TEST),
}


def model_fields(root: type = m.VmConfig) -> list[str]:
    """``Class.field`` for every field of ``root`` and of every dataclass reachable from it."""
    seen: list[type] = []
    names: list[str] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names.append(f"{cls.__name__}.{f.name}")
            stack = [hints[f.name]]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and dataclasses.is_dataclass(t):
                    walk(t)
                stack.extend(typing.get_args(t))

    walk(root)
    return names


def command_line(extra: tuple[str | None, ...], files: dict[str, str]) -> list[str]:
    """The ``vmsh launch`` flags: :data:`BASE` with ``extra``'s flags in place of its own."""
    flags: dict[str, str | None] = dict(BASE)
    repeated: list[str] = []
    pairs = list(zip(extra[::2], extra[1::2], strict=True)) if len(extra) % 2 == 0 else None
    if pairs is None:  # valueless flags (--pvpanic, --watchdog) come last, alone
        pairs = list(zip(extra[:-1:2], extra[1:-1:2], strict=True))
        repeated.append(str(extra[-1]))
    for flag, value in pairs:
        assert flag is not None
        if flag in flags or value is None:
            flags[flag] = value
        else:
            repeated.extend([flag, value])
    argv = [part for flag, value in flags.items() if value is not None for part in (flag, value)]
    return [arg.format(**files) for arg in argv + repeated]
