"""The PCI devices a VmConfig asks for, created and plugged into the ``DeviceManager``.

In cloud-hypervisor's creation order (console, disks, nets, rng, fs, pmem, vsock, balloon,
watchdog, the virtio-iommu, then pvpanic), so slots come out as its do. A device with
``iommu=on`` (or on one of ``--platform iommu_segments``) is placed behind the virtio-iommu. Every
host resource (image file, tap, vhost-user backend connection, entropy source, pmem file, vsock
socket) is opened here, and a failure names the option and the device id.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmsh.config import model as m
from vmsh.devices.base import Trigger
from vmsh.devices.pvpanic import PvPanicDevice
from vmsh.devices.ratelimit import RateLimiter, RateLimiterGroup
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.engine.console import ConsoleBackend
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.memory_manager import DEFAULT_ZONE, hotplug_areas, shared_memory_table
from vmsh.engine.pci_device import PciDevice
from vmsh.errors import DeviceError, VmshError

# The device models a config names are imported where they are created: a VM (or a restored
# snapshot) without them does not pay for importing them (``ci/bench/restore_imports.py``).
if TYPE_CHECKING:
    from vmsh.devices.vhost_user.blk import VhostUserBlk
    from vmsh.devices.vhost_user.fs import VhostUserFs
    from vmsh.devices.vhost_user.net import VhostUserNet
    from vmsh.devices.virtio.block import VirtioBlock
    from vmsh.devices.virtio.console import VirtioConsole
    from vmsh.devices.virtio.net import VirtioNet
    from vmsh.devices.virtio.pmem import VirtioPmem

LOG = logging.getLogger(__name__)

RNG_ID = "__rng"
CONSOLE_ID = "__console"
BALLOON_ID = "__balloon"
WATCHDOG_ID = "__watchdog"
PVPANIC_ID = "__pvpanic"
IOMMU_ID = "__iommu"


#: each VM's ``--rate-limit-group`` limiters, shared by the disks that name them (hot-plugged too)
_RATE_LIMIT_GROUPS: weakref.WeakKeyDictionary[DeviceManager, dict[str, RateLimiterGroup]] = weakref.WeakKeyDictionary()


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (what cloud-hypervisor picks when none is set)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


@dataclass
class PlatformHooks:
    """What devices report to the VM: console output, a guest panic, a watchdog reset."""

    console: ConsoleBackend | None = None
    on_panic: Callable[[int], object] | None = None
    reset: Trigger | None = None
    #: set to the created console device, so its backend's input can be fed to it
    console_device: VirtioConsole | None = None


def add_config_devices(manager: DeviceManager, cfg: m.VmConfig, hooks: PlatformHooks) -> None:
    """Create and plug every PCI device of ``cfg``."""
    _RATE_LIMIT_GROUPS[manager] = {g.id: RateLimiterGroup.from_config(g) for g in cfg.rate_limit_groups or []}
    table = None
    if cfg.iommu:
        # the table first: the devices behind the IOMMU translate through it from their first access
        table = manager.enable_iommu(tuple(cfg.platform.iommu_segments or ()) if cfg.platform else ())
    if hooks.console is not None:
        backend = hooks.console

        def console() -> VirtioConsole:
            from vmsh.devices.virtio.console import VirtioConsole

            hooks.console_device = VirtioConsole(backend.write)
            return hooks.console_device

        _add(manager, CONSOLE_ID, "--console", console, iommu=cfg.console.iommu)
    for disk in cfg.disks or []:
        add_item(manager, "disks", disk)
    for net in cfg.net or []:
        add_item(manager, "net", net)
    if cfg.rng is not None:
        _add(manager, RNG_ID, "--rng", lambda: VirtioRng(cfg.rng.src), iommu=cfg.rng.iommu)
    for fs in cfg.fs or []:
        add_item(manager, "fs", fs)
    for pmem in cfg.pmem or []:
        add_item(manager, "pmem", pmem)
    if cfg.vsock is not None:
        add_item(manager, "vsock", cfg.vsock)
    for area in hotplug_areas(cfg.memory):
        if area.method is m.HotplugMethod.VIRTIO_MEM:
            from vmsh.devices.virtio.mem import VirtioMem

            # cloud-hypervisor's order (virtio-mem after vsock) and id (the memory zone's)
            _add(manager, area.zone, "--memory hotplug_method=virtio-mem",
                 functools.partial(VirtioMem, area.base, area.size, _hotplugged(cfg.memory, area.zone),
                                   _numa_node(cfg, area.zone)))
    if cfg.balloon is not None:
        from vmsh.devices.virtio.balloon import VirtioBalloon

        balloon = cfg.balloon
        _add(manager, BALLOON_ID, "--balloon", lambda: VirtioBalloon.from_config(balloon))
    if cfg.watchdog:
        assert hooks.reset is not None
        reset = hooks.reset
        from vmsh.devices.virtio.watchdog import VirtioWatchdog

        _add(manager, WATCHDOG_ID, "--watchdog", lambda: VirtioWatchdog(reset))
    if table is not None:
        from vmsh.devices.virtio.iommu import VirtioIommu

        iommu = VirtioIommu(table)
        try:
            manager.add_iommu(IOMMU_ID, iommu)
        except BaseException:
            iommu.close()
            raise
    if cfg.pvpanic:
        try:
            manager.add_pci(PVPANIC_ID, PvPanicDevice(hooks.on_panic))
        except DeviceError as err:
            raise VmshError(f"--pvpanic: cannot create {PVPANIC_ID}") from err


def _hotplugged(mem: m.MemoryConfig, zone_id: str) -> int:
    """What zone ``zone_id``'s virtio-mem device asks the guest to plug at boot."""
    if zone_id == DEFAULT_ZONE:
        return mem.hotplugged_size or 0
    return next((z.hotplugged_size or 0 for z in mem.zones or [] if z.id == zone_id), 0)


