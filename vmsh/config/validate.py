"""Rules across the fields of a VmConfig, with cloud-hypervisor's messages, and device ids.

:func:`validate` checks a config in the order of cloud-hypervisor's ``VmConfig::validate``
and returns a validated copy: ``iommu`` derived from the devices and the platform, firmware
payloads stripped of cmdline and initramfs. :func:`assign_device_ids` then names the
devices that have no id as the device manager would (``_disk0``, ``_net1``, ...).
"""

from __future__ import annotations

import copy
import logging

from vmsh.config import model as m
from vmsh.config.model import ConsoleOutputMode
from vmsh.errors import DuplicateError, ValidationError

LOG = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 32768
MAX_NUM_PCI_SEGMENTS = 96
MAX_SERIAL_LEN = 20
MIN_MTU = 1280
#: VSOCK CIDs with a fixed meaning (any, hypervisor, local, host) and the wildcard.
SPECIAL_VSOCK_CIDS = (0, 1, 2, 0xFFFF_FFFF)
MAX_VFIO_BAR = 5


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Checker:
    """One validation pass; holds the config and the set of user-given ids."""

    def __init__(self, cfg: m.VmConfig) -> None:
        self.cfg = cfg
        self.ids: set[str] = set()
        self.boot_vcpus = cfg.cpus.boot_vcpus
        self.num_segments = cfg.num_pci_segments()
        self.iommu_segments = (cfg.platform.iommu_segments or []) if cfg.platform else []

    def identifier(self, ident: str | None) -> None:
        if ident is None:
            return
        if ident.startswith("__"):
            raise ValidationError(f"Identifier {ident} is not valid")
        if ident in self.ids:
            raise DuplicateError(f"Identifier {ident} is not unique")
        self.ids.add(ident)

    def pci_segment(self, segment: int, iommu: bool | None) -> None:
        # Without --platform there is one segment. cloud-hypervisor v40 checked only with
        # --platform, and a device on a missing segment then failed in its device manager (a
        # hot-add: a 500); it checks against the default of one segment since.
        if segment >= self.num_segments:
            raise ValidationError(f"Invalid PCI segment id: {segment}")
        if iommu is not None and segment in self.iommu_segments and not iommu:
            raise ValidationError(f"Device is on an IOMMU PCI segment ({segment}) but not placed behind IOMMU")

    def queue_count(self, count: int) -> None:
        if count > self.boot_vcpus:
            raise ValidationError(f"Queue count ({count}) must not exceed boot vCPUs ({self.boot_vcpus})")

    @staticmethod
    def queue_size(size: int) -> None:
        if not _is_power_of_two(size) or size > MAX_QUEUE_SIZE:
            raise ValidationError(f"Queue size must be a power of 2 no greater than {MAX_QUEUE_SIZE}: {size}")

    def shared_memory(self, message: str) -> None:
        if not self.cfg.backed_by_shared_memory():
            raise ValidationError(message)


def _payload(cfg: m.VmConfig) -> None:
    payload = cfg.payload
    try:
        if payload is None or (payload.firmware is None and payload.kernel is None):
            raise ValidationError("No bootitem provided: neither firmware nor kernel")
        if payload.firmware is not None and payload.kernel is not None:
            raise ValidationError("Specifying a kernel is not supported when a firmware is provided")
    except ValidationError as err:
        raise ValidationError("Payload configuration is not bootable") from err
    if payload.firmware is not None and (payload.cmdline is not None or payload.initramfs is not None):
        LOG.warning("Ignoring cmdline and initramfs: a firmware payload takes neither")
        payload.cmdline = None
        payload.initramfs = None


def _consoles(cfg: m.VmConfig) -> None:
    for console in (cfg.serial, cfg.console):
        if console.mode is ConsoleOutputMode.FILE and console.file is None:
            raise ValidationError("Path missing when using file console mode")
        if console.mode is ConsoleOutputMode.SOCKET and console.socket is None:
            raise ValidationError("Path missing when using socket console mode")
    if cfg.debug_console.mode is ConsoleOutputMode.FILE and cfg.debug_console.file is None:
        raise ValidationError("Path missing when using file mode for debug console")
    if cfg.serial.mode is ConsoleOutputMode.TTY and cfg.console.mode is ConsoleOutputMode.TTY:
        LOG.warning("Using TTY output for multiple consoles")


