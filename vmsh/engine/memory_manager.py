"""The engine's memory manager: guest RAM made from a config or mapped from a snapshot.

Everything that decides where RAM comes from lives here: plain RAM from ``--memory``
(anonymous, memfd for ``shared``, hugetlbfs), ``--memory-zone`` s laid out one after the other
(a file, hugepages, prefault, bound to a host NUMA node with mbind(2)), the check that the host
has that much memory at all, and a snapshot's memory file mapped copy-on-write. The regions and
the checked access are ``vmsh.engine.memory``; KVM memory slots are registered with
``GuestMemoryMmap.register``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmsh.config import model as m
from vmsh.devices.vhost_user.protocol import MemoryRegion
from vmsh.engine.memory import (
    MEM_32BIT_RESERVED_START,
    RAM_64BIT_START,
    GuestMemoryMmap,
    GuestRegion,
    MemoryOptions,
    ram_ranges,
)
from vmsh.engine.persist import SnapshotError
from vmsh.errors import GuestMemoryError, VhostUserError, VmshError

LOG = logging.getLogger(__name__)

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
#: mbind(2): x86_64 syscall number and the policy that binds to a node set
_SYS_MBIND = 237
_MPOL_BIND = 2


@dataclass(frozen=True, slots=True)
class ZoneSpec:
    """One ``--memory-zone``: its size, how it is backed, and where."""

    size: int
    options: MemoryOptions = field(default_factory=MemoryOptions)
    #: back the zone with this file (MAP_SHARED when ``options.shared``, else private)
    file: str | None = None
    #: bind the zone's pages to this host NUMA node (mbind MPOL_BIND)
    host_numa_node: int | None = None


def bind_to_node(mm: mmap.mmap, node: int) -> None:
    """Bind a mapping's pages to host NUMA node ``node``.

    :raises GuestMemoryError: when the node does not exist or the kernel refuses.
    """
    if not os.path.isdir(f"/sys/devices/system/node/node{node}"):
        raise GuestMemoryError(f"host NUMA node {node} does not exist")
    mask = (ctypes.c_ulong * (node // 64 + 1))()
    mask[node // 64] = 1 << (node % 64)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(len(mm)), _MPOL_BIND,
                    mask, ctypes.c_ulong(len(mask) * 64 + 1), 0) != 0:
        raise GuestMemoryError(f"cannot bind guest RAM to host NUMA node {node}: "
                               f"{os.strerror(ctypes.get_errno())}")


def zone_layout(sizes: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Where memory zones of ``sizes`` bytes go in guest physical memory: per zone its
    ``(guest address, length)`` pieces. The zones follow one another around the 32-bit hole
    like plain RAM, so a zone that straddles the hole has two pieces (cloud-hypervisor's
    ``vmm/src/memory_manager.rs`` lays them out the same way). The guest NUMA tables describe
    these ranges.

    >>> [[(hex(a), n >> 20) for a, n in z] for z in zone_layout([2 << 30, 2 << 30])]
    [[('0x0', 2048)], [('0x80000000', 1024), ('0x100000000', 1024)]]
    """
    pieces = iter(ram_ranges(sum(sizes)))
    start, room = next(pieces)
    layout: list[list[tuple[int, int]]] = []
    for size in sizes:
        ranges: list[tuple[int, int]] = []
        done = 0
        while done < size:
            if room == 0:
                start, room = next(pieces)
            n = min(room, size - done)
            ranges.append((start, n))
            start, room, done = start + n, room - n, done + n
        layout.append(ranges)
    return layout


