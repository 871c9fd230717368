"""vhost-user devices in a real guest, against real backends: vhost-user-blk served by
``qemu-storage-daemon`` (Debian ``qemu-system-common``) and vhost-user-net served by DPDK's
``dpdk-testpmd`` with its vhost PMD (Debian ``dpdk-dev``, ``--no-huge``).

Guest RAM is shared (``--memory shared=on``) and the guests boot fresh: a snapshot of a VM with
vhost-user devices is refused, so there is no clone to restore.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.eventlog import events_of, wait_for_event
from vmsh.api.client import ApiClient, ApiError
from vmsh.harness.waiting import wait_until

SHARED = ["--memory", "size=512M,shared=on"]
QSD = "/usr/bin/qemu-storage-daemon"
TESTPMD = "/usr/bin/dpdk-testpmd"


def _require(path: str, package: str) -> None:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: install the Debian package {package} (ci/setup does)")


class Backend:
    """A backend process, stopped at the end of the test."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.log.read_text(errors="replace")


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for b in started:
        b.stop()


def storage_daemon(backends: list[Backend], tmp_path: Path, image: Path, name: str = "vu-blk",
                   sock: Path | None = None) -> Path:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on a socket it listens on."""
    _require(QSD, "qemu-system-common")
    sock = sock or tmp_path / f"{name}.sock"
    backends.append(Backend([QSD, "--blockdev", f"driver=file,node-name=f,filename={image}",
                             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                             f"addr.path={sock},writable=on"], tmp_path / f"{name}.log"))
    wait_until(sock.exists, 30, f"qemu-storage-daemon's socket {sock}", interval=0.05)
    return sock


def make_image(path: Path, size: int = 8 << 20) -> Path:
    with open(path, "wb") as f:
        f.write(b"VMSH-VHOST-USER-BLK".ljust(512, b"\0"))
        f.truncate(size)
    return path


def wait_in_guest(guest, condition: str, tries: int = 300) -> None:
    guest.check_output(f"i=0; until {condition}; do [ $i -lt {tries} ] || exit 1; i=$((i+1)); sleep 0.2; done",
                       timeout=tries / 5 + 30)


def test_vhost_user_blk_reads_and_writes_through_qemu_storage_daemon(vmsh_guest, backends, tmp_path: Path) -> None:
    image = make_image(tmp_path / "vu.img")
    sock = storage_daemon(backends, tmp_path, image)
    guest = vmsh_guest(*SHARED, "--disk", f"vhost_user=on,socket={sock}")
    assert guest.check_output("cat /sys/block/vda/size") == str((8 << 20) // 512)
    assert guest.check_output("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 19") == "VMSH-VHOST-USER-BLK"
    # 256 KiB of real data, written at 1 MiB, read back by the host from the image file
    guest.check_output("dd if=/bin/busybox of=/dev/vda bs=4k seek=256 count=64 oflag=direct 2>/dev/null && sync")
    in_guest = guest.check_output("dd if=/bin/busybox bs=4k count=64 2>/dev/null | sha256sum").split()[0]
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert hashlib.sha256(f.read(256 << 10)).hexdigest() == in_guest
    # and what the host wrote behind the guest's back (cache dropped) comes back through the backend
    with open(image, "r+b") as f:
        f.seek(4 << 20)
        f.write(b"WRITTEN-BY-THE-HOST".ljust(4096, b"\0"))
    assert guest.check_output("dd if=/dev/vda bs=4k skip=1024 count=1 iflag=direct 2>/dev/null | head -c 19") \
        == "WRITTEN-BY-THE-HOST"


def test_vhost_user_needs_shared_memory(vmsh_guest, tmp_path: Path) -> None:
    guest = vmsh_guest("--disk", f"vhost_user=on,socket={tmp_path / 'none.sock'}", ready=False)
    assert guest.wait_exit(30) != 0
    assert "Using vhost-user requires using shared memory or huge pages" in guest.console_tail()


GUEST_MAC = "52:54:00:12:34:56"
#: a neighbour that does not exist: testpmd's 5tswap mode sends every frame back with the MAC, IP
#: addresses and ports swapped, so the guest's echo request comes back as a request from it
PEER_MAC = "02:00:00:00:00:01"


def start_testpmd(backends: list[Backend], tmp_path: Path, sock: Path, *, client: bool) -> Backend:
    """DPDK's testpmd with one vhost-user port that sends every frame back (5tswap), with no
    hugepages and no PCI devices."""
    _require(TESTPMD, "dpdk-dev")
    backend = Backend([TESTPMD, "--no-huge", "-m", "512", "--no-pci", "--file-prefix", f"vmsh{os.getpid()}",
                       "-l", "0,1", "--vdev", f"net_vhost0,iface={sock},client={int(client)}", "--",
                       "--forward-mode=5tswap", "--total-num-mbufs=4096", "--nb-cores=1", "--stats-period=1"],
                      tmp_path / "testpmd.log")
    backends.append(backend)
    wait_until(lambda: "Checking link statuses" in backend.log.read_text(errors="replace")
               or backend.proc.poll() is not None, 60, "testpmd to start", interval=0.1)
    if backend.proc.poll() is not None:
        pytest.fail(f"testpmd did not start:\n{backend.log.read_text(errors='replace')[-3000:]}")
    return backend


def ping_through_the_backend(guest) -> None:
    guest.check_output(f"ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0 && "
                       f"arp -s 10.99.0.1 {PEER_MAC}")
    assert guest.check_output("cat /sys/class/net/eth0/address") == GUEST_MAC
    # the echo request goes out, comes back swapped as a request from 10.99.0.1, the guest's
    # reply to it goes out and comes back as the reply ping waits for: four trips through the backend
    out = guest.check_output("ping -c 3 -s 1000 -W 5 10.99.0.1")
    assert re.search(r"3 packets transmitted, 3 packets received", out), out


@pytest.mark.parametrize("mode", ["client", "server"])
def test_vhost_user_net_carries_frames_through_testpmd(vmsh_guest, backends, tmp_path: Path, mode: str) -> None:
    sock = tmp_path / "vu-net.sock"
    # vmsh as client: testpmd listens; vmsh as server: vmsh listens and testpmd connects (retrying)
    pmd = start_testpmd(backends, tmp_path, sock, client=mode == "server")
    guest = vmsh_guest(*SHARED, "--net", f"vhost_user=on,socket={sock},vhost_mode={mode},mac={GUEST_MAC}")
    ping_through_the_backend(guest)
    log = pmd.stop()
    received = [int(n) for n in re.findall(r"RX-packets: +(\d+)", log)]
    assert received and max(received) >= 6, log[-2000:]


def test_vhost_user_devices_hot_add_remove_and_refuse_a_snapshot(vmsh_guest, backends, tmp_path: Path) -> None:
    """On one running guest: a vhost-user disk and a vhost-user net are hot-added (ACPI PCI
    hotplug), carry data and are ejected again; a snapshot while one is plugged is refused
    before anything is written."""
    api, events = tmp_path / "api.sock", tmp_path / "events.json"
    guest = vmsh_guest(*SHARED, "--api-socket", f"path={api}", "--event-monitor", f"path={events}")
    image = make_image(tmp_path / "hot.img")
    qsd = storage_daemon(backends, tmp_path, image)
    with ApiClient(str(api)) as client:
        info = client.put("vm.add-disk", {"vhost_user": True, "vhost_socket": str(qsd), "id": "vudisk"})
    assert info["id"] == "vudisk"
    wait_in_guest(guest, "[ -e /sys/block/vda ]")
    assert guest.check_output("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 19") == "VMSH-VHOST-USER-BLK"
    guest.check_output("echo HOT-ADDED-AND-WRITTEN | dd of=/dev/vda bs=512 seek=100 conv=sync oflag=direct 2>/dev/null")
    with open(image, "rb") as f:
        f.seek(100 * 512)
        assert f.read(21) == b"HOT-ADDED-AND-WRITTEN"

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        with pytest.raises(ApiError) as refused:
            client.put("vm.snapshot", {"destination_url": f"file://{snapshot}"})
        client.put("vm.resume")
    assert "Cannot snapshot a VM with vhost-user devices (vudisk)" in str(refused.value)
    assert list(snapshot.iterdir()) == [], "nothing was written"

    with ApiClient(str(api)) as client:
        client.put("vm.remove-device", {"id": "vudisk"})
    assert wait_for_event(events, "vm", "device-removed") == {"id": "vudisk", "bdf": info["bdf"]}
    wait_in_guest(guest, "[ ! -e /sys/block/vda ]")
    # the backend saw the frontend go and still serves: the disk can be plugged again
    with ApiClient(str(api)) as client:
        client.put("vm.add-disk", {"vhost_user": True, "vhost_socket": str(qsd), "id": "vudisk2"})
    wait_in_guest(guest, "[ -e /sys/block/vda ]")
    assert guest.check_output("dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 21") \
        == "HOT-ADDED-AND-WRITTEN"

    sock = tmp_path / "vu-net.sock"
    start_testpmd(backends, tmp_path, sock, client=False)
    with ApiClient(str(api)) as client:
        client.put("vm.add-net", {"vhost_user": True, "vhost_socket": str(sock), "mac": GUEST_MAC, "id": "vunet"})
    wait_in_guest(guest, "[ -e /sys/class/net/eth0 ]")
    ping_through_the_backend(guest)
    with ApiClient(str(api)) as client:
        client.put("vm.remove-device", {"id": "vunet"})
    wait_in_guest(guest, "[ ! -e /sys/class/net/eth0 ]")
    removed = [props["id"] for src, ev, props in events_of(events) if (src, ev) == ("vm", "device-removed")]
    assert removed == ["vudisk", "vunet"]


def test_vhost_user_blk_reconnects_when_the_backend_restarts(vmsh_guest, backends, tmp_path: Path) -> None:
    """qemu-storage-daemon killed and started again on the same socket: vmsh reconnects (as a
    client it retries for up to 60 s), replays the set-up, and the guest's I/O goes on."""
    image = make_image(tmp_path / "vu.img")
    sock = storage_daemon(backends, tmp_path, image, name="first")
    guest = vmsh_guest(*SHARED, "--disk", f"vhost_user=on,socket={sock}")
    assert guest.check_output("dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 19") \
        == "VMSH-VHOST-USER-BLK"
    first = backends.pop()
    first.proc.kill()
    first.stop()
    sock.unlink()
    with open(image, "r+b") as f:
        f.seek(2 << 20)
        f.write(b"SEEN-BY-THE-SECOND-BACKEND".ljust(512, b"\0"))
    time.sleep(1)  # vmsh notices the hang-up and starts retrying before the new backend is up
    storage_daemon(backends, tmp_path, image, name="second", sock=sock)
    assert guest.check_output("dd if=/dev/vda bs=512 skip=4096 count=1 iflag=direct 2>/dev/null | head -c 26",
                              timeout=120) == "SEEN-BY-THE-SECOND-BACKEND"
    guest.check_output("echo AFTER-RECONNECT | dd of=/dev/vda bs=512 seek=8 conv=sync oflag=direct 2>/dev/null")
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(15) == b"AFTER-RECONNECT"
