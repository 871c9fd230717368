"""One PCI device as the device manager plugs it in: its model, its one lock, its BAR window.

Every register path of a device takes that device's one lock (``PciDevice.lock``): vCPU accesses
to its BAR (``BarWindow``), configuration-space accesses through 0xcf8 or ECAM
(``LockedPciFunction``, what the PCI bus holds in the slot), and the I/O thread's queue kicks.
The lock stays the same when the guest moves the BAR. A BAR move the guest makes by writing the
configuration space is only noted under the lock; the device manager follows it afterwards on
the VMM's control loop (see ``docs/threading.md``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmsh.engine.bus import BusRange
from vmsh.engine.msi import KvmMsiRouter
from vmsh.errors import DeviceError


class PciFunctionModel(Protocol):
    """What the manager needs of a PCI device model with one memory BAR (a virtio-pci
    transport, pvpanic): configuration space, BAR 0 accesses and placement, state."""

    config: Any
    BAR_SIZE: int
    state_type: type[Any]
    on_bar_change: Callable[[int, int], None] | None

    def bar_read(self, offset: int, size: int) -> bytes: ...

    def bar_write(self, offset: int, data: bytes) -> None: ...

    def bar_address(self) -> int: ...

    def set_bar_address(self, addr: int) -> None: ...

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class BarWindow:
    """A device's BAR 0 as a bus device, serialized by the device's lock.

    It also serves the queue kicks the I/O thread receives through ioeventfds. ``notify`` maps
    each live notification eventfd to its queue; it changes only under the lock, so a kick
    that arrives for an eventfd the BAR has just dropped (the BAR moved or the device went) is
    ignored instead of reading a closed, or reused, fd.
    """

    thread_safe = True

    def __init__(self, transport: PciFunctionModel, lock: threading.Lock) -> None:
        self.transport = transport
        self.lock = lock
        self.notify: dict[int, int] = {}

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            return self.transport.bar_read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.transport.bar_write(offset, data)

    def kick(self, fd: int, queue: int) -> None:
        """The I/O-thread callback of one queue's ioeventfd."""
        with self.lock:
            if self.notify.get(fd) != queue:
                return
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.transport.notify(queue)  # type: ignore[attr-defined]  # virtio transports only have queues


@dataclass(eq=False)
class PciDevice:
    """One device as plugged into the VM."""

    id: str
    segment: int
    slot: int
    transport: PciFunctionModel
    router: KvmMsiRouter | None
    #: the device's one lock (see the module docstring)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: virtqueues served through ioeventfds (0 for a device without queues)
    queues: int = 0
    #: BAR 0 is a 64-bit memory BAR
    bar64: bool = False
    mapped: BusRange | None = None
    notify_fds: list[tuple[int, int]] = field(default_factory=list)  # (fd, guest address)
    #: where the guest has moved BAR 0 and the manager has not followed yet (under ``lock``)
    pending_move: int | None = None
    window: BarWindow = field(init=False)

    def __post_init__(self) -> None:
        self.window = BarWindow(self.transport, self.lock)


class LockedConfigSpace:
    """A device's configuration space as the PCI bus reaches it: accesses take the device's
    lock; after a write that moved BAR 0, ``after_write`` is called with the lock released."""

    def __init__(self, device: PciDevice, after_write: Callable[[PciDevice], None]) -> None:
        self._device = device
        self._config = device.transport.config
        self._after_write = after_write

    def read(self, register: int, size: int) -> bytes:
        with self._device.lock:
            return bytes(self._config.read(register, size))

    def write(self, register: int, data: bytes) -> None:
        with self._device.lock:
            self._config.write(register, data)
            moved = self._device.pending_move is not None
        if moved:
            self._after_write(self._device)

    def __getattr__(self, name: str) -> Any:
        # everything else (what ``describe`` reads) is the configuration space's own
        return getattr(self._config, name)


class LockedPciFunction:
    """What a PCI bus slot holds for a plugged device (the bus only uses ``config``)."""

    def __init__(self, device: PciDevice, after_write: Callable[[PciDevice], None]) -> None:
        self.device_entry = device
        self.config = LockedConfigSpace(device, after_write)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device_entry.transport, name)


class BarAllocator:
    """Bump allocation of naturally aligned BARs inside one window."""

    def __init__(self, base: int, size: int) -> None:
        self.cursor, self.end = base, base + size

    def allocate(self, size: int) -> int:
        addr = (self.cursor + size - 1) & ~(size - 1)
        if addr + size > self.end:
            raise DeviceError(f"No room for a {size:#x}-byte BAR in the PCI window ending at {self.end:#x}")
        self.cursor = addr + size
        return addr