def create_zones(zones: list[ZoneSpec]) -> GuestMemoryMmap:
    """RAM made of memory zones, one after the other in guest physical memory, laid out around
    the 32-bit hole like plain RAM (:func:`zone_layout`); a zone that straddles the hole is two
    regions."""
    total = sum(z.size for z in zones)
    if not zones or total <= 0 or any(z.size <= 0 or z.size % 4096 for z in zones):
        raise GuestMemoryError("memory zones must have positive sizes that are multiples of 4 KiB")
    regions: list[GuestRegion] = []
    try:
        for zone, ranges in zip(zones, zone_layout([z.size for z in zones]), strict=True):
            done = 0
            for start, n in ranges:
                if zone.file is not None:
                    region = GuestRegion.from_file(start, zone.file, done, n, zone.options)
                else:
                    region = GuestRegion.create(start, n, zone.options)
                regions.append(region)
                if zone.host_numa_node is not None:
                    bind_to_node(region.mmap, zone.host_numa_node)
                done += n
    except GuestMemoryError:
        for r in regions:
            r.close()
        raise
    return GuestMemoryMmap(regions)


# --- hotplug areas ----------------------------------------------------------------------------------

#: cloud-hypervisor's default memory zone: ``--memory`` itself
DEFAULT_ZONE = "mem0"
#: hotplug areas, ACPI hot-added RAM and virtio-mem regions start on this boundary (cloud-hypervisor's
#: ``start_addr`` and VIRTIO_MEM_ALIGN_SIZE); ACPI additions are multiples of it
HOTPLUG_ALIGN = 128 << 20


@dataclass(frozen=True, slots=True)
class HotplugArea:
    """A range of guest physical addresses kept free for RAM added while the guest runs."""

    #: guest physical address of the first byte
    base: int
    size: int
    #: the memory zone it belongs to (``mem0`` for ``--memory``)
    zone: str
    #: ``acpi``: RAM is added in new slots of the ACPI memory hotplug controller; ``virtio-mem``:
    #: the whole area is one virtio-mem device's region
    method: m.HotplugMethod

    @property
    def end(self) -> int:
        return self.base + self.size


def boot_ram_size(mem: m.MemoryConfig) -> int:
    """The RAM a VM boots with before anything is hot-added: ``size`` and the zones' sizes."""
    return mem.size + sum(z.size for z in mem.zones or [])


def hotplug_start(ram_end: int) -> int:
    """Where RAM added after ``[0, ram_end)`` goes (cloud-hypervisor's ``start_addr`` with hotplug):
    the next 128 MiB boundary, or 4 GiB while RAM ends below the 32-bit hole."""
    if ram_end - 1 < MEM_32BIT_RESERVED_START:
        return RAM_64BIT_START
    return ((ram_end - 1) | (HOTPLUG_ALIGN - 1)) + 1


