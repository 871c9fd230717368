"""The VmConfig model: plain dataclasses with cloud-hypervisor's JSON field names.

The field set, JSON spellings, enum spellings and defaults are those of cloud-hypervisor
v40 (``vmm/src/vm_config.rs``), so that a ``vm.create`` body written for it loads unchanged.
Later spellings are accepted on input as aliases (``system_serial_number`` for
``serial_number``). Each field's JSON behaviour is described by :func:`field`:

* a field without a default is *required* when its object is present in JSON;
* ``kind`` names the Rust integer type of an integer field (or of list elements), so that
  out-of-range JSON numbers are rejected as serde would;
* ``json`` overrides the JSON name, ``aliases`` lists names also accepted on input.

Conversion to and from JSON lives in :mod:`vmsh.config.serde`; the launcher syntax in
:mod:`vmsh.config.parse`; cross-field rules in :mod:`vmsh.config.validate`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

#: ``--cpus`` and ``--memory`` defaults (cloud-hypervisor ``DEFAULT_*``).
DEFAULT_VCPUS = 1
DEFAULT_MAX_PHYS_BITS = 46
DEFAULT_MEMORY_MB = 512
DEFAULT_RNG_SOURCE = "/dev/urandom"
DEFAULT_DISK_NUM_QUEUES = 1
DEFAULT_DISK_QUEUE_SIZE = 128
DEFAULT_NET_NUM_QUEUES = 2
DEFAULT_NET_QUEUE_SIZE = 256
DEFAULT_NET_IP = "192.168.249.1"
DEFAULT_NET_MASK = "255.255.255.0"
DEFAULT_FS_NUM_QUEUES = 1
DEFAULT_FS_QUEUE_SIZE = 1024
DEFAULT_VDPA_NUM_QUEUES = 1
DEFAULT_PCI_SEGMENT_APERTURE_WEIGHT = 1
DEFAULT_NUM_PCI_SEGMENTS = 1
DEFAULT_DEBUG_CONSOLE_IOBASE = 0xE9


def field(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    kind: str | None = None,
    json: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """Declare a config field with its JSON behaviour (see the module docstring)."""
    metadata = {"kind": kind, "json": json, "aliases": aliases}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class JsonEnum(enum.Enum):
    """An enum whose value is its JSON spelling; ``words`` are the launcher spellings."""

    @classmethod
    def from_word(cls, word: str) -> JsonEnum:
        """Look up a launcher word case-insensitively."""
        for member in cls:
            if word.lower() in member.words():
                return member
        raise ValueError(word)

    def words(self) -> tuple[str, ...]:
        """The launcher spellings of this member (lowercase)."""
        return (str(self.value).lower(),)


class HotplugMethod(JsonEnum):
    """``--memory hotplug_method``."""

    ACPI = "Acpi"
    VIRTIO_MEM = "VirtioMem"

    def words(self) -> tuple[str, ...]:
        return ("acpi",) if self is HotplugMethod.ACPI else ("virtio-mem",)


class VhostMode(JsonEnum):
    """``--net vhost_mode``."""

    CLIENT = "Client"
    SERVER = "Server"


class ConsoleOutputMode(JsonEnum):
    """Where the serial port, the virtio console and the debug console go."""

    OFF = "Off"
    PTY = "Pty"
    TTY = "Tty"
    FILE = "File"
    SOCKET = "Socket"
    NULL = "Null"


# --- cpus -----------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class CpuTopology:
    """``topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>``."""

    threads_per_core: int = field(kind="u8")
    cores_per_die: int = field(kind="u8")
    dies_per_package: int = field(kind="u8")
    packages: int = field(kind="u8")


@dataclasses.dataclass(kw_only=True)
class CpuAffinity:
    """One ``affinity=[vcpu@[host cpus]]`` entry."""

    vcpu: int = field(kind="u8")
    host_cpus: list[int] = field(kind="usize")


@dataclasses.dataclass(kw_only=True)
class CpuFeatures:
    """``features=[amx]``."""

    amx: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class CpusConfig:
    """``--cpus``."""

    boot_vcpus: int = field(kind="u8")
    max_vcpus: int = field(kind="u8")
    topology: Optional[CpuTopology] = field(None)
    kvm_hyperv: bool = field(False)
    max_phys_bits: int = field(DEFAULT_MAX_PHYS_BITS, kind="u8")
    affinity: Optional[list[CpuAffinity]] = field(None)
    features: CpuFeatures = field(factory=CpuFeatures)


# --- platform, memory -------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class PlatformConfig:
    """``--platform``; ``system_serial_number``/``system_uuid`` are later spellings accepted on input."""

    num_pci_segments: int = field(DEFAULT_NUM_PCI_SEGMENTS, kind="u16")
    iommu_segments: Optional[list[int]] = field(None, kind="u16")
    serial_number: Optional[str] = field(None, aliases=("system_serial_number",))
    uuid: Optional[str] = field(None, aliases=("system_uuid",))
    oem_strings: Optional[list[str]] = field(None)


@dataclasses.dataclass(kw_only=True)
class PciSegmentConfig:
    """``--pci-segment``."""

    pci_segment: int = field(kind="u16")
    mmio32_aperture_weight: int = field(DEFAULT_PCI_SEGMENT_APERTURE_WEIGHT, kind="u32")
    mmio64_aperture_weight: int = field(DEFAULT_PCI_SEGMENT_APERTURE_WEIGHT, kind="u32")


@dataclasses.dataclass(kw_only=True)
class MemoryZoneConfig:
    """``--memory-zone``."""

    id: str = field()
    size: int = field(kind="u64")
    file: Optional[str] = field(None)
    shared: bool = field(False)
    hugepages: bool = field(False)
    hugepage_size: Optional[int] = field(None, kind="u64")
    host_numa_node: Optional[int] = field(None, kind="u32")
    hotplug_size: Optional[int] = field(None, kind="u64")
    hotplugged_size: Optional[int] = field(None, kind="u64")
    prefault: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class MemoryConfig:
    """``--memory`` (and the ``--memory-zone`` list as ``zones``)."""

    size: int = field(kind="u64")
    mergeable: bool = field(False)
    hotplug_method: HotplugMethod = field(HotplugMethod.ACPI)
    hotplug_size: Optional[int] = field(None, kind="u64")
    hotplugged_size: Optional[int] = field(None, kind="u64")
    shared: bool = field(False)
    hugepages: bool = field(False)
    hugepage_size: Optional[int] = field(None, kind="u64")
    prefault: bool = field(False)
    zones: Optional[list[MemoryZoneConfig]] = field(None)
    thp: bool = field(True)

    def total_size(self) -> int:
        """RAM the guest starts with: base, zones and what is hotplugged at boot."""
        total = self.size + (self.hotplugged_size or 0)
        for zone in self.zones or []:
            total += zone.size + (zone.hotplugged_size or 0)
        return total


# --- rate limiting ------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class TokenBucketConfig:
    """One token bucket: ``size`` tokens refilled every ``refill_time`` ms."""

    DENY_UNKNOWN_FIELDS = True

    size: int = field(kind="u64")
    one_time_burst: Optional[int] = field(None, kind="u64")
    refill_time: int = field(kind="u64")


@dataclasses.dataclass(kw_only=True)
class RateLimiterConfig:
    """Bandwidth and operations buckets."""

    DENY_UNKNOWN_FIELDS = True

    bandwidth: Optional[TokenBucketConfig] = field(None)
    ops: Optional[TokenBucketConfig] = field(None)


@dataclasses.dataclass(kw_only=True)
class RateLimiterGroupConfig:
    """``--rate-limit-group``."""

    id: str = field()
    rate_limiter_config: RateLimiterConfig = field()


# --- devices --------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class VirtQueueAffinity:
    """One ``queue_affinity=[queue@[host cpus]]`` entry."""

    queue_index: int = field(kind="u16")
    host_cpus: list[int] = field(kind="usize")


@dataclasses.dataclass(kw_only=True)
class DiskConfig:
    """``--disk``."""

    path: Optional[str] = field(None)
    readonly: bool = field(False)
    direct: bool = field(False)
    iommu: bool = field(False)
    num_queues: int = field(DEFAULT_DISK_NUM_QUEUES, kind="usize")
    queue_size: int = field(DEFAULT_DISK_QUEUE_SIZE, kind="u16")
    vhost_user: bool = field(False)
    vhost_socket: Optional[str] = field(None)
    rate_limit_group: Optional[str] = field(None)
    rate_limiter_config: Optional[RateLimiterConfig] = field(None)
    id: Optional[str] = field(None)
    disable_io_uring: bool = field(False)
    disable_aio: bool = field(False)
    pci_segment: int = field(0, kind="u16")
    serial: Optional[str] = field(None)
    queue_affinity: Optional[list[VirtQueueAffinity]] = field(None)


@dataclasses.dataclass(kw_only=True)
class NetConfig:
    """``--net``.

    ``mac`` stays None until the device is created, which picks a random locally
    administered address: a default that differed between two parses would break the
    CLI/JSON parity of the canonical config.
    """

    tap: Optional[str] = field(None)
    ip: str = field(DEFAULT_NET_IP, kind="ipv4")
    mask: str = field(DEFAULT_NET_MASK, kind="ipv4")
    mac: Optional[str] = field(None, kind="mac")
    host_mac: Optional[str] = field(None, kind="mac")
    mtu: Optional[int] = field(None, kind="u16")
    iommu: bool = field(False)
    num_queues: int = field(DEFAULT_NET_NUM_QUEUES, kind="usize")
    queue_size: int = field(DEFAULT_NET_QUEUE_SIZE, kind="u16")
    vhost_user: bool = field(False)
    vhost_socket: Optional[str] = field(None)
    vhost_mode: VhostMode = field(VhostMode.CLIENT)
    id: Optional[str] = field(None)
    fds: Optional[list[int]] = field(None, kind="fd")
    rate_limiter_config: Optional[RateLimiterConfig] = field(None)
    pci_segment: int = field(0, kind="u16")
    offload_tso: bool = field(True)
    offload_ufo: bool = field(True)
    offload_csum: bool = field(True)


@dataclasses.dataclass(kw_only=True)
class RngConfig:
    """``--rng``."""

    src: str = field()
    iommu: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class BalloonConfig:
    """``--balloon``."""

    size: int = field(kind="u64")
    deflate_on_oom: bool = field(False)
    free_page_reporting: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class FsConfig:
    """``--fs`` (vhost-user-fs)."""

    tag: str = field()
    socket: str = field()
    num_queues: int = field(DEFAULT_FS_NUM_QUEUES, kind="usize")
    queue_size: int = field(DEFAULT_FS_QUEUE_SIZE, kind="u16")
    id: Optional[str] = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class PmemConfig:
    """``--pmem``."""

    file: str = field()
    size: Optional[int] = field(None, kind="u64")
    iommu: bool = field(False)
    discard_writes: bool = field(False)
    id: Optional[str] = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class ConsoleConfig:
    """``--serial`` and ``--console``."""

    file: Optional[str] = field(None)
    mode: ConsoleOutputMode = field()
    iommu: bool = field(False)
    socket: Optional[str] = field(None)


@dataclasses.dataclass(kw_only=True)
class DebugConsoleConfig:
    """``--debug-console``; a None ``iobase`` means port 0xe9."""

    file: Optional[str] = field(None)
    mode: ConsoleOutputMode = field()
    iobase: Optional[int] = field(None, kind="u16")


@dataclasses.dataclass(kw_only=True)
class DeviceConfig:
    """``--device`` (VFIO passthrough)."""

    path: str = field()
    iommu: bool = field(False)
    id: Optional[str] = field(None)
    pci_segment: int = field(0, kind="u16")
    x_nv_gpudirect_clique: Optional[int] = field(None, kind="u8")


@dataclasses.dataclass(kw_only=True)
class UserDeviceConfig:
    """``--user-device`` (vfio-user)."""

    socket: str = field()
    id: Optional[str] = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class VdpaConfig:
    """``--vdpa``."""

    path: str = field()
    num_queues: int = field(DEFAULT_VDPA_NUM_QUEUES, kind="usize")
    iommu: bool = field(False)
    id: Optional[str] = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class VsockConfig:
    """``--vsock``."""

    cid: int = field(kind="u32")
    socket: str = field()
    iommu: bool = field(False)
    id: Optional[str] = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class SgxEpcConfig:
    """``--sgx-epc`` (x86_64, v40)."""

    id: str = field()
    size: int = field(0, kind="u64")
    prefault: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class NumaDistance:
    """One ``distances=[destination@distance]`` entry."""

    destination: int = field(kind="u32")
    distance: int = field(kind="u8")


@dataclasses.dataclass(kw_only=True)
class NumaConfig:
    """``--numa``."""

    guest_numa_id: int = field(kind="u32")
    cpus: Optional[list[int]] = field(None, kind="u8")
    distances: Optional[list[NumaDistance]] = field(None)
    memory_zones: Optional[list[str]] = field(None)
    sgx_epc_sections: Optional[list[str]] = field(None)
    pci_segments: Optional[list[int]] = field(None, kind="u16")


@dataclasses.dataclass(kw_only=True)
class PayloadConfig:
    """``--firmware``, ``--kernel``, ``--cmdline``, ``--initramfs``."""

    firmware: Optional[str] = field(None)
    kernel: Optional[str] = field(None)
    cmdline: Optional[str] = field(None)
    initramfs: Optional[str] = field(None)


@dataclasses.dataclass(kw_only=True)
class TpmConfig:
    """``--tpm``."""

    socket: str = field()


def default_cpus() -> CpusConfig:
    return CpusConfig(boot_vcpus=DEFAULT_VCPUS, max_vcpus=DEFAULT_VCPUS)


def default_memory() -> MemoryConfig:
    return MemoryConfig(size=DEFAULT_MEMORY_MB << 20)


def default_rng() -> RngConfig:
    return RngConfig(src=DEFAULT_RNG_SOURCE)


def default_serial() -> ConsoleConfig:
    return ConsoleConfig(mode=ConsoleOutputMode.NULL)


def default_console() -> ConsoleConfig:
    return ConsoleConfig(mode=ConsoleOutputMode.TTY)


def default_debug_console() -> DebugConsoleConfig:
    return DebugConsoleConfig(mode=ConsoleOutputMode.OFF, iobase=DEFAULT_DEBUG_CONSOLE_IOBASE)


@dataclasses.dataclass(kw_only=True)
class VmConfig:
    """A whole VM: what ``vm.create`` takes and ``vm.info`` returns as ``config``."""

    cpus: CpusConfig = field(factory=default_cpus)
    memory: MemoryConfig = field(factory=default_memory)
    payload: Optional[PayloadConfig] = field(None)
    rate_limit_groups: Optional[list[RateLimiterGroupConfig]] = field(None)
    disks: Optional[list[DiskConfig]] = field(None)
    net: Optional[list[NetConfig]] = field(None)
    rng: RngConfig = field(factory=default_rng)
    balloon: Optional[BalloonConfig] = field(None)
    fs: Optional[list[FsConfig]] = field(None)
    pmem: Optional[list[PmemConfig]] = field(None)
    serial: ConsoleConfig = field(factory=default_serial)
    console: ConsoleConfig = field(factory=default_console)
    debug_console: DebugConsoleConfig = field(factory=default_debug_console)
    devices: Optional[list[DeviceConfig]] = field(None)
    user_devices: Optional[list[UserDeviceConfig]] = field(None)
    vdpa: Optional[list[VdpaConfig]] = field(None)
    vsock: Optional[VsockConfig] = field(None)
    pvpanic: bool = field(False)
    iommu: bool = field(False)
    sgx_epc: Optional[list[SgxEpcConfig]] = field(None)
    numa: Optional[list[NumaConfig]] = field(None)
    watchdog: bool = field(False)
    pci_segments: Optional[list[PciSegmentConfig]] = field(None)
    platform: Optional[PlatformConfig] = field(None)
    tpm: Optional[TpmConfig] = field(None)

    def backed_by_shared_memory(self) -> bool:
        """Whether guest RAM can be shared with another process (vhost-user needs it)."""
        if self.memory.shared or self.memory.hugepages:
            return True
        if self.memory.size == 0:
            zones = self.memory.zones or []
            return all(zone.shared or zone.hugepages for zone in zones)
        return False

    def num_pci_segments(self) -> int:
        return self.platform.num_pci_segments if self.platform else DEFAULT_NUM_PCI_SEGMENTS


@dataclasses.dataclass(kw_only=True)
class RestoredNetConfig:
    """One ``net_fds=[id@[fds]]`` entry of a restore."""

    id: str = field()
    num_fds: int = field(kind="usize")
    fds: Optional[list[int]] = field(None, kind="fd")


@dataclasses.dataclass(kw_only=True)
class RestoreConfig:
    """``--restore`` and the ``vm.restore`` body."""

    source_url: str = field()
    prefault: bool = field(False)
    net_fds: Optional[list[RestoredNetConfig]] = field(None)
    resume: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class EndpointConfig:
    """``--api-socket``, ``--event-monitor``, ``--gdb``: a path, or an inherited descriptor."""

    path: Optional[str] = field(None)
    fd: Optional[int] = field(None, kind="i32")


@dataclasses.dataclass(kw_only=True)
class ProfileConfig:
    """``--profile`` (a vmsh addition): sample the guest's instruction pointers."""

    #: where the report goes when the VM stops (None: the log)
    path: Optional[str] = field(None)
    hz: int = field(200, kind="u32")
    #: the guest kernel's System.map, to report by symbol
    system_map: Optional[str] = field(None)
