"""The modern virtio-pci transport (virtio 1.2 §4.1), with cloud-hypervisor's BAR layout.

One PCI function per device: vendor 0x1af4, device 0x1040 + virtio type, revision 1
(§4.1.2), and one 512 KiB memory BAR holding every structure (cloud-hypervisor's
``virtio-devices/src/transport/pci_device.rs``)::

    0x00000  common configuration (56 bytes, §4.1.4.3)
    0x02000  ISR status (1 byte, §4.1.4.5; reading clears it)
    0x04000  device configuration (0x1000, §4.1.4.6)
    0x06000  notifications (0x1000, notify_off_multiplier 4: queue i at 0x6000 + 4 i, §4.1.4.4)
    0x08000  MSI-X table (PCI 3.0 §6.8.2)
    0x48000  MSI-X pending bit array

The capability list has the five virtio structures (COMMON, ISR, DEVICE, NOTIFY, PCI_CFG)
and MSI-X with one vector per queue plus one for configuration changes.

``VirtioPciDevice`` is a register model: the engine maps ``bar_read``/``bar_write`` at the BAR
address on its MMIO bus, follows ``on_bar_change`` when the guest moves the BAR, and calls
``notify`` when a queue's ioeventfd fires. Nothing a guest writes raises: bad values are
ignored or, for a bad queue at DRIVER_OK, put the device into DEVICE_NEEDS_RESET.

``on_lifecycle`` is told ``"activated"`` when the device starts (the driver set DRIVER_OK, or
a restore brought a running device back) and ``"reset"`` when the driver resets a started
device: cloud-hypervisor's ``virtio-device`` events (its ``virtio-devices/src/*.rs``
``activate``/``reset``, and ``transport/pci_device.rs``, which resets only an activated device).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmsh.devices.pci.config_space import (
    BAR0,
    COMMAND,
    COMMAND_MEMORY_SPACE_BIT,
    PciConfigSpace,
    PciConfigState,
)
from vmsh.devices.pci.msix import PCI_CAP_ID_MSIX, MsiRouter, MsixState, MsixTable
from vmsh.devices.state import check_bits, check_length, check_range, expect_state, within
from vmsh.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FEATURES_OK,
    VirtioDevice,
    has_feature,
)
from vmsh.devices.virtio.queue import VirtQueue, VirtQueueState, check_live_layout
from vmsh.errors import DeviceStateError, VmshError
from vmsh.guest_memory import GuestMemory
from vmsh.state_types import U8, U16, U32, U64

LOG = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: modern device IDs are 0x1040 + the virtio device type (§4.1.2.1)
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1
#: class codes as cloud-hypervisor sets them (its ``pci_device.rs``)
PCI_CLASS_NETWORK_ETHERNET = 0x020000
PCI_CLASS_MASS_STORAGE_OTHER = 0x018000
PCI_CLASS_OTHER = 0xFFFF00

# Virtio PCI capability (§4.1.4): vendor-specific capability ID and cfg_type values
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
#: struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
VIRTIO_PCI_CAP_LEN = 16
#: notify and pci_cfg capabilities append one le32 (notify_off_multiplier / pci_cfg_data)
VIRTIO_PCI_CAP_EXT_LEN = 20

# BAR 0 layout (cloud-hypervisor's ``pci_device.rs``)
BAR_SIZE = 0x80000
COMMON_CONFIG_OFFSET = 0x0000
COMMON_CONFIG_SIZE = 56
ISR_CONFIG_OFFSET = 0x2000
ISR_CONFIG_SIZE = 1
DEVICE_CONFIG_OFFSET = 0x4000
DEVICE_CONFIG_SIZE = 0x1000
NOTIFICATION_OFFSET = 0x6000
NOTIFICATION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x8000
MSIX_TABLE_SIZE = 0x40000
MSIX_PBA_OFFSET = 0x48000
MSIX_PBA_SIZE = 0x800
#: at most this many queues fit the notification area
MAX_QUEUES = NOTIFICATION_SIZE // NOTIFY_OFF_MULTIPLIER

# Common configuration registers (struct virtio_pci_common_cfg, §4.1.4.3)
COMMON_DEVICE_FEATURE_SELECT = 0x00  # le32 RW
COMMON_DEVICE_FEATURE = 0x04  # le32 RO
COMMON_DRIVER_FEATURE_SELECT = 0x08  # le32 RW
COMMON_DRIVER_FEATURE = 0x0C  # le32 RW
COMMON_CONFIG_MSIX_VECTOR = 0x10  # le16 RW
COMMON_NUM_QUEUES = 0x12  # le16 RO
COMMON_DEVICE_STATUS = 0x14  # u8 RW
COMMON_CONFIG_GENERATION = 0x15  # u8 RO
COMMON_QUEUE_SELECT = 0x16  # le16 RW
COMMON_QUEUE_SIZE = 0x18  # le16 RW
COMMON_QUEUE_MSIX_VECTOR = 0x1A  # le16 RW
COMMON_QUEUE_ENABLE = 0x1C  # le16 RW
COMMON_QUEUE_NOTIFY_OFF = 0x1E  # le16 RO
COMMON_QUEUE_DESC_LO = 0x20  # le32 RW
COMMON_QUEUE_DESC_HI = 0x24
COMMON_QUEUE_DRIVER_LO = 0x28
COMMON_QUEUE_DRIVER_HI = 0x2C
COMMON_QUEUE_DEVICE_LO = 0x30
COMMON_QUEUE_DEVICE_HI = 0x34

#: (offset, size) of every common configuration register
_COMMON_FIELDS = (
    (COMMON_DEVICE_FEATURE_SELECT, 4), (COMMON_DEVICE_FEATURE, 4), (COMMON_DRIVER_FEATURE_SELECT, 4),
    (COMMON_DRIVER_FEATURE, 4), (COMMON_CONFIG_MSIX_VECTOR, 2), (COMMON_NUM_QUEUES, 2),
    (COMMON_DEVICE_STATUS, 1), (COMMON_CONFIG_GENERATION, 1), (COMMON_QUEUE_SELECT, 2),
    (COMMON_QUEUE_SIZE, 2), (COMMON_QUEUE_MSIX_VECTOR, 2), (COMMON_QUEUE_ENABLE, 2),
    (COMMON_QUEUE_NOTIFY_OFF, 2), (COMMON_QUEUE_DESC_LO, 4), (COMMON_QUEUE_DESC_HI, 4),
    (COMMON_QUEUE_DRIVER_LO, 4), (COMMON_QUEUE_DRIVER_HI, 4), (COMMON_QUEUE_DEVICE_LO, 4),
    (COMMON_QUEUE_DEVICE_HI, 4),
)

#: "no MSI-X vector" (§4.1.5.1.2)
VIRTIO_MSI_NO_VECTOR = 0xFFFF
# ISR status bits (§4.1.4.5)
VIRTIO_PCI_ISR_QUEUE = 0x1  # a used buffer notification
VIRTIO_PCI_ISR_CONFIG = 0x2  # a configuration change notification
#: driver_feature_select values that mean something (features 0..127)
_MAX_FEATURE_SELECT = 4
#: what ``on_lifecycle`` is told
ACTIVATED = "activated"
RESET = "reset"


def _class_code(device_type: int) -> int:
    if device_type == VIRTIO_ID_NET:
        return PCI_CLASS_NETWORK_ETHERNET
    if device_type == VIRTIO_ID_BLOCK:
        return PCI_CLASS_MASS_STORAGE_OTHER
    return PCI_CLASS_OTHER


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A virtio_pci_cap body after cap_vndr/cap_next: cap_len, cfg_type, bar 0, id 0, padding."""
    return struct.pack("<BBBBxxII", VIRTIO_PCI_CAP_LEN + len(extra), cfg_type, 0, 0, offset, length) + extra


