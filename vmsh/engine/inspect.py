"""Looking inside a built VM: a vCPU's registers, guest RAM, the rip profiler.

These are the bodies of the vmsh extension actions ``vm.registers``, ``vm.read-memory``,
``vm.profile-start`` and ``vm.profile-stop`` (:mod:`vmsh.engine.vmm`), so that the shell's
``regs``, ``x`` and ``profile`` work the same on a VM in the shell's process and on one behind
an API socket. Each function takes the VM and returns plain JSON-able data; a request the VM
cannot answer (no such vCPU, an address outside RAM, a length over :data:`MAX_READ`) is a
:class:`~vmsh.errors.ValidationError` (HTTP 400), never a traceback. The caller (the VMM's
action path) has checked the VM's state and holds the VMM lock.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from vmsh.errors import GuestMemoryError, ValidationError, VmshError

LOG = logging.getLogger(__name__)

#: the most bytes one ``vm.read-memory`` returns (its reply carries them in hex)
MAX_READ = 1 << 20
#: the profiler's sampling rates, per second: at least one sample, at most one per 100 µs
MIN_HZ, MAX_HZ = 1, 10_000


class _RegisterFile(Protocol):
    def get_regs(self) -> Any: ...
    def get_sregs(self) -> Any: ...


class _Vcpu(Protocol):
    @property
    def fd(self) -> _RegisterFile: ...


class _Memory(Protocol):
    def read(self, addr: int, length: int) -> bytes: ...


class InspectableVm(Protocol):
    """What these functions read of :class:`vmsh.engine.vm.Vm`."""

    @property
    def vcpus(self) -> Sequence[_Vcpu]: ...
    @property
    def memory(self) -> _Memory | None: ...
    def start_profiler(self, hz: int) -> None: ...
    def stop_profiler(self, system_map: str | None = None, top: int = 40) -> str: ...


def _plain(obj: Any) -> Any:
    """A kvm register dataclass (Regs, Sregs, Segment, DTable) as JSON data (ints, lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, bool):
        return int(obj)
    return obj


def registers(vm: InspectableVm, cpu_id: int) -> dict[str, Any]:
    """``vm.registers``: vCPU ``cpu_id``'s general registers (KVM_GET_REGS) and special
    registers (KVM_GET_SREGS: segments, descriptor tables, control registers, EFER, APIC base).

    :raises ValidationError: when the VM has no vCPU ``cpu_id``.
    """
    count = len(vm.vcpus)
    if not 0 <= cpu_id < count:
        raise ValidationError(f"No vCPU {cpu_id} (the VM has {count})")
    fd = vm.vcpus[cpu_id].fd
    return {"cpu_id": cpu_id, "regs": _plain(fd.get_regs()), "sregs": _plain(fd.get_sregs())}


def read_memory(vm: InspectableVm, address: int, length: int) -> dict[str, Any]:
    """``vm.read-memory``: ``length`` bytes of guest RAM at guest physical ``address``.

    Returns ``{"address": address, "data": "<hex>"}``.

    :raises ValidationError: for a length outside 1..:data:`MAX_READ`, or a range that is not
        all RAM (the guest memory error is the cause).
    """
    if not 0 < length <= MAX_READ:
        raise ValidationError(f"The length must be between 1 and {MAX_READ} bytes (it is {length})")
    if address < 0:
        raise ValidationError(f"The address must not be negative (it is {address})")
    if vm.memory is None:
        raise VmshError("The VM has no guest RAM yet")
    try:
        data = vm.memory.read(address, length)
    except GuestMemoryError as err:
        raise ValidationError(f"Cannot read {length} bytes at {address:#x}") from err
    return {"address": address, "data": bytes(data).hex()}


def start_profiler(vm: InspectableVm, hz: int) -> None:
    """``vm.profile-start``: sample every vCPU's instruction pointer ``hz`` times a second.

    :raises ValidationError: for a rate outside :data:`MIN_HZ`..:data:`MAX_HZ`.
    :raises VmshError: when the profiler already runs.
    """
    if not MIN_HZ <= hz <= MAX_HZ:
        raise ValidationError(f"The sampling rate must be between {MIN_HZ} and {MAX_HZ} per second (it is {hz})")
    vm.start_profiler(hz)


def stop_profiler(vm: InspectableVm, system_map: str | None, top: int) -> dict[str, str]:
    """``vm.profile-stop``: stop sampling; returns ``{"report": text}``, the hottest ``top``
    addresses, by symbol when ``system_map`` (a kernel System.map on the VMM's host) is given.

    :raises ValidationError: for ``top`` below 1.
    :raises VmshError: when the profiler does not run.
    """
    if top < 1:
        raise ValidationError(f"top must be at least 1 (it is {top})")
    return {"report": vm.stop_profiler(system_map, top=top)}
