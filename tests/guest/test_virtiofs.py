"""virtio-fs (``--fs``, ``vm.add-fs``) in a real guest against QEMU's virtiofsd: the guest mounts
the shared host directory with its own virtiofs driver, reads files the host wrote and writes
files the host reads; a device hot-added to a running guest works the same and goes away again.

cloud-hypervisor requires ``--memory shared=on`` for ``--fs`` (virtiofsd maps the guest RAM), so
every guest here has it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.guest.eventlog import events_of, wait_for_event
from tests.guest.virtiofsd import Virtiofsd
from vmsh.api.client import ApiClient, ApiError
from vmsh.harness.waiting import wait_until

SHARED_MEMORY = ("--memory", "size=512M,shared=on")
TAG = "hostshare"
#: guest command: true once the virtiofs driver has bound a device
BOUND = "ls /sys/bus/virtio/drivers/virtiofs/ | grep -q virtio"


@pytest.fixture
def virtiofsd(tmp_path: Path):
    """A daemon sharing ``tmp_path/shared`` (with a small and a 1 MiB file in it)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello from the host\n")
    (shared / "big.bin").write_bytes(os.urandom(1 << 20))
    daemon = Virtiofsd(shared, tmp_path / "virtiofsd.sock", tmp_path / "virtiofsd.log")
    yield daemon
    daemon.close()


def wait_in_guest(guest, condition: str, tries: int = 300) -> None:
    """Poll a shell condition in the guest (5 per second) until it holds."""
    guest.check_output(f"i=0; until {condition}; do [ $i -lt {tries} ] || exit 1; i=$((i+1)); sleep 0.2; done",
                       timeout=tries / 5 + 30)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def exercise_share(guest, daemon: Virtiofsd, tag: str = TAG) -> None:
    """Mount ``tag`` in the guest and move data both ways through it."""
    assert "virtiofs" in guest.check_output("cat /proc/filesystems")
    guest.check_output(f"mkdir -p /mnt/share && mount -t virtiofs {tag} /mnt/share")
    assert f"{tag} /mnt/share virtiofs" in guest.check_output("cat /proc/mounts")
    # host -> guest: a small file and one that takes many descriptors
    assert guest.check_output("cat /mnt/share/hello.txt") == "hello from the host"
    assert guest.check_output("sha256sum /mnt/share/big.bin").split()[0] == sha256(daemon.shared / "big.bin")
    # guest -> host: a line and a copy of the big file, visible on the host after the guest syncs
    guest.check_output("echo written by the guest > /mnt/share/from-guest.txt && "
                       "cp /mnt/share/big.bin /mnt/share/copy.bin && sync")
    assert (daemon.shared / "from-guest.txt").read_text() == "written by the guest\n"
    assert sha256(daemon.shared / "copy.bin") == sha256(daemon.shared / "big.bin")
    # a file the host changes now is what the guest reads next (cache=none)
    (daemon.shared / "hello.txt").write_text("changed on the host\n")
    assert guest.check_output("cat /mnt/share/hello.txt") == "changed on the host"
    guest.check_output("rm /mnt/share/from-guest.txt")
    assert not (daemon.shared / "from-guest.txt").exists()
    guest.check_output("umount /mnt/share")


def test_fs_shares_a_host_directory_with_the_guest(vmsh_guest, virtiofsd) -> None:
    guest = vmsh_guest(*SHARED_MEMORY, "--platform", "num_pci_segments=2",
                       "--fs", f"tag={TAG},socket={virtiofsd.socket},queue_size=256,id=fs0,pci_segment=1")
    wait_in_guest(guest, BOUND)
    # the PCI function the driver bound is on segment 1
    assert "/0001:00:" in guest.check_output("readlink -f /sys/bus/virtio/drivers/virtiofs/virtio*")
    exercise_share(guest, virtiofsd)


def test_fs_asking_for_more_queues_than_the_backend_serves_is_refused(vmsh_guest, virtiofsd) -> None:
    """``num_queues`` counts request queues; with the hiprio queue the device needs one more, and
    this virtiofsd serves two in all (GET_QUEUE_NUM): the device is refused, as cloud-hypervisor
    refuses it, before the guest runs. (Two vCPUs: a device may not have more request queues.)"""
    guest = vmsh_guest(*SHARED_MEMORY, "--cpus", "boot=2",
                       "--fs", f"tag={TAG},socket={virtiofsd.socket},num_queues=2", ready=False)
    assert guest.wait_exit(timeout=120) != 0
    assert "the backend serves 2 queues, 3 were asked for" in guest.console_tail()


def test_fs_is_hot_added_used_and_removed(vmsh_guest, tmp_path: Path, virtiofsd) -> None:
    """A fresh boot, not a restored clone: a restored guest's RAM is a private copy-on-write
    mapping of the snapshot, which a backend cannot map."""
    api, events = tmp_path / "api.sock", tmp_path / "events.json"
    guest = vmsh_guest(*SHARED_MEMORY, "--api-socket", f"path={api}", "--event-monitor", f"path={events}")
    with ApiClient(str(api)) as client:
        info = client.put("vm.add-fs", {"tag": TAG, "socket": str(virtiofsd.socket), "id": "hotfs"})
        assert info["id"] == "hotfs"
        assert [f["id"] for f in client.get("vm.info")["config"]["fs"]] == ["hotfs"]
    wait_in_guest(guest, BOUND)
    exercise_share(guest, virtiofsd)
    assert ("virtio-device", "activated", {"id": "hotfs"}) in events_of(events)
    # a snapshot is refused before anything is written: virtiofsd's state (the FUSE session, open
    # files) cannot be saved from the VMM
    snap = tmp_path / "snap"
    snap.mkdir()
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        with pytest.raises(ApiError, match=r"Cannot snapshot a VM with vhost-user devices \(hotfs\)"):
            client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
        client.put("vm.resume")
    assert list(snap.iterdir()) == []
    # and the device works on after the pause
    assert guest.check_output(f"mount -t virtiofs {TAG} /mnt/share && cat /mnt/share/hello.txt && umount /mnt/share"
                              ) == "changed on the host"
    with ApiClient(str(api)) as client:
        client.put("vm.remove-device", {"id": "hotfs"})
    assert wait_for_event(events, "vm", "device-removed") == {"id": "hotfs", "bdf": info["bdf"]}
    wait_in_guest(guest, f"! {{ {BOUND}; }}")
    with ApiClient(str(api)) as client:
        assert not client.get("vm.info")["config"].get("fs")
    # the device let go of its backend: this virtiofsd ends when its frontend disconnects
    wait_until(lambda: not virtiofsd.alive(), 30, "virtiofsd to see the device go")
    # the guest carries on
    assert guest.check_output("echo alive") == "alive"