def _numa_node(cfg: m.VmConfig, zone_id: str) -> int | None:
    """The guest NUMA node whose ``memory_zones`` list zone ``zone_id`` (its virtio-mem device
    offers VIRTIO_MEM_F_ACPI_PXM with it, as cloud-hypervisor's does), None without one."""
    return next((n.guest_numa_id for n in cfg.numa or [] if zone_id in (n.memory_zones or [])), None)


#: the option of each config list a device can be added from
_OPTIONS = {"disks": "--disk", "net": "--net", "fs": "--fs", "pmem": "--pmem", "vsock": "--vsock"}


def unsupported_item(kind: str, item: Any) -> list[str]:
    """The keys of one ``disks``/``net``/``fs``/``pmem``/``vsock`` item that vmsh cannot act on, each
    with why (the builder refuses them cold, :func:`add_item` when hot-added)."""
    missing = []
    if kind == "net" and item.vhost_user:
        if item.num_queues > 2:
            missing.append("--net vhost_user=on with num_queues above 2 (vmsh's vhost-user-net has one queue pair)")
        # cloud-hypervisor ignores these for a vhost-user net; vmsh never accepts what it ignores
        missing.extend(f"--net {key} with vhost_user=on (the backend moves the packets: there is no tap)"
                       for key, given in (("tap", item.tap), ("fd", item.fds), ("host_mac", item.host_mac)) if given)
    if kind == "disks" and item.vhost_user:
        missing.extend(f"--disk {key} with vhost_user=on (the backend's export decides it)"
                       for key, given in (("readonly", item.readonly), ("direct", item.direct),
                                          ("serial", item.serial)) if given)
    if kind == "disks" and item.queue_affinity:
        missing.append("--disk queue_affinity (vmsh serves every queue of every disk on its one I/O thread)")
    return missing


