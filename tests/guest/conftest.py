"""Fixtures for guest tests: the built images, /dev/kvm, and guests booted with ``vmsh launch``.

A guest test needs both; without them it fails in CI (where the images are built first) and
is skipped elsewhere, loudly, with the reason and the command that fixes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmsh.errors import ImageError
from vmsh.harness import Guest, SnapshotCache, restore_guest

#: quiet: every console byte costs the guest kernel instructions, which are emulated on PVM hosts
DEFAULT_CMDLINE = "console=ttyS0 quiet"
#: a boot is seconds on this project's hosts, far less on hardware KVM; the budget is generous
BOOT_TIMEOUT = float(os.environ.get("VMSH_BOOT_TIMEOUT", "240"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI builds the images first, so this is an error)")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/guest/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="session")
def kvm_device() -> str:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _unavailable("guest tests need /dev/kvm (read-write)")
    return "/dev/kvm"


@pytest.fixture(scope="session")
def images(kvm_device: str) -> Callable[[str], str]:
    """``images(name)``: the path of a built guest image."""
    from vmsh.images import image_path

    def lookup(name: str) -> str:
        try:
            return str(image_path(name))
        except ImageError as err:
            _unavailable(f"guest image {name!r} is not built ({err}); run `vmsh images build`")
            raise

    return lookup


LaunchGuest = Callable[..., Guest]


@pytest.fixture
def launch_guest(images: Callable[[str], str], tmp_path: Path) -> Iterator[LaunchGuest]:
    """``launch_guest(*flags, kernel="vmlinux", cmdline=..., ready=True)``: a booted guest.

    The guest's serial console is the VMM's terminal; the VMM is stopped after the test.
    """
    guests: list[Guest] = []

    def launch(*flags: str, kernel: str = "vmlinux", initramfs: str = "initramfs", cmdline: str = DEFAULT_CMDLINE,
               ready: bool = True, serial: str = "tty", boot_timeout: float = BOOT_TIMEOUT) -> Guest:
        argv = [sys.executable, "-m", "vmsh", "launch", "--kernel", images(kernel), "--initramfs", images(initramfs),
                "--cmdline", cmdline, "--serial", serial, "--console", "off", *flags]
        guest = Guest(argv, workdir=tmp_path / f"guest{len(guests)}", boot_timeout=boot_timeout)
        guests.append(guest)
        guest.start()
        if ready:
            guest.wait_ready()
        return guest

    yield launch
    for guest in guests:
        guest.close()


@pytest.fixture(scope="session")
def snapshot_cache(tmp_path_factory: pytest.TempPathFactory) -> SnapshotCache:
    """Booted-guest snapshots shared by every xdist worker of this run (the parent of the
    workers' base temp directories is common to them)."""
    root = tmp_path_factory.getbasetemp().parent / "vmsh-snapshots"
    return SnapshotCache(root, boot_timeout=BOOT_TIMEOUT)


def default_flags(images: Callable[[str], str], *extra: str) -> list[str]:
    return ["--kernel", images("vmlinux"), "--initramfs", images("initramfs"), "--cmdline", DEFAULT_CMDLINE,
            "--serial", "tty", "--console", "off", "--memory", "size=256M", *extra]


@pytest.fixture
def restored_guest(images: Callable[[str], str], snapshot_cache: SnapshotCache, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    """``restored_guest(*flags)``: a clone of a guest booted once with the default flags plus ``flags``."""
    guests: list[Guest] = []

    def restore(*extra: str) -> Guest:
        snap = snapshot_cache.get(default_flags(images, *extra))
        guest = restore_guest(snap, tmp_path / f"clone{len(guests)}")
        guests.append(guest)
        return guest

    yield restore
    for guest in guests:
        guest.close()
