"""Kernel loaders and boot tables on synthetic ELF and bzImage images (tests/kernel_images.py)."""

from __future__ import annotations

import mmap
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_images import make_bzimage, make_elf
from vmsh.engine.boot import layout
from vmsh.engine.boot.bootparams import (
    BP_E820_ENTRIES,
    BP_E820_TABLE,
    HDR_CMD_LINE_PTR,
    HDR_RAMDISK_IMAGE,
    XEN_HVM_START_MAGIC_VALUE,
    e820_map,
    write_boot_params,
    write_pvh_start_info,
)
from vmsh.engine.boot.configure import write_boot_tables
from vmsh.engine.boot.loader import LoaderError, load_cmdline, load_initramfs, load_kernel, map_payload
from vmsh.engine.memory import GuestMemoryMmap

MEM = 64 << 20


@pytest.fixture
def mem() -> GuestMemoryMmap:
    m = GuestMemoryMmap.create(MEM)
    yield m
    m.close()


def test_elf_loader_copies_segments_and_finds_the_pvh_entry(mem: GuestMemoryMmap) -> None:
    mem.fill(0x1000040, 32, 0xAA)
    k = load_kernel(mem, make_elf())
    assert (k.kind, k.entry) == ("pvh", 0x1000200)
    assert (k.load_start, k.load_end) == (0x1000000, 0x1000000 + 64 + 32)
    assert mem.read(0x1000000, 64) == b"\x90" * 64
    assert mem.read(0x1000040, 32) == bytes(32)  # bss zeroed


def test_elf_without_pvh_note_is_refused(mem: GuestMemoryMmap) -> None:
    with pytest.raises(LoaderError, match="no PVH entry note"):
        load_kernel(mem, make_elf(entry_note=None))


def test_elf_segment_outside_ram_is_refused(mem: GuestMemoryMmap) -> None:
    with pytest.raises(LoaderError, match="does not fit"):
        load_kernel(mem, make_elf(paddr=MEM - 16, entry_note=MEM - 16))


def test_elf_below_1mib_is_refused(mem: GuestMemoryMmap) -> None:
    with pytest.raises(LoaderError, match="below"):
        load_kernel(mem, make_elf(paddr=0x1000, entry_note=0x200000))


def test_bzimage_loader_places_protected_mode_code(mem: GuestMemoryMmap) -> None:
    img = make_bzimage()
    k = load_kernel(mem, img)
    assert (k.kind, k.entry, k.protocol) == ("bzimage", 0x100000, 0x20F)
    assert mem.read(0x100000, 4) == b"\xfa\xf4\xfa\xf4"
    assert k.setup_header == img[0x1F1:0x26C]
    assert k.cmdline_max == 2048


def test_bzimage_zero_setup_sects_means_four(mem: GuestMemoryMmap) -> None:
    img = bytearray(make_bzimage(setup_sects=4))
    img[0x1F1] = 0
    load_kernel(mem, bytes(img))
    assert mem.read(0x100000, 2) == b"\xfa\xf4"


@pytest.mark.parametrize("kwargs,msg", [({"version": 0x1FF}, "boot protocol"),
                                        ({"loadflags": 0}, "LOADED_HIGH"),
                                        ({"code32_start": 0x10000}, "below")])
def test_bzimage_unsupported_headers_are_refused(mem: GuestMemoryMmap, kwargs: dict[str, int], msg: str) -> None:
    with pytest.raises(LoaderError, match=msg):
        load_kernel(mem, make_bzimage(**kwargs))


def test_garbage_is_neither_elf_nor_bzimage(mem: GuestMemoryMmap) -> None:
    with pytest.raises(LoaderError, match="neither an ELF vmlinux nor a bzImage"):
        load_kernel(mem, b"MZ" + bytes(4096))


def test_missing_kernel_file(mem: GuestMemoryMmap, tmp_path: object) -> None:
    with pytest.raises(LoaderError, match=r"^No such file or directory$"):
        load_kernel(mem, "/nonexistent/vmlinux")


def _payload(kind: str, tmp_path: Path) -> str:
    """A path that is not a loadable payload: a FIFO (opening it would block), a character
    device without end, a directory, a sparse file larger than the 64 MiB of RAM."""
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path)
    if kind == "big":
        path = tmp_path / "big"
        with open(path, "wb") as f:
            f.truncate(MEM + 1)
        return str(path)
    return {"zero": "/dev/zero", "dir": str(tmp_path)}[kind]


