"""A description of the machine a guest would see, taken from a built VM before it runs.

:func:`describe` reads a :class:`vmsh.engine.vm.Vm` that
:func:`~vmsh.engine.builder.build_for_boot` made and that has not been booted, the way a guest
would find it, and returns canonical JSON-able data (dicts with string keys, lists, ints,
strings; :func:`canonical_text` gives the text ``vmsh launch --describe`` prints and ``vmsh remote describe`` shows):

- ``acpi``: every table reached from the RSDP the boot protocol hands the kernel
  (RSDP -> XSDT -> each entry, and the FADT's X_DSDT/DSDT and FACS), each with its
  signature, address, length, sha256 and the bytes in hex (ACPI 6.4 §5.2.5-§5.2.9);
- ``smbios``: the SMBIOS 3.0 entry point at ``layout.SMBIOS_START`` and every structure
  (type, handle, formatted area, strings; DMTF DSP0134 3.2 §5.2.2, §6.1);
- ``boot``: the protocol (``pvh`` when hvm_start_info's magic is at PVH_INFO_START, else
  ``bzimage``), the kernel command line, the memory map (PVH memmap or the zero page's e820
  table), and the boot structure itself (hvm_start_info with its module list, or the 4 KiB
  zero page in hex);
- ``ram``: sha256 of each non-zero 2 MiB chunk of guest RAM (what the loaders wrote: kernel,
  initramfs, tables) and the region layout;
- ``vcpus``: per vCPU its CPUID entries, the boot MSRs, regs, sregs, FPU control words,
  LAPIC page and MP state, as set for boot;
- ``pci``: every function on every segment (configuration space, 4 KiB in hex, with vendor,
  device, class and decoded BARs) and, for vmsh's devices, the device id;
- ``virtio``: each virtio device's type, offered features, queue sizes and configuration
  space (plus a block device's GET_ID serial);
- ``buses``: the port I/O and MMIO ranges of every platform device.

Normalized or left out, because they differ from run to run rather than between machines:

- ``IA32_TSC`` is not read back (it is set to 0 for boot, but reads the running counter);
- host paths (image files, sockets, pty names), tap names and the host side of a net device
  are not part of the description: only what the guest can observe is;
- a net device without ``mac=`` gets a random MAC at creation (as in cloud-hypervisor): its
  config space then differs between two builds, so configurations compared with each other
  must fix the MAC.

:func:`describe_config` builds a throwaway VM from a normalized config with a null console
backend for ``tty`` modes (the describing process's terminal is never touched), describes
it and releases it. The pieces (:func:`walk_acpi`, :func:`parse_smbios`, ...) work on any
``read(addr, length) -> bytes`` and are unit-tested on synthetic memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from typing import Any

from vmsh.engine.boot import layout
from vmsh.engine.boot.bootparams import (
    BP_ACPI_RSDP_ADDR,
    BP_E820_ENTRIES,
    BP_E820_MAX,
    BP_E820_TABLE,
    XEN_HVM_START_MAGIC_VALUE,
)
from vmsh.engine.boot.configure import BOOT_MSRS, MSR_IA32_TSC

LOG = logging.getLogger(__name__)

Reader = Callable[[int, int], bytes]

#: description format version (bump when the shape changes)
FORMAT = 1
#: ACPI (6.4 §5.2.5.3): "RSD PTR ", 36 bytes for revision >= 2
RSDP_SIGNATURE = b"RSD PTR "
RSDP_V2_LENGTH = 36
RSDP_V1_LENGTH = 20
#: the common table header (§5.2.6) is 36 bytes; its length field is at offset 4
TABLE_HEADER_LENGTH = 36
#: FADT fields (§5.2.9, Table 5.9): FIRMWARE_CTRL, DSDT, X_FIRMWARE_CTRL, X_DSDT
FADT_FIRMWARE_CTRL, FADT_DSDT, FADT_X_FIRMWARE_CTRL, FADT_X_DSDT = 36, 40, 132, 140
#: a table longer than this is taken as garbage rather than read
MAX_TABLE_LENGTH = 1 << 20
MAX_TABLES = 64
#: SMBIOS 3.0 entry point (DSP0134 §5.2.2): "_SM3_", max structure size at 12, address at 16
SM3_ANCHOR = b"_SM3_"
SM3_ENTRY_POINT = struct.Struct("<5sBBBBBBBIQ")
SMBIOS_END_OF_TABLE = 127
#: hvm_start_info v1 and its tables (Xen start_info.h)
_START_INFO = struct.Struct("<IIIIQQQQII")
_MODLIST = struct.Struct("<QQQQ")
_MEMMAP = struct.Struct("<QQII")
_E820 = struct.Struct("<QQI")
#: how much of the command line is read at most
CMDLINE_READ = layout.CMDLINE_MAX_SIZE
#: RAM is digested in chunks of this size; all-zero chunks are left out
RAM_CHUNK = 2 << 20
#: PCI configuration space: type 0 header (PCI 3.0 §6.1) and the extended space (PCIe §7.2)
PCI_CONFIG_SIZE = 0x1000
PCI_BAR0, PCI_NUM_BARS = 0x10, 6


class DescribeError(ValueError):
    """Guest memory that does not hold what the boot path should have put there."""


def _hex(data: bytes) -> str:
    return data.hex()


def _blob(data: bytes) -> dict[str, Any]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest(), "hex": _hex(data)}


# --- ACPI -----------------------------------------------------------------------------------------


def _table(read: Reader, addr: int) -> bytes:
    header = read(addr, TABLE_HEADER_LENGTH)
    length = struct.unpack_from("<I", header, 4)[0]
    if not TABLE_HEADER_LENGTH <= length <= MAX_TABLE_LENGTH:
        raise DescribeError(f"ACPI table {header[:4]!r} at {addr:#x} has length {length}")
    return read(addr, length)


def walk_acpi(read: Reader, rsdp_addr: int) -> list[dict[str, Any]]:
    """Every table reachable from the RSDP at ``rsdp_addr``, in the order a guest finds them:
    RSDP, XSDT (or RSDT for a revision 0 RSDP), each listed table, then the FADT's DSDT and
    FACS. A table reached twice is listed once.

    :raises DescribeError: when there is no RSDP at ``rsdp_addr`` or a length is absurd.
    """
    head = read(rsdp_addr, RSDP_V1_LENGTH)
    if head[:8] != RSDP_SIGNATURE:
        raise DescribeError(f"No RSDP at {rsdp_addr:#x}")
    revision = head[15]
    rsdp = read(rsdp_addr, RSDP_V2_LENGTH) if revision >= 2 else head
    found: list[dict[str, Any]] = []
    seen: set[int] = set()

    def add(addr: int, data: bytes, signature: str) -> None:
        seen.add(addr)
        found.append({"signature": signature, "address": addr, **_blob(data)})

    add(rsdp_addr, rsdp, "RSDP")
    if revision >= 2:
        root_addr, entry_size = struct.unpack_from("<Q", rsdp, 24)[0], 8
    else:
        root_addr, entry_size = struct.unpack_from("<I", rsdp, 16)[0], 4
    root = _table(read, root_addr)
    add(root_addr, root, root[:4].decode("latin-1"))
    entries = [int.from_bytes(root[i:i + entry_size], "little")
               for i in range(TABLE_HEADER_LENGTH, len(root) - entry_size + 1, entry_size)]
    queue = list(entries[:MAX_TABLES])
    while queue:
        addr = queue.pop(0)
        if addr in seen or addr == 0:
            continue
        data = _table(read, addr)
        signature = data[:4].decode("latin-1")
        add(addr, data, signature)
        if signature == "FACP":
            for offset, size in ((FADT_X_DSDT, 8), (FADT_DSDT, 4), (FADT_X_FIRMWARE_CTRL, 8), (FADT_FIRMWARE_CTRL, 4)):
                if len(data) >= offset + size:
                    target = int.from_bytes(data[offset:offset + size], "little")
                    if target and target not in seen and target not in queue:
                        queue.append(target)
    return found


# --- SMBIOS ---------------------------------------------------------------------------------------


def parse_smbios(read: Reader, addr: int) -> dict[str, Any]:
    """The SMBIOS 3.0 entry point at ``addr`` and its structures (formatted area and strings).

    :raises DescribeError: when the anchor is missing or a structure runs past the table.
    """
    raw = read(addr, SM3_ENTRY_POINT.size)
    anchor, _checksum, ep_length, major, minor, docrev, revision, _res, max_size, table_addr = \
        SM3_ENTRY_POINT.unpack(raw)
    if anchor != SM3_ANCHOR:
        raise DescribeError(f"No SMBIOS 3.0 entry point at {addr:#x}")
    entry = read(addr, ep_length)
    table = read(table_addr, max_size)
    structures = []
    pos = 0
    while pos + 4 <= len(table):
        kind, length, handle = struct.unpack_from("<BBH", table, pos)
        if length < 4 or pos + length > len(table):
            raise DescribeError(f"SMBIOS structure at offset {pos} has length {length}")
        formatted = table[pos:pos + length]
        end = table.find(b"\0\0", pos + length)
        if end < 0:
            raise DescribeError(f"SMBIOS structure {handle} has no string-set terminator")
        strings_area = table[pos + length:end]
        strings = [s.decode("latin-1") for s in strings_area.split(b"\0") if s] if strings_area else []
        structures.append({"type": kind, "handle": handle, "length": length, "formatted": _hex(formatted),
                           "strings": strings})
        pos = end + 2
        if kind == SMBIOS_END_OF_TABLE:
            break
    return {
        "entry_point": {"address": addr, "version": f"{major}.{minor}.{docrev}", "revision": revision,
                        "table_address": table_addr, "table_max_size": max_size, **_blob(entry)},
        "table": _blob(table),
        "structures": structures,
    }


# --- boot protocol --------------------------------------------------------------------------------


def read_cmdline(read: Reader, addr: int = layout.CMDLINE_START) -> str:
    raw = read(addr, CMDLINE_READ)
    return raw.split(b"\0", 1)[0].decode("latin-1")


def parse_e820(zero_page: bytes) -> list[dict[str, int]]:
    """The e820 table of a Linux zero page (zero-page.rst: count at 0x1e8, table at 0x2d0)."""
    count = min(zero_page[BP_E820_ENTRIES], BP_E820_MAX)
    out = []
    for i in range(count):
        addr, size, kind = _E820.unpack_from(zero_page, BP_E820_TABLE + i * _E820.size)
        out.append({"addr": addr, "size": size, "type": kind})
    return out


def parse_pvh(read: Reader, addr: int = layout.PVH_INFO_START) -> dict[str, Any] | None:
    """hvm_start_info at ``addr`` with its module list and memory map, or None without the magic."""
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, _res = \
        _START_INFO.unpack(read(addr, _START_INFO.size))
    if magic != XEN_HVM_START_MAGIC_VALUE:
        return None
    if nr_modules > 64 or memmap_entries > 1024:
        raise DescribeError(f"hvm_start_info lists {nr_modules} modules and {memmap_entries} memmap entries")
    modules = []
    for i in range(nr_modules):
        paddr, size, mod_cmdline, _r = _MODLIST.unpack(read(modlist + i * _MODLIST.size, _MODLIST.size))
        modules.append({"paddr": paddr, "size": size, "cmdline_paddr": mod_cmdline,
                        "sha256": hashlib.sha256(read(paddr, size)).hexdigest()})
    entries = []
    for i in range(memmap_entries):
        m_addr, m_size, m_type, _r = _MEMMAP.unpack(read(memmap + i * _MEMMAP.size, _MEMMAP.size))
        entries.append({"addr": m_addr, "size": m_size, "type": m_type})
    return {
        "version": version, "flags": flags, "nr_modules": nr_modules, "modlist_paddr": modlist,
        "cmdline_paddr": cmdline, "rsdp_paddr": rsdp, "memmap_paddr": memmap, "memmap_entries": memmap_entries,
        "modules": modules, "memmap": entries,
    }


def describe_boot(read: Reader) -> dict[str, Any]:
    """The boot protocol's structures, the memory map, the command line and the RSDP address."""
    pvh = parse_pvh(read)
    if pvh is not None:
        return {"protocol": "pvh", "start_info": pvh, "e820": pvh["memmap"], "rsdp": pvh["rsdp_paddr"],
                "cmdline": read_cmdline(read, pvh["cmdline_paddr"]) if pvh["cmdline_paddr"] else ""}
    page = read(layout.ZERO_PAGE_START, 4096)
    cmdline_ptr = struct.unpack_from("<I", page, 0x228)[0] | struct.unpack_from("<I", page, 0xC8)[0] << 32
    ramdisk = struct.unpack_from("<I", page, 0x218)[0] | struct.unpack_from("<I", page, 0xC0)[0] << 32
    ramdisk_size = struct.unpack_from("<I", page, 0x21C)[0] | struct.unpack_from("<I", page, 0xC4)[0] << 32
    initrd = None
    if ramdisk_size:
        digest = hashlib.sha256(read(ramdisk, ramdisk_size)).hexdigest()
        initrd = {"addr": ramdisk, "size": ramdisk_size, "sha256": digest}
    return {"protocol": "bzimage", "zero_page": _blob(page), "e820": parse_e820(page),
            "rsdp": struct.unpack_from("<Q", page, BP_ACPI_RSDP_ADDR)[0], "initrd": initrd,
            "cmdline": read_cmdline(read, cmdline_ptr) if cmdline_ptr else ""}


