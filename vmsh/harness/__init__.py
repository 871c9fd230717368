"""The guest-test harness: pexpect-driven guests (:mod:`vmsh.harness.guest`) and booted-once
snapshots that every test restores (:mod:`vmsh.harness.snapshots`)."""

from vmsh.harness.guest import CommandResult, Guest, GuestError
from vmsh.harness.snapshots import SnapshotCache, restore_guest

__all__ = ["CommandResult", "Guest", "GuestError", "SnapshotCache", "restore_guest"]
