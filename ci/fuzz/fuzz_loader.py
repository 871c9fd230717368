"""Fuzz campaign: the kernel loaders (ELF/PVH and bzImage headers) and the boot tables they feed.

Seeds are the synthetic images of ``tests/kernel_images.py`` (PVH ELFs with and without the entry
note, bzImages of several boot protocol versions). Each input is a seed with header fields
overwritten (the ELF header's program header offset, size and count, program headers, note
sizes and types; the bzImage's setup_sects, header length, version, loadflags, code32_start,
initrd_addr_max and cmdline_size) by edge values, its bytes mutated, and its length cut or
extended. The image goes the way ``vm.boot`` takes it: :func:`load_kernel`, then
:func:`load_initramfs` with a random-sized initramfs and :func:`write_boot_tables` with a
random command line (the zero page or hvm_start_info) into a 32 MiB guest RAM. Only
:class:`vmsh.errors.VmshError` (the loader's :class:`LoaderError`, a
:class:`GuestMemoryError`) may come out.

Usage: ``python3 ci/fuzz/fuzz_loader.py --inputs 100000``
"""

from __future__ import annotations

import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz import fuzzlib
from tests.kernel_images import make_bzimage, make_elf
from vmsh.engine.boot.configure import write_boot_tables
from vmsh.engine.boot.loader import load_initramfs, load_kernel
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.errors import VmshError

RAM_SIZE = 32 << 20

SEEDS = [
    make_elf(), make_elf(entry_note=None), make_elf(paddr=0x100000, code=b"\xf4" * 4096, bss=1 << 20),
    make_elf(entry_note=0x1000000, bss=0),
    make_bzimage(), make_bzimage(version=0x202), make_bzimage(version=0x206, setup_sects=4),
    make_bzimage(version=0x20F, setup_sects=30, payload=b"\x90" * 8192), make_bzimage(version=0x1FF),
]

#: (offset, struct format) of the header fields worth overwriting
ELF_FIELDS = [(0x04, "<B"), (0x05, "<B"), (0x12, "<H"), (0x18, "<Q"), (0x20, "<Q"), (0x36, "<H"), (0x38, "<H")]
# the two program headers at 64 and 120: type, offset, paddr, filesz, memsz
ELF_FIELDS += [(base + off, fmt) for base in (64, 120)
               for off, fmt in ((0, "<I"), (8, "<Q"), (24, "<Q"), (32, "<Q"), (40, "<Q"))]
# the notes (after 176 + 64 bytes of code in the default image): namesz, descsz, type
ELF_FIELDS += [(240 + off, "<I") for off in (0, 4, 8, 20, 24, 28)]
BZ_FIELDS = [(0x1F1, "<B"), (0x201, "<B"), (0x202, "<I"), (0x206, "<H"), (0x211, "<B"), (0x214, "<I"),
             (0x22C, "<I"), (0x238, "<I"), (0x1FE, "<H")]
EDGES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x100000, 0x1000000, RAM_SIZE - 1, RAM_SIZE, 0x7FFFFFFF,
         0xFFFFFFFF, 1 << 32, 1 << 63, (1 << 64) - 1, 56, 64, 18, 4, 0x200, 0x206, 0x20F]


@dataclass
class LoaderInput:
    image: bytes
    initramfs: int | None  # size in bytes, None: no initramfs
    cmdline: bytes


def _set(buf: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if offset + size <= len(buf):
        struct.pack_into(fmt, buf, offset, value & ((1 << (8 * size)) - 1))


@st.composite
def loader_input(draw: st.DrawFn) -> LoaderInput:
    rnd: random.Random = draw(st.randoms(use_true_random=False))
    seed = rnd.choice(SEEDS)
    buf = bytearray(seed)
    fields = ELF_FIELDS if seed[:4] == b"\x7fELF" else BZ_FIELDS
    for _ in range(rnd.choice((0, 1, 1, 2, 3))):
        offset, fmt = rnd.choice(fields)
        _set(buf, offset, fmt, rnd.choice(EDGES) if rnd.randrange(3) else rnd.getrandbits(64))
    if rnd.randrange(3) == 0:
        buf = bytearray(fuzzlib.mutate(bytes(buf), rnd, rnd.randint(1, 6)))
    cut = rnd.randrange(8)
    if cut == 0:
        buf = buf[:rnd.randrange(len(buf) + 1)]
    elif cut == 1:
        buf += bytes(rnd.choice((1, 511, 4096, 1 << 20)))
    initramfs = rnd.choice((None, None, 0, 1, 4096, 1 << 20, RAM_SIZE // 2, RAM_SIZE))
    cmdline = rnd.choice((b"", b"console=ttyS0", b"x" * 255, b"x" * 256, b"x" * 2047, b"x" * 4096, b"a\0b",
                          rnd.randbytes(rnd.randrange(64))))
    return LoaderInput(bytes(buf), initramfs, cmdline)


class _Harness:
    mem: GuestMemoryMmap | None = None

    def setup(self) -> None:
        self.mem = GuestMemoryMmap.create(RAM_SIZE)

    def teardown(self) -> None:
        if self.mem is not None:
            self.mem.close()

    def target(self, inp: LoaderInput) -> None:
        mem = self.mem
        assert mem is not None
        kernel = load_kernel(mem, inp.image)
        initrd = None
        if inp.initramfs is not None:
            initrd = load_initramfs(mem, bytes(inp.initramfs), kernel)
        write_boot_tables(mem, kernel, inp.cmdline.decode("latin-1"), initrd)


HARNESS = _Harness()
CAMPAIGN = fuzzlib.Campaign("loader", loader_input(), HARNESS.target, (VmshError,), time_limit=5.0,
                            setup=HARNESS.setup, teardown=HARNESS.teardown)

if __name__ == "__main__":
    sys.exit(fuzzlib.main(CAMPAIGN))
