"""vmsh.engine.describe's pieces on synthetic guest memory (no KVM): ACPI walking, SMBIOS
parsing, boot structures, BAR decoding, RAM digests, virtio descriptions."""

from __future__ import annotations

import hashlib
import mmap
import struct

import pytest

from vmsh.devices.pci.config_space import PciConfigSpace
from vmsh.engine import describe as d
from vmsh.engine import smbios
from vmsh.engine.acpi.builder import build_acpi
from vmsh.engine.acpi.spec import AcpiSpec, GedSpec, PciSegment
from vmsh.engine.boot import layout
from vmsh.engine.boot.bootparams import e820_map, write_boot_params, write_pvh_start_info
from vmsh.engine.boot.loader import KernelImage, load_cmdline
from vmsh.engine.memory import GuestMemoryMmap


class FlatMemory:
    """A bytearray read like guest memory."""

    def __init__(self, size: int = 2 << 20) -> None:
        self.data = bytearray(size)

    def read(self, addr: int, length: int) -> bytes:
        if addr < 0 or addr + length > len(self.data):
            raise IndexError(addr)
        return bytes(self.data[addr:addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self.data[addr:addr + len(data)] = data


def acpi_tables(max_vcpus: int = 2):
    segment = PciSegment(id=0, ecam_base=layout.PCI_MMCONFIG_START, mmio32=(0xC000_0000, 640 << 20),
                         mmio64=(1 << 32, 1 << 36))
    return build_acpi(AcpiSpec(boot_vcpus=1, max_vcpus=max_vcpus, pci_segments=(segment,),
                               ged=GedSpec(address=0xFEB0_0000, irq=5), shutdown_port=0x600, pm_timer_port=0x608))


def test_walk_acpi_finds_every_table_with_its_bytes() -> None:
    mem = FlatMemory()
    acpi = acpi_tables()
    mem.write(acpi.rsdp_address, acpi.blob)
    found = d.walk_acpi(mem.read, acpi.rsdp_address)
    assert [t["signature"] for t in found] == ["RSDP", "XSDT", "FACP", "APIC", "MCFG", "DSDT"]
    for table in found:
        addr, data = acpi.tables[table["signature"]]
        assert table["address"] == addr
        assert bytes.fromhex(table["hex"]) == data
        assert table["length"] == len(data)
        assert table["sha256"] == hashlib.sha256(data).hexdigest()


def test_walk_acpi_refuses_memory_without_an_rsdp_or_with_a_bad_length() -> None:
    mem = FlatMemory()
    with pytest.raises(d.DescribeError, match="No RSDP"):
        d.walk_acpi(mem.read, layout.RSDP_POINTER)
    acpi = acpi_tables()
    mem.write(acpi.rsdp_address, acpi.blob)
    mem.write(acpi.address("XSDT") + 4, struct.pack("<I", 3))  # shorter than a header
    with pytest.raises(d.DescribeError, match="XSDT"):
        d.walk_acpi(mem.read, acpi.rsdp_address)


def test_walk_acpi_lists_a_table_reached_twice_once() -> None:
    mem = FlatMemory()
    acpi = acpi_tables()
    mem.write(acpi.rsdp_address, acpi.blob)
    xsdt = bytearray(acpi.table("XSDT"))
    xsdt += struct.pack("<Q", acpi.address("DSDT"))  # also listed directly
    struct.pack_into("<I", xsdt, 4, len(xsdt))
    mem.write(acpi.address("XSDT"), bytes(xsdt))
    signatures = [t["signature"] for t in d.walk_acpi(mem.read, acpi.rsdp_address)]
    assert signatures.count("DSDT") == 1


def test_parse_smbios_gives_each_structure_and_its_strings() -> None:
    mem = FlatMemory()
    spec = smbios.SmbiosSpec(serial_number="SN-1", uuid="4f1c2a3b-5d6e-4f70-8a9b-0c1d2e3f4a5b",
                             oem_strings=("a", "b c"))
    mem.write(layout.SMBIOS_START, smbios.build_smbios(spec))
    out = d.parse_smbios(mem.read, layout.SMBIOS_START)
    assert [s["type"] for s in out["structures"]] == [0, 1, 11, 127]
    assert [s["handle"] for s in out["structures"]] == [0, 1, 2, 3]
    assert "SN-1" in out["structures"][1]["strings"]
    assert out["structures"][2]["strings"] == ["a", "b c"]
    assert out["structures"][3]["strings"] == []
    assert out["entry_point"]["version"] == "3.2.0"
    assert bytes.fromhex(out["structures"][1]["formatted"])[8:24] == spec.uuid_bytes()


def test_parse_smbios_without_the_anchor_is_an_error() -> None:
    with pytest.raises(d.DescribeError, match="SMBIOS"):
        d.parse_smbios(FlatMemory().read, layout.SMBIOS_START)


@pytest.fixture
def guest_memory():
    mem = GuestMemoryMmap.create(64 << 20)
    yield mem
    mem.close()


def test_describe_boot_reads_a_bzimage_zero_page(guest_memory: GuestMemoryMmap) -> None:
    header = bytearray(0x280 - 0x1F1)
    kernel = KernelImage("bzimage", 0x100000, 0x100000, 0x200000, bytes(header), 0x20F)
    initrd_data = b"initrd" * 100
    guest_memory.write(0x300000, initrd_data)
    load_cmdline(guest_memory, "console=ttyS0 quiet")
    e820 = e820_map(guest_memory)
    write_boot_params(guest_memory, kernel, 19, (0x300000, len(initrd_data)), e820, rsdp=0xA0000)
    boot = d.describe_boot(guest_memory.read)
    assert boot["protocol"] == "bzimage"
    assert boot["cmdline"] == "console=ttyS0 quiet"
    assert boot["rsdp"] == 0xA0000
    assert [(e["addr"], e["size"], e["type"]) for e in boot["e820"]] == e820
    assert boot["initrd"] == {"addr": 0x300000, "size": len(initrd_data),
                              "sha256": hashlib.sha256(initrd_data).hexdigest()}
    assert len(bytes.fromhex(boot["zero_page"]["hex"])) == 4096


def test_describe_boot_reads_pvh_start_info(guest_memory: GuestMemoryMmap) -> None:
    load_cmdline(guest_memory, "quiet")
    guest_memory.write(0x400000, b"x" * 4096)
    e820 = e820_map(guest_memory)
    write_pvh_start_info(guest_memory, (0x400000, 4096), e820, rsdp=0xA0000)
    boot = d.describe_boot(guest_memory.read)
    assert boot["protocol"] == "pvh"
    assert boot["cmdline"] == "quiet"
    assert boot["rsdp"] == 0xA0000
    assert [(e["addr"], e["size"], e["type"]) for e in boot["e820"]] == e820
    (module,) = boot["start_info"]["modules"]
    assert (module["paddr"], module["size"]) == (0x400000, 4096)
    assert module["sha256"] == hashlib.sha256(b"x" * 4096).hexdigest()


def test_decode_bars_reads_addresses_and_sizes_like_a_sizing_probe() -> None:
    config = PciConfigSpace(0x1AF4, 0x1041, 0x020000)
    config.add_memory_bar(0, 0x80000, is_64bit=True)
    config.add_memory_bar(2, 0x1000, is_64bit=False, prefetchable=True)
    config.set_bar_address(0, 0x1_2000_0000)
    config.set_bar_address(2, 0xC000_1000)
    bars = d.decode_bars(d.read_config_space(config), bytes(config.write_mask))
    assert bars == [
        {"index": 0, "kind": "mem64", "prefetchable": False, "address": 0x1_2000_0000, "size": 0x80000},
        {"index": 2, "kind": "mem32", "prefetchable": True, "address": 0xC000_1000, "size": 0x1000},
    ]


def test_describe_function_names_ids_and_keeps_the_whole_space() -> None:
    config = PciConfigSpace(0x1B36, 0x0011, 0x088000, revision=1)
    out = d.describe_function(config)
    assert (out["vendor"], out["device"], out["class"], out["revision"]) == ("0x1b36", "0x0011", "0x088000", 1)
    assert len(bytes.fromhex(out["config"])) == 256
    assert out["extended_config"] is None
    assert out["bars"] == []


def test_digest_ram_skips_zero_and_untouched_chunks() -> None:
    chunk = 2 << 20
    mm = mmap.mmap(-1, 4 * chunk, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        from vmsh._native import ffi

        pin = ffi.from_buffer(mm)
        host = int(ffi.cast("uintptr_t", pin))
        assert d.resident_chunks(host, len(mm), chunk) in (set(), None)
        mm[chunk + 5:chunk + 8] = b"abc"
        resident = d.resident_chunks(host, len(mm), chunk)
        assert resident is None or resident == {1}
        with_host = d.digest_ram([(0, memoryview(mm), host)], chunk)
        without = d.digest_ram([(0, memoryview(mm), None)], chunk)
        assert with_host == without
        assert list(with_host["nonzero_chunks"]) == [f"{chunk:#x}"]
        assert with_host["regions"] == [{"start": 0, "size": 4 * chunk}]
        del pin
    finally:
        mm.close()


def test_describe_virtio_gives_type_features_queues_config_and_serial() -> None:
    class FakeBlock:
        device_type = 2
        avail_features = (1 << 32) | (1 << 5)
        queue_max_sizes = (128, 128)
        serial = b"SER"

        def config_bytes(self) -> bytes:
            return b"\x01\x02\x03"

        def read_config(self, offset: int, size: int) -> bytes:
            return self.config_bytes()[offset:offset + size]

    out = d.describe_virtio(FakeBlock())
    assert out == {"device_type": 2, "features": "0x0000000100000020", "queue_max_sizes": [128, 128],
                   "config": "010203", "serial": "SER"}


def test_canonical_text_sorts_keys_and_ends_with_a_newline() -> None:
    assert d.canonical_text({"b": 1, "a": [2]}) == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'


def test_vm_describe_needs_a_created_vm_that_is_not_booted() -> None:
    from vmsh.config import model as m
    from vmsh.engine.state import VmState
    from vmsh.engine.vmm import ACTIONS_BY_PATH, Vmm
    from vmsh.errors import NotFoundError, StateError

    action = ACTIONS_BY_PATH["/api/v1/vm.describe"]
    assert (action.http_method, action.body) == ("GET", None)
    vmm = Vmm()
    with pytest.raises(NotFoundError):
        vmm.call(action)

    class Booted:
        state = VmState.RUNNING

    vmm.config = m.VmConfig()
    vmm.vm = Booted()  # type: ignore[assignment]  # a stand-in for a booted Vm
    with pytest.raises(StateError, match="not booted"):
        vmm.call(action)


def test_remote_describe_is_a_get_of_vm_describe() -> None:
    from vmsh.remote import build_request

    assert build_request("describe", []) == ("GET", "vm.describe", None, [])
