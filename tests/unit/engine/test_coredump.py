"""The core file's layout (vmsh.engine.coredump) and the page-table map it adds
(vmsh.engine.page_map), on synthetic registers and a fake guest memory."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmsh.engine import coredump
from vmsh.engine.kvm_types import Regs, Sregs
from vmsh.engine.page_map import mapped_runs
from vmsh.engine.paging import PTE_P, PTE_PS, PTE_RW, PagingMode
from vmsh.errors import GuestMemoryError, VmshError

CR0_PG, CR4_PAE, EFER_LMA = 1 << 31, 1 << 5, 1 << 10


def fake_tables() -> tuple[PagingMode, dict[int, int]]:
    """PML4 at 0x1000: entry 273 (0xffff888000000000) -> PDPT 0x2000 -> PD 0x3000 with two 2 MiB
    pages at 0 and 2 MiB; entry 511 -> PDPT 0x4000 -> PD 0x5000 -> PT 0x6000 with one 4 KiB page."""
    mem = {
        0x1000 + 273 * 8: 0x2000 | PTE_P | PTE_RW,
        0x1000 + 1 * 8: 0x7000 | PTE_P,  # a user-half entry, left out
        0x2000: 0x3000 | PTE_P | PTE_RW,
        0x3000: 0x0 | PTE_P | PTE_PS,
        0x3000 + 8: 0x20_0000 | PTE_P | PTE_PS,
        0x1000 + 511 * 8: 0x4000 | PTE_P,
        0x4000 + 510 * 8: 0x5000 | PTE_P,
        0x5000: 0x6000 | PTE_P,
        0x6000 + 3 * 8: 0x9000 | PTE_P,
    }
    return PagingMode(CR0_PG, 0x1000, CR4_PAE, EFER_LMA), mem


def test_mapped_runs_coalesce_the_kernel_half() -> None:
    mode, mem = fake_tables()
    runs = mapped_runs(mode, lambda gpa: mem.get(gpa, 0))
    assert runs == [(0xFFFF_8880_0000_0000, 0, 0x40_0000), (0xFFFF_FFFF_8000_3000, 0x9000, 0x1000)]


def test_mapped_runs_leave_out_what_is_not_ram() -> None:
    mode, mem = fake_tables()

    def read(gpa: int) -> int:
        if gpa >= 0x6000:
            raise GuestMemoryError("outside RAM")
        return mem.get(gpa, 0)

    runs = mapped_runs(mode, read, is_ram=lambda pa, size: pa + size <= 0x20_0000)
    assert runs == [(0xFFFF_8880_0000_0000, 0, 0x20_0000)]


def cpu(index: int) -> coredump.CpuState:
    regs = Regs(rax=0x1111, rip=0xFFFF_FFFF_8100_0000 + index, rsp=0xFFFF_8880_0001_0000, rflags=0x246)
    sregs = Sregs(cr3=0x1000)
    sregs.cs.selector = 0x10
    return coredump.CpuState(index, regs, sregs, kernel_gs_base=0x42)


def test_layout_follows_cloud_hypervisors_core_format() -> None:
    ram = [coredump.RamRegion(0x1_0000_0000, bytes(0x2000)), coredump.RamRegion(0, b"\xaa" * 0x1000)]
    head, pieces = coredump.layout([cpu(0), cpu(1)], ram, [(0xFFFF_8880_0000_0000, 0x800, 0x100)])
    ident, e_type, machine, _v, _entry, phoff, _sh, _fl, ehsize, phentsize, phnum = \
        struct.unpack_from("<16sHHIQQQIHHH", head)
    assert ident[:4] == b"\x7fELF" and (e_type, machine, phoff, ehsize, phentsize) == (4, 62, 64, 64, 56)
    assert phnum == 1 + 2 + 1
    phdrs = [struct.unpack_from("<IIQQQQQQ", head, 64 + 56 * i) for i in range(phnum)]
    note = phdrs[0]
    assert note[0] == coredump.PT_NOTE and note[2] == 64 + 56 * phnum and note[2] + note[5] == len(head)
    # physical segments in address order, back to back after the notes
    assert [(p[0], p[3], p[4], p[5]) for p in phdrs[1:3]] == [(1, 0, 0, 0x1000), (1, 0, 0x1_0000_0000, 0x2000)]
    assert phdrs[1][2] == len(head) and phdrs[2][2] == len(head) + 0x1000
    assert pieces == [(len(head), ram[1].data), (len(head) + 0x1000, ram[0].data)]
    # the virtual alias points into the bytes of the region that holds it
    assert phdrs[3][2:6] == (len(head) + 0x800, 0xFFFF_8880_0000_0000, 0x800, 0x100)
    # notes: two NT_PRSTATUS (pr_pid = vCPU index, rip in user_regs_struct order), then two QEMU
    notes = head[note[2]:]
    pos, seen = 0, []
    while pos < len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12:pos + 12 + namesz - 1]
        desc_at = pos + 12 + ((namesz + 3) & ~3)
        desc = notes[desc_at:desc_at + descsz]
        seen.append((name, kind, descsz))
        if name == b"CORE":
            pid = struct.unpack_from("<I", desc, 32)[0]
            rip = struct.unpack_from("<Q", desc, 112 + 8 * coredump.USER_REGS.index("rip"))[0]
            assert rip == 0xFFFF_FFFF_8100_0000 + pid
        else:
            assert struct.unpack_from("<II", desc) == (1, 440)
            assert struct.unpack_from("<Q", desc, 432)[0] == 0x42  # kernel_gs_base last
        pos = desc_at + ((descsz + 3) & ~3)
    assert seen == [(b"CORE", 1, 336)] * 2 + [(b"QEMU", 0, 440)] * 2


@pytest.mark.needs(shutil.which("readelf") is not None, "readelf is not installed (apt-get install binutils)")
def test_readelf_accepts_a_written_core(tmp_path: Path) -> None:
    path = tmp_path / "core"
    coredump.write_core(str(path), [cpu(0)], [coredump.RamRegion(0, b"\x90" * 0x3000)])
    out = subprocess.run(["readelf", "-h", "-l", "-n", "-W", str(path)], capture_output=True, text=True, check=True)
    assert "CORE (Core file)" in out.stdout and "NT_PRSTATUS" in out.stdout and not out.stderr, out
    with pytest.raises(VmshError, match="Cannot create the core dump file"):
        coredump.write_core(str(path), [cpu(0)], [coredump.RamRegion(0, b"\x90" * 0x3000)])


def test_untouched_ram_is_a_hole_that_reads_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "core"
    data = bytearray(b"\x11" * 0x4000)
    # only the second page is said to hold data: the rest is not written
    coredump.write_core(str(path), [cpu(0)], [coredump.RamRegion(0, bytes(data), [(0x1000, 0x1000)])])
    head, _ = coredump.layout([cpu(0)], [coredump.RamRegion(0, bytes(data))])
    body = path.read_bytes()[len(head):]
    assert len(body) == 0x4000
    assert body[0x1000:0x2000] == b"\x11" * 0x1000 and body[:0x1000] == bytes(0x1000) == body[0x3000:]