def add_item(manager: DeviceManager, kind: str, item: Any, *, hotplug: bool = False,
             slot: int | None = None) -> PciDevice:
    """Create and plug one ``disks``/``net``/``fs``/``pmem``/``vsock`` item of a config, in ``slot`` or
    the first free one (cold, or into a running VM: then a disk's BAR is 64-bit like every
    hotplugged device's).

    :raises VmshError: for an item with a key vmsh cannot act on (:func:`unsupported_item`).
    """
    missing = unsupported_item(kind, item)
    if missing:
        raise VmshError("Not supported by vmsh: " + ", ".join(missing))
    iommu = bool(getattr(item, "iommu", False))
    if iommu and hotplug and item.pci_segment not in manager.iommu_segments:
        # cloud-hypervisor's InvalidIommuHotplug: the VIOT table, written at boot, lists only
        # the boot devices and the IOMMU segments' slots
        raise VmshError("Invalid IOMMU hotplug: a device hot-added behind the IOMMU must be on one of "
                        "--platform iommu_segments")
    where: dict[str, Any] = {"segment": item.pci_segment, "slot": slot, "iommu": iommu}
    if kind == "disks" and item.vhost_user:
        return _add(manager, item.id, "--disk", lambda: _vhost_user_blk(manager, item),
                    bar64=hotplug or item.pci_segment != 0, **where)
    if kind == "disks":
        return _add(manager, item.id, "--disk", lambda: _block(manager, item),
                    bar64=hotplug or item.pci_segment != 0, **where)
    if kind == "net" and item.vhost_user:
        return _add(manager, item.id, "--net", lambda: _vhost_user_net(manager, item), **where)
    if kind == "net":
        return _add(manager, item.id, "--net", lambda: _net(manager, item), **where)
    if kind == "fs":
        return _add(manager, item.id, "--fs", lambda: _vhost_user_fs(manager, item), **where)
    if kind == "pmem":
        return _add(manager, item.id, "--pmem", lambda: _pmem(manager, item), **where)
    if kind == "vsock":
        from vmsh.devices.virtio.vsock import VirtioVsock

        return _add(manager, item.id, "--vsock", lambda: VirtioVsock.from_config(item, manager.loop), **where)
    raise VmshError(f"{kind}: these devices cannot be plugged into a running VM")


def _add(manager: DeviceManager, dev_id: str | None, option: str, make: Any, *, segment: int = 0,
         slot: int | None = None, bar64: bool = True, iommu: bool = False) -> PciDevice:
    assert dev_id is not None, "normalize() names every device"
    try:
        device = make()
    except (DeviceError, OSError, ValueError) as err:
        raise VmshError(f"{option}: cannot create {dev_id}") from err
    try:
        return manager.add_virtio(dev_id, device, segment=segment, slot=slot, bar64=bar64, iommu=iommu)
    except BaseException:
        device.close()
        raise


def _block(manager: DeviceManager, disk: m.DiskConfig) -> VirtioBlock:
    from vmsh.devices.virtio.block import VirtioBlock

    if disk.path is None:
        raise DeviceError("a disk needs path=")
    if disk.rate_limit_group is not None:
        group = _RATE_LIMIT_GROUPS.get(manager, {}).get(disk.rate_limit_group)
        if group is None:
            raise DeviceError(f"rate-limit group {disk.rate_limit_group} is not defined")
        limiter: RateLimiter | None = group.limiter
    else:
        limiter = RateLimiter.from_config(disk.rate_limiter_config)
    return VirtioBlock(disk.path, readonly=disk.readonly, direct=disk.direct, num_queues=disk.num_queues,
                       queue_size=disk.queue_size, serial=disk.serial, rate_limiter=limiter, watcher=manager.loop,
                       disable_io_uring=disk.disable_io_uring, disable_aio=disk.disable_aio,
                       dev_id=disk.id or "_disk")


