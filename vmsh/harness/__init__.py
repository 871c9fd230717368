"""The guest-test harness: pexpect-driven guests (:mod:`vmsh.harness.guest`)."""

from vmsh.harness.guest import CommandResult, Guest, GuestError

__all__ = ["CommandResult", "Guest", "GuestError"]
