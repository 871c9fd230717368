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
from typing import Any, Self

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
    def from_word(cls, word: str) -> Self:
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
    topology: CpuTopology | None = field(None)
    kvm_hyperv: bool = field(False)
    max_phys_bits: int = field(DEFAULT_MAX_PHYS_BITS, kind="u8")
    affinity: list[CpuAffinity] | None = field(None)
    features: CpuFeatures = field(factory=CpuFeatures)


# --- platform, memory -------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class PlatformConfig:
    """``--platform``; ``system_serial_number``/``system_uuid`` are later spellings accepted on input."""

    num_pci_segments: int = field(DEFAULT_NUM_PCI_SEGMENTS, kind="u16")
    iommu_segments: list[int] | None = field(None, kind="u16")
    serial_number: str | None = field(None, aliases=("system_serial_number",))
    uuid: str | None = field(None, aliases=("system_uuid",))
    oem_strings: list[str] | None = field(None)


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
    file: str | None = field(None)
    shared: bool = field(False)
    hugepages: bool = field(False)
    hugepage_size: int | None = field(None, kind="u64")
    host_numa_node: int | None = field(None, kind="u32")
    hotplug_size: int | None = field(None, kind="u64")
    hotplugged_size: int | None = field(None, kind="u64")
    prefault: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class MemoryConfig:
    """``--memory`` (and the ``--memory-zone`` list as ``zones``)."""

    size: int = field(kind="u64")
    mergeable: bool = field(False)
    hotplug_method: HotplugMethod = field(HotplugMethod.ACPI)
    hotplug_size: int | None = field(None, kind="u64")
    hotplugged_size: int | None = field(None, kind="u64")
    shared: bool = field(False)
    hugepages: bool = field(False)
    hugepage_size: int | None = field(None, kind="u64")
    prefault: bool = field(False)
    zones: list[MemoryZoneConfig] | None = field(None)
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
    one_time_burst: int | None = field(None, kind="u64")
    refill_time: int = field(kind="u64")


@dataclasses.dataclass(kw_only=True)
class RateLimiterConfig:
    """Bandwidth and operations buckets."""

    DENY_UNKNOWN_FIELDS = True

    bandwidth: TokenBucketConfig | None = field(None)
    ops: TokenBucketConfig | None = field(None)


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

    path: str | None = field(None)
    readonly: bool = field(False)
    direct: bool = field(False)
    iommu: bool = field(False)
    num_queues: int = field(DEFAULT_DISK_NUM_QUEUES, kind="usize")
    queue_size: int = field(DEFAULT_DISK_QUEUE_SIZE, kind="u16")
    vhost_user: bool = field(False)
    vhost_socket: str | None = field(None)
    rate_limit_group: str | None = field(None)
    rate_limiter_config: RateLimiterConfig | None = field(None)
    id: str | None = field(None)
    disable_io_uring: bool = field(False)
    disable_aio: bool = field(False)
    pci_segment: int = field(0, kind="u16")
    serial: str | None = field(None)
    queue_affinity: list[VirtQueueAffinity] | None = field(None)


@dataclasses.dataclass(kw_only=True)
class NetConfig:
    """``--net``.

    ``mac`` stays None until the device is created, which picks a random locally
    administered address: a default that differed between two parses would break the
    CLI/JSON parity of the canonical config.
    """

    tap: str | None = field(None)
    ip: str = field(DEFAULT_NET_IP, kind="ipv4")
    mask: str = field(DEFAULT_NET_MASK, kind="ipv4")
    mac: str | None = field(None, kind="mac")
    host_mac: str | None = field(None, kind="mac")
    mtu: int | None = field(None, kind="u16")
    iommu: bool = field(False)
    num_queues: int = field(DEFAULT_NET_NUM_QUEUES, kind="usize")
    queue_size: int = field(DEFAULT_NET_QUEUE_SIZE, kind="u16")
    vhost_user: bool = field(False)
    vhost_socket: str | None = field(None)
    vhost_mode: VhostMode = field(VhostMode.CLIENT)
    id: str | None = field(None)
    fds: list[int] | None = field(None, kind="fd")
    rate_limiter_config: RateLimiterConfig | None = field(None)
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
    id: str | None = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class PmemConfig:
    """``--pmem``."""

    file: str = field()
    size: int | None = field(None, kind="u64")
    iommu: bool = field(False)
    discard_writes: bool = field(False)
    id: str | None = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class ConsoleConfig:
    """``--serial`` and ``--console``."""

    file: str | None = field(None)
    mode: ConsoleOutputMode = field()
    iommu: bool = field(False)
    socket: str | None = field(None)