def _cpus(cfg: m.VmConfig) -> None:
    cpus = cfg.cpus
    if cpus.max_vcpus < cpus.boot_vcpus:
        raise ValidationError(f"Max CPUs ({cpus.max_vcpus}) lower than boot CPUs ({cpus.boot_vcpus})")
    topo = cpus.topology
    if topo is not None:
        parts = (topo.threads_per_core, topo.cores_per_die, topo.dies_per_package, topo.packages)
        if 0 in parts:
            raise ValidationError("No part of the CPU topology can be zero")
        # v40 has no limit on threads per core (the "at most 2" rule came in a later release);
        # its message says "vCPUs" (vmm/src/config.rs, ValidationError::CpuTopologyCount).
        if parts[0] * parts[1] * parts[2] * parts[3] != cpus.max_vcpus:
            raise ValidationError("Product of CPU topology parts does not match maximum vCPUs")


def _rate_limit_groups(c: _Checker) -> None:
    for group in c.cfg.rate_limit_groups or []:
        limiter = group.rate_limiter_config
        if not group.id or (limiter.bandwidth is None and limiter.ops is None):
            raise ValidationError("Invalid rate-limiter group")
        c.identifier(group.id)


def _disks(c: _Checker) -> None:
    group_ids = {g.id for g in c.cfg.rate_limit_groups or []}
    for disk in c.cfg.disks or []:
        if disk.vhost_socket is not None and disk.path is not None:
            raise ValidationError("Disk path and vhost socket both provided")
        if disk.vhost_user:
            c.shared_memory("Using vhost-user requires using shared memory or huge pages")
            if disk.vhost_socket is None:
                raise ValidationError("No socket provided when using vhost-user")
        if disk.rate_limit_group is not None and disk.rate_limit_group not in group_ids:
            raise ValidationError("Invalid rate-limiter group")
        c.queue_count(disk.num_queues)
        c.queue_size(disk.queue_size)
        if disk.queue_size <= 2:
            raise ValidationError(f"Block queue size must be greater than 2: {disk.queue_size}")
        if disk.vhost_user and disk.iommu:
            raise ValidationError("Device does not support being placed behind IOMMU")
        if disk.vhost_user and (disk.rate_limiter_config is not None or disk.rate_limit_group is not None):
            raise ValidationError("Rate limiting is not supported with vhost-user")
        if disk.rate_limiter_config is not None and disk.rate_limit_group is not None:
            raise ValidationError("Invalid rate-limiter group")
        if disk.serial is not None and len(disk.serial.encode()) > MAX_SERIAL_LEN:
            raise ValidationError(
                f"Block device serial length ({len(disk.serial.encode())}) exceeds maximum allowed length "
                f"({MAX_SERIAL_LEN})"
            )
        c.pci_segment(disk.pci_segment, disk.iommu)
        c.cfg.iommu |= disk.iommu
        c.identifier(disk.id)


