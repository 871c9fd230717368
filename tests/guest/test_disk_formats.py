"""Fixed VHD and VHDX images made by qemu-img, hot-added to a running guest: the guest's kernel
reads what the raw reference holds and writes into them (into data already present and, in
a VHDX, into blocks vmsh allocates); qemu-img then agrees with the reference written the same way
(`qemu-img check` clean where the format has checks, the data equal).

Each test restores a clone of one booted guest with its own API socket and hot-adds the image
(cheaper than booting a guest per format).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.guest.eventlog import wait_for_event
from vmsh.api.client import ApiClient

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (Debian qemu-utils) is missing")

SIZE = 8 << 20
DATA = 1 << 20
# (block size, skip, seek, count) of each guest dd copying the disk onto itself, in 4 KiB blocks:
# inside the data already present, and (1280 = 5 MiB) into an empty part of the disk.
COPIES = [(4096, 0, 1280, 64), (4096, 3, 100, 5)]


@pytest.fixture
def clone(vmsh_clone, tmp_path: Path):
    api, events = tmp_path / "api.sock", tmp_path / "events.json"
    guest = vmsh_clone(restore_flags=["--api-socket", f"path={api}", "--event-monitor", f"path={events}"])
    guest.api, guest.events = str(api), events
    return guest


def _qemu_img(*args: str) -> str:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"qemu-img {' '.join(args)}: {res.stdout}{res.stderr}"
    return res.stdout


def _wait_in_guest(guest, condition: str, tries: int = 300) -> None:
    guest.check_output(f"i=0; until {condition}; do [ $i -lt {tries} ] || exit 1; i=$((i+1)); sleep 0.2; done",
                       timeout=tries / 5 + 30)


@pytest.mark.parametrize("fmt, options", [("vpc", "subformat=fixed,force_size=on"),
                                          ("vhdx", "subformat=dynamic,block_size=1M"),
                                          ("vhdx", "subformat=fixed,block_size=8M")])
def test_guest_reads_and_writes_an_image_qemu_img_made(clone, tmp_path: Path, fmt: str, options: str) -> None:
    ref = tmp_path / "ref.raw"
    with open(ref, "wb") as f:
        f.write(os.urandom(DATA))
        f.truncate(SIZE)
    image = tmp_path / f"disk.{fmt}"
    _qemu_img("convert", "-O", fmt, "-o", options, str(ref), str(image))

    with ApiClient(clone.api) as api:
        api.put("vm.add-disk", {"path": str(image), "id": "fmt0"})
    _wait_in_guest(clone, "[ -e /sys/block/vda ]")
    assert clone.check_output("cat /sys/block/vda/size") == str(SIZE // 512)
    in_guest = clone.check_output(f"dd if=/dev/vda bs=64k count={DATA >> 16} 2>/dev/null | sha256sum").split()[0]
    assert in_guest == hashlib.sha256(ref.read_bytes()[:DATA]).hexdigest()
    for bs, skip, seek, count in COPIES:
        clone.check_output(f"dd if=/dev/vda of=/dev/vda bs={bs} skip={skip} seek={seek} count={count} "
                           "iflag=direct oflag=direct conv=notrunc,fsync 2>/dev/null")
    with ApiClient(clone.api) as api:
        api.put("vm.remove-device", {"id": "fmt0"})
    wait_for_event(clone.events, "vm", "device-removed")

    fd = os.open(ref, os.O_RDWR)
    try:
        for bs, skip, seek, count in COPIES:
            os.pwrite(fd, os.pread(fd, bs * count, bs * skip), bs * seek)
    finally:
        os.close(fd)
    if fmt == "vhdx":
        assert "No errors were found" in _qemu_img("check", "-f", fmt, str(image))
        _qemu_img("compare", "-f", "raw", "-F", fmt, str(ref), str(image))
    else:
        # qemu-img shows a fixed VHD's footer as a last sector of its disk: compare the rest.
        out = tmp_path / "out.raw"
        _qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
        assert out.read_bytes()[:SIZE] == ref.read_bytes()


@pytest.fixture(scope="session")
def format_disks(vmsh_snapshots) -> tuple[Path, Path, Path]:
    """A raw reference and a fixed VHD and a dynamic VHDX of it, shared by every worker's snapshot."""
    root = Path(vmsh_snapshots.root) / "disk-formats"
    root.mkdir(exist_ok=True)
    ref, vhd, vhdx = root / "ref.raw", root / "disk.vhd", root / "disk.vhdx"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not vhdx.exists():
            with open(root / "ref.tmp", "wb") as f:
                f.write(hashlib.sha256(b"vmsh disk formats").digest() * (DATA // 32))
                f.truncate(SIZE)
            _qemu_img("convert", "-O", "vpc", "-o", "subformat=fixed,force_size=on", str(root / "ref.tmp"), str(vhd))
            _qemu_img("convert", "-O", "vhdx", "-o", "block_size=1M", str(root / "ref.tmp"), str(root / "vhdx.tmp"))
            (root / "ref.tmp").rename(ref)
            (root / "vhdx.tmp").rename(vhdx)
    return ref, vhd, vhdx


def test_restored_guest_uses_vhd_and_vhdx_disks(vmsh_clone, format_disks, tmp_path: Path) -> None:
    # The guest booted with both disks and was snapshotted; this clone restored it onto private
    # copies of the images (the snapshot holds no disk data: the formats reopen from the files).
    ref_path, _, _ = format_disks
    guest = vmsh_clone("--disk", f"path={format_disks[1]}", f"path={format_disks[2]}")
    ref = ref_path.read_bytes()
    for dev in ("vda", "vdb"):
        assert guest.check_output(f"cat /sys/block/{dev}/size") == str(SIZE // 512)
        got = guest.check_output(f"dd if=/dev/{dev} bs=64k count={DATA >> 16} 2>/dev/null | sha256sum").split()[0]
        assert got == hashlib.sha256(ref[:DATA]).hexdigest(), dev
        guest.check_output(f"dd if=/dev/{dev} of=/dev/{dev} bs=4096 skip=0 seek=1500 count=16 "
                           "iflag=direct oflag=direct conv=notrunc,fsync 2>/dev/null")
    guest.close()
    expected = bytearray(ref)
    expected[1500 * 4096:1516 * 4096] = ref[:16 * 4096]
    vhd, vhdx = (guest.workdir / "snapshot" / f"disk-_disk{n}.img" for n in (0, 1))
    out = tmp_path / "out.raw"
    _qemu_img("convert", "-f", "vpc", "-O", "raw", str(vhd), str(out))
    assert out.read_bytes()[:SIZE] == expected
    assert "No errors were found" in _qemu_img("check", "-f", "vhdx", str(vhdx))
    _qemu_img("convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(out))
    assert out.read_bytes() == expected