NOT_LOADABLE = [("fifo", "^not a regular file$"), ("zero", "^not a regular file$"),
                ("dir", "^not a regular file$"),
                ("big", f"^it is {MEM + 1} bytes, larger than the guest's {MEM} bytes of RAM$")]


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail a test that blocks (as opening a FIFO for reading does) instead of hanging the run."""

    def expired(_signum: int, _frame: object) -> None:
        raise TimeoutError("the loader blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize("kind, message", NOT_LOADABLE)
def test_kernel_that_is_not_a_regular_file_within_ram_is_refused_at_once(
        mem: GuestMemoryMmap, tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, _payload(kind, tmp_path))


@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize("kind, message", NOT_LOADABLE)
def test_initramfs_that_is_not_a_regular_file_within_ram_is_refused_at_once(
        mem: GuestMemoryMmap, tmp_path: Path, kind: str, message: str) -> None:
    k = load_kernel(mem, make_elf())
    with pytest.raises(LoaderError, match=message):
        load_initramfs(mem, _payload(kind, tmp_path), k)


def test_payload_files_are_mapped_not_read(tmp_path: Path) -> None:
    path = tmp_path / "initrd"
    path.write_bytes(b"070701" + bytes(5000))
    data = map_payload(str(path), MEM)
    assert isinstance(data, mmap.mmap) and data[:6] == b"070701"


def test_initramfs_file_is_loaded(mem: GuestMemoryMmap, tmp_path: Path) -> None:
    path = tmp_path / "initrd"
    path.write_bytes(b"070701" + bytes(5000))
    addr, size = load_initramfs(mem, str(path), load_kernel(mem, make_elf()))
    assert size == 5006 and mem.read(addr, 6) == b"070701"


def test_initramfs_goes_page_aligned_to_the_top_of_low_ram(mem: GuestMemoryMmap) -> None:
    k = load_kernel(mem, make_elf())
    addr, size = load_initramfs(mem, b"070701" + bytes(5000), k)
    assert size == 5006
    assert addr == (MEM - 5006) & ~0xFFF
    assert mem.read(addr, 6) == b"070701"


def test_initramfs_that_does_not_fit_is_refused(mem: GuestMemoryMmap) -> None:
    k = load_kernel(mem, make_elf())
    with pytest.raises(LoaderError, match="does not fit"):
        load_initramfs(mem, bytes(MEM - 0x1000000), k)


def test_cmdline_is_nul_terminated_and_bounded(mem: GuestMemoryMmap) -> None:
    assert load_cmdline(mem, "console=ttyS0") == 13
    assert mem.read(layout.CMDLINE_START, 14) == b"console=ttyS0\0"
    with pytest.raises(LoaderError, match="at most 10"):
        load_cmdline(mem, "x" * 11, max_len=10)


def test_e820_map_matches_the_reference_layout(mem: GuestMemoryMmap) -> None:
    assert e820_map(mem) == [(0, 0xA0000, 1), (0x100000, MEM - 0x100000, 1),
                             (0xE800_0000, 256 << 20, 2)]


def test_boot_params_carry_header_cmdline_initrd_and_e820(mem: GuestMemoryMmap) -> None:
    k = load_kernel(mem, make_bzimage())
    e820 = e820_map(mem)
    write_boot_params(mem, k, 5, (0x3000000, 0x1234), e820)
    zp = mem.read(layout.ZERO_PAGE_START, 4096)
    assert zp[0x202:0x206] == b"HdrS"
    assert zp[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<I", zp, HDR_CMD_LINE_PTR)[0] == layout.CMDLINE_START
    assert struct.unpack_from("<II", zp, HDR_RAMDISK_IMAGE) == (0x3000000, 0x1234)
    assert zp[BP_E820_ENTRIES] == 3
    assert struct.unpack_from("<QQI", zp, BP_E820_TABLE + 20) == (0x100000, MEM - 0x100000, 1)


def test_pvh_start_info_layout(mem: GuestMemoryMmap) -> None:
    e820 = e820_map(mem)
    write_pvh_start_info(mem, (0x3000000, 0x1234), e820)
    info = struct.unpack("<IIIIQQQQII", mem.read(layout.PVH_INFO_START, 56))
    assert info == (XEN_HVM_START_MAGIC_VALUE, 1, 0, 1, layout.MODLIST_START, layout.CMDLINE_START, 0,
                    layout.MEMMAP_START, 3, 0)
    assert struct.unpack("<QQQQ", mem.read(layout.MODLIST_START, 32)) == (0x3000000, 0x1234, 0, 0)
    assert struct.unpack("<QQII", mem.read(layout.MEMMAP_START + 24, 24)) == (0x100000, MEM - 0x100000, 1, 0)


def test_write_boot_tables_for_pvh(mem: GuestMemoryMmap) -> None:
    k = load_kernel(mem, make_elf())
    write_boot_tables(mem, k, "console=ttyS0 quiet", None)
    assert mem.read(layout.CMDLINE_START, 20) == b"console=ttyS0 quiet\0"
    assert mem.read_u32(layout.PVH_INFO_START) == XEN_HVM_START_MAGIC_VALUE
    assert mem.read_u16(layout.EBDA_POINTER) == 0xA000
