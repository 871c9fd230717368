"""virtio-blk and virtio-rng in a real guest, driven by the guest kernel's own drivers.

One snapshot of a guest with two disks (an ext4 image, writable, two queues; the raw
pattern image, read-only, with synchronous I/O) and the entropy device is booted once per session; every test
gets its own restored clone, on private copies of the writable disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

SERIAL = "vmsh-disk0"


@pytest.fixture(scope="session")
def disk_flags(vmsh_snapshots, vmsh_image) -> list[str]:
    """Flags for the device guest; its writable disk is a copy shared by every worker's snapshot."""
    root = Path(vmsh_snapshots.root)
    ext4 = root / "block-disk.ext4"
    with open(root / "block-disk.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ext4.exists():
            shutil.copyfile(vmsh_image("disk"), root / "block-disk.tmp")
            (root / "block-disk.tmp").rename(ext4)
    return ["--cpus", "boot=2", "--disk", f"path={ext4},serial={SERIAL},num_queues=2",
            # synchronous: served by its queue's native thread (block_fast.QueueServer)
            f"path={vmsh_image('raw-disk')},readonly=on,_disable_io_uring=on,_disable_aio=on",
            "--rng", "src=/dev/urandom"]


@pytest.fixture
def guest(vmsh_clone, disk_flags):
    return vmsh_clone(*disk_flags)


def manifest(vmsh_image) -> dict:
    return json.loads(Path(vmsh_image("disk-manifest")).read_text())


def test_disks_have_their_size_serial_and_mode(guest, vmsh_image) -> None:
    raw_size = Path(vmsh_image("raw-disk")).stat().st_size
    ext4_size = Path(vmsh_image("disk")).stat().st_size
    assert guest.check_output("cat /sys/block/vda/size /sys/block/vda/ro").split() == [str(ext4_size // 512), "0"]
    assert guest.check_output("cat /sys/block/vda/serial") == SERIAL
    assert guest.check_output("cat /sys/block/vdb/size /sys/block/vdb/ro").split() == [str(raw_size // 512), "1"]
    # the guest reads what the host image holds (sector 3 of the pattern image)
    assert guest.check_output("dd if=/dev/vdb bs=512 skip=3 count=1 2>/dev/null | head -c 20") == "VMSH-SECTOR 00000003"


def test_files_on_the_ext4_disk_read_back(guest, vmsh_image) -> None:
    expected = manifest(vmsh_image)
    guest.check_output("mount /dev/vda /mnt")
    out = guest.check_output("cat /mnt/hello.txt; sha256sum /mnt/pattern.bin")
    assert "hello from the vmsh test disk" in out
    assert json.dumps(expected).find(out.split()[-2]) >= 0, (out, expected)


def test_written_data_reaches_the_host_file(guest, tmp_path: Path) -> None:
    # Real data without generating it: every guest kernel instruction is emulated on PVM
    # hosts, so /dev/urandom or a write per line would cost tens of seconds.
    guest.check_output("mount /dev/vda /mnt && dd if=/bin/busybox of=/mnt/written.bin bs=256k count=1 2>/dev/null")
    in_guest = guest.check_output("sha256sum /mnt/written.bin").split()[0]
    guest.check_output("umount /mnt && sync")
    image = guest.workdir / "snapshot" / "disk-_disk0.img"
    dump = tmp_path / "written.bin"
    subprocess.run(["debugfs", "-R", f"dump /written.bin {dump}", str(image)], check=True, capture_output=True)
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == in_guest


def test_readonly_disk_refuses_writes(guest, vmsh_image) -> None:
    before = hashlib.sha256(Path(vmsh_image("raw-disk")).read_bytes()).hexdigest()
    result = guest.run("dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct")
    assert result.status != 0, result.output
    first = guest.check_output("dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 20")
    assert first == "VMSH-SECTOR 00000000"
    assert hashlib.sha256(Path(vmsh_image("raw-disk")).read_bytes()).hexdigest() == before
    # the synchronous disk's queue has its own thread, named as cloud-hypervisor names it; it
    # handed the refused write to the I/O loop and went on serving reads
    assert guest.check_output("dd if=/dev/vdb bs=512 skip=5 count=1 iflag=direct 2>/dev/null | head -c 20") \
        == "VMSH-SECTOR 00000005"
    names = [(task / "comm").read_text().strip() for task in Path(f"/proc/{guest.pid}/task").iterdir()]
    assert "_disk1_q0" in names, names


def test_two_queues_are_used_by_two_vcpus(guest) -> None:
    assert guest.check_output("ls /sys/block/vda/mq").split() == ["0", "1"]
    guest.check_output("for cpu in 1 2; do taskset $cpu dd if=/dev/vda of=/dev/null bs=4k count=64 iflag=direct "
                       "2>/dev/null; done")
    counts = {}
    for line in guest.check_output("grep -E 'req\\.[01]' /proc/interrupts").splitlines():
        fields = line.split()
        counts[fields[-1].split("-")[-1]] = sum(int(x) for x in fields[1:3])
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts


def test_rng_gives_bytes(guest) -> None:
    assert guest.check_output("cat /sys/class/misc/hw_random/rng_current") == "virtio_rng.0"
    first = guest.check_output("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'")
    second = guest.check_output("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'")
    assert len(first) == 64 and len(second) == 64 and first != second