@dataclass(frozen=True, slots=True)
class VirtioPciState:
    """Plain-data state of a ``VirtioPciDevice`` and its device.

    ``device`` is the device's own state (its class is the device's ``state_type``: the
    decoder needs the device to know it).
    """

    config: PciConfigState
    msix: MsixState
    queues: tuple[VirtQueueState, ...]
    queue_msix_vectors: tuple[U16, ...]
    device_feature_select: U32 = 0
    driver_feature_select: U32 = 0
    #: features 0..127 can be written (four 32-bit selects), so wider than the other registers
    driver_features: int = 0
    device_status: U8 = 0
    config_generation: U8 = 0
    config_msix_vector: U16 = VIRTIO_MSI_NO_VECTOR
    queue_select: U16 = 0
    isr: U8 = 0
    activated: bool = False
    needs_reset: bool = False
    bar_address: U64 = 0
    device: Any = None


class _VirtioPciConfig(PciConfigSpace):
    """The function's configuration space, with hooks for BAR 0, MSI-X control and PCI_CFG."""

    def __init__(self, owner: VirtioPciDevice, device_type: int) -> None:
        device_id = VIRTIO_PCI_DEVICE_ID_BASE + device_type
        super().__init__(VIRTIO_PCI_VENDOR_ID, device_id, _class_code(device_type),
                         revision=VIRTIO_PCI_REVISION, subsystem_vendor=VIRTIO_PCI_VENDOR_ID,
                         subsystem=device_id)
        self.owner = owner
        self.msix_cap = 0
        self.pci_cfg_cap = 0

    def read(self, offset: int, size: int) -> bytes:
        data = self.pci_cfg_cap + 16
        if self.pci_cfg_cap and data <= offset < data + 4 and size in (1, 2, 4) and offset + size <= data + 4:
            return self.owner._pci_cfg_read(offset - data, size)
        return super().read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (1, 2, 4) or offset < 0 or offset % size:
            return
        window = self.pci_cfg_cap + 16
        if self.pci_cfg_cap and window <= offset < window + 4:
            self.owner._pci_cfg_write(offset - window, data)
            return
        super().write(offset, data)
        end = offset + size
        if offset < BAR0 + 8 and end > BAR0:
            self.owner._bar_register_written(offset, data)
        if offset < COMMAND + 2 and end > COMMAND:
            self.owner._command_written()
        control = self.msix_cap + 2
        if self.msix_cap and offset < control + 2 and end > control:
            self.owner.msix.control_write(self.get(control, 2))
            self.owner.device.interrupts_changed()


