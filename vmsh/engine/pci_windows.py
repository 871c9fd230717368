"""Where the PCI segments live in guest physical memory: each segment's ECAM window and its
share of the 32-bit and 64-bit MMIO apertures.

The layout is cloud-hypervisor's x86_64 one (its ``arch/src/x86_64/layout.rs`` and
``docs/memory.md``): 640 MiB of 32-bit MMIO from 3 GiB, 64-bit MMIO from the end of RAM (at
least 4 GiB) up to the top of the guest's physical address space less the platform area; each
``--pci-segment`` gets a share by its ``mmio32_aperture_weight`` / ``mmio64_aperture_weight``.
The same config and host give the same windows, for a boot and for each of its restores.
"""

from __future__ import annotations

from vmsh.config import model as m
from vmsh.devices.pci.root import PciEcam
from vmsh.engine.acpi.spec import PciSegment
from vmsh.engine.boot import layout

#: 640 MiB of 32-bit MMIO from 3 GiB
MMIO32_START, MMIO32_SIZE = 0xC000_0000, 640 << 20
RAM_64BIT_START = 1 << 32
#: the top of the physical address space is kept for platform devices
PLATFORM_AREA = (64 << 10) + (1 << 20)


def _split(base: int, size: int, weights: list[int], align: int) -> list[tuple[int, int]]:
    """``[base, base+size)`` cut into aligned pieces by weight; the last takes the rest."""
    out, cursor, total = [], base, sum(weights)
    for i, weight in enumerate(weights):
        share = size - (cursor - base) if i == len(weights) - 1 else (size * weight // total) & ~(align - 1)
        out.append((cursor, share))
        cursor += share
    return out


def pci_segments(cfg: m.VmConfig, ram_end: int, phys_bits: int) -> tuple[PciSegment, ...]:
    """Each segment's ECAM and its share of the 32-bit and 64-bit MMIO windows."""
    count = cfg.num_pci_segments()
    weights = {s.pci_segment: s for s in cfg.pci_segments or []}
    w32 = [weights[i].mmio32_aperture_weight if i in weights else 1 for i in range(count)]
    w64 = [weights[i].mmio64_aperture_weight if i in weights else 1 for i in range(count)]
    start64 = max(ram_end, RAM_64BIT_START)
    size64 = max(0, (1 << phys_bits) - PLATFORM_AREA - start64)
    win32 = _split(MMIO32_START, MMIO32_SIZE, w32, 1 << 20)
    win64 = _split(start64, size64, w64, 1 << 30)
    return tuple(
        PciSegment(id=i, ecam_base=layout.PCI_MMCONFIG_START + i * PciEcam.SIZE, mmio32=win32[i], mmio64=win64[i])
        for i in range(count)
    )
