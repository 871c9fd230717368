"""MSI-X: the capability, the vector table and the pending-bit array of one PCI function.

PCI Local Bus Specification 3.0 §6.8.2: the capability (ID 0x11) holds Message Control (table
size - 1 in bits 10:0, Function Mask bit 14, MSI-X Enable bit 15), the table's BAR indicator and
offset, and the PBA's. Each table entry is 16 bytes: Message Address (low, high), Message Data
and Vector Control (bit 0: mask). The PBA holds one pending bit per vector (§6.8.2.10).

A device raises a vector with ``MsixTable.signal``; a masked vector (entry masked, function
masked or MSI-X disabled) only sets its pending bit, and unmasking a pending vector delivers
it then (§6.8.2.9). What delivery means - a KVM GSI route plus an irqfd - is the engine's
business, behind the ``MsiRouter`` protocol.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from vmsh.devices.state import check_length, expect_state
from vmsh.state_types import U32, U64

LOG = logging.getLogger(__name__)

#: capability ID of MSI-X (PCI 3.0 Appendix H)
PCI_CAP_ID_MSIX = 0x11
#: MSI-X capability length: header, message control, table and PBA offset/BIR (§6.8.2)
MSIX_CAP_LENGTH = 12

# Message Control bits (§6.8.2.3)
MSIX_CONTROL_TABLE_SIZE_MASK = 0x07FF  # N - 1, read-only
MSIX_CONTROL_FUNCTION_MASK_BIT = 0x4000  # all vectors masked
MSIX_CONTROL_ENABLE_BIT = 0x8000  # MSI-X on (and INTx off)

#: bytes per table entry (§6.8.2.6-9)
MSIX_TABLE_ENTRY_SIZE = 16
MSIX_ENTRY_ADDR_LO = 0x0
MSIX_ENTRY_ADDR_HI = 0x4
MSIX_ENTRY_DATA = 0x8
MSIX_ENTRY_VECTOR_CONTROL = 0xC
MSIX_ENTRY_MASK_BIT = 0x1  # Vector Control bit 0: this vector is masked
#: at most 2048 vectors (table size is an 11-bit field)
MSIX_MAX_VECTORS = 2048


class MsiRouter(Protocol):
    """Delivers MSI messages (the engine: KVM GSI routing plus an irqfd per vector)."""

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        """The message of ``vector`` changed, or whether it may be delivered.

        ``masked`` is true when the entry, the whole function, or MSI-X itself is masked/off.
        """
        ...

    def trigger(self, vector: int) -> None:
        """Deliver ``vector``'s message now."""
        ...


@dataclass(frozen=True, slots=True)
class MsixEntry:
    """One table entry."""

    address: U64 = 0
    data: U32 = 0
    masked: bool = True  # entries reset masked (§6.8.2.9)


@dataclass(frozen=True, slots=True)
class MsixState:
    """Plain-data state of an ``MsixTable``."""

    entries: tuple[MsixEntry, ...]
    pending: tuple[bool, ...]
    enabled: bool = False
    function_masked: bool = False