class _Interrupt:
    """The ``VirtioInterrupt`` the transport hands its device: ISR bits plus MSI-X vectors."""

    def __init__(self, owner: VirtioPciDevice) -> None:
        self.owner = owner

    def signal_used_queue(self, queue_index: int) -> None:
        o = self.owner
        o._set_isr(VIRTIO_PCI_ISR_QUEUE)
        if 0 <= queue_index < len(o.queue_msix_vectors):
            vector = o.queue_msix_vectors[queue_index]
            if vector != VIRTIO_MSI_NO_VECTOR:
                o.msix.signal(vector)

    def queue_eventfd(self, queue_index: int) -> int | None:
        """The eventfd that raises ``queue_index``'s MSI-X vector without this process (a KVM
        irqfd), for a backend that signals used buffers itself (vhost-user); None when the
        queue has no vector or the router has no such fds."""
        o = self.owner
        if not 0 <= queue_index < len(o.queue_msix_vectors):
            return None
        vector = o.queue_msix_vectors[queue_index]
        eventfd = getattr(o.msix.router, "eventfd", None)
        if vector == VIRTIO_MSI_NO_VECTOR or eventfd is None:
            return None
        fd: int | None = eventfd(vector)
        return fd

    def queue_irqfd(self, queue_index: int) -> int | None:
        """The irqfd that raises ``queue_index``'s vector, only while writing it is what
        ``signal_used_queue`` would do: MSI-X on, neither the function nor the vector masked
        (a device thread that signals by itself asks again after ``interrupts_changed``)."""
        o = self.owner
        if not 0 <= queue_index < len(o.queue_msix_vectors):
            return None
        vector = o.queue_msix_vectors[queue_index]
        if vector == VIRTIO_MSI_NO_VECTOR or vector >= o.msix.num_vectors or o.msix.is_masked(vector):
            return None
        return self.queue_eventfd(queue_index)

    def signal_config_change(self) -> None:
        o = self.owner
        with o._isr_lock:
            o.config_generation = (o.config_generation + 1) & 0xFF
        o._set_isr(VIRTIO_PCI_ISR_CONFIG)
        if o.config_msix_vector != VIRTIO_MSI_NO_VECTOR:
            o.msix.signal(o.config_msix_vector)


