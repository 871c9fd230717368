"""qcow2 disks in a real guest, judged by qemu-img: an overlay (made by qemu-img over a raw
backing file) hot-added to a restored clone is read and written by the guest's virtio-blk driver
and qemu-img then finds it consistent and equal to the reference; a guest restored from a snapshot
taken with a qcow2 disk, snapshotted again after writing and restored once more, keeps its data;
a guest boots with its root file system on a qcow2 overlay and writes to it."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.unit.devices.storage.qcow2.qemu import assert_same, check_clean, qemu_img
from vmsh.api.client import ApiClient
from vmsh.harness import restore_guest
from vmsh.images import cpio

BUSYBOX = Path("/bin/busybox")  # the guest's /bin/busybox is this file (vmsh/images/initramfs.py)


def wait_in_guest(guest, condition: str, tries: int = 300) -> None:
    guest.check_output(f"i=0; until {condition}; do [ $i -lt {tries} ] || exit 1; i=$((i+1)); sleep 0.2; done",
                       timeout=tries / 5 + 30)


def overlay(tmp: Path, base_source: str) -> tuple[Path, Path]:
    """``top.qcow2`` over a raw copy of ``base_source`` (absolute backing path: private copies of
    the overlay made for clones still find it), with 64 KiB at 1 MiB written by qemu-io; and
    ``ref.raw``, what the guest must see."""
    base = tmp / "base.raw"
    shutil.copyfile(base_source, base)
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", top)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(top)], check=True,
                   capture_output=True)
    ref = tmp / "ref.raw"
    shutil.copyfile(base, ref)
    with open(ref, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x5a" * 65536)
    return top, ref


def guest_writes(guest, dev: str, ref: Path) -> None:
    """Writes the guest makes (partial clusters over the backing file, over qemu-io's cluster,
    whole clusters), mirrored onto ``ref``, each followed by a flush (fsync on the device: `sync`
    alone sends no flush for a raw block device)."""
    busybox = BUSYBOX.read_bytes()
    writes = [(7 * 512, 3 * 512, "bs=512 seek=7 count=3"), (260 * 4096, 8 * 4096, "bs=4k seek=260 count=8"),
              (300 * 4096, 64 * 4096, "bs=4k seek=300 count=64")]
    for offset, length, dd in writes:
        guest.check_output(f"dd if=/bin/busybox of={dev} {dd} conv=notrunc,fsync oflag=direct 2>/dev/null")
        with open(ref, "r+b") as f:
            f.seek(offset)
            f.write(busybox[:length])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hot_added_qcow2_overlay_is_read_and_written(vmsh_clone, vmsh_image, tmp_path: Path) -> None:
    top, ref = overlay(tmp_path, vmsh_image("raw-disk"))
    api = tmp_path / "api.sock"
    guest = vmsh_clone(restore_flags=["--api-socket", f"path={api}"])
    with ApiClient(str(api)) as client:
        client.put("vm.add-disk", {"path": str(top), "id": "qcow0"})
    wait_in_guest(guest, "[ -e /sys/block/vda ]")
    assert guest.check_output("cat /sys/block/vda/size") == str(ref.stat().st_size // 512)
    assert guest.check_output("dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | head -c 20") == \
        "VMSH-SECTOR 00000003"
    assert guest.check_output("sha256sum /dev/vda").split()[0] == sha256(ref)
    guest_writes(guest, "/dev/vda", ref)
    assert guest.check_output("sha256sum /dev/vda").split()[0] == sha256(ref)
    check_clean(top)  # after the guest's flush, while the VMM still has it open
    assert_same(top, ref)
    with ApiClient(str(api)) as client:
        client.put("vm.remove-device", {"id": "qcow0"})
    wait_in_guest(guest, "[ ! -e /sys/block/vda ]")
    check_clean(top)
    assert_same(top, ref)


@pytest.fixture(scope="session")
def snapshot_overlay(vmsh_snapshots, vmsh_image) -> tuple[Path, Path]:
    """One overlay shared by every worker's snapshot (clones run on private copies of it)."""
    root = Path(vmsh_snapshots.root) / "qcow2-overlay"
    with open(Path(vmsh_snapshots.root) / "qcow2-overlay.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "ref.raw").exists():
            tmp = root.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            overlay(tmp, vmsh_image("raw-disk"))
            # The backing path inside the overlay is absolute: build where it will stay.
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
            qemu_img("rebase", "-u", "-b", str(root / "base.raw"), "-F", "raw", root / "top.qcow2")
    return root / "top.qcow2", root / "ref.raw"


def test_snapshot_and_restore_with_a_qcow2_disk(vmsh_clone, snapshot_overlay, tmp_path: Path) -> None:
    top, shared_ref = snapshot_overlay
    ref = tmp_path / "ref.raw"
    shutil.copyfile(shared_ref, ref)
    api = tmp_path / "api.sock"
    guest = vmsh_clone("--disk", f"path={top},id=qdisk", restore_flags=["--api-socket", f"path={api}"])
    own = guest.workdir / "snapshot" / "disk-qdisk.img"  # the clone's private copy of the overlay
    assert guest.check_output("dd if=/dev/vda bs=512 skip=5 count=1 2>/dev/null | head -c 20") == \
        "VMSH-SECTOR 00000005"
    guest_writes(guest, "/dev/vda", ref)
    # completed but never flushed by the guest: the snapshot must carry it all the same
    guest.check_output("dd if=/bin/busybox of=/dev/vda bs=4k seek=500 count=4 conv=notrunc oflag=direct 2>/dev/null")
    with open(ref, "r+b") as f:
        f.seek(500 * 4096)
        f.write(BUSYBOX.read_bytes()[:4 * 4096])
    shared_before = sha256(top)
    snap = tmp_path / "snap"
    snap.mkdir()
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    # restored (its private copy of the image made) while the snapshotted VMM is still there, paused
    again = restore_guest(snap, tmp_path / "again")
    guest.close()
    check_clean(own)
    assert_same(own, ref)
    try:
        assert again.check_output("sha256sum /dev/vda").split()[0] == sha256(ref)
        again.check_output("dd if=/dev/zero of=/dev/vda bs=64k seek=10 count=2 oflag=direct conv=fsync 2>/dev/null")
    finally:
        again.close()
    with open(ref, "r+b") as f:
        f.seek(10 * 65536)
        f.write(bytes(2 * 65536))
    mine = tmp_path / "again" / "snapshot" / "disk-qdisk.img"
    check_clean(mine)
    assert_same(mine, ref)
    assert sha256(top) == shared_before, "clones write their own copies, never the shared overlay"


def _root_tree(initramfs: Path, dest: Path) -> None:
    """The test initramfs unpacked into ``dest`` (to become an ext4 root file system)."""
    for name, (mode, data) in sorted(cpio.read_names(initramfs.read_bytes()).items()):
        path = dest / name
        if stat.S_ISCHR(mode):
            continue  # the kernel mounts devtmpfs on /dev before it starts init from a disk root
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            os.symlink(data.decode(), path)
        else:
            path.write_bytes(data)
        if not stat.S_ISLNK(mode):
            os.chmod(path, stat.S_IMODE(mode))


def test_boot_with_the_root_file_system_on_a_qcow2_overlay(vmsh_guest, vmsh_image, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _root_tree(Path(vmsh_image("initramfs")), tree)
    root_raw = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(root_raw), "32M"], check=True, capture_output=True)
    base_before = sha256(root_raw)
    top = tmp_path / "root.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(root_raw), "-F", "raw", top)
    flags = vmsh_guest.flags("--disk", f"path={top}", cmdline="console=ttyS0 quiet root=/dev/vda rw init=/init")
    i = flags.index("--initramfs")
    del flags[i:i + 2]  # no initramfs: the kernel mounts the qcow2 disk as /
    guest = vmsh_guest.launch(flags)
    assert guest.check_output("grep ' / ' /proc/mounts").split()[:3] == ["/dev/root", "/", "ext4"]
    guest.check_output("echo 'written on a qcow2 root' > /note && sync")
    guest.close()
    check_clean(top)
    assert sha256(root_raw) == base_before, "the backing file is never written"
    flat = tmp_path / "flat.ext4"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, flat)
    out = subprocess.run(["debugfs", "-R", "cat /note", str(flat)], check=True, capture_output=True, text=True)
    assert out.stdout == "written on a qcow2 root\n"
