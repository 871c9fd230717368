"""Shared specs and small parsers for the ACPI tests."""

from __future__ import annotations

import struct

import pytest

from vmsh.engine.acpi import AcpiSpec, GedSpec, InterruptOverride, PciSegment

GED_ADDRESS = 0x3FFF_FFF0_0000
GED_IRQ = 5


def two_segment_spec(**changes: object) -> AcpiSpec:
    values: dict[str, object] = dict(
        boot_vcpus=2,
        max_vcpus=4,
        pci_segments=(
            PciSegment(0, 0xE800_0000, mmio32=(0xC000_0000, 0x1400_0000), mmio64=(0x2_0000_0000, 0x1_0000_0000)),
            PciSegment(1, 0xE810_0000, mmio32=(0xD400_0000, 0x1400_0000), mmio64=(0x3_0000_0000, 0x1_0000_0000)),
        ),
        ged=GedSpec(GED_ADDRESS, GED_IRQ),
        interrupt_overrides=(InterruptOverride(4, 4),),
    )
    values.update(changes)
    return AcpiSpec(**values)  # type: ignore[arg-type]  # keyword overrides of mixed types, checked by AcpiSpec


@pytest.fixture
def spec() -> AcpiSpec:
    return two_segment_spec()


def sdt_header(table: bytes) -> dict[str, object]:
    sig, length, rev, csum, oem, table_id, oem_rev, creator, creator_rev = struct.unpack_from(
        "<4sIBB6s8sI4sI", table
    )
    return dict(
        signature=sig.decode(),
        length=length,
        revision=rev,
        checksum=csum,
        oem_id=oem.decode(),
        table_id=table_id.decode(),
        oem_revision=oem_rev,
        creator_id=creator.decode(),
        creator_revision=creator_rev,
    )


def madt_entries(table: bytes) -> list[tuple[int, bytes]]:
    """(type, entry bytes) of each MADT interrupt controller structure."""
    out = []
    off = 44
    while off < len(table):
        kind, length = table[off], table[off + 1]
        assert length >= 2
        out.append((kind, table[off : off + length]))
        off += length
    assert off == len(table)
    return out