def resident_chunks(host_addr: int, size: int, chunk: int = RAM_CHUNK) -> set[int] | None:
    """Indices of the ``chunk``-sized pieces of a mapping that have a page in memory
    (mincore(2)); None when that cannot be told. Untouched guest RAM has none, so it need
    not be read (reading it would fault in zero pages: seconds for a few GiB)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    mincore.restype = ctypes.c_int
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    if mincore(ctypes.c_void_p(host_addr), ctypes.c_size_t(size), vec) != 0:
        return None
    per_chunk = max(1, chunk // page)
    raw = bytes(vec)
    return {i // per_chunk for i in range(0, pages, per_chunk) if any(b & 1 for b in raw[i:i + per_chunk])}


def digest_ram(regions: list[tuple[int, Any, int | None]], chunk: int = RAM_CHUNK) -> dict[str, Any]:
    """The RAM regions ``(start, view, host address or None)`` and a sha256 of every chunk
    that is not all zeros (by guest address). Chunks with no resident page are zeros."""
    zero = bytes(chunk)
    chunks: dict[str, str] = {}
    total = hashlib.sha256()
    layout_out = []
    for start, view, host_addr in regions:
        view = memoryview(view)
        layout_out.append({"start": start, "size": len(view)})
        resident = resident_chunks(host_addr, len(view), chunk) if host_addr is not None else None
        for offset in range(0, len(view), chunk):
            if resident is not None and offset // chunk not in resident:
                continue
            piece = view[offset:offset + chunk]
            if piece == zero[:len(piece)]:
                continue
            digest = hashlib.sha256(piece).hexdigest()
            chunks[f"{start + offset:#x}"] = digest
            total.update(f"{start + offset:x}:{digest};".encode())
    return {"regions": layout_out, "chunk": chunk, "nonzero_chunks": chunks, "sha256": total.hexdigest()}


# --- PCI ------------------------------------------------------------------------------------------


def read_config_space(config: Any, size: int = PCI_CONFIG_SIZE) -> bytes:
    """A function's configuration space read the way a guest does: dword by dword."""
    return b"".join(config.read(offset, 4) for offset in range(0, size, 4))


