"""The guest-test harness: pexpect-driven guests (:mod:`vmsh.harness.guest`), booted-once
snapshots that every test restores (:mod:`vmsh.harness.snapshots`) and waiting for a state
(:mod:`vmsh.harness.waiting`)."""

from vmsh.harness.guest import CommandResult, Guest, GuestError
from vmsh.harness.snapshots import SnapshotCache, restore_guest
from vmsh.harness.waiting import WaitTimeout, wait_until

__all__ = ["CommandResult", "Guest", "GuestError", "SnapshotCache", "WaitTimeout", "restore_guest", "wait_until"]
