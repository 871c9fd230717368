"""Live migration of a real guest between two VMM processes (``vm.send-migration`` /
``vm.receive-migration`` through ``vmsh remote``, cloud-hypervisor's ``unix:`` sockets).

One restored clone with a disk and its serial console on the VMM's terminal is migrated by
copying to a VMM started with only ``--api-socket`` (the clone's config asks for shared RAM, so
the destination's RAM is a memfd), then from there with ``local`` (the RAM's fds pass over the
socket) to a third; the guest's shell answers on each new VMM's console, keeps what it wrote to
RAM and to its disk, and each source VMM exits. Refusals leave the source guest running: a
``local`` migration of RAM that is not shared (the clone's copy-on-write snapshot mapping), and
a destination that cannot open the guest's disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from vmsh.api.client import ApiClient
from vmsh.harness.guest import Guest
from vmsh.harness.migrate import migrate_guest, start_receiver
from vmsh.harness.waiting import wait_until

DISK_SIZE = 8 << 20


def remote(api: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsh", "remote", "--api-socket", str(api), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def destination(tmp_path: Path, name: str) -> tuple[Guest, Path]:
    return start_receiver(tmp_path, name, log_flags(tmp_path, name))


def log_flags(tmp_path: Path, name: str) -> list[str]:
    return ["-v", "--log-file", str(tmp_path / f"{name}.log")]


def migrate(source_api: Path, dest_api: Path, sock: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str],
                                                                                 subprocess.CompletedProcess[str]]:
    """Through ``vmsh remote``: receive on ``dest_api`` (the call blocks until the migration
    ends) and send from ``source_api``; returns both results (send, receive)."""
    received: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: received.append(remote(dest_api, "receive-migration", f"unix:{sock}")))
    thread.start()
    wait_until(sock.exists, 30, f"the migration socket {sock}", interval=0.05)
    sent = remote(source_api, "send-migration", *flags, f"unix:{sock}")
    thread.join(120)
    assert received, "the receive-migration call did not return"
    return sent, received[0]


def test_guest_migrates_by_copy_then_locally_and_refusals_leave_it_running(vmsh_clone, tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    api = tmp_path / "src.sock"
    source = vmsh_clone("--memory", "size=256M,shared=on", "--disk", f"path={disk}",
                        restore_flags=["--api-socket", f"path={api}", "-v", "--log-file", str(tmp_path / "src.log")])
    source.check_output("echo in-ram > /tmp/mark; printf on-disk | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null")

    # local=true needs shared RAM: the clone's RAM is the snapshot file mapped copy-on-write
    dest, dest_api = destination(tmp_path, "dest0")
    sent, received = migrate(api, dest_api, tmp_path / "m0.sock", "--local")
    assert sent.returncode != 0 and "Local migration requires shared memory" in sent.stderr, sent
    assert received.returncode != 0, received
    assert source.check_output("cat /tmp/mark") == "in-ram"
    dest.close()

    # a destination that cannot open the guest's disk refuses the config; the source runs on
    # (the clone's disk is its private copy of the snapshot's: the path its config names)
    with ApiClient(str(api)) as client:
        used = Path(client.get("vm.info")["config"]["disks"][0]["path"])
    hidden = used.with_suffix(".hidden")
    os.rename(used, hidden)
    try:
        dest, dest_api = destination(tmp_path, "dest1")
        sent, received = migrate(api, dest_api, tmp_path / "m1.sock")
        assert sent.returncode != 0 and "refused" in sent.stderr, sent
        assert received.returncode != 0 and "cannot be opened here" in received.stderr, received
        with_info = remote(dest_api, "info")
        assert with_info.returncode != 0, with_info  # no VM left behind on the destination
        dest.close()
    finally:
        os.rename(hidden, used)
    assert source.check_output("cat /tmp/mark") == "in-ram"

    # copying migration while the guest writes to RAM: the guest answers on the destination's
    # console with its counter still counting, the source exits
    source.check_output("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
                        "done) >/dev/null 2>&1 &")
    counts = [int(source.check_output("sleep 0.2; cat /tmp/count")) for _ in range(2)]
    assert 0 < counts[0] < counts[1], counts
    # (with the harness's helper, as a test moves a guest mid-test)
    first = migrate_guest(source, tmp_path, name="dest2", extra_flags=log_flags(tmp_path, "dest2"))
    assert source.wait_exit(60) == 0
    assert first.check_output("cat /tmp/mark; dd if=/dev/vda bs=7 count=1 2>/dev/null") == "in-ram\non-disk"
    counts = [int(first.check_output("cat /tmp/count")) for _ in range(2)]
    assert 0 < counts[0] < counts[1], counts
    first.check_output("kill %1; echo second > /tmp/mark2")

    # local migration from there: the destination maps the same memfds
    second, second_api = destination(tmp_path, "dest3")
    sent, received = migrate(tmp_path / "dest2.sock", second_api, tmp_path / "m3.sock", "--local")
    assert sent.returncode == 0, sent
    assert received.returncode == 0, received
    assert first.wait_exit(60) == 0
    assert second.check_output("cat /tmp/mark /tmp/mark2; dd if=/dev/vda bs=7 count=1 2>/dev/null") == \
        "in-ram\nsecond\non-disk"
    info = remote(second_api, "info")
    assert info.returncode == 0 and '"Running"' in info.stdout, info
    second.close()