def decode_bars(space: bytes, write_mask: bytes | None = None) -> list[dict[str, Any]]:
    """Memory and I/O BARs of a type 0 header; sizes come from the writable address bits
    (what a guest's all-ones sizing probe reads back) when ``write_mask`` is given."""
    bars = []
    index = 0
    while index < PCI_NUM_BARS:
        offset = PCI_BAR0 + 4 * index
        low = struct.unpack_from("<I", space, offset)[0]
        mask = struct.unpack_from("<I", write_mask, offset)[0] if write_mask is not None else 0
        if low == 0 and mask == 0:
            index += 1
            continue
        if low & 1:  # I/O BAR
            bar = {"index": index, "kind": "io", "address": low & ~0x3}
            if write_mask is not None:
                bar["size"] = ((~mask & 0xFFFF_FFFC) + 4) & 0xFFFF_FFFF
            bars.append(bar)
            index += 1
            continue
        is64 = low & 0x6 == 0x4
        address = low & 0xFFFF_FFF0
        if is64 and index + 1 < PCI_NUM_BARS:
            address |= struct.unpack_from("<I", space, offset + 4)[0] << 32
            if write_mask is not None:
                mask |= struct.unpack_from("<I", write_mask, offset + 4)[0] << 32
        bar = {"index": index, "kind": "mem64" if is64 else "mem32", "prefetchable": bool(low & 0x8),
               "address": address}
        if write_mask is not None:
            width = (1 << 64) - 1 if is64 else 0xFFFF_FFFF
            bar["size"] = ((~mask & width & ~0xF) + 0x10) & width
        bars.append(bar)
        index += 2 if is64 else 1
    return bars


