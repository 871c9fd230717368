"""vmsh's pytest plugin: fixtures that boot real guests, from launcher flags or a JSON config.

Registered through the ``pytest11`` entry point, so any project with vmsh installed gets:

* ``vmsh_image(name)`` - the path of a built guest image (``vmlinux``, ``initramfs``, ...);
* ``vmsh_guest(*flags, config=None, kernel=..., ready=True)`` - a booted guest whose serial
  console is driven by the harness; ``config`` (a JSON VmConfig as a dict) goes through
  the API's ``vm.create`` + ``vm.boot`` instead of flags; ``vmsh_guest.launch(flags)`` takes
  complete launcher flags;
* ``vmsh_snapshots`` and ``vmsh_clone(*flags)`` - boot once per configuration (shared by
  xdist workers), then restore a clone per test, into an idle pre-started VMM process of the
  worker's ``vmsh_pool`` (:mod:`vmsh.harness.pool`) unless the clone needs launcher flags of its own.

Options: ``--vmsh-kernel``/``--vmsh-initramfs`` choose the images, ``--vmsh-boot-timeout``
the boot budget, ``--vmsh-parity-all`` boots every CLI/JSON parity configuration (not only
the ones marked for CI), ``--vmsh-pool N`` the idle VMM processes each worker keeps for
clones (0: a new process per clone), ``--vmsh-keep-logs DIR`` copies every guest's console log there (always on
failure the tail is in the error). A test that needs ``/dev/kvm`` or the images and cannot
have them fails in CI (``CI`` set) and is skipped elsewhere, with the reason
(:mod:`vmsh.harness.requirements`); the skips are listed again at the end of the run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmsh.errors import ImageError
from vmsh.harness.guest import Guest
from vmsh.harness.pool import VmmPool
from vmsh.harness.requirements import KVM_REASON, SKIP_PREFIX, kvm_available, require, tsc_restorable, unavailable
from vmsh.harness.snapshots import SnapshotCache, launch_argv, restore_guest
from vmsh.harness.waiting import WaitTimeout, wait_until

#: the guests' kernel command line. Where a restore cannot set the guest's TSC back (a PVM host),
#: the guests keep time with kvm-clock, which a restore does set back (KVM_SET_CLOCK): with the
#: TSC a clone would see all the time since its snapshot pass at once and spend guest CPU on it
#: (measured on PVM: a clone's first answer took 0.14-0.17 s from a 14-minute-old snapshot and
#: 0.23-0.30 s at 34 minutes; 0.05-0.07 s with kvm-clock at 1 s and at 1 minute).
DEFAULT_CMDLINE = "console=ttyS0 quiet" + ("" if tsc_restorable() else " clocksource=kvm-clock")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmsh", "vmsh guests")
    group.addoption("--vmsh-kernel", default="vmlinux", help="guest image to boot (default: vmlinux)")
    group.addoption("--vmsh-initramfs", default="initramfs", help="initramfs image (default: initramfs)")
    group.addoption("--vmsh-boot-timeout", type=float, default=float(os.environ.get("VMSH_BOOT_TIMEOUT", "300")),
                    help="seconds a guest may take to reach its ready marker")
    group.addoption("--vmsh-pool", type=int, default=2, metavar="N",
                    help="idle pre-started VMM processes per worker for clones (0: a new process per clone)")
    group.addoption("--vmsh-keep-logs", default=None, metavar="DIR", help="copy every guest console log into DIR")
    group.addoption("--vmsh-parity-all", action="store_true", default=False,
                    help="boot every parity configuration both ways (default: only the few marked for CI)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the tests that did not run for want of KVM or images, loudly: a run that skipped
    them is not a green run."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(SKIP_PREFIX):
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("vmsh: tests that did not run (they fail in CI)", sep="!", yellow=True, bold=True)
        for reason, count in sorted(reasons.items()):
            terminalreporter.line(f"{count:5d}  {reason.removeprefix(SKIP_PREFIX)}", yellow=True)


@pytest.fixture(scope="session")
def vmsh_image() -> Callable[[str], str]:
    require(kvm_available(), f"guest tests {KVM_REASON}")
    from vmsh.images import image_path

    def lookup(name: str) -> str:
        try:
            return str(image_path(name))
        except ImageError as err:
            unavailable(f"guest image {name!r} is not built ({err}); run `vmsh images build`")
            raise

    return lookup


class GuestFactory:
    """Boots guests for one test and stops them after it."""

    def __init__(self, request: pytest.FixtureRequest, workdir: Path, image: Callable[[str], str],
                 pool: Callable[[], VmmPool | None] | None = None) -> None:
        self.request = request
        self._pool = pool
        self.workdir = workdir
        self.image = image
        self.guests: list[Guest] = []
        opts = request.config.option
        self.kernel, self.initramfs = opts.vmsh_kernel, opts.vmsh_initramfs
        self.boot_timeout = opts.vmsh_boot_timeout

    def flags(self, *extra: str, kernel: str | None = None, initramfs: str | None = None,
              cmdline: str = DEFAULT_CMDLINE, serial: str = "tty", console: str = "off") -> list[str]:
        """Launcher flags for the chosen images; the serial console on the VMM's terminal
        and no virtio console by default."""
        return ["--kernel", self.image(kernel or self.kernel), "--initramfs", self.image(initramfs or self.initramfs),
                "--cmdline", cmdline, "--serial", serial, "--console", console, *extra]

    def _new(self, argv: list[str]) -> Guest:
        guest = Guest(argv, workdir=self.workdir / f"guest{len(self.guests)}", boot_timeout=self.boot_timeout)
        self.guests.append(guest)
        return guest

    def launch(self, flags: list[str], ready: bool = True) -> Guest:
        """A guest from complete launcher flags (images, cmdline, serial and console included)."""
        guest = self._new(launch_argv(list(flags)))
        guest.start()
        if ready:
            guest.wait_ready()
        return guest

    def __call__(self, *extra: str, config: dict[str, Any] | None = None, ready: bool = True, **kw: Any) -> Guest:
        if config is None:
            guest = self._new(launch_argv(self.flags(*extra, **kw)))
            guest.start()
        else:
            guest = self._boot_json(config)
        if ready:
            guest.wait_ready()
        return guest

    def _boot_json(self, config: dict[str, Any]) -> Guest:
        from vmsh.api.client import ApiClient

        api = self.workdir / f"api{len(self.guests)}.sock"
        guest = self._new(launch_argv(["--api-socket", str(api)]))
        guest.start()
        try:
            wait_until(api.exists, 30, f"the VMM's API socket {api}", interval=0.02, process=guest.exit_status)
        except WaitTimeout as err:
            raise guest._fail(str(err)) from None
        with ApiClient(str(api)) as client:
            client.put("vm.create", config)
            client.put("vm.boot")
        return guest

    def clone(self, snapshot: Path, restore_flags: list[str] | None = None) -> Guest:
        """A restored clone of ``snapshot``; ``restore_flags`` go to its ``vmsh launch --restore``
        (``--api-socket``, ``--event-monitor``, ...); without them the clone is restored into a
        pooled process when the session has a pool."""
        workdir = self.workdir / f"clone{len(self.guests)}"
        pool = self._pool() if self._pool is not None and not restore_flags else None
        if pool is not None:
            guest = pool.clone(snapshot, workdir, timeout=self.boot_timeout)
        else:
            guest = restore_guest(snapshot, workdir, extra_flags=restore_flags, timeout=self.boot_timeout)
        self.guests.append(guest)
        return guest

    def close(self) -> None:
        keep = self.request.config.option.vmsh_keep_logs
        for i, guest in enumerate(self.guests):
            guest.close()
            if keep and guest.log_path.exists():
                target = Path(keep) / f"{self.request.node.name}-{i}.log".replace("/", "_")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(guest.log_path, target)


@pytest.fixture(scope="session")
def vmsh_pool(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], VmmPool | None]]:
    """This worker's pool of idle VMM processes for clones, started on first use (None with
    ``--vmsh-pool 0``); stopped when the session ends."""
    pools: list[VmmPool] = []
    size = request.config.option.vmsh_pool

    def get() -> VmmPool | None:
        if size <= 0:
            return None
        if not pools:
            pools.append(VmmPool(tmp_path_factory.mktemp("vmsh-pool"), size))
        return pools[0]

    yield get
    for pool in pools:
        pool.close()


@pytest.fixture
def vmsh_guest(request: pytest.FixtureRequest, tmp_path: Path, vmsh_image: Callable[[str], str],
               vmsh_pool: Callable[[], VmmPool | None]) -> Iterator[GuestFactory]:
    factory = GuestFactory(request, tmp_path, vmsh_image, vmsh_pool)
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def vmsh_snapshots(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SnapshotCache:
    # The parent of the per-worker base temp directories is shared by all xdist workers.
    root = tmp_path_factory.getbasetemp().parent / "vmsh-snapshots"
    return SnapshotCache(root, boot_timeout=request.config.option.vmsh_boot_timeout)


@pytest.fixture
def vmsh_clone(vmsh_guest: GuestFactory, vmsh_snapshots: SnapshotCache) -> Callable[..., Guest]:
    """``vmsh_clone(*flags, restore_flags=[...])``: a clone of a guest booted once with the default
    flags plus ``flags``; ``restore_flags`` are given to the clone's own process."""

    def clone(*extra: str, restore_flags: list[str] | None = None, **kw: Any) -> Guest:
        return vmsh_guest.clone(vmsh_snapshots.get(vmsh_guest.flags(*extra, **kw)), restore_flags)

    return clone
