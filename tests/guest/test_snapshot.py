"""A running Linux guest survives snapshot and restore into fresh processes."""

from __future__ import annotations

from pathlib import Path

from vmsh.api.client import ApiClient
from vmsh.harness import restore_guest, wait_until


def read_count(guest) -> int:
    # The loop rewrites the file: a read can catch it empty between truncate and write.
    return int(guest.check_output('while :; do c=$(cat /tmp/count); [ -n "$c" ] && break; done; echo $c'))


def test_counter_loop_and_tmpfs_file_survive_restore(vmsh_guest, tmp_path: Path) -> None:
    api = tmp_path / "api.sock"
    snap = tmp_path / "snap"
    snap.mkdir()
    guest = vmsh_guest("--api-socket", str(api))
    guest.check_output("echo 'kept in tmpfs' > /tmp/note; (i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done) &")
    guest.check_output("while [ ! -s /tmp/count ]; do sleep 0.1; done")
    before = read_count(guest)
    clock_before = float(guest.check_output("cut -d' ' -f1 /proc/uptime"))
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    guest.close()
    # the original process is gone; a new one carries on
    clone = restore_guest(snap, tmp_path / "clone")
    try:
        assert clone.check_output("cat /tmp/note") == "kept in tmpfs"
        first = read_count(clone)
        assert before <= first, (before, first)
        wait_until(lambda: read_count(clone) > first, 60, f"the counter loop to go on past {first} in the clone",
                   interval=0.2)
        clock_after = float(clone.check_output("cut -d' ' -f1 /proc/uptime"))
        assert clock_before <= clock_after < clock_before + 120
    finally:
        clone.close()


def test_four_clones_from_one_snapshot(vmsh_clone) -> None:
    clones = [vmsh_clone() for _ in range(4)]
    for i, clone in enumerate(clones):
        clone.check_output(f"echo {i} > /tmp/who")
    assert [clone.check_output("cat /tmp/who") for clone in clones] == ["0", "1", "2", "3"]