def describe_function(config: Any) -> dict[str, Any]:
    space = read_config_space(config)
    vendor, device = struct.unpack_from("<HH", space, 0)
    class_code = int.from_bytes(space[9:12], "little")
    mask = getattr(config, "write_mask", None)
    return {
        "vendor": f"{vendor:#06x}", "device": f"{device:#06x}", "class": f"{class_code:#08x}",
        "revision": space[8], "header_type": space[0x0E],
        "subsystem_vendor": f"{struct.unpack_from('<H', space, 0x2C)[0]:#06x}",
        "subsystem": f"{struct.unpack_from('<H', space, 0x2E)[0]:#06x}",
        "bars": decode_bars(space, bytes(mask) if mask is not None else None),
        "config": _hex(space[:256]),
        "extended_config": _hex(space[256:]) if any(space[256:]) else None,
        "config_sha256": hashlib.sha256(space).hexdigest(),
    }


def describe_virtio(device: Any) -> dict[str, Any]:
    size = len(device.config_bytes())
    out: dict[str, Any] = {
        "device_type": device.device_type,
        "features": f"{device.avail_features:#018x}",
        "queue_max_sizes": list(device.queue_max_sizes),
        "config": _hex(device.read_config(0, size)),
    }
    serial = getattr(device, "serial", None)
    if isinstance(serial, bytes):
        out["serial"] = serial.decode("latin-1")
    return out