def _net(manager: DeviceManager, net: m.NetConfig) -> VirtioNet:
    from vmsh.devices.backends.tap import Tap, parse_mac
    from vmsh.devices.virtio.net import VirtioNet, format_mac

    pairs = max(1, net.num_queues // 2)
    if net.fds:
        tap = Tap(net.tap or f"fd{net.fds[0]}", list(net.fds))  # a migration's tap keeps its name
    else:
        tap = Tap.open(net.tap, pairs)
        try:
            tap.configure(ip=net.ip, mask=net.mask, mtu=net.mtu, mac=net.host_mac)
        except DeviceError:
            tap.close()
            raise
    if not net.mac:
        # Written back into the config, as cloud-hypervisor does: vm.info shows it and a
        # snapshot's config.json brings the same MAC back on restore.
        net.mac = format_mac(random_mac())
    mac = parse_mac(net.mac)
    limits = net.rate_limiter_config
    return VirtioNet(tap, mac, manager.loop, queue_size=net.queue_size, mtu=net.mtu,
                     offload_csum=net.offload_csum, offload_tso=net.offload_tso, offload_ufo=net.offload_ufo,
                     rate_limiter=(lambda: RateLimiter.from_config(limits)) if limits is not None else None)


def _vhost_user_blk(manager: DeviceManager, disk: m.DiskConfig) -> VhostUserBlk:
    from vmsh.devices.vhost_user.blk import VhostUserBlk

    assert disk.id is not None and disk.vhost_socket is not None, "normalize() and validate() see to it"
    memory = manager.memory
    return VhostUserBlk(disk.id, disk.vhost_socket, lambda: shared_memory_table(memory),
                        num_queues=disk.num_queues, queue_size=disk.queue_size, watcher=manager.loop)


def _vhost_user_net(manager: DeviceManager, net: m.NetConfig) -> VhostUserNet:
    from vmsh.devices.backends.tap import parse_mac
    from vmsh.devices.vhost_user.net import VhostUserNet
    from vmsh.devices.virtio.net import format_mac

    assert net.id is not None and net.vhost_socket is not None, "normalize() and validate() see to it"
    if not net.mac:
        net.mac = format_mac(random_mac())  # as for a tap: vm.info shows the MAC the guest has
    memory = manager.memory
    return VhostUserNet(net.id, net.vhost_socket, lambda: shared_memory_table(memory), parse_mac(net.mac),
                        server=net.vhost_mode is m.VhostMode.SERVER, queue_size=net.queue_size, mtu=net.mtu,
                        offload_csum=net.offload_csum, offload_tso=net.offload_tso, offload_ufo=net.offload_ufo,
                        watcher=manager.loop)


def _vhost_user_fs(manager: DeviceManager, fs: m.FsConfig) -> VhostUserFs:
    from vmsh.devices.vhost_user.fs import VhostUserFs

    assert fs.id is not None, "normalize() names every device"
    memory = manager.memory
    return VhostUserFs(fs.id, fs.socket, lambda: shared_memory_table(memory), fs.tag, num_queues=fs.num_queues,
                       queue_size=fs.queue_size, watcher=manager.loop)


def _pmem(manager: DeviceManager, pmem: m.PmemConfig) -> VirtioPmem:
    """The file mapped into guest physical memory: shared (writes reach the file) or, with
    ``discard_writes``, private (the guest's writes stay in this process)."""
    from vmsh.devices.virtio.pmem import VirtioPmem

    flags = os.O_RDONLY if pmem.discard_writes else os.O_RDWR
    fd = os.open(pmem.file, flags | os.O_CLOEXEC)
    try:
        size = pmem.size or os.fstat(fd).st_size
        if size <= 0 or size % (2 << 20):
            raise DeviceError(f"the pmem size {size} is not a positive multiple of 2 MiB")
        if pmem.size and os.fstat(fd).st_size < size and not pmem.discard_writes:
            os.ftruncate(fd, size)
        share = mmap.MAP_PRIVATE if pmem.discard_writes else mmap.MAP_SHARED
        mapping = mmap.mmap(fd, size, share, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    start = manager.map_region(pmem.id or "pmem", mapping, size)
    return VirtioPmem.from_config(pmem, start, size)
