"""The status, notify and scan methods of an ACPI hotplug controller (CPUs, memory slots).

cloud-hypervisor's CPU and memory hotplug controllers (after QEMU's) have the same two methods
around a register block that selects one slot at a time and shows its inserting and removing
flags:

- ``xSTA(i)``: slot ``i``'s ``_STA``: 0xF (present, enabled, shown, functioning) while its
  enabled flag is set, else 0;
- ``xTFY(i, v)``: Notify the device object of slot ``i`` with ``v``;
- ``xSCN``: what the GED's ``_EVT`` calls on a change: for each slot, select it, and if its
  inserting flag is set Notify 1 (device check, ACPI 6.4 §5.6.6: the guest adds it) and
  acknowledge by writing 1; if its removing flag is set Notify 3 (eject request) and acknowledge.

All are Serialized; ``xSTA`` and ``xSCN`` hold the controller's mutex.
"""

from __future__ import annotations

from collections.abc import Callable

from vmsh.engine.acpi import aml
from vmsh.engine.acpi.aml_named import Method
from vmsh.engine.acpi.aml_ops import (
    Acquire,
    Arg,
    Call,
    If,
    Increment,
    LEqual,
    LLess,
    Local,
    Notify,
    Release,
    Return,
    Store,
    While,
)

#: _STA of a present, enabled, shown and functioning device (ACPI 6.4 §6.3.7)
STA_PRESENT_ENABLED = 0x0F
#: Notify values (ACPI 6.4 §5.6.6, Table 5.166)
NOTIFY_DEVICE_CHECK = 1
NOTIFY_EJECT_REQUEST = 3


def notify_and_scan(notify: str, scan: str, count: int, device_name: Callable[[int], str], *, lock: str,
                    select: str, inserting: str, removing: str) -> list[bytes]:
    """The methods ``notify`` (``xTFY``) and ``scan`` (``xSCN``) for ``count`` slots whose device
    objects ``device_name(i)`` names; ``lock``, ``select``, ``inserting`` and ``removing`` are
    the controller's mutex and fields (full paths)."""
    local0 = Local(0)
    tfy = Method(notify, 2, serialized=True, body=[
        If(LEqual(Arg(0), i), [Notify(device_name(i), Arg(1))]) for i in range(count)
    ])
    scn = Method(scan, 0, serialized=True, body=[
        Acquire(lock),
        Store(0, local0),
        While(LLess(local0, count), [
            Store(local0, select),
            If(LEqual(aml.Path(inserting), 1), [
                Call(notify, local0, NOTIFY_DEVICE_CHECK),
                Store(1, inserting),
            ]),
            If(LEqual(aml.Path(removing), 1), [
                Call(notify, local0, NOTIFY_EJECT_REQUEST),
                Store(1, removing),
            ]),
            Increment(local0),
        ]),
        Release(lock),
    ])
    return [tfy, scn]


def status_method(name: str, *, lock: str, select: str, enabled: str) -> bytes:
    """``xSTA(i)``: select slot ``i`` under ``lock`` and answer 0xF if ``enabled`` is set, else 0."""
    local0 = Local(0)
    return Method(name, 1, serialized=True, body=[
        Acquire(lock),
        Store(Arg(0), select),
        Store(0, local0),
        If(LEqual(aml.Path(enabled), 1), [Store(STA_PRESENT_ENABLED, local0)]),
        Release(lock),
        Return(local0),
    ])