# --- vCPUs ----------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """A kvm dataclass (Regs, Sregs, Segment, ...) as plain JSON data (bytes in hex)."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (bytes, bytearray)):
        return _hex(bytes(obj))
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    return obj


def describe_vcpu(fd: Any) -> dict[str, Any]:
    msrs = sorted(i for i in BOOT_MSRS if i != MSR_IA32_TSC)
    fpu = fd.get_fpu()
    return {
        "id": fd.vcpu_id,
        "cpuid": [
            {"function": f"{e.function:#010x}", "index": e.index, "flags": e.flags,
             "eax": f"{e.eax:#010x}", "ebx": f"{e.ebx:#010x}", "ecx": f"{e.ecx:#010x}", "edx": f"{e.edx:#010x}"}
            for e in sorted(fd.get_cpuid2(), key=lambda e: (e.function, e.index))
        ],
        "msrs": {f"{index:#x}": value for index, value in sorted(fd.get_msrs(msrs).items())},
        "regs": _plain(fd.get_regs()),
        "sregs": _plain(fd.get_sregs()),
        "fpu": {"fcw": fpu.fcw, "fsw": fpu.fsw, "ftwx": fpu.ftwx, "mxcsr": fpu.mxcsr},
        "lapic": _hex(fd.get_lapic()),
        "mp_state": fd.get_mp_state(),
    }


# --- the whole machine ----------------------------------------------------------------------------


def _bus_ranges(bus: Any) -> list[dict[str, Any]]:
    return [{"name": r.name, "base": r.base, "length": r.length} for r in bus.ranges()]


def describe(vm: Any) -> dict[str, Any]:
    """The machine ``vm`` (built, not booted) presents to its guest; see the module docstring."""
    memory = vm.memory
    if memory is None or vm.devices is None:
        raise DescribeError("The VM is not built")
    read = memory.read
    boot = describe_boot(read)
    rsdp = boot["rsdp"] or layout.RSDP_POINTER
    ids = {(e.segment, e.slot): dev_id for dev_id, e in vm.devices.devices.items()}
    pci = []
    virtio = {}
    for bus in vm.devices.buses:
        for slot, function in enumerate(bus.slots):
            if function is None:
                continue
            dev_id = ids.get((bus.segment, slot))
            bdf = f"{bus.segment:04x}:00:{slot:02x}.0"
            pci.append({"bdf": bdf, "id": dev_id, **describe_function(function.config)})
            device = getattr(function, "device", None)
            if dev_id is not None and device is not None:
                virtio[dev_id] = describe_virtio(device)
    return {
        "format": FORMAT,
        "acpi": walk_acpi(read, rsdp),
        "smbios": parse_smbios(read, layout.SMBIOS_START),
        "boot": boot,
        "ram": digest_ram([(r.start, r.view, r.host_addr) for r in memory.regions]),
        "vcpus": [describe_vcpu(v.fd) for v in vm.vcpus],
        "pci": pci,
        "virtio": virtio,
        "buses": {"pio": _bus_ranges(vm.pio), "mmio": _bus_ranges(vm.mmio)},
    }


def canonical_text(description: dict[str, Any]) -> str:
    """The text form: JSON with sorted keys, one-space indent, a final newline."""
    return json.dumps(description, sort_keys=True, indent=1) + "\n"


def describe_config(cfg: Any) -> dict[str, Any]:
    """Build a throwaway VM from the normalized ``cfg``, describe it and release it.

    ``tty`` consoles get a null backend: describing never touches the terminal.
    """
    from vmsh.engine.builder import build_for_boot
    from vmsh.engine.console import ConsoleBackend
    from vmsh.engine.events import EventMonitor

    events = EventMonitor()
    vm = build_for_boot(cfg, events, lambda kind, detail: None, lambda work: work(), tty=ConsoleBackend())
    try:
        return describe(vm)
    finally:
        vm.shutdown()
        events.close()