def hotplug_areas(mem: m.MemoryConfig, boot_ram: int | None = None) -> tuple[HotplugArea, ...]:
    """The hotplug areas of ``mem``, in address order, after boot RAM (cloud-hypervisor's
    ``MemoryManager::new``): ``--memory hotplug_size`` (ACPI or virtio-mem) first, then each
    zone's ``hotplug_size`` (virtio-mem); none without ``hotplug_size``. The NUMA tables (SRAT)
    describe them.

    ``boot_ram``: the RAM the VM booted with, when it is not the config's any more (an ACPI
    resize sets ``size`` to the new total, as cloud-hypervisor does, so that a reboot starts with
    it; the running VM and its snapshots keep the areas of the boot).
    """
    wanted = [(DEFAULT_ZONE, mem.hotplug_size)] if mem.hotplug_size else []
    wanted += [(z.id, z.hotplug_size) for z in mem.zones or [] if z.hotplug_size]
    if not wanted:
        return ()
    boot_ram = boot_ram_size(mem) if boot_ram is None else boot_ram
    boot = ram_ranges(boot_ram) if boot_ram else [(0, 0)]
    cursor = hotplug_start(boot[-1][0] + boot[-1][1])
    areas = []
    for zone, size in wanted:
        method = mem.hotplug_method if zone == DEFAULT_ZONE else m.HotplugMethod.VIRTIO_MEM
        cursor = -(-cursor // HOTPLUG_ALIGN) * HOTPLUG_ALIGN
        areas.append(HotplugArea(cursor, size, zone, method))
        cursor += size
    return tuple(areas)


def hotplug_end(mem: m.MemoryConfig, ram_end: int, boot_ram: int | None = None) -> int:
    """The first address after RAM and every hotplug area: the 64-bit PCI window starts there."""
    areas = hotplug_areas(mem, boot_ram)
    return max(ram_end, areas[-1].end) if areas else ram_end


def check_hotplug_config(mem: m.MemoryConfig) -> None:
    """Refuse memory hotplug settings cloud-hypervisor v40 refuses (its ``MemoryManager::new``).

    :raises VmshError: with its message.
    """
    virtio_mem = mem.hotplug_method is m.HotplugMethod.VIRTIO_MEM
    _check_sizes("--memory", mem.hotplug_size, mem.hotplugged_size, virtio_mem)
    for zone in mem.zones or []:
        if zone.hotplug_size is not None and not virtio_mem:
            raise VmshError("Invalid hotplug method associated with memory zones resizing capability")
        _check_sizes(f"--memory-zone {zone.id}", zone.hotplug_size, zone.hotplugged_size, virtio_mem)


def _check_sizes(option: str, hotplug_size: int | None, hotplugged_size: int | None, virtio_mem: bool) -> None:
    if hotplug_size is None:
        return
    if hotplug_size % HOTPLUG_ALIGN:
        # virtio-mem regions are 128 MiB aligned (VIRTIO_MEM_ALIGN_SIZE); ACPI adds 128 MiB multiples
        raise VmshError(f"{option} hotplug_size {hotplug_size} is not a multiple of 128 MiB")
    if not hotplugged_size:
        return
    if hotplugged_size > hotplug_size:
        raise VmshError(f"Memory configuration is not valid ({option}): 'hotplugged_size' {hotplugged_size} "
                        f"can't be bigger than 'hotplug_size' {hotplug_size}")
    if not virtio_mem:
        raise VmshError(f"Memory configuration is not valid ({option}): Invalid to define 'hotplugged_size' "
                        "with hotplug method 'acpi'")
    if hotplugged_size % VIRTIO_MEM_BLOCK:
        raise VmshError(f"Memory configuration is not valid ({option}): 'hotplugged_size' {hotplugged_size} is "
                        "not a multiple of the virtio-mem block size (2 MiB)")


#: virtio-mem's block size (cloud-hypervisor's VIRTIO_MEM_DEFAULT_BLOCK_SIZE)
VIRTIO_MEM_BLOCK = 2 << 20


def memory_options(mem: m.MemoryConfig) -> MemoryOptions:
    """How ``--memory`` RAM (and the RAM hot-added to it) is backed."""
    return MemoryOptions(shared=mem.shared, hugepages=mem.hugepages, hugepage_size=mem.hugepage_size,
                         mergeable=mem.mergeable, thp=mem.thp, prefault=mem.prefault)


def zone_options(mem: m.MemoryConfig, zone_id: str) -> MemoryOptions:
    """How zone ``zone_id`` (``mem0``: ``--memory``) is backed; a zone's virtio-mem region is
    anonymous or memfd memory like the zone, never its file."""
    for zone in mem.zones or []:
        if zone.id == zone_id:
            return MemoryOptions(shared=zone.shared, hugepages=zone.hugepages, hugepage_size=zone.hugepage_size,
                                 mergeable=mem.mergeable, thp=mem.thp, prefault=False)
    return dataclasses.replace(memory_options(mem), prefault=False)


def hotplug_region(area: HotplugArea, start: int, size: int, options: MemoryOptions) -> GuestRegion:
    """Fresh RAM ``[start, start+size)`` in ``area``, marked as hotplug RAM.

    :raises GuestMemoryError: when the host cannot map it.
    """
    region = GuestRegion.create(start, size, options)
    region.hotplug = True
    return region


def create_memory(mem: m.MemoryConfig) -> GuestMemoryMmap:
    """Guest RAM from ``--memory``, or from the ``--memory-zone`` s laid out one after another;
    then each virtio-mem area's region (the device plugs its blocks). An ACPI hotplug area
    stays empty until a resize.

    :raises VmshError: naming what the host could not provide.
    """
    check_hotplug_config(mem)
    memory = _create_zone_memory(mem) if mem.zones else GuestMemoryMmap.create(mem.size, memory_options(mem))
    try:
        for area in hotplug_areas(mem):
            if area.method is m.HotplugMethod.VIRTIO_MEM:
                region = hotplug_region(area, area.base, area.size, zone_options(mem, area.zone))
                memory.add_region(region)
                node = next((z.host_numa_node for z in mem.zones or [] if z.id == area.zone), None)
                if node is not None:
                    bind_to_node(region.mmap, node)  # as the zone's boot RAM (cloud-hypervisor's)
    except GuestMemoryError as err:
        memory.close()
        raise VmshError("Cannot create the hotpluggable memory") from err
    return memory


def _create_zone_memory(mem: m.MemoryConfig) -> GuestMemoryMmap:
    if mem.size:
        raise VmshError("--memory size must be 0 when the RAM comes from --memory-zone")
    assert mem.zones
    specs = [ZoneSpec(zone.size, MemoryOptions(
        shared=zone.shared, hugepages=zone.hugepages, hugepage_size=zone.hugepage_size,
        mergeable=mem.mergeable, thp=mem.thp, prefault=zone.prefault), file=zone.file,
        host_numa_node=zone.host_numa_node) for zone in mem.zones]
    try:
        return create_zones(specs)
    except GuestMemoryError as err:
        raise VmshError("Cannot create the memory zones") from err


def map_snapshot_memory(path: Path, prefault: bool, ranges: list[tuple[int, int]] | None = None,
                        boot_size: int | None = None) -> GuestMemoryMmap:
    """Guest RAM as a private (copy-on-write) mapping of a snapshot's memory file, whose
    ``ranges`` (checked by the caller; default: boot RAM laid out from the file's size) are
    concatenated in it; those past ``boot_size`` bytes are hotplug RAM.

    :raises SnapshotError: when the file cannot be mapped.
    """
    regions: list[GuestRegion] = []
    flags = mmap.MAP_PRIVATE | (_MAP_POPULATE if prefault else 0)
    try:
        with open(path, "rb") as f:
            if ranges is None:
                ranges = ram_ranges(os.fstat(f.fileno()).st_size)
            offset = 0
            for start, length in ranges:
                mm = mmap.mmap(f.fileno(), length, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                # the file stays known: a later snapshot copies the pages this VM never touched
                regions.append(GuestRegion(start, mm, backing=(os.dup(f.fileno()), offset)))
                regions[-1].hotplug = boot_size is not None and offset >= boot_size
                offset += length
    except (OSError, ValueError) as err:
        for region in regions:
            region.close()
        raise SnapshotError(f"Cannot map the snapshot memory {path}") from err
    return GuestMemoryMmap(regions)


def host_memory() -> int | None:
    """RAM plus swap of this host in bytes (None when /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return (int(fields["MemTotal"].split()[0]) + int(fields["SwapTotal"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_host_memory(size: int) -> None:
    """Refuse a guest larger than the host's RAM plus swap: RAM is mapped lazily, so the mapping
    would succeed and the guest die later.

    :raises VmshError: naming both sizes.
    """
    available = host_memory()
    if available is not None and size > available:
        raise VmshError(f"Guest RAM ({_gib(size)}) is more than this host has ({_gib(available)})")


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def shared_memory_table(memory: GuestMemoryMmap) -> list[MemoryRegion]:
    """Guest RAM as a vhost-user backend maps it: each region's file (its memfd, or a memory
    zone's file) and offset, with its guest and host addresses.

    :raises VhostUserError: for a region that is not a shared mapping of a file (private RAM,
        or the copy-on-write mapping of a restored snapshot): the backend would not see the
        guest's writes.
    """
    table = []
    for r in memory.regions:
        if r.shared and r.fd is not None:
            fd, offset = r.fd, 0
        elif r.shared and r.backing is not None:
            fd, offset = r.backing
        else:
            raise VhostUserError(f"guest RAM at {r.start:#x} is not shared memory: vhost-user needs "
                                 f"--memory shared=on (or shared memory zones)")
        table.append(MemoryRegion(r.start, r.size, r.host_addr, fd, offset))
    return table
