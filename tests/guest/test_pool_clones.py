"""Clones restored into the worker's pool of pre-started VMM processes behave as clones in new
processes do: each its own guest, on private disks."""

from __future__ import annotations

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