class MsixTable:
    """The table and PBA of ``num_vectors`` vectors, plus the capability's control bits.

    :param num_vectors: table size (1..2048).
    :param router: told about every change and asked to deliver unmasked vectors.

    Example::

        msix = MsixTable(3, router)
        msix.control_write(MSIX_CONTROL_ENABLE_BIT)
        msix.table_write(0, struct.pack("<IIII", 0xFEE00000, 0, 0x41, 0))  # unmask vector 0
        msix.signal(0)                                                       # -> router.trigger(0)
    """

    state_type = MsixState

    def __init__(self, num_vectors: int, router: MsiRouter) -> None:
        if not 1 <= num_vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {num_vectors} out of range")
        self.num_vectors = num_vectors
        self.router = router
        self.table = bytearray(num_vectors * MSIX_TABLE_ENTRY_SIZE)
        for v in range(num_vectors):
            self.table[v * MSIX_TABLE_ENTRY_SIZE + MSIX_ENTRY_VECTOR_CONTROL] = MSIX_ENTRY_MASK_BIT
        self.pending = [False] * num_vectors
        self.enabled = False
        self.function_masked = False
        self._lock = threading.RLock()

    # -- sizes -----------------------------------------------------------------------------

    @property
    def table_size(self) -> int:
        """Bytes of the table."""
        return len(self.table)

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA (whole QWORDs, §6.8.2.10)."""
        return ((self.num_vectors + 63) // 64) * 8

    def capability_body(self, table_bir: int, table_offset: int, pba_bir: int, pba_offset: int) -> bytes:
        """The capability after its ID/next bytes: message control, table and PBA offset/BIR."""
        return struct.pack("<HII", self.num_vectors - 1, table_offset | table_bir, pba_offset | pba_bir)

    @staticmethod
    def capability_write_mask() -> bytes:
        """Only Function Mask and Enable are guest-writable."""
        return struct.pack("<HII", MSIX_CONTROL_FUNCTION_MASK_BIT | MSIX_CONTROL_ENABLE_BIT, 0, 0)

    # -- entries ---------------------------------------------------------------------------

    def entry(self, vector: int) -> MsixEntry:
        """The decoded entry of ``vector``."""
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, vector * MSIX_TABLE_ENTRY_SIZE)
        return MsixEntry(lo | hi << 32, data, bool(ctrl & MSIX_ENTRY_MASK_BIT))

    def is_masked(self, vector: int) -> bool:
        """True if ``vector`` cannot be delivered now."""
        return not self.enabled or self.function_masked or self.entry(vector).masked

    def _update(self, vector: int) -> None:
        e = self.entry(vector)
        self.router.update(vector, e.address, e.data, self.is_masked(vector))
        if self.pending[vector] and not self.is_masked(vector):
            self.pending[vector] = False
            self.router.trigger(vector)

    # -- guest side ------------------------------------------------------------------------

    def control_write(self, control: int) -> None:
        """The guest wrote Message Control (only bits 14 and 15 count)."""
        with self._lock:
            enabled = bool(control & MSIX_CONTROL_ENABLE_BIT)
            masked = bool(control & MSIX_CONTROL_FUNCTION_MASK_BIT)
            if (enabled, masked) == (self.enabled, self.function_masked):
                return
            self.enabled, self.function_masked = enabled, masked
            for v in range(self.num_vectors):
                self._update(v)

    def control_bits(self) -> int:
        """Function Mask and Enable as Message Control bits."""
        return ((MSIX_CONTROL_ENABLE_BIT if self.enabled else 0)
                | (MSIX_CONTROL_FUNCTION_MASK_BIT if self.function_masked else 0))

    def table_read(self, offset: int, size: int) -> bytes:
        """Read the table (out of range reads as zeros)."""
        with self._lock:
            if offset < 0 or size <= 0:
                return b"\0" * max(size, 0)
            return bytes(self.table[offset:offset + size]).ljust(size, b"\0")

    def table_write(self, offset: int, data: bytes) -> None:
        """Write the table; each touched entry is reported to the router if it changed."""
        end = offset + len(data)
        if offset < 0 or not data or end > len(self.table):
            return
        with self._lock:
            first, last = offset // MSIX_TABLE_ENTRY_SIZE, (end - 1) // MSIX_TABLE_ENTRY_SIZE
            before = [self.entry(v) for v in range(first, last + 1)]
            self.table[offset:end] = data
            for v, old in zip(range(first, last + 1), before, strict=True):
                if self.entry(v) != old:
                    self._update(v)

    def pba_read(self, offset: int, size: int) -> bytes:
        """Read the PBA (read-only; writes are ignored, §6.8.2.10)."""
        with self._lock:
            bits = sum(1 << v for v, p in enumerate(self.pending) if p)
            raw = bits.to_bytes(self.pba_size, "little")
            if offset < 0 or size <= 0:
                return b"\0" * max(size, 0)
            return raw[offset:offset + size].ljust(size, b"\0")

    # -- device side -----------------------------------------------------------------------

    def signal(self, vector: int) -> None:
        """Raise ``vector``: deliver it, or mark it pending while it is masked."""
        with self._lock:
            if not 0 <= vector < self.num_vectors:
                return
            if not self.enabled:
                # Without MSI-X the function would use INTx, which this model does not have.
                LOG.debug("MSI-X vector %d raised while MSI-X is disabled", vector)
                return
            if self.function_masked or self.entry(vector).masked:
                self.pending[vector] = True
                return
            self.router.trigger(vector)

    def reset(self) -> None:
        """Back to power-on: all entries masked and zero, nothing pending, MSI-X off."""
        with self._lock:
            self.restore(MsixState(entries=(MsixEntry(),) * self.num_vectors,
                                   pending=(False,) * self.num_vectors))

    # -- snapshot --------------------------------------------------------------------------

    def state(self) -> MsixState:
        """The table, pending bits and control bits as plain data."""
        with self._lock:
            return MsixState(entries=tuple(self.entry(v) for v in range(self.num_vectors)),
                             pending=tuple(self.pending), enabled=self.enabled,
                             function_masked=self.function_masked)

    def restore(self, state: MsixState) -> None:
        """Load ``state`` (untrusted) and tell the router about every vector.

        :raises DeviceStateError: for another state class, another number of vectors (entries
            or pending bits), or an address or data wider than its register.
        """
        state = expect_state(state, MsixState)
        check_length("entries", state.entries, self.num_vectors)
        check_length("pending", state.pending, self.num_vectors)
        table = bytearray(len(self.table))
        for v, e in enumerate(state.entries):
            struct.pack_into("<QII", table, v * MSIX_TABLE_ENTRY_SIZE, e.address, e.data,
                             MSIX_ENTRY_MASK_BIT if e.masked else 0)
        with self._lock:
            self.table[:] = table
            self.pending = [bool(p) for p in state.pending]
            self.enabled = bool(state.enabled)
            self.function_masked = bool(state.function_masked)
            for v in range(self.num_vectors):
                self._update(v)
