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
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmsh.config import model as m
from vmsh.devices.vhost_user.protocol import MemoryRegion
from vmsh.engine.memory import GuestMemoryMmap, GuestRegion, MemoryOptions, ram_ranges
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


def create_memory(mem: m.MemoryConfig) -> GuestMemoryMmap:
    """Guest RAM from ``--memory``, or from the ``--memory-zone`` s laid out one after another.

    :raises VmshError: naming what the host could not provide.
    """
    if not mem.zones:
        return GuestMemoryMmap.create(mem.size, MemoryOptions(
            shared=mem.shared, hugepages=mem.hugepages, hugepage_size=mem.hugepage_size,
            mergeable=mem.mergeable, thp=mem.thp, prefault=mem.prefault))
    if mem.size:
        raise VmshError("--memory size must be 0 when the RAM comes from --memory-zone")
    for zone in mem.zones:
        if zone.hotplug_size or zone.hotplugged_size:
            raise VmshError(f"--memory-zone {zone.id}: memory hotplug is not supported by vmsh")
    specs = [ZoneSpec(zone.size, MemoryOptions(
        shared=zone.shared, hugepages=zone.hugepages, hugepage_size=zone.hugepage_size,
        mergeable=mem.mergeable, thp=mem.thp, prefault=zone.prefault), file=zone.file,
        host_numa_node=zone.host_numa_node) for zone in mem.zones]
    try:
        return create_zones(specs)
    except GuestMemoryError as err:
        raise VmshError("Cannot create the memory zones") from err


def map_snapshot_memory(path: Path, prefault: bool) -> GuestMemoryMmap:
    """Guest RAM as a private (copy-on-write) mapping of a snapshot's memory file.

    :raises SnapshotError: when the file cannot be mapped.
    """
    regions: list[GuestRegion] = []
    flags = mmap.MAP_PRIVATE | (_MAP_POPULATE if prefault else 0)
    try:
        with open(path, "rb") as f:
            offset = 0
            for start, length in ram_ranges(os.fstat(f.fileno()).st_size):
                mm = mmap.mmap(f.fileno(), length, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                # the file stays known: a later snapshot copies the pages this VM never touched
                regions.append(GuestRegion(start, mm, backing=(os.dup(f.fileno()), offset)))
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
