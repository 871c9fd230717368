"""SMBIOS 3.2 tables for vmsh guests (DMTF DSP0134 3.2.0).

:func:`build_smbios` returns one blob for guest memory at ``spec.address`` (0xf0000, where Linux
scans for the ``_SM3_`` anchor): the 64-bit entry point, then the structure table right after
it. The structures are

- type 0, BIOS Information (§7.1);
- type 1, System Information (§7.2): manufacturer, product, serial number and UUID, which the
  guest shows as ``/sys/class/dmi/id/{sys_vendor,product_name,product_serial,product_uuid}``;
- type 11, OEM Strings (§7.12), when there are any;
- type 127, End-of-Table (§7.45).

The user-visible values come from ``--platform serial_number=..,uuid=..,oem_strings=[..]``;
:meth:`SmbiosSpec.from_platform` takes them from the config.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

#: anchor of the SMBIOS 3.0 64-bit entry point (§5.2.2)
SM3_ANCHOR = b"_SM3_"
SM3_ENTRY_POINT_SIZE = 0x18
SMBIOS_MAJOR = 3
SMBIOS_MINOR = 2
SMBIOS_DOCREV = 0
#: entry point revision 1: the 3.0 entry point format (§5.2.2, Table 2)
SM3_ENTRY_POINT_REVISION = 1

DEFAULT_SMBIOS_ADDRESS = 0xF0000
#: the legacy BIOS area ends at 1 MiB
DEFAULT_SMBIOS_LIMIT = 0x100000

TYPE_BIOS_INFORMATION = 0
TYPE_SYSTEM_INFORMATION = 1
TYPE_OEM_STRINGS = 11
TYPE_END_OF_TABLE = 127

#: formatted-area lengths for SMBIOS 3.1+ type 0 and 2.4+ type 1
TYPE0_LENGTH = 0x1A
TYPE1_LENGTH = 0x1B
TYPE11_LENGTH = 0x05
TYPE127_LENGTH = 0x04

#: BIOS Characteristics (§7.1.1, Table 7): bit 7 "PCI is supported"
BIOS_CHAR_PCI_SUPPORTED = 1 << 7
#: BIOS Characteristics Extension Byte 2 (§7.1.2.2, Table 9): bit 4 "SMBIOS table describes
#: a virtual machine"
BIOS_CHAR_EXT2_VIRTUAL_MACHINE = 1 << 4
#: System Information wake-up type (§7.2.2, Table 12): 06h Power Switch
WAKEUP_POWER_SWITCH = 0x06
#: strings are referenced by a one-byte, one-based index (§6.1.3)
MAX_STRINGS = 255


@dataclass(frozen=True)
class SmbiosSpec:
    """What the SMBIOS tables say about the VM.

    Empty strings (and ``None``) are "no string" (index 0); ``uuid`` is an RFC 4122 string or
    ``None`` for an all-zero UUID. Defaults match the reference VMM.
    """

    bios_vendor: str = "cloud-hypervisor"
    bios_version: str = "0"
    bios_release_date: str = ""
    manufacturer: str = "Cloud Hypervisor"
    product_name: str = "cloud-hypervisor"
    version: str = ""
    serial_number: str | None = None
    uuid: str | None = None
    sku_number: str = ""
    family: str = ""
    oem_strings: tuple[str, ...] = ()
    address: int = DEFAULT_SMBIOS_ADDRESS
    limit: int = DEFAULT_SMBIOS_LIMIT

    def __post_init__(self) -> None:
        for name in (
            "bios_vendor",
            "bios_version",
            "bios_release_date",
            "manufacturer",
            "product_name",
            "version",
            "serial_number",
            "sku_number",
            "family",
        ):
            _check_string(name, getattr(self, name))
        object.__setattr__(self, "oem_strings", tuple(self.oem_strings))
        if len(self.oem_strings) > MAX_STRINGS:
            raise ValueError(f"SMBIOS oem_strings has {len(self.oem_strings)} entries, at most {MAX_STRINGS} allowed")
        for i, text in enumerate(self.oem_strings):
            if text == "":
                # a type 11 string cannot be empty: the count says how many strings follow, and
                # an empty one would end the string set early (§6.1.3)
                raise ValueError(f"SMBIOS oem_strings[{i}] is empty")
            _check_string(f"oem_strings[{i}]", text)
        self.uuid_bytes()  # validates
        if self.address % 16:
            # §5.2.2: the anchor is found on a 16-byte boundary
            raise ValueError(f"SMBIOS address {self.address:#x} is not 16-byte aligned")

    def uuid_bytes(self) -> bytes:
        """The UUID in SMBIOS byte order (§7.2.1): time_low, time_mid and time_hi_and_version
        little-endian, the clock sequence and node as written. Zeros when there is none."""
        if self.uuid is None or self.uuid == "":
            return bytes(16)
        try:
            return uuidlib.UUID(self.uuid).bytes_le
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"SMBIOS uuid {self.uuid!r} is not a valid UUID") from err

    @classmethod
    def from_platform(cls, platform: Any, **overrides: Any) -> SmbiosSpec:
        """Build a spec from a ``PlatformConfig`` (or ``None``): serial_number, uuid, oem_strings."""
        values: dict[str, Any] = {}
        if platform is not None:
            values["serial_number"] = getattr(platform, "serial_number", None)
            values["uuid"] = getattr(platform, "uuid", None)
            values["oem_strings"] = tuple(getattr(platform, "oem_strings", None) or ())
        values.update(overrides)
        return cls(**values)


def _check_string(name: str, text: str | None) -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError(f"SMBIOS {name} must be a string, not {type(text).__name__}")
    if "\x00" in text:
        raise ValueError(f"SMBIOS {name} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"SMBIOS {name} cannot be encoded as UTF-8") from err


class _Strings:
    """The string-set of one structure (§6.1.3): one-based indexes, 0 for "no string"."""

    def __init__(self) -> None:
        self._items: list[bytes] = []

    def add(self, text: str | None) -> int:
        if not text:
            return 0
        if len(self._items) >= MAX_STRINGS:
            raise ValueError(f"SMBIOS structure has more than {MAX_STRINGS} strings")
        self._items.append(text.encode("utf-8"))
        return len(self._items)

    def encode(self) -> bytes:
        # each string NUL-terminated, the set ended by one more NUL; no strings: two NULs
        if not self._items:
            return b"\x00\x00"
        return b"".join(s + b"\x00" for s in self._items) + b"\x00"


def _structure(kind: int, handle: int, formatted: bytes, strings: _Strings) -> bytes:
    # header (§6.1.2): type, length of the formatted area including the header, handle
    header = struct.pack("<BBH", kind, 4 + len(formatted), handle)
    return header + formatted + strings.encode()


def _bios_information(spec: SmbiosSpec, handle: int) -> bytes:
    strings = _Strings()
    vendor = strings.add(spec.bios_vendor)
    version = strings.add(spec.bios_version)
    release_date = strings.add(spec.bios_release_date)
    formatted = struct.pack(
        "<BBHBBQBBBBBBH",
        vendor,
        version,
        0,  # BIOS starting address segment: no legacy BIOS image
        release_date,
        0,  # BIOS ROM size: 64 KiB (n=0); there is no ROM
        BIOS_CHAR_PCI_SUPPORTED,
        0,  # characteristics extension byte 1
        BIOS_CHAR_EXT2_VIRTUAL_MACHINE,
        0,  # system BIOS major release
        0,  # system BIOS minor release
        0xFF,  # embedded controller firmware major: 0xFF = no EC
        0xFF,  # embedded controller firmware minor
        0,  # extended BIOS ROM size
    )
    assert 4 + len(formatted) == TYPE0_LENGTH
    return _structure(TYPE_BIOS_INFORMATION, handle, formatted, strings)


def _system_information(spec: SmbiosSpec, handle: int) -> bytes:
    strings = _Strings()
    manufacturer = strings.add(spec.manufacturer)
    product = strings.add(spec.product_name)
    version = strings.add(spec.version)
    serial = strings.add(spec.serial_number)
    uuid_raw = spec.uuid_bytes()
    sku = strings.add(spec.sku_number)
    family = strings.add(spec.family)
    formatted = struct.pack("<BBBB16sBBB", manufacturer, product, version, serial, uuid_raw, WAKEUP_POWER_SWITCH,
                            sku, family)
    assert 4 + len(formatted) == TYPE1_LENGTH
    return _structure(TYPE_SYSTEM_INFORMATION, handle, formatted, strings)


def _oem_strings(spec: SmbiosSpec, handle: int) -> bytes:
    strings = _Strings()
    for text in spec.oem_strings:
        strings.add(text)
    return _structure(TYPE_OEM_STRINGS, handle, bytes([len(spec.oem_strings)]), strings)


def _end_of_table(handle: int) -> bytes:
    return _structure(TYPE_END_OF_TABLE, handle, b"", _Strings())


def entry_point(table_address: int, table_size: int) -> bytes:
    """The SMBIOS 3.0 64-bit entry point (§5.2.2, Table 2), 24 bytes with its checksum."""
    ep = bytearray(
        struct.pack(
            "<5sBBBBBBBIQ",
            SM3_ANCHOR,
            0,  # checksum, below
            SM3_ENTRY_POINT_SIZE,
            SMBIOS_MAJOR,
            SMBIOS_MINOR,
            SMBIOS_DOCREV,
            SM3_ENTRY_POINT_REVISION,
            0,  # reserved
            table_size,  # structure table maximum size
            table_address,
        )
    )
    ep[5] = (-sum(ep)) & 0xFF
    return bytes(ep)


def build_structures(spec: SmbiosSpec) -> bytes:
    """The structure table: types 0, 1, [11], 127 with handles 0, 1, 2, ..."""
    parts = [_bios_information(spec, 0), _system_information(spec, 1)]
    if spec.oem_strings:
        parts.append(_oem_strings(spec, len(parts)))
    parts.append(_end_of_table(len(parts)))
    return b"".join(parts)


def build_smbios(spec: SmbiosSpec) -> bytes:
    """The entry point at ``spec.address`` followed by the structure table, as one blob."""
    table = build_structures(spec)
    table_address = spec.address + SM3_ENTRY_POINT_SIZE
    blob = entry_point(table_address, len(table)) + table
    if spec.address + len(blob) > spec.limit:
        raise ValueError(
            f"SMBIOS tables need {len(blob)} bytes from {spec.address:#x}, more than fit below {spec.limit:#x}"
        )
    return blob
