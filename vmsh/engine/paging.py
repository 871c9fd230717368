"""Guest-virtual to guest-physical translation by walking the guest's own page tables.

The PVM instruction handler (``pvm.py``) must read and write memory operands of instructions
KVM could not emulate; those are guest virtual addresses under the guest's CR3. Supported
modes: paging off (identity), 4-level and 5-level long-mode paging (Intel SDM vol. 3A §4.5).
Legacy 32-bit and PAE paging are not: a PVM host refuses 32-bit paging anyway
(see ``pvm.py``), and Linux x86_64 runs in long mode.

The walker only reads memory through a ``read_u64(gpa)`` callable, so it is unit-tested on a
fake memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmsh.errors import GuestMemoryError

LOG = logging.getLogger(__name__)

# CR0 / CR4 / EFER bits that select the paging mode (SDM vol. 3A §4.1.1, Table 4-1)
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10

# Paging-structure entry bits (SDM vol. 3A §4.5, Tables 4-15 to 4-20)
PTE_P = 1 << 0  # present
PTE_RW = 1 << 1  # writable
PTE_US = 1 << 2  # user
PTE_PS = 1 << 7  # maps a page (in PDPTE: 1 GiB, in PDE: 2 MiB)
#: physical-address bits 51:12 of an entry
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000

# #PF error code bits (SDM vol. 3A §4.7)
PF_PRESENT = 1 << 0
PF_WRITE = 1 << 1


class PageFault(GuestMemoryError):
    """The guest's page tables do not map the address for this access."""

    def __init__(self, gva: int, error_code: int) -> None:
        super().__init__(f"page fault at {gva:#x} (error code {error_code:#x})")
        self.gva = gva
        self.error_code = error_code


@dataclass(frozen=True, slots=True)
class PagingMode:
    """The control registers that decide how a virtual address translates."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def is_paging(self) -> bool:
        """True when CR0.PG is set."""
        return bool(self.cr0 & CR0_PG)

    @property
    def levels(self) -> int:
        """4 or 5 for long-mode paging; 0 with paging off.

        :raises GuestMemoryError: for 32-bit or PAE paging, which the walker does not do.
        """
        if not self.is_paging:
            return 0
        if not (self.efer & EFER_LMA and self.cr4 & CR4_PAE):
            raise GuestMemoryError("32-bit and PAE guest paging are not supported by the walker")
        return 5 if self.cr4 & CR4_LA57 else 4


def translate(mode: PagingMode, gva: int, read_u64: Callable[[int], int], write: bool = False) -> int:
    """Translate ``gva`` to a guest physical address.

    :param read_u64: reads a paging-structure entry at a guest physical address.
    :param write: the access is a write (a read-only mapping then faults; CR0.WP is assumed,
        as Linux sets it).
    :raises PageFault: if an entry on the way is not present, or a write hits a read-only page.
    """
    levels = mode.levels
    if levels == 0:
        return gva & 0xFFFF_FFFF_FFFF_FFFF
    table = mode.cr3 & PTE_ADDR_MASK
    writable = True
    # Level shifts: PML5 48, PML4 39, PDPT 30, PD 21, PT 12.
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        entry = read_u64(table + ((gva >> shift) & 0x1FF) * 8)
        if not entry & PTE_P:
            raise PageFault(gva, PF_WRITE if write else 0)
        writable = writable and bool(entry & PTE_RW)
        if level in (2, 3) and entry & PTE_PS:
            page_mask = (1 << shift) - 1
            gpa = (entry & PTE_ADDR_MASK & ~page_mask) | (gva & page_mask)
            break
        table = entry & PTE_ADDR_MASK
    else:
        gpa = table | (gva & 0xFFF)
    if write and not writable:
        raise PageFault(gva, PF_PRESENT | PF_WRITE)
    return gpa


def read_virt(mode: PagingMode, gva: int, length: int, read_u64: Callable[[int], int],
              read_phys: Callable[[int, int], bytes]) -> bytes:
    """Read ``length`` bytes at ``gva``, page by page (a span may cross into an unmapped page)."""
    out = b""
    while length > 0:
        n = min(length, 0x1000 - (gva & 0xFFF))
        out += read_phys(translate(mode, gva, read_u64), n)
        gva += n
        length -= n
    return out


def write_virt(mode: PagingMode, gva: int, data: bytes, read_u64: Callable[[int], int],
               write_phys: Callable[[int, bytes], None]) -> None:
    """Write ``data`` at ``gva``; every page is translated before any byte is written."""
    parts = []
    pos = 0
    while pos < len(data):
        n = min(len(data) - pos, 0x1000 - ((gva + pos) & 0xFFF))
        parts.append((translate(mode, gva + pos, read_u64, write=True), data[pos:pos + n]))
        pos += n
    for gpa, chunk in parts:
        write_phys(gpa, chunk)
