"""KVM's dirty page log for a live migration's copy rounds.

:class:`DirtyLog` re-registers every memslot with ``KVM_MEM_LOG_DIRTY_PAGES`` and reads each
slot's bitmap with ``KVM_GET_DIRTY_LOG`` (which also clears it), as cloud-hypervisor's
``start_dirty_log``/``dirty_log`` do. It sees the pages vCPUs write; the VMM's own writes to
guest RAM (virtio devices) are not in it, which is why the migration's last, paused round
compares against what was sent (``vmsh.engine.migration``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import struct

from vmsh._native import lib
from vmsh.engine.memory import PAGE_SIZE, GuestMemoryMmap
from vmsh.engine.migration_protocol import ranges_from_bitmap
from vmsh.errors import KvmError

LOG = logging.getLogger(__name__)

#: <linux/kvm.h>: _IOW(KVMIO, 0x42, struct kvm_dirty_log) (16 bytes: slot, padding, bitmap pointer)
KVM_GET_DIRTY_LOG = 0x4010AE42
_DIRTY_LOG = struct.Struct("<IIQ")


class DirtyLog:
    """Dirty page logging on every memslot of ``memory`` (registered on ``vm_fd``)."""

    def __init__(self, vm_fd: object, memory: GuestMemoryMmap) -> None:
        self._vm_fd = vm_fd
        self._memory = memory
        self._bitmaps: dict[int, ctypes.Array[ctypes.c_uint8]] = {}

    def start(self) -> None:
        """Turn logging on (:raises KvmError: when KVM refuses; logging is then off again)."""
        try:
            for slot in self._memory.slot_regions:
                self._set(slot, lib.KVM_MEM_LOG_DIRTY_PAGES)
        except KvmError:
            self.stop()
            raise

    def stop(self) -> None:
        for slot in self._memory.slot_regions:
            try:
                self._set(slot, 0)
            except KvmError as err:
                LOG.warning("cannot turn the dirty log of memslot %d off: %s", slot, err)
        self._bitmaps.clear()

    def _set(self, slot: int, flags: int) -> None:
        region = self._memory.slot_regions[slot]
        self._vm_fd.set_user_memory_region(slot, region.start, region.size, region.host_addr,  # type: ignore[attr-defined]  # a VmFd
                                           flags)

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """The ``(guest address, length)`` ranges written since the last call (or :meth:`start`)."""
        ranges: list[tuple[int, int]] = []
        fd = self._vm_fd.fd  # type: ignore[attr-defined]  # a VmFd
        for slot, region in self._memory.slot_regions.items():
            pages = region.size // PAGE_SIZE
            bitmap = self._bitmaps.get(slot)
            if bitmap is None:
                # KVM writes whole 64-bit words
                bitmap = self._bitmaps[slot] = (ctypes.c_uint8 * (((pages + 63) // 64) * 8))()
            request = bytearray(_DIRTY_LOG.pack(slot, 0, ctypes.addressof(bitmap)))
            try:
                fcntl.ioctl(fd, KVM_GET_DIRTY_LOG, request)
            except OSError as err:
                raise KvmError(f"KVM_GET_DIRTY_LOG slot {slot}") from err
            ranges.extend(ranges_from_bitmap(bytes(bitmap), region.start))
        return ranges