@dataclasses.dataclass(kw_only=True)
class DebugConsoleConfig:
    """``--debug-console``; a None ``iobase`` means port 0xe9."""

    file: str | None = field(None)
    mode: ConsoleOutputMode = field()
    iobase: int | None = field(None, kind="u16")


@dataclasses.dataclass(kw_only=True)
class DeviceConfig:
    """``--device`` (VFIO passthrough)."""

    path: str = field()
    iommu: bool = field(False)
    id: str | None = field(None)
    pci_segment: int = field(0, kind="u16")
    x_nv_gpudirect_clique: int | None = field(None, kind="u8")


@dataclasses.dataclass(kw_only=True)
class UserDeviceConfig:
    """``--user-device`` (vfio-user)."""

    socket: str = field()
    id: str | None = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class VdpaConfig:
    """``--vdpa``."""

    path: str = field()
    num_queues: int = field(DEFAULT_VDPA_NUM_QUEUES, kind="usize")
    iommu: bool = field(False)
    id: str | None = field(None)
    pci_segment: int = field(0, kind="u16")


@dataclasses.dataclass(kw_only=True)
class VsockConfig:
    """``--vsock``."""

    cid: int = field(kind="u32")
    socket: str = field()
    iommu: bool = field(False)
    id: str | None = field(None)
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
    cpus: list[int] | None = field(None, kind="u8")
    distances: list[NumaDistance] | None = field(None)
    memory_zones: list[str] | None = field(None)
    sgx_epc_sections: list[str] | None = field(None)
    pci_segments: list[int] | None = field(None, kind="u16")


@dataclasses.dataclass(kw_only=True)
class PayloadConfig:
    """``--firmware``, ``--kernel``, ``--cmdline``, ``--initramfs``."""

    firmware: str | None = field(None)
    kernel: str | None = field(None)
    cmdline: str | None = field(None)
    initramfs: str | None = field(None)


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
    payload: PayloadConfig | None = field(None)
    rate_limit_groups: list[RateLimiterGroupConfig] | None = field(None)
    disks: list[DiskConfig] | None = field(None)
    net: list[NetConfig] | None = field(None)
    rng: RngConfig = field(factory=default_rng)
    balloon: BalloonConfig | None = field(None)
    fs: list[FsConfig] | None = field(None)
    pmem: list[PmemConfig] | None = field(None)
    serial: ConsoleConfig = field(factory=default_serial)
    console: ConsoleConfig = field(factory=default_console)
    debug_console: DebugConsoleConfig = field(factory=default_debug_console)
    devices: list[DeviceConfig] | None = field(None)
    user_devices: list[UserDeviceConfig] | None = field(None)
    vdpa: list[VdpaConfig] | None = field(None)
    vsock: VsockConfig | None = field(None)
    pvpanic: bool = field(False)
    iommu: bool = field(False)
    sgx_epc: list[SgxEpcConfig] | None = field(None)
    numa: list[NumaConfig] | None = field(None)
    watchdog: bool = field(False)
    pci_segments: list[PciSegmentConfig] | None = field(None)
    platform: PlatformConfig | None = field(None)
    tpm: TpmConfig | None = field(None)

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
    fds: list[int] | None = field(None, kind="fd")


@dataclasses.dataclass(kw_only=True)
class RestoreConfig:
    """``--restore`` and the ``vm.restore`` body."""

    source_url: str = field()
    prefault: bool = field(False)
    net_fds: list[RestoredNetConfig] | None = field(None)
    resume: bool = field(False)


@dataclasses.dataclass(kw_only=True)
class EndpointConfig:
    """``--api-socket``, ``--event-monitor``, ``--gdb``: a path, or an inherited descriptor."""

    path: str | None = field(None)
    fd: int | None = field(None, kind="i32")


@dataclasses.dataclass(kw_only=True)
class ProfileConfig:
    """``--profile`` (a vmsh addition): sample the guest's instruction pointers."""

    #: where the report goes when the VM stops (None: the log)
    path: str | None = field(None)
    hz: int = field(200, kind="u32")
    #: the guest kernel's System.map, to report by symbol
    system_map: str | None = field(None)
