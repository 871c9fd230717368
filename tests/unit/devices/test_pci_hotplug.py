"""ACPI PCI hotplug: the controller's registers and the AML that drives them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmsh.devices.acpi import PciHotplugController, PciHotplugState
from vmsh.engine.acpi.builder import build_acpi
from vmsh.engine.acpi.pci_hotplug import RESCAN_METHOD, hotplug_aml
from vmsh.engine.acpi.spec import AcpiSpec, GedSpec, PciSegment
from vmsh.engine.persist import from_plain, to_plain
from vmsh.errors import DeviceStateError


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def test_up_and_down_bitmaps_read_once_per_segment() -> None:
    ejected = []
    ctl = PciHotplugController(2, lambda seg, slot: ejected.append((seg, slot)))
    ctl.plug(0, 3)
    ctl.unplug(1, 5)
    assert ctl.read(0x0, 4) == u32(1 << 3)
    assert ctl.read(0x0, 4) == u32(0), "PCIU clears on read"
    assert ctl.read(0x4, 4) == u32(0)
    ctl.write(0xC, u32(1))
    assert ctl.read(0xC, 4) == u32(1)
    assert ctl.read(0x4, 4) == u32(1 << 5)
    ctl.write(0x8, u32(1 << 5 | 1 << 7))
    assert ejected == [(1, 5), (1, 7)]


def test_bad_accesses_are_harmless() -> None:
    ctl = PciHotplugController(1, lambda seg, slot: pytest.fail("no eject expected"))
    ctl.write(0xC, u32(9))  # no such segment: selection unchanged
    assert ctl.read(0xC, 4) == u32(0)
    ctl.write(0x8, b"\xff")  # not a 32-bit access
    assert ctl.read(0x0, 2) == b"\0\0"
    assert ctl.read(0x40, 4) == u32(0)


def test_state_round_trip_and_checks() -> None:
    ctl = PciHotplugController(2, lambda seg, slot: None)
    ctl.plug(1, 2)
    other = PciHotplugController(2, lambda seg, slot: None)
    other.restore(ctl.state())
    other.write(0xC, u32(1))
    assert other.read(0x0, 4) == u32(1 << 2)
    with pytest.raises(DeviceStateError):
        PciHotplugController(1, lambda s, t: None).restore(ctl.state())


def test_declared_slots_survive_a_snapshot_and_older_snapshots_declare_all() -> None:
    ctl = PciHotplugController(1, lambda seg, slot: None)
    ctl.declared = [[1, 2, 9]]
    plain = to_plain(ctl.state())
    other = PciHotplugController(1, lambda seg, slot: None)
    other.restore(from_plain(PciHotplugState, plain))
    assert other.declared == [[1, 2, 9]]
    # a snapshot from before slots were declared: its guest has a slot device for every slot
    del plain["declared"]
    older = PciHotplugController(1, lambda seg, slot: None)
    older.restore(from_plain(PciHotplugState, plain))
    assert older.declared == [list(range(1, 32))]
    for bad in ([[0]], [[32]], [[1], [2]]):
        with pytest.raises(DeviceStateError):
            other.restore(from_plain(PciHotplugState, {**plain, "declared": bad}))


@pytest.mark.needs(shutil.which("iasl") is not None, "needs iasl (acpica-tools) to disassemble the DSDT")
def test_dsdt_with_hotplug_disassembles(tmp_path) -> None:
    segs = tuple(PciSegment(id=i, ecam_base=0xE800_0000 + (i << 20), mmio32=(0xC000_0000 + (i << 24), 1 << 24),
                            mmio64=((1 << 32) + (i << 30), 1 << 30)) for i in range(2))
    acpi = build_acpi(AcpiSpec(boot_vcpus=1, pci_segments=segs, ged=GedSpec(address=0xFEB0_0000, irq=5),
                               pci_rescan_method=RESCAN_METHOD,
                               extra_aml=hotplug_aml(0xFEB0_1000, [list(range(1, 32))] * 2)))
    (tmp_path / "dsdt.dat").write_bytes(acpi.table("DSDT"))
    out = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    for needle in ("Device (PHPR)", "\\_SB.PCI0.PCNT ()", "\\_SB.PC01.PCNT ()", "Device (S01F)",
                   "Return (\\_SB.PHPR.PCEJ (_SUN, _SEG))", "\\_SB.PHPR.PSCN ()"):
        assert needle in dsl, needle
