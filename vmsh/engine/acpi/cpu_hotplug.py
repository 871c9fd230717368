"""AML for ACPI CPU hotplug: the ``\\_SB_.PRES`` controller and the ``\\_SB_.CPUS`` container with
its methods and one processor device per possible vCPU.

The scheme is cloud-hypervisor's (vmm/src/cpu.rs, after QEMU's): ``PRES`` holds the registers of
``vmsh.devices.cpu_hotplug.CpuHotplugController`` as the fields ``CSEL`` (select a vCPU) and
``CPEN``/``CINS``/``CRMV``/``CEJ0`` (its enabled, inserting and removing flags, and eject), and
the ``CPLK`` mutex. The methods of ``CPUS``, all Serialized (see ``pci_hotplug`` for why) and
under that mutex:

- ``CSTA(i)``: vCPU i's ``_STA``: 0xF when enabled, else 0;
- ``CEJ0(i)``: vCPU i's ``_EJ0``: writes its eject bit;
- ``CTFY(i, v)``: Notify(Cxxx, v) for vCPU i;
- ``CSCN``: what the GED's ``_EVT`` calls on a CPU-change event: for every vCPU whose
  inserting flag is set, Notify 1 (device check: the guest adds it) and acknowledge; for every
  one whose removing flag is set, Notify 3 (eject request: the guest offlines it and calls
  ``_EJ0``) and acknowledge;

Each processor ``Cxxx`` (ACPI0007, ``_UID`` = the vCPU index = its MADT processor UID) has
``_STA`` and ``_EJ0`` (not vCPU 0, which cannot be removed) calling those, and ``_MAT``, its MADT
entry marked enabled (ACPI 6.4 §6.2.10): a guest that skips the MADT's online-capable entries
still finds a hot-added vCPU's APIC id there.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vmsh.engine.acpi import aml
from vmsh.engine.acpi.aml import Buffer, String
from vmsh.engine.acpi.aml_named import Device, Field, Method, Mutex, Name, Named, OperationRegion, Reserved
from vmsh.engine.acpi.aml_ops import (
    Acquire,
    Arg,
    Call,
    Release,
    Return,
    Store,
)
from vmsh.engine.acpi.aml_resources import Memory32Fixed, ResourceTemplate
from vmsh.engine.acpi.hotplug_scan import notify_and_scan, status_method

#: the methods the GED calls and the processors use
SCAN_METHOD = "\\_SB_.CPUS.CSCN"
REGISTER_SIZE = 0xC
SYSTEM_MEMORY = 0
BYTE_ACC, DWORD_ACC = 1, 3
WRITE_AS_ZEROS = 2
#: MADT flags: enabled (ACPI 6.4 §5.2.12.2)
MADT_ENABLED = 1


def processor_name(index: int) -> str:
    """``C000``..``CFFF`` for vCPUs 0..4095, then ``D000``.. and so on."""
    return f"{chr(ord('C') + index // 0x1000)}{index % 0x1000:03X}"


def madt_entry(index: int, apic_id: int) -> bytes:
    """vCPU ``index``'s MADT entry, enabled: a Local APIC (type 0) for an APIC id below 255,
    else a Local x2APIC (type 9) (ACPI 6.4 §5.2.12.2, §5.2.12.12)."""
    if apic_id < 0xFF and index < 0x100:
        return struct.pack("<BBBBI", 0, 8, index, apic_id, MADT_ENABLED)
    return struct.pack("<BBHIII", 9, 16, 0, apic_id, MADT_ENABLED, index)


#: _STA of the controller: present, enabled, functioning, not shown in UI (§6.3.7)
STA_HIDDEN_DEVICE = 0x0B
#: the controller's names, from the CPUS methods
_PRES = "\\_SB_.PRES."
CPLK, CSEL, CPEN, CINS, CRMV, CEJ0 = (_PRES + n for n in ("CPLK", "CSEL", "CPEN", "CINS", "CRMV", "CEJ0"))


def controller(address: int) -> bytes:
    """``PRES``: the register block, its fields and the lock."""
    return Device("PRES", [
        Name("_HID", aml.EisaId("PNP0A06")),
        Name("_UID", String("CPU Hotplug Controller")),
        Name("_STA", STA_HIDDEN_DEVICE),
        Name("_CRS", ResourceTemplate([Memory32Fixed(address, REGISTER_SIZE)])),
        Mutex("CPLK"),
        OperationRegion("PRST", SYSTEM_MEMORY, address, REGISTER_SIZE),
        Field("PRST", [Reserved(32), Named("CPEN", 1), Named("CINS", 1), Named("CRMV", 1), Named("CEJ0", 1),
                       Reserved(4)], access=BYTE_ACC, update=WRITE_AS_ZEROS),
        Field("PRST", [Named("CSEL", 32)], access=DWORD_ACC),
    ])


def methods(apic_ids: tuple[int, ...]) -> list[bytes]:
    """``CSTA``, ``CEJ0``, ``CTFY`` and ``CSCN`` for ``len(apic_ids)`` possible vCPUs."""
    count = len(apic_ids)
    csta = status_method("CSTA", lock=CPLK, select=CSEL, enabled=CPEN)
    cej0 = Method("CEJ0", 1, serialized=True, body=[
        Acquire(CPLK),
        Store(Arg(0), CSEL),
        Store(1, CEJ0),
        Release(CPLK),
    ])
    return [csta, cej0, *notify_and_scan("CTFY", "CSCN", count, processor_name, lock=CPLK, select=CSEL,
                                         inserting=CINS, removing=CRMV)]


def processor(index: int, apic_id: int, proximity_domain: int | None = None) -> bytes:
    """Processor device ``index`` whose status and eject go through the controller; with a
    proximity domain, ``_PXM`` returns it (the node a hot-added vCPU joins, ACPI 6.4 §6.2.14)."""
    body = [
        Name("_HID", String("ACPI0007")),
        Name("_UID", index),
        Method("_STA", 0, [Return(Call("CSTA", index))], serialized=True),
        Name("_MAT", Buffer(madt_entry(index, apic_id))),
    ]
    if proximity_domain is not None:
        body.append(Name("_PXM", proximity_domain))  # an integer, see dsdt.pxm
    if index > 0:
        body.append(Method("_EJ0", 1, [Call("CEJ0", index)], serialized=True))
    return Device(processor_name(index), body)


def processors(address: int, apic_ids: tuple[int, ...], domains: Sequence[int | None] = ()) -> bytes:
    """``PRES`` and ``CPUS`` (ACPI0010, §8.4.2) with every possible vCPU, for the ``\\_SB_`` scope;
    ``domains[i]``, when given and not None, is vCPU i's proximity domain."""
    return controller(address) + Device("CPUS", [
        Name("_HID", String("ACPI0010")),
        Name("_CID", aml.EisaId("PNP0A05")),
        *methods(apic_ids),
        *(processor(i, apic_id, domains[i] if i < len(domains) else None) for i, apic_id in enumerate(apic_ids)),
    ])
