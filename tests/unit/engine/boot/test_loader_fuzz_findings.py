"""Kernel images the fuzz campaign (ci/fuzz/fuzz_loader.py) found raising out of the loader."""

from __future__ import annotations

import pytest

from tests.kernel_images import make_elf
from vmsh.engine.boot.loader import LoaderError, load_kernel
from vmsh.engine.memory import GuestMemoryMmap


@pytest.fixture
def mem():
    m = GuestMemoryMmap.create(32 << 20)
    yield m
    m.close()


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_pvh_note_cut_off_by_the_end_of_the_file(mem: GuestMemoryMmap, cut: int) -> None:
    # make_elf puts the Xen PVH note last, its 4-byte entry at the very end of the file; the
    # PT_NOTE segment still claims the whole note (struct.error before the fix)
    image = make_elf()[:-cut]
    with pytest.raises(LoaderError, match="PVH entry note runs past its PT_NOTE segment"):
        load_kernel(mem, image)


def test_whole_pvh_note_still_loads(mem: GuestMemoryMmap) -> None:
    assert load_kernel(mem, make_elf()).entry == 0x1000200