def _nets(c: _Checker) -> None:
    for net in c.cfg.net or []:
        if net.vhost_user:
            c.shared_memory("Using vhost-user requires using shared memory or huge pages")
            if net.vhost_socket is None:
                raise ValidationError("No socket provided when using vhost-user")
        if net.num_queues < 2:
            raise ValidationError(f"Number of queues ({net.num_queues}) to virtio_net should be higher than 2")
        if net.fds is not None:
            if len(net.fds) * 2 != net.num_queues:
                raise ValidationError(
                    f"Number of queues ({net.num_queues}) to virtio_net does not match the number of FDs "
                    f"({len(net.fds)})"
                )
            for fd in net.fds:
                if fd <= 2:
                    raise ValidationError(f"Reserved fd number (<= 2): {fd}")
        c.queue_count(net.num_queues // 2)
        c.queue_size(net.queue_size)
        if net.vhost_user and net.iommu:
            raise ValidationError("Device does not support being placed behind IOMMU")
        if net.vhost_user and net.rate_limiter_config is not None:
            raise ValidationError("Rate limiting is not supported with vhost-user")
        if net.mtu is not None and net.mtu < MIN_MTU:
            raise ValidationError(f"Provided MTU {net.mtu} is lower than {MIN_MTU} (expected by VIRTIO specification)")
        if not net.offload_csum and (net.offload_tso or net.offload_ufo):
            raise ValidationError('"offload_tso" and "offload_ufo" depend on "offload_csum"')
        c.pci_segment(net.pci_segment, net.iommu)
        c.cfg.iommu |= net.iommu
        c.identifier(net.id)


def _fs_pmem_rng_console(c: _Checker) -> None:
    cfg = c.cfg
    for fs in cfg.fs or []:
        c.shared_memory("Using vhost-user requires using shared memory or huge pages")
        c.queue_count(fs.num_queues)
        c.queue_size(fs.queue_size)
        c.pci_segment(fs.pci_segment, None)
        c.identifier(fs.id)
    for pmem in cfg.pmem or []:
        c.pci_segment(pmem.pci_segment, pmem.iommu)
        cfg.iommu |= pmem.iommu
        c.identifier(pmem.id)
    # The v40 rng and console have no pci_segment, so no segment rule applies to them.
    cfg.iommu |= cfg.rng.iommu
    cfg.iommu |= cfg.console.iommu


def _memory(cfg: m.VmConfig) -> None:
    mem = cfg.memory
    areas: list[tuple[bool, int | None, bool]] = [(mem.hugepages, mem.hugepage_size, mem.shared)]
    areas += [(z.hugepages, z.hugepage_size, z.shared) for z in mem.zones or []]
    for hugepages, hugepage_size, shared in areas:
        if hugepage_size is not None:
            if not hugepages:
                raise ValidationError("Huge page size specified but huge pages not enabled")
            if not _is_power_of_two(hugepage_size):
                raise ValidationError(f"Huge page size is not power of 2: {hugepage_size}")
        if shared and mem.mergeable:
            raise ValidationError("Invalid to set both 'mergeable' and 'shared' for memory")


def _other_devices(c: _Checker) -> None:
    cfg = c.cfg
    for dev in cfg.user_devices or []:
        c.shared_memory("Using user devices requires using shared memory or huge pages")
        c.pci_segment(dev.pci_segment, None)
        c.identifier(dev.id)
    for vdpa in cfg.vdpa or []:
        c.pci_segment(vdpa.pci_segment, vdpa.iommu)
        cfg.iommu |= vdpa.iommu
        c.identifier(vdpa.id)
    if cfg.vsock is not None and cfg.vsock.cid in SPECIAL_VSOCK_CIDS:
        raise ValidationError(f"{cfg.vsock.cid} is a special VSOCK CID")
    if cfg.balloon is not None:
        total = cfg.memory.total_size()
        if cfg.balloon.size >= total:
            raise ValidationError(f"Balloon size ({cfg.balloon.size}) greater than RAM ({total})")
    paths: set[str] = set()
    for device in cfg.devices or []:
        if device.path in paths:
            raise DuplicateError(f"Duplicated device path: {device.path}")
        paths.add(device.path)
        c.pci_segment(device.pci_segment, device.iommu)
        cfg.iommu |= device.iommu
        c.identifier(device.id)
    if cfg.vsock is not None:
        c.pci_segment(cfg.vsock.pci_segment, cfg.vsock.iommu)
        cfg.iommu |= cfg.vsock.iommu
        c.identifier(cfg.vsock.id)
    for epc in cfg.sgx_epc or []:
        c.identifier(epc.id)


def _numa(c: _Checker) -> None:
    zone_nodes: dict[str, int] = {}
    segment_nodes: dict[int, int] = {}
    for node in c.cfg.numa or []:
        for zone in node.memory_zones or []:
            if zone in zone_nodes:
                raise ValidationError(
                    f"Memory zone: {zone} belongs to multiple NUMA nodes: {zone_nodes[zone]} and {node.guest_numa_id}"
                )
            zone_nodes[zone] = node.guest_numa_id
        for segment in node.pci_segments or []:
            if segment >= c.num_segments:
                raise ValidationError(f"Invalid PCI segment id: {segment}")
            if segment == 0 and node.guest_numa_id != 0:
                raise ValidationError(f"Default PCI segment assigned to non-zero NUMA node {node.guest_numa_id}")
            if segment in segment_nodes:
                raise ValidationError(
                    f"PCI segment: {segment} belongs to multiple NUMA nodes {segment_nodes[segment]} "
                    f"and {node.guest_numa_id}"
                )
            segment_nodes[segment] = node.guest_numa_id


def _zones_segments_platform(c: _Checker) -> None:
    cfg = c.cfg
    for zone in cfg.memory.zones or []:
        c.identifier(zone.id)
    for seg in cfg.pci_segments or []:
        if seg.pci_segment >= c.num_segments:
            raise ValidationError(f"Invalid PCI segment id: {seg.pci_segment}")
        for weight in (seg.mmio32_aperture_weight, seg.mmio64_aperture_weight):
            if weight == 0:
                raise ValidationError(f"Invalid PCI segment aperture weight: {weight}")
    if cfg.platform is not None:
        num = cfg.platform.num_pci_segments
        if num == 0 or num > MAX_NUM_PCI_SEGMENTS:
            raise ValidationError(f"Number of PCI segments ({num}) not in range of 1 to {MAX_NUM_PCI_SEGMENTS}")
        for segment in cfg.platform.iommu_segments or []:
            if segment >= num:
                raise ValidationError(f"Invalid PCI segment id: {segment}")
        if cfg.platform.iommu_segments is not None:
            cfg.iommu = True


def validate(cfg: m.VmConfig) -> m.VmConfig:
    """Check ``cfg`` and return a validated copy (``cfg`` itself is not changed).

    :raises ValidationError: with cloud-hypervisor's message for the first broken rule.
    """
    cfg = copy.deepcopy(cfg)
    _payload(cfg)
    _consoles(cfg)
    _cpus(cfg)
    checker = _Checker(cfg)
    _rate_limit_groups(checker)
    _disks(checker)
    _nets(checker)
    _fs_pmem_rng_console(checker)
    _memory(cfg)
    _other_devices(checker)
    _numa(checker)
    _zones_segments_platform(checker)
    return cfg


#: (list attribute, id prefix) in the order the device manager creates the devices.
_AUTO_ID_ORDER = (
    ("disks", "_disk"),
    ("net", "_net"),
    ("fs", "_fs"),
    ("pmem", "_pmem"),
    ("vsock", "_vsock"),
    ("vdpa", "_vdpa"),
    ("devices", "_vfio"),
    ("user_devices", "_vfio_user"),
)


def user_ids(cfg: m.VmConfig) -> set[str]:
    """Every id the configuration names itself (devices, zones, groups, EPC sections)."""
    ids: set[str] = set()
    for attr, _ in _AUTO_ID_ORDER:
        value = getattr(cfg, attr)
        for item in value if isinstance(value, list) else [value] if value else []:
            if item.id is not None:
                ids.add(item.id)
    ids.update(z.id for z in cfg.memory.zones or [])
    ids.update(g.id for g in cfg.rate_limit_groups or [])
    ids.update(e.id for e in cfg.sgx_epc or [])
    return ids


def assign_device_ids(cfg: m.VmConfig) -> m.VmConfig:
    """Return a copy of ``cfg`` where every device without an id has one.

    One counter runs over all device kinds, in creation order, skipping names the
    configuration already uses: ``--disk a --disk b --net c`` gives ``_disk0``,
    ``_disk1``, ``_net2``.
    """
    cfg = copy.deepcopy(cfg)
    taken = user_ids(cfg)
    counter = 0
    for attr, prefix in _AUTO_ID_ORDER:
        value = getattr(cfg, attr)
        for item in value if isinstance(value, list) else [value] if value else []:
            if item.id is not None:
                continue
            while True:
                name = f"{prefix}{counter}"
                counter += 1
                if name not in taken:
                    break
            item.id = name
            taken.add(name)
    return cfg
