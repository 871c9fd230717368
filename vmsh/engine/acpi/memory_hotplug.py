"""AML for ACPI memory hotplug: the ``\\_SB_.MHPC`` controller with its methods and one memory
device per slot.

The scheme is cloud-hypervisor's (vmm/src/memory_manager.rs, after QEMU's): ``MHPC`` (PNP0A06)
holds the registers of ``vmsh.devices.memory_hotplug.MemoryHotplugController`` as the fields
``MHBL``/``MHBH``/``MHLL``/``MHLH`` (the selected slot's base and length, low and high 32 bits),
``MEN_``/``MINS``/``MRMV``/``MEJ0`` (its enabled, inserting and removing flags, and eject) and
``MSEL`` (the selection), and the ``MLCK`` mutex. Its methods, all Serialized and under that
mutex:

- ``MSTA(i)``: slot i's ``_STA``: 0xF when it holds RAM, else 0;
- ``MCRS(i)``: slot i's ``_CRS``: a QWord memory descriptor (ACPI 6.4 §6.4.3.5.1) patched with
  the slot's range (AML integers are 64 bits wide in a revision 2 DSDT);
- ``MTFY(i, v)``: Notify(Mxxx, v) for slot i;
- ``MSCN``: what the GED's ``_EVT`` calls on a memory-change event: for every slot whose
  inserting flag is set, Notify 1 (device check: Linux's ``acpi_memhotplug`` adds the range)
  and acknowledge; for every one whose removing flag is set, Notify 3 and acknowledge.

Each memory device ``M000``..``M007`` is a ``PNP0C80`` (ACPI 6.4 §9.13) with ``_UID`` = the
slot, ``_STA`` and ``_CRS`` calling those; no ``_EJ0``: ACPI memory is never removed.
"""

from __future__ import annotations

from vmsh.devices.memory_hotplug import REGISTER_SIZE, SLOTS
from vmsh.engine.acpi import aml
from vmsh.engine.acpi.aml import String
from vmsh.engine.acpi.aml_named import (
    CreateQWordField,
    Device,
    Field,
    Method,
    Mutex,
    Name,
    Named,
    OperationRegion,
    Reserved,
    Scope,
)
from vmsh.engine.acpi.aml_ops import (
    Acquire,
    Add,
    Arg,
    Call,
    Or,
    Release,
    Return,
    ShiftLeft,
    Store,
    Subtract,
)
from vmsh.engine.acpi.aml_resources import MEM_CACHEABLE, Memory32Fixed, QWordMemory, ResourceTemplate
from vmsh.engine.acpi.hotplug_scan import notify_and_scan, status_method

#: the method the GED calls on a memory-change event
SCAN_METHOD = "\\_SB_.MHPC.MSCN"
SYSTEM_MEMORY = 0
BYTE_ACC, DWORD_ACC = 1, 3
WRITE_AS_ZEROS = 2
#: _STA of the controller: present, enabled, functioning, not shown in UI (§6.3.7)
STA_HIDDEN_DEVICE = 0x0B
#: byte offsets of the minimum, maximum and length fields in a QWord address descriptor (§6.4.3.5.1)
QWORD_MIN, QWORD_MAX, QWORD_LEN = 14, 22, 38

_MHPC = "\\_SB_.MHPC."
MLCK, MSEL, MHBL, MHBH, MHLL, MHLH, MEN_, MINS, MRMV = (
    _MHPC + n for n in ("MLCK", "MSEL", "MHBL", "MHBH", "MHLL", "MHLH", "MEN_", "MINS", "MRMV"))


def slot_name(slot: int) -> str:
    """``M000``..``M007`` (decimal, as cloud-hypervisor names them)."""
    return f"M{slot:03d}"


def _methods() -> list[bytes]:
    msta = status_method("MSTA", lock=MLCK, select=MSEL, enabled=MEN_)
    mcrs = Method("MCRS", 1, serialized=True, body=[
        Acquire(MLCK),
        Store(Arg(0), MSEL),
        Name("MR64", ResourceTemplate([QWordMemory(0, 0xFFFF_FFFF_FFFF_FFFE, producer=False,
                                                   cacheable=MEM_CACHEABLE)])),
        CreateQWordField(aml.Path("MR64"), QWORD_MIN, "MINL"),
        CreateQWordField(aml.Path("MR64"), QWORD_MAX, "MAXL"),
        CreateQWordField(aml.Path("MR64"), QWORD_LEN, "LENL"),
        Store(Or(ShiftLeft(aml.Path(MHBH), 32), aml.Path(MHBL)), "MINL"),
        Store(Or(ShiftLeft(aml.Path(MHLH), 32), aml.Path(MHLL)), "LENL"),
        Store(Subtract(Add(aml.Path("MINL"), aml.Path("LENL")), 1), "MAXL"),
        Release(MLCK),
        Return(aml.Path("MR64")),
    ])
    return [msta, mcrs, *notify_and_scan("MTFY", "MSCN", SLOTS, lambda i: "\\_SB_." + slot_name(i), lock=MLCK,
                                         select=MSEL, inserting=MINS, removing=MRMV)]


def memory_device(slot: int) -> bytes:
    """Memory device ``slot`` (PNP0C80) whose status and range come from the controller."""
    return Device(slot_name(slot), [
        Name("_HID", aml.EisaId("PNP0C80")),
        Name("_UID", slot),
        Method("_STA", 0, [Return(Call(_MHPC + "MSTA", slot))], serialized=True),
        Method("_CRS", 0, [Return(Call(_MHPC + "MCRS", slot))], serialized=True),
    ])


def hotplug_aml(address: int) -> bytes:
    """``\\_SB_.MHPC`` with its registers and methods, and the memory devices beside it."""
    return Scope("\\_SB_", [Device("MHPC", [
        Name("_HID", aml.EisaId("PNP0A06")),
        Name("_UID", String("Memory Hotplug Controller")),
        Name("_STA", STA_HIDDEN_DEVICE),
        Name("_CRS", ResourceTemplate([Memory32Fixed(address, REGISTER_SIZE)])),
        Mutex("MLCK"),
        OperationRegion("MHPR", SYSTEM_MEMORY, address, REGISTER_SIZE),
        Field("MHPR", [Named("MHBL", 32), Named("MHBH", 32), Named("MHLL", 32), Named("MHLH", 32)],
              access=DWORD_ACC),
        Field("MHPR", [Reserved(160), Named("MEN_", 1), Named("MINS", 1), Named("MRMV", 1), Named("MEJ0", 1),
                       Reserved(4)], access=BYTE_ACC, update=WRITE_AS_ZEROS),
        Field("MHPR", [Named("MSEL", 32)], access=DWORD_ACC),
        *_methods(),
    ]), *(memory_device(i) for i in range(SLOTS))])