class VirtioPciDevice:
    """A virtio device behind the modern PCI transport (a ``PciFunction``).

    :param device: the device model.
    :param memory: guest RAM, for the virtqueues.
    :param router: delivers MSI-X messages.
    :param bar64: make BAR 0 a 64-bit memory BAR (cloud-hypervisor uses a 32-bit BAR only for
        cold-plugged block devices on segment 0).

    Example::

        dev = VirtioPciDevice(VirtioRng(), memory, router)
        dev.set_bar_address(0xE000_0000)   # the engine's allocation; map bar_read/bar_write there
        dev.on_bar_change = remap          # called with (old, new) when the guest moves BAR 0
        dev.notify(0)                      # the ioeventfd at notify_offset(0) fired
    """

    BAR_SIZE = BAR_SIZE
    state_type = VirtioPciState

    def __init__(self, device: VirtioDevice, memory: GuestMemory, router: MsiRouter, *, bar64: bool = True) -> None:
        num_queues = len(device.queue_max_sizes)
        if not 0 < num_queues <= MAX_QUEUES:
            raise ValueError(f"a virtio-pci device has 1..{MAX_QUEUES} queues, not {num_queues}")
        self.device = device
        self.memory = memory
        self.bar64 = bar64
        self.msix = MsixTable(num_queues + 1, router)
        self.queues = [VirtQueue(memory, size) for size in device.queue_max_sizes]
        self.queue_msix_vectors = [VIRTIO_MSI_NO_VECTOR] * num_queues
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.device_status = 0
        self.config_generation = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        self.activated = False
        #: set when activation failed (the device's own errors are in ``device.needs_reset``)
        self.needs_reset = False
        #: called with (old, new) when the guest moves BAR 0
        self.on_bar_change: Callable[[int, int], None] | None = None
        #: called with ACTIVATED or RESET (with the device's lock held: it must not block)
        self.on_lifecycle: Callable[[str], None] | None = None
        self.interrupt = _Interrupt(self)
        self._bar_address = 0
        self._bar_pending = False
        self._lock = threading.RLock()
        self._isr_lock = threading.Lock()
        self.config = _VirtioPciConfig(self, device.device_type)
        self._build_config()

    # -- configuration space -----------------------------------------------------------------

    def _build_config(self) -> None:
        c = self.config
        c.add_memory_bar(0, BAR_SIZE, is_64bit=self.bar64)
        c.add_capability(PCI_CAP_ID_VNDR,
                         _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CONFIG_OFFSET, COMMON_CONFIG_SIZE))
        c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CONFIG_OFFSET, ISR_CONFIG_SIZE))
        c.add_capability(PCI_CAP_ID_VNDR,
                         _virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE))
        c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFICATION_OFFSET, NOTIFICATION_SIZE,
                                                      struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        # virtio_pci_cfg_cap (§4.1.4.9): the driver picks bar/offset/length, then accesses pci_cfg_data.
        mask = struct.pack("<BBBBxxII", 0, 0, 0xFF, 0, 0xFFFF_FFFF, 0xFFFF_FFFF)
        c.pci_cfg_cap = c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, b"\0" * 4), mask)
        c.msix_cap = c.add_capability(PCI_CAP_ID_MSIX,
                                      self.msix.capability_body(0, MSIX_TABLE_OFFSET, 0, MSIX_PBA_OFFSET),
                                      self.msix.capability_write_mask())

    def bar_address(self) -> int:
        """BAR 0's guest address as last programmed (0 if unassigned)."""
        return self._bar_address

    def set_bar_address(self, addr: int) -> None:
        """Place BAR 0 at ``addr`` (the engine's allocation before boot; no callback)."""
        if addr % BAR_SIZE or addr < 0 or addr >= (1 << 64 if self.bar64 else 1 << 32):
            raise ValueError(f"BAR address {addr:#x} does not fit a {BAR_SIZE:#x} BAR")
        with self._lock:
            self.config.set_bar_address(0, addr)
            self._bar_address = addr
            self._bar_pending = False

    def _bar_register_written(self, offset: int, data: bytes) -> None:
        # Sizing (§6.2.5.1) writes all ones and restores the old value: not a move. A 64-bit
        # BAR is moved in two writes, low dword then high (linux drivers/pci/setup-res.c
        # pci_std_update_resource); report once the high half is written, or when the guest
        # turns memory decoding back on.
        if data == b"\xff" * len(data):
            return
        if self.bar64 and offset < BAR0 + 4:
            self._bar_pending = True
            return
        self._report_bar()

    def _command_written(self) -> None:
        if self._bar_pending and self.config.get(COMMAND, 2) & COMMAND_MEMORY_SPACE_BIT:
            self._report_bar()

    def _report_bar(self) -> None:
        self._bar_pending = False
        new = self.config.bar_address(0)
        if new == self._bar_address:
            return
        old, self._bar_address = self._bar_address, new
        LOG.debug("BAR 0 moved from %#x to %#x", old, new)
        if self.on_bar_change is not None:
            self.on_bar_change(old, new)

    def _pci_cfg_window(self) -> tuple[int, int, int]:
        cap = self.config.pci_cfg_cap
        return self.config.get(cap + 4, 1), self.config.get(cap + 8, 4), self.config.get(cap + 12, 4)

    def _pci_cfg_read(self, pos: int, size: int) -> bytes:
        bar, offset, length = self._pci_cfg_window()
        if bar != 0 or length not in (1, 2, 4) or pos != 0 or size < length:
            return b"\0" * size
        return self.bar_read(offset, length).ljust(size, b"\0")

    def _pci_cfg_write(self, pos: int, data: bytes) -> None:
        bar, offset, length = self._pci_cfg_window()
        if bar != 0 or length not in (1, 2, 4) or pos != 0 or len(data) < length:
            return
        self.bar_write(offset, data[:length])

    # -- BAR 0 -----------------------------------------------------------------------------

    def notify_offset(self, queue_index: int) -> int:
        """Offset in BAR 0 of queue ``queue_index``'s notification address (§4.1.4.4)."""
        return NOTIFICATION_OFFSET + NOTIFY_OFF_MULTIPLIER * queue_index

    def bar_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` in BAR 0; anything unmapped reads as zeros."""
        size = max(0, size)
        if not 0 < size <= 8 or offset < 0:
            return b"\0" * size
        if offset < COMMON_CONFIG_SIZE:
            with self._lock:
                return self._common_image()[offset:offset + size].ljust(size, b"\0")
        if offset == ISR_CONFIG_OFFSET:
            with self._isr_lock:
                isr, self.isr = self.isr, 0  # reading clears it (§4.1.4.5)
            return bytes([isr]).ljust(size, b"\0")
        if DEVICE_CONFIG_OFFSET <= offset < DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE:
            return self.device.read_config(offset - DEVICE_CONFIG_OFFSET, size)
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE:
            return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + MSIX_PBA_SIZE:
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return b"\0" * size

    def bar_write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` in BAR 0; writes to read-only or unmapped bytes are ignored."""
        if not 0 < len(data) <= 8 or offset < 0:
            return
        if offset < COMMON_CONFIG_SIZE:
            self._common_write(offset, bytes(data))
        elif DEVICE_CONFIG_OFFSET <= offset < DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE:
            self.device.write_config(offset - DEVICE_CONFIG_OFFSET, bytes(data))
        elif NOTIFICATION_OFFSET <= offset < NOTIFICATION_OFFSET + NOTIFICATION_SIZE:
            self.notify((offset - NOTIFICATION_OFFSET) // NOTIFY_OFF_MULTIPLIER)
        elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, bytes(data))
            self.device.interrupts_changed()

    def notify(self, queue_index: int) -> None:
        """The driver kicked queue ``queue_index`` (an ioeventfd fired, or a notify write)."""
        if self.activated and 0 <= queue_index < len(self.queues):
            self.device.queue_notify(queue_index)

    def _set_isr(self, bits: int) -> None:
        with self._isr_lock:
            self.isr |= bits

    # -- common configuration ----------------------------------------------------------------

    def _selected(self) -> VirtQueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    @property
    def status(self) -> int:
        """Device status as the driver reads it (with DEVICE_NEEDS_RESET when it applies)."""
        needs = self.needs_reset or self.device.needs_reset
        return self.device_status | (VIRTIO_STATUS_DEVICE_NEEDS_RESET if needs else 0)

    def _common_image(self) -> bytes:
        q = self._selected()
        sel = self.device_feature_select
        device_feature = (self.device.avail_features >> (32 * sel)) & 0xFFFF_FFFF if sel < _MAX_FEATURE_SELECT else 0
        driver_feature = (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF \
            if self.driver_feature_select < _MAX_FEATURE_SELECT else 0
        vector = self.queue_msix_vectors[self.queue_select] if q is not None else VIRTIO_MSI_NO_VECTOR
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ", sel, device_feature, self.driver_feature_select, driver_feature,
            self.config_msix_vector, len(self.queues), self.status, self.config_generation,
            self.queue_select, q.size if q is not None else 0, vector,
            int(q.ready) if q is not None else 0, self.queue_select if q is not None else 0,
            q.desc_table if q is not None else 0, q.avail_ring if q is not None else 0,
            q.used_ring if q is not None else 0)

    def _common_write(self, offset: int, data: bytes) -> None:
        with self._lock:
            image = bytearray(self._common_image())
            end = min(offset + len(data), COMMON_CONFIG_SIZE)
            image[offset:end] = data[:end - offset]
            for field, size in _COMMON_FIELDS:
                if field < end and field + size > offset:
                    self._common_field(field, int.from_bytes(image[field:field + size], "little"))

    def _common_field(self, field: int, value: int) -> None:
        if field == COMMON_DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif field == COMMON_DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif field == COMMON_DRIVER_FEATURE:
            sel = self.driver_feature_select
            if sel < _MAX_FEATURE_SELECT and not self.device_status & VIRTIO_STATUS_FEATURES_OK:
                shift = 32 * sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif field == COMMON_CONFIG_MSIX_VECTOR:
            self.config_msix_vector = self._vector(value)
        elif field == COMMON_DEVICE_STATUS:
            self._status_write(value)
        elif field == COMMON_QUEUE_SELECT:
            self.queue_select = value
        else:
            self._queue_field(field, value)

    def _check_vector(self, field: str, vector: int) -> None:
        if vector != VIRTIO_MSI_NO_VECTOR and vector >= self.msix.num_vectors:
            raise DeviceStateError(field, f"vector {vector} is beyond the MSI-X table of {self.msix.num_vectors}")

    def _vector(self, value: int) -> int:
        # An unknown vector is refused by reading back NO_VECTOR (§4.1.5.1.2.1).
        return value if value < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR

    def _queue_field(self, field: int, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if field == COMMON_QUEUE_MSIX_VECTOR:
            self.queue_msix_vectors[self.queue_select] = self._vector(value)
            self.device.interrupts_changed()
            return
        if q.ready or self.device_status & VIRTIO_STATUS_DRIVER_OK:
            return  # a live queue's layout cannot change (§4.1.4.3.2); queue_enable 0 is not a reset
        if field == COMMON_QUEUE_SIZE:
            q.size = value  # checked (power of two, <= max) at DRIVER_OK
        elif field == COMMON_QUEUE_ENABLE:
            q.ready = value == 1
        elif field in (COMMON_QUEUE_DESC_LO, COMMON_QUEUE_DRIVER_LO, COMMON_QUEUE_DEVICE_LO):
            name = {COMMON_QUEUE_DESC_LO: "desc_table", COMMON_QUEUE_DRIVER_LO: "avail_ring",
                    COMMON_QUEUE_DEVICE_LO: "used_ring"}[field]
            setattr(q, name, (getattr(q, name) & ~0xFFFF_FFFF) | value)
        elif field in (COMMON_QUEUE_DESC_HI, COMMON_QUEUE_DRIVER_HI, COMMON_QUEUE_DEVICE_HI):
            name = {COMMON_QUEUE_DESC_HI: "desc_table", COMMON_QUEUE_DRIVER_HI: "avail_ring",
                    COMMON_QUEUE_DEVICE_HI: "used_ring"}[field]
            setattr(q, name, (getattr(q, name) & 0xFFFF_FFFF) | value << 32)

    def _status_write(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        value &= ~VIRTIO_STATUS_DEVICE_NEEDS_RESET  # the device's bit, not the driver's
        added = value & ~self.device_status
        if added & VIRTIO_STATUS_FEATURES_OK and not self._features_acceptable():
            # Leaving FEATURES_OK clear tells the driver the subset was refused (§3.1.1 step 6).
            value &= ~VIRTIO_STATUS_FEATURES_OK
        self.device_status = value
        if added & VIRTIO_STATUS_DRIVER_OK and not self.activated:
            self._activate()

    def _features_acceptable(self) -> bool:
        offered = self.device.avail_features
        if self.driver_features & ~offered:
            LOG.info("driver accepted features %#x that were not offered", self.driver_features & ~offered)
            return False
        if not has_feature(self.driver_features, VIRTIO_F_VERSION_1):
            LOG.info("driver did not accept VIRTIO_F_VERSION_1 (a legacy driver)")
            return False
        return True

    def _activate(self) -> None:
        if not self.device_status & VIRTIO_STATUS_FEATURES_OK:
            self._fail("DRIVER_OK without FEATURES_OK")
            return
        try:
            for q in self.queues:
                q.event_idx = has_feature(self.driver_features, VIRTIO_F_EVENT_IDX)
                q.indirect = has_feature(self.driver_features, VIRTIO_F_INDIRECT_DESC)
                if q.ready:
                    q.validate()
            self.device.activate(self.memory, self.queues, self.interrupt, self.driver_features)
        except (VmshError, OSError, ValueError) as err:
            self._fail(f"activation failed: {err}")
            return
        self.activated = True
        self._tell(ACTIVATED)

    def _tell(self, event: str) -> None:
        if self.on_lifecycle is not None:
            self.on_lifecycle(event)

    def _fail(self, reason: str) -> None:
        LOG.warning("virtio-pci %#x: %s", self.config.get(0x02, 2), reason)
        self.needs_reset = True
        self.interrupt.signal_config_change()

    def _reset(self) -> None:
        """Device reset (§2.4 / §4.1.4.3.1): back to the initial state; MSI-X stays (it is PCI's)."""
        was_activated = self.activated
        self.device.reset()
        for q in self.queues:
            q.reset()
        self.queue_msix_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queues)
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.device_status = 0
        self.queue_select = 0
        self.activated = False
        self.needs_reset = False
        with self._isr_lock:
            self.isr = 0
        if was_activated:
            self._tell(RESET)

    def close(self) -> None:
        """VM teardown: stop and close the device."""
        self.device.close()

    def counters(self) -> dict[str, int]:
        """The device's counters."""
        return self.device.counters()

    # -- snapshot --------------------------------------------------------------------------

    def state(self) -> VirtioPciState:
        """Everything the guest can observe, as plain data (take it with the VM paused)."""
        with self._lock:
            return VirtioPciState(
                config=self.config.state(), msix=self.msix.state(),
                queues=tuple(q.state() for q in self.queues), queue_msix_vectors=tuple(self.queue_msix_vectors),
                device_feature_select=self.device_feature_select, driver_feature_select=self.driver_feature_select,
                driver_features=self.driver_features, device_status=self.device_status,
                config_generation=self.config_generation, config_msix_vector=self.config_msix_vector,
                queue_select=self.queue_select, isr=self.isr, activated=self.activated,
                needs_reset=self.needs_reset or self.device.needs_reset, bar_address=self._bar_address,
                device=self.device.state())

    def restore(self, state: VirtioPciState) -> None:
        """Load ``state`` (untrusted) and re-activate the device if it was running.

        After a restore the engine should ``notify`` every queue once (after interrupts are
        wired) so that requests the driver queued before the snapshot are not left waiting.

        :raises DeviceStateError: for another state class, another number of queues, an
            MSI-X vector beyond the table, a register wider than it is, a queue of a running
            device with a layout the spec forbids, or a nested state (``config``, ``msix``,
            ``queues[i]``, ``device``) that its part refuses. The transport's own fields are
            checked before anything changes; if a nested part refuses its state, the transport
            is put back into the state it had (its own, so it fits) before the error is raised.
        """
        s = expect_state(state, VirtioPciState)
        check_length("queues", s.queues, len(self.queues))
        check_length("queue_msix_vectors", s.queue_msix_vectors, len(self.queues))
        check_range("driver_features", s.driver_features, 0, (1 << 128) - 1)
        check_bits("isr", s.isr, VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG)
        for i, vector in enumerate(s.queue_msix_vectors):
            self._check_vector(f"queue_msix_vectors[{i}]", vector)
        self._check_vector("config_msix_vector", s.config_msix_vector)
        if s.activated and not s.needs_reset:
            # A running device validated its ready queues at DRIVER_OK (validate()).
            for i, qs in enumerate(s.queues):
                if qs.ready:
                    with within(f"queues[{i}]"):
                        check_live_layout(qs)
        with self._lock:
            before = self.state()
            try:
                self._load(s)
            except DeviceStateError:
                self._load(before)
                raise

    def _load(self, s: VirtioPciState) -> None:
        """Apply a checked state (with the lock held); nested parts check theirs as they load."""
        self.device.reset()
        with within("config"):
            self.config.restore(s.config)
        with within("msix"):
            self.msix.restore(s.msix)
        for i, (q, qs) in enumerate(zip(self.queues, s.queues, strict=True)):
            with within(f"queues[{i}]"):
                q.restore(qs)
        self.queue_msix_vectors = list(s.queue_msix_vectors)
        self.device_feature_select = s.device_feature_select
        self.driver_feature_select = s.driver_feature_select
        self.driver_features = s.driver_features
        self.device_status = s.device_status & ~VIRTIO_STATUS_DEVICE_NEEDS_RESET
        self.config_generation = s.config_generation
        self.config_msix_vector = s.config_msix_vector
        self.queue_select = s.queue_select
        self.isr = s.isr
        self._bar_address = self.config.bar_address(0)
        self._bar_pending = False
        self.activated = False
        self.needs_reset = False
        with within("device"):
            self.device.restore(s.device)
        if s.activated:
            self._activate()
        if s.needs_reset:
            self.needs_reset = True
