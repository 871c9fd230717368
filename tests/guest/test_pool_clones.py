"""Clones restored into the worker's pool of pre-started VMM processes behave as clones in new
processes do: each its own guest, on private disks."""

from __future__ import annotations

import time

from vmsh.harness.waiting import wait_until


def test_pooled_clones_are_independent_guests(vmsh_clone, vmsh_pool) -> None:
    pool = vmsh_pool()
    assert pool is not None  # the default --vmsh-pool 2
    idle = set(pool.idle_pids())
    first = vmsh_clone()
    assert first.pid in idle  # restored into a process started ahead of time
    second = vmsh_clone()
    assert second.pid != first.pid
    first.check_output("echo one > /tmp/mark")
    assert second.run("cat /tmp/mark").status != 0  # clones share nothing they write
    assert first.check_output("cat /tmp/mark") == "one"
    # refilled by the pool's thread, after its delay (not on the clone's path)
    wait_until(lambda: len(pool.idle_pids()) == pool.size, 60, "the pool to be refilled")


def test_a_pooled_clone_has_the_layout_of_a_fresh_process_clone(vmsh_clone) -> None:
    guest = vmsh_clone()
    assert (guest.workdir / "snapshot" / "config.json").exists()  # its private copy of the snapshot
    assert guest.check_output("echo logged-$((40 + 2))") == "logged-42"
    assert "logged-42" in (guest.workdir / "console.log").read_text(errors="replace")


def test_a_clone_starts_at_its_snapshots_time_however_old_it_is(vmsh_clone) -> None:
    """Two clones of one snapshot, made seconds apart, both start from the snapshot's time: on a
    host where a restore cannot set the guest's TSC back (PVM), the harness's guests keep time
    with kvm-clock, which it does set back (``DEFAULT_CMDLINE``)."""

    def uptime() -> float:
        clone = vmsh_clone()
        try:
            return float(clone.check_output("cat /proc/uptime").split()[0])
        finally:
            clone.close()

    first = uptime()
    time.sleep(8)
    second = uptime()
    # each clone ran for well under 3 s before it read its uptime; 8 s more would be the TSC
    assert abs(second - first) < 3, (first, second)
