"""AML for ACPI PCI hotplug: the ``\\_SB_.PHPR`` controller and a slot device per PCI slot.

The scheme is cloud-hypervisor's (and QEMU's ``acpi-pci-hotplug``): a 16-byte register block
(``vmsh.devices.acpi.PciHotplugController``) holds, for the segment selected in ``PSEG``,
the slots that came up (``PCIU``) and the slots to remove (``PCID``); a write to ``B0EJ``
ejects slots. When the VMM plugs or unplugs a device it sets the bit and raises the GED's
PCI-change event; ``_EVT`` calls ``\\_SB_.PHPR.PSCN``, which for each segment selects it and
calls the root bridge's ``PCNT``: Notify(Sxx, 1) (device check: the guest scans the slot)
for each bit of PCIU, Notify(Sxx, 3) (eject request) for each bit of PCID. The guest's
acpiphp then runs the slot's ``_EJ0``, which writes the slot's bit to ``B0EJ``.

On hardware KVM every slot gets a slot device, as in cloud-hypervisor. On a PVM host only
those holding a device at boot (so any device can be removed) and the first
``SPARE_SLOTS_PVM`` free ones (for devices added later) do: each slot device costs a Linux
guest about 100,000 instructions at boot (its ACPI device, sysfs nodes and acpiphp slot),
which PVM emulates at over a microsecond each, so all 31 would add 3 M instructions (a third
of the default guest's boot), and even 8 spare ones cost 0.8 M. Four spare slots let a
running guest take four devices more than it booted with (the guest tests add one at a
time); a hot-add beyond them is refused with an error that says why. A snapshot records
which slots its guest has.

Every method is declared Serialized. For a NotSerialized method ACPICA parses the method's
AML when the table is loaded, to find out whether it must serialize it anyway (it does when
the method creates named objects); that costs a Linux guest about 14,000 instructions per
method, and these methods take the controller's mutex in any case.

Names: ACPI 6.4 §6.3.3 ``_EJx``, §6.1.12 ``_SUN``, §6.1.1 ``_ADR`` (device << 16 | function),
§5.6.6 Notify values 1 (device check) and 3 (eject request).
"""

from __future__ import annotations

from vmsh.engine.acpi import aml
from vmsh.engine.acpi.aml import EisaId
from vmsh.engine.acpi.aml_named import Device, Field, Method, Mutex, Name, Named, OperationRegion, Scope
from vmsh.engine.acpi.aml_ops import Acquire, And, Arg, Call, If, Notify, Release, Return, ShiftLeft, Store
from vmsh.engine.acpi.aml_resources import Memory32Fixed, ResourceTemplate
from vmsh.engine.acpi.dsdt import pci_root_name
from vmsh.engine.acpi.hotplug_scan import NOTIFY_DEVICE_CHECK, NOTIFY_EJECT_REQUEST

#: register offsets of the controller (each 32 bits)
PCIU, PCID, B0EJ, PSEG = 0x0, 0x4, 0x8, 0xC
REGISTER_SIZE = 0x10
RESCAN_METHOD = "\\_SB_.PHPR.PSCN"
SYSTEM_MEMORY = 0
DWORD_ACC = 3
#: _STA of the controller: present, enabled, functioning, not shown in UI (§6.3.7)
STA_HIDDEN_DEVICE = 0x0B


#: free slots per segment declared hotpluggable at boot on a PVM host, beyond the occupied ones
SPARE_SLOTS_PVM = 4
#: slot 0 of a segment is its host bridge
FIRST_SLOT = 1
NUM_SLOTS = 32


def declared_slots(occupied: set[int], spare: int = NUM_SLOTS) -> list[int]:
    """The slots of a segment that get a slot device: the ``occupied`` ones and ``spare`` free ones."""
    free = [s for s in range(FIRST_SLOT, NUM_SLOTS) if s not in occupied]
    return sorted({s for s in occupied if s >= FIRST_SLOT} | set(free[:spare]))


def slot_name(slot: int) -> str:
    return f"S{slot:03X}"


def controller(address: int, segments: list[int]) -> bytes:
    """``\\_SB_.PHPR``: the register block, the eject helper and the rescan of every segment."""
    body = [
        Name("_HID", EisaId("PNP0A06")),
        Name("_UID", aml.String("PCI Hotplug Controller")),
        Name("_STA", STA_HIDDEN_DEVICE),
        Name("_CRS", ResourceTemplate([Memory32Fixed(address, REGISTER_SIZE)])),
        Mutex("BLCK"),
        OperationRegion("PCST", SYSTEM_MEMORY, address, REGISTER_SIZE),
        Field("PCST", [Named("PCIU", 32), Named("PCID", 32), Named("B0EJ", 32), Named("PSEG", 32)],
              access=DWORD_ACC),
        # PCEJ(slot, segment): eject one slot
        Method("PCEJ", 2, serialized=True, body=[
            Acquire("BLCK"),
            Store(Arg(1), "PSEG"),
            Store(ShiftLeft(1, Arg(0)), "B0EJ"),
            Release("BLCK"),
            Return(0),
        ]),
        Method("PSCN", 0, [Call(f"\\_SB_.{pci_root_name(seg)}.PCNT") for seg in segments], serialized=True),
    ]
    return Scope("\\_SB_", [Device("PHPR", body)])


def slots(segment: int, declared: list[int]) -> bytes:
    """The slot devices of one root bridge, with ``DVNT`` and ``PCNT``."""
    devices = []
    notify = []
    for slot in declared:
        name = slot_name(slot)
        devices.append(Device(name, [
            Name("_SUN", slot),
            Name("_ADR", slot << 16),
            Method("_EJ0", 1, [Return(Call("\\_SB_.PHPR.PCEJ", aml.Path("_SUN"), aml.Path("_SEG")))], serialized=True),
        ]))
        notify.append(If(And(Arg(0), 1 << slot), [Notify(name, Arg(1))]))
    dvnt = Method("DVNT", 2, notify, serialized=True)
    pcnt = Method("PCNT", 0, serialized=True, body=[
        Acquire("\\_SB_.PHPR.BLCK"),
        Store(segment, "\\_SB_.PHPR.PSEG"),
        Call("DVNT", aml.Path("\\_SB_.PHPR.PCIU"), NOTIFY_DEVICE_CHECK),
        Call("DVNT", aml.Path("\\_SB_.PHPR.PCID"), NOTIFY_EJECT_REQUEST),
        Release("\\_SB_.PHPR.BLCK"),
    ])
    return Scope(f"\\_SB_.{pci_root_name(segment)}", [*devices, dvnt, pcnt])


def hotplug_aml(address: int, declared: list[list[int]]) -> tuple[bytes, ...]:
    """Everything the DSDT needs for PCI hotplug: ``declared[segment]`` lists its slot devices."""
    segments = list(range(len(declared)))
    return (controller(address, segments), *(slots(seg, declared[seg]) for seg in segments))
