"""Launcher option strings to config objects: one parser per ``--option``.

Each parser takes the option's ``key=value,...`` string and returns its config dataclass.
Errors read as cloud-hypervisor's: ``Error parsing --disk`` with the grammar error
(``Unknown option: foo``) chained as its cause. :data:`OPTION_PARSERS` maps an option name
to its parser and its syntax string, which is also the launcher's help text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from vmsh.config import model as m
from vmsh.config.options import (
    OptionParser,
    byte_sized,
    choice,
    integer,
    integer_list,
    ipv4,
    mac_address,
    string_list,
    toggle,
    tuple_list,
)
from vmsh.errors import OptionParseError

T = TypeVar("T")

_u8, _u16, _u32, _u64, _usize, _i32 = (integer(k) for k in ("u8", "u16", "u32", "u64", "usize", "i32"))

RATE_LIMIT_KEYS = ("bw_size", "bw_one_time_burst", "bw_refill_time",
                   "ops_size", "ops_one_time_burst", "ops_refill_time")
RATE_LIMIT_SYNTAX = (
    "bw_size=<bytes>,bw_one_time_burst=<bytes>,bw_refill_time=<ms>,"
    "ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>"
)

#: option name -> (parser, syntax)
OPTION_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {}


def option(name: str, syntax: str) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    """Register the parser of ``--name`` and wrap its errors as ``Error parsing --name``."""

    def wrap(func: Callable[[str], T]) -> Callable[[str], T]:
        @functools.wraps(func)
        def parse(text: str) -> T:
            try:
                return func(text)
            except OptionParseError as err:
                raise OptionParseError(f"Error parsing --{name}") from err

        OPTION_PARSERS[name] = (parse, syntax)
        return parse

    return wrap


def _missing(what: str) -> OptionParseError:
    return OptionParseError(f"{what} missing")


def _required(parser: OptionParser, key: str, what: str | None = None) -> str:
    """The value of a key the option cannot do without (``<what> missing`` otherwise)."""
    value = parser.get(key)
    if value is None:
        raise _missing(what or key)
    return value


def _flag(parser: OptionParser, key: str) -> bool:
    return parser.convert(key, toggle) or False


def _rate_limiter(parser: OptionParser) -> m.RateLimiterConfig | None:
    """The rate limiter of the ``bw_*``/``ops_*`` keys; a bucket exists only with a size and a refill time."""

    def bucket(prefix: str) -> m.TokenBucketConfig | None:
        size = parser.convert(f"{prefix}_size", _u64) or 0
        burst = parser.convert(f"{prefix}_one_time_burst", _u64) or 0
        refill = parser.convert(f"{prefix}_refill_time", _u64) or 0
        if size == 0 or refill == 0:
            return None
        return m.TokenBucketConfig(size=size, one_time_burst=burst, refill_time=refill)

    bandwidth, ops = bucket("bw"), bucket("ops")
    if bandwidth is None and ops is None:
        return None
    return m.RateLimiterConfig(bandwidth=bandwidth, ops=ops)


# --- cpus, platform, memory ------------------------------------------------------------------


def _topology(value: str) -> m.CpuTopology:
    parts = value.split(":")
    if len(parts) != 4:
        raise ValueError(value)
    t, c, d, p = (_u8(part) for part in parts)
    return m.CpuTopology(threads_per_core=t, cores_per_die=c, dies_per_package=d, packages=p)


@option(
    "cpus",
    "boot=<boot_vcpus>,max=<max_vcpus>,"
    "topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>,"
    "kvm_hyperv=on|off,max_phys_bits=<maximum_number_of_physical_bits>,"
    "affinity=<list_of_vcpus_with_their_associated_cpuset>,"
    "features=<list_of_features_to_enable>",
)
def parse_cpus(text: str) -> m.CpusConfig:
    p = OptionParser("boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features").parse(text)
    boot = p.convert("boot", _u8)
    boot = m.DEFAULT_VCPUS if boot is None else boot
    max_vcpus = p.convert("max", _u8)
    affinity = p.convert("affinity", tuple_list(_u8, integer_list("usize")))
    features = m.CpuFeatures()
    for feature in p.convert("features", string_list) or []:
        if feature == "amx":
            features.amx = True
        else:
            raise OptionParseError(f"Invalid feature in --cpus features list: {feature}")
    max_phys_bits = p.convert("max_phys_bits", _u8)
    return m.CpusConfig(
        boot_vcpus=boot,
        max_vcpus=boot if max_vcpus is None else max_vcpus,
        topology=p.convert("topology", _topology),
        kvm_hyperv=_flag(p, "kvm_hyperv"),
        max_phys_bits=m.DEFAULT_MAX_PHYS_BITS if max_phys_bits is None else max_phys_bits,
        affinity=[m.CpuAffinity(vcpu=v, host_cpus=cpus) for v, cpus in affinity] if affinity is not None else None,
        features=features,
    )


@option(
    "platform",
    "num_pci_segments=<num_pci_segments>,iommu_segments=<list_of_segments>,"
    "serial_number=<dmi_device_serial_number>,uuid=<dmi_device_uuid>,oem_strings=<list_of_strings>",
)
def parse_platform(text: str) -> m.PlatformConfig:
    p = OptionParser(
        "num_pci_segments", "iommu_segments", "serial_number", "uuid", "oem_strings",
        "system_serial_number", "system_uuid",
    ).parse(text)
    num = p.convert("num_pci_segments", _u16)
    return m.PlatformConfig(
        num_pci_segments=m.DEFAULT_NUM_PCI_SEGMENTS if num is None else num,
        iommu_segments=p.convert("iommu_segments", integer_list("u16")),
        serial_number=p.get("system_serial_number") or p.get("serial_number"),
        uuid=p.get("system_uuid") or p.get("uuid"),
        oem_strings=p.convert("oem_strings", string_list),
    )


_hotplug_method = choice({"acpi": m.HotplugMethod.ACPI, "virtio-mem": m.HotplugMethod.VIRTIO_MEM})


@option(
    "memory",
    "size=<guest_memory_size>,mergeable=on|off,shared=on|off,hugepages=on|off,"
    "hugepage_size=<hugepage_size>,hotplug_method=acpi|virtio-mem,"
    "hotplug_size=<hotpluggable_memory_size>,hotplugged_size=<hotplugged_memory_size>,"
    "prefault=on|off,thp=on|off",
)
def parse_memory(text: str) -> m.MemoryConfig:
    p = OptionParser(
        "size", "file", "mergeable", "hotplug_method", "hotplug_size", "hotplugged_size",
        "shared", "hugepages", "hugepage_size", "prefault", "thp",
    ).parse(text)
    size = p.convert("size", byte_sized)
    thp = p.convert("thp", toggle)
    return m.MemoryConfig(
        size=(m.DEFAULT_MEMORY_MB << 20) if size is None else size,
        mergeable=_flag(p, "mergeable"),
        hotplug_method=p.convert("hotplug_method", _hotplug_method) or m.HotplugMethod.ACPI,
        hotplug_size=p.convert("hotplug_size", byte_sized),
        hotplugged_size=p.convert("hotplugged_size", byte_sized),
        shared=_flag(p, "shared"),
        hugepages=_flag(p, "hugepages"),
        hugepage_size=p.convert("hugepage_size", byte_sized),
        prefault=_flag(p, "prefault"),
        thp=True if thp is None else thp,
    )


@option(
    "memory-zone",
    "size=<guest_memory_region_size>,file=<backing_file>,shared=on|off,hugepages=on|off,"
    "hugepage_size=<hugepage_size>,host_numa_node=<node_id>,id=<zone_identifier>,"
    "hotplug_size=<hotpluggable_memory_size>,hotplugged_size=<hotplugged_memory_size>,"
    "prefault=on|off",
)
def parse_memory_zone(text: str) -> m.MemoryZoneConfig:
    p = OptionParser(
        "size", "file", "shared", "hugepages", "hugepage_size", "host_numa_node", "id",
        "hotplug_size", "hotplugged_size", "prefault",
    ).parse(text)
    zone_id = _required(p, "id")
    size = p.convert("size", byte_sized)
    return m.MemoryZoneConfig(
        id=zone_id,
        size=(m.DEFAULT_MEMORY_MB << 20) if size is None else size,
        file=p.get("file"),
        shared=_flag(p, "shared"),
        hugepages=_flag(p, "hugepages"),
        hugepage_size=p.convert("hugepage_size", byte_sized),
        host_numa_node=p.convert("host_numa_node", _u32),
        hotplug_size=p.convert("hotplug_size", byte_sized),
        hotplugged_size=p.convert("hotplugged_size", byte_sized),
        prefault=_flag(p, "prefault"),
    )


@option("rate-limit-group", RATE_LIMIT_SYNTAX + ",id=<device_id>")
def parse_rate_limit_group(text: str) -> m.RateLimiterGroupConfig:
    p = OptionParser(*RATE_LIMIT_KEYS, "id").parse(text)
    limiter = _rate_limiter(p) or m.RateLimiterConfig()
    return m.RateLimiterGroupConfig(id=p.get("id") or "", rate_limiter_config=limiter)


# --- block and network --------------------------------------------------------------------------


@option(
    "disk",
    "path=<disk_image_path>,readonly=on|off,direct=on|off,iommu=on|off,"
    "num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,"
    "vhost_user=on|off,socket=<vhost_user_socket_path>,"
    + RATE_LIMIT_SYNTAX
    + ",id=<device_id>,pci_segment=<segment_id>,rate_limit_group=<group_id>,"
    "queue_affinity=<list_of_queue_indices_with_their_associated_cpuset>,serial=<serial_number>",
)
def parse_disk(text: str) -> m.DiskConfig:
    p = OptionParser(
        "path", "readonly", "direct", "iommu", "queue_size", "num_queues", "vhost_user", "socket",
        *RATE_LIMIT_KEYS, "id", "_disable_io_uring", "_disable_aio", "pci_segment", "serial",
        "rate_limit_group", "queue_affinity",
    ).parse(text)
    num_queues = p.convert("num_queues", _usize)
    queue_size = p.convert("queue_size", _u16)
    affinity = p.convert("queue_affinity", tuple_list(_u16, integer_list("usize")))
    return m.DiskConfig(
        path=p.get("path"),
        readonly=_flag(p, "readonly"),
        direct=_flag(p, "direct"),
        iommu=_flag(p, "iommu"),
        num_queues=m.DEFAULT_DISK_NUM_QUEUES if num_queues is None else num_queues,
        queue_size=m.DEFAULT_DISK_QUEUE_SIZE if queue_size is None else queue_size,
        vhost_user=_flag(p, "vhost_user"),
        vhost_socket=p.get("socket"),
        rate_limit_group=p.get("rate_limit_group"),
        rate_limiter_config=_rate_limiter(p),
        id=p.get("id"),
        disable_io_uring=_flag(p, "_disable_io_uring"),
        disable_aio=_flag(p, "_disable_aio"),
        pci_segment=p.convert("pci_segment", _u16) or 0,
        serial=p.get("serial"),
        queue_affinity=(
            [m.VirtQueueAffinity(queue_index=q, host_cpus=cpus) for q, cpus in affinity]
            if affinity is not None
            else None
        ),
    )


@option(
    "net",
    "tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,fd=<fd1,fd2...>,iommu=on|off,"
    "num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,"
    "vhost_user=<vhost_user_enable>,socket=<vhost_user_socket_path>,vhost_mode=client|server,"
    + RATE_LIMIT_SYNTAX
    + ",pci_segment=<segment_id>,offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off",
)
def parse_net(text: str) -> m.NetConfig:
    p = OptionParser(
        "tap", "ip", "mask", "mac", "host_mac", "mtu", "iommu", "queue_size", "num_queues",
        "vhost_user", "socket", "vhost_mode", "id", "fd", *RATE_LIMIT_KEYS, "pci_segment",
        "offload_tso", "offload_ufo", "offload_csum",
    ).parse(text)
    num_queues = p.convert("num_queues", _usize)
    queue_size = p.convert("queue_size", _u16)
    mode = choice({"client": m.VhostMode.CLIENT, "server": m.VhostMode.SERVER})

    def on_by_default(key: str) -> bool:
        value = p.convert(key, toggle)
        return True if value is None else value

    return m.NetConfig(
        tap=p.get("tap"),
        ip=p.convert("ip", ipv4) or m.DEFAULT_NET_IP,
        mask=p.convert("mask", ipv4) or m.DEFAULT_NET_MASK,
        mac=p.convert("mac", mac_address),
        host_mac=p.convert("host_mac", mac_address),
        mtu=p.convert("mtu", _u16),
        iommu=_flag(p, "iommu"),
        num_queues=m.DEFAULT_NET_NUM_QUEUES if num_queues is None else num_queues,
        queue_size=m.DEFAULT_NET_QUEUE_SIZE if queue_size is None else queue_size,
        vhost_user=_flag(p, "vhost_user"),
        vhost_socket=p.get("socket"),
        vhost_mode=p.convert("vhost_mode", mode) or m.VhostMode.CLIENT,
        id=p.get("id"),
        fds=p.convert("fd", integer_list("i32")),
        rate_limiter_config=_rate_limiter(p),
        pci_segment=p.convert("pci_segment", _u16) or 0,
        offload_tso=on_by_default("offload_tso"),
        offload_ufo=on_by_default("offload_ufo"),
        offload_csum=on_by_default("offload_csum"),
    )


# --- other virtio devices ---------------------------------------------------------------------------


@option("rng", "src=<entropy_source_path>,iommu=on|off")
def parse_rng(text: str) -> m.RngConfig:
    p = OptionParser("src", "iommu").parse(text)
    return m.RngConfig(src=p.get("src") or m.DEFAULT_RNG_SOURCE, iommu=_flag(p, "iommu"))


@option("balloon", "size=<balloon_size>,deflate_on_oom=on|off,free_page_reporting=on|off")
def parse_balloon(text: str) -> m.BalloonConfig:
    p = OptionParser("size", "deflate_on_oom", "free_page_reporting").parse(text)
    return m.BalloonConfig(
        size=p.convert("size", byte_sized) or 0,
        deflate_on_oom=_flag(p, "deflate_on_oom"),
        free_page_reporting=_flag(p, "free_page_reporting"),
    )


FS_MAX_TAG_LEN = 36


@option(
    "fs",
    "tag=<tag_name>,socket=<socket_path>,num_queues=<number_of_queues>,"
    "queue_size=<size_of_each_queue>,id=<device_id>,pci_segment=<segment_id>",
)
def parse_fs(text: str) -> m.FsConfig:
    p = OptionParser("tag", "queue_size", "num_queues", "socket", "id", "pci_segment").parse(text)
    tag = _required(p, "tag")
    if len(tag.encode()) > FS_MAX_TAG_LEN:
        raise OptionParseError(f"max tag length is {FS_MAX_TAG_LEN}")
    socket = _required(p, "socket")
    num_queues = p.convert("num_queues", _usize)
    queue_size = p.convert("queue_size", _u16)
    return m.FsConfig(
        tag=tag,
        socket=socket,
        num_queues=m.DEFAULT_FS_NUM_QUEUES if num_queues is None else num_queues,
        queue_size=m.DEFAULT_FS_QUEUE_SIZE if queue_size is None else queue_size,
        id=p.get("id"),
        pci_segment=p.convert("pci_segment", _u16) or 0,
    )


@option(
    "pmem",
    "file=<backing_file_path>,size=<persistent_memory_size>,iommu=on|off,"
    "discard_writes=on|off,id=<device_id>,pci_segment=<segment_id>",
)
def parse_pmem(text: str) -> m.PmemConfig:
    p = OptionParser("size", "file", "iommu", "discard_writes", "id", "pci_segment").parse(text)
    file = _required(p, "file")
    return m.PmemConfig(
        file=file,
        size=p.convert("size", byte_sized),
        iommu=_flag(p, "iommu"),
        discard_writes=_flag(p, "discard_writes"),
        id=p.get("id"),
        pci_segment=p.convert("pci_segment", _u16) or 0,
    )


_CONSOLE_MODES = ("off", "pty", "tty", "null")


def _console_mode(p: OptionParser, path_keys: dict[str, str]) -> tuple[m.ConsoleOutputMode, dict[str, str]]:
    """The mode word (or the path key) that is set, and the path it names.

    ``path_keys`` maps each path-taking key (``file``, ``socket``) to the message for an
    empty path.
    """
    for word in _CONSOLE_MODES:
        if p.is_set(word):
            return m.ConsoleOutputMode.from_word(word), {}
    for key, missing in path_keys.items():
        if p.is_set(key):
            path = p.get(key)
            if path is None:
                raise OptionParseError(missing)
            return m.ConsoleOutputMode.from_word(key), {key: path}
    raise OptionParseError("invalid console mode given")


def _console(text: str) -> m.ConsoleConfig:
    p = OptionParser("file", "socket", "iommu", valueless=_CONSOLE_MODES).parse(text)
    mode, paths = _console_mode(p, {"file": "Path missing when using file console mode",
                                    "socket": "Path missing when using socket console mode"})
    return m.ConsoleConfig(file=paths.get("file"), mode=mode, iommu=_flag(p, "iommu"), socket=paths.get("socket"))


@option("serial", "off|null|pty|tty|file=</path/to/a/file>|socket=</path/to/a/file>")
def parse_serial(text: str) -> m.ConsoleConfig:
    return _console(text)


@option("console", "off|null|pty|tty|file=</path/to/a/file>,iommu=on|off")
def parse_console(text: str) -> m.ConsoleConfig:
    return _console(text)


def _io_port(value: str) -> int:
    if not value.startswith("0x"):
        raise ValueError(value)
    return _u16(str(int(value[2:], 16)))


@option("debug-console", "off|pty|tty|file=</path/to/a/file>,iobase=<port in hex>")
def parse_debug_console(text: str) -> m.DebugConsoleConfig:
    p = OptionParser("file", "iobase", valueless=_CONSOLE_MODES).parse(text)
    mode, paths = _console_mode(p, {"file": "Path missing when using file mode for debug console"})
    iobase = None
    raw = p.get("iobase")
    if raw is not None:
        try:
            iobase = _io_port(raw)
        except ValueError:
            raise OptionParseError(
                f"The IO port was not properly provided in hex or a `0x` prefix is missing: {raw}"
            ) from None
    return m.DebugConsoleConfig(file=paths.get("file"), mode=mode, iobase=iobase)


@option(
    "device",
    "path=<device_path>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>",
)
def parse_device(text: str) -> m.DeviceConfig:
    p = OptionParser("path", "id", "iommu", "pci_segment", "x_nv_gpudirect_clique").parse(text)
    path = _required(p, "path")
    return m.DeviceConfig(
        path=path,
        iommu=_flag(p, "iommu"),
        id=p.get("id"),
        pci_segment=p.convert("pci_segment", _u16) or 0,
        x_nv_gpudirect_clique=p.convert("x_nv_gpudirect_clique", _u8),
    )


@option("user-device", "socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>")
def parse_user_device(text: str) -> m.UserDeviceConfig:
    p = OptionParser("socket", "id", "pci_segment").parse(text)
    socket = _required(p, "socket")
    return m.UserDeviceConfig(socket=socket, id=p.get("id"), pci_segment=p.convert("pci_segment", _u16) or 0)


@option(
    "vdpa",
    "path=<device_path>,num_queues=<number_of_queues>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>",
)
def parse_vdpa(text: str) -> m.VdpaConfig:
    p = OptionParser("path", "num_queues", "iommu", "id", "pci_segment").parse(text)
    path = _required(p, "path")
    num_queues = p.convert("num_queues", _usize)
    return m.VdpaConfig(
        path=path,
        num_queues=m.DEFAULT_VDPA_NUM_QUEUES if num_queues is None else num_queues,
        iommu=_flag(p, "iommu"),
        id=p.get("id"),
        pci_segment=p.convert("pci_segment", _u16) or 0,
    )


@option(
    "vsock",
    "cid=<context_id>,socket=<socket_path>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>",
)
def parse_vsock(text: str) -> m.VsockConfig:
    p = OptionParser("socket", "cid", "iommu", "id", "pci_segment").parse(text)
    socket = _required(p, "socket")
    cid = p.convert("cid", _u32)
    if cid is None:
        raise _missing("cid")
    return m.VsockConfig(
        cid=cid,
        socket=socket,
        iommu=_flag(p, "iommu"),
        id=p.get("id"),
        pci_segment=p.convert("pci_segment", _u16) or 0,
    )


# --- topology and platform devices ----------------------------------------------------------------


@option(
    "numa",
    "guest_numa_id=<node_id>,cpus=<cpus_id>,distances=<list_of_distances_to_destination_nodes>,"
    "memory_zones=<list_of_memory_zones>,sgx_epc_sections=<list_of_sgx_epc_sections>,"
    "pci_segments=<list_of_pci_segments>",
)
def parse_numa(text: str) -> m.NumaConfig:
    p = OptionParser(
        "guest_numa_id", "cpus", "distances", "memory_zones", "sgx_epc_sections", "pci_segments"
    ).parse(text)
    guest_numa_id = p.convert("guest_numa_id", _u32)
    if guest_numa_id is None:
        raise OptionParseError("guest_numa_id is required for all NUMA nodes")
    distances = p.convert("distances", tuple_list(_u32, _u8))
    return m.NumaConfig(
        guest_numa_id=guest_numa_id,
        cpus=p.convert("cpus", integer_list("u8")),
        distances=(
            [m.NumaDistance(destination=d, distance=v) for d, v in distances] if distances is not None else None
        ),
        memory_zones=p.convert("memory_zones", string_list),
        sgx_epc_sections=p.convert("sgx_epc_sections", string_list),
        pci_segments=p.convert("pci_segments", integer_list("u16")),
    )


@option(
    "pci-segment",
    "pci_segment=<segment_id>,mmio32_aperture_weight=<scale>,mmio64_aperture_weight=<scale>",
)
def parse_pci_segment(text: str) -> m.PciSegmentConfig:
    p = OptionParser("pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight").parse(text)
    weight32 = p.convert("mmio32_aperture_weight", _u32)
    weight64 = p.convert("mmio64_aperture_weight", _u32)
    return m.PciSegmentConfig(
        pci_segment=p.convert("pci_segment", _u16) or 0,
        mmio32_aperture_weight=m.DEFAULT_PCI_SEGMENT_APERTURE_WEIGHT if weight32 is None else weight32,
        mmio64_aperture_weight=m.DEFAULT_PCI_SEGMENT_APERTURE_WEIGHT if weight64 is None else weight64,
    )


@option("tpm", "(UNIX Domain Socket from swtpm) socket=</path/to/a/socket>")
def parse_tpm(text: str) -> m.TpmConfig:
    p = OptionParser("socket").parse(text)
    socket = _required(p, "socket", "path")
    return m.TpmConfig(socket=socket)


@option("sgx-epc", "id=<epc_section_identifier>,size=<epc_section_size>,prefault=on|off")
def parse_sgx_epc(text: str) -> m.SgxEpcConfig:
    p = OptionParser("id", "size", "prefault").parse(text)
    epc_id = _required(p, "id")
    return m.SgxEpcConfig(id=epc_id, size=p.convert("size", byte_sized) or 0, prefault=_flag(p, "prefault"))


@option(
    "restore",
    "source_url=<source_url>,prefault=on|off,"
    "net_fds=<list_of_net_ids_with_their_associated_fds>,resume=true|false",
)
def parse_restore(text: str) -> m.RestoreConfig:
    p = OptionParser("source_url", "prefault", "net_fds", "resume").parse(text)
    source_url = _required(p, "source_url")
    net_fds = p.convert("net_fds", tuple_list(str, integer_list("i32")))
    return m.RestoreConfig(
        source_url=source_url,
        prefault=_flag(p, "prefault"),
        net_fds=(
            [m.RestoredNetConfig(id=i, num_fds=len(fds), fds=fds) for i, fds in net_fds]
            if net_fds is not None
            else None
        ),
        resume=_flag(p, "resume"),
    )


# --- VMM-level options ---------------------------------------------------------------------------


@option("api-socket", "path=</path/to/a/file> or fd=<fd>")
def parse_api_socket(text: str) -> m.EndpointConfig:
    p = OptionParser("path", "fd")
    try:
        p.parse(text)
    except OptionParseError:
        # cloud-hypervisor takes anything that is not key=value as the socket's path.
        return m.EndpointConfig(path=text)
    fd = p.convert("fd", _i32)
    if fd is not None:
        return m.EndpointConfig(fd=fd)
    return m.EndpointConfig(path=p.get("path") or text)


@option("event-monitor", "path=</path/to/a/file> or fd=<fd>")
def parse_event_monitor(text: str) -> m.EndpointConfig:
    p = OptionParser("path", "fd").parse(text)
    fd = p.convert("fd", _i32)
    if fd is not None:
        return m.EndpointConfig(fd=fd)
    path = p.get("path")
    if path is None:
        raise OptionParseError("path or fd required")
    return m.EndpointConfig(path=path)


@option("gdb", "path=</path/to/a/file>")
def parse_gdb(text: str) -> m.EndpointConfig:
    path = OptionParser("path").parse(text).get("path")
    if path is None:
        raise OptionParseError("path required")
    return m.EndpointConfig(path=path)


@option("profile", "path=<report_file>,hz=<samples_per_second>,system_map=</path/to/System.map>")
def parse_profile(text: str) -> m.ProfileConfig:
    p = OptionParser("path", "hz", "system_map").parse(text)
    hz = p.convert("hz", _u32)
    if hz is not None and not 1 <= hz <= 100_000:
        raise OptionParseError(f"hz must be between 1 and 100000: {hz}")
    return m.ProfileConfig(path=p.get("path"), hz=200 if hz is None else hz, system_map=p.get("system_map"))
