"""Live-migrate a harness :class:`~vmsh.harness.guest.Guest` to a new VMM process mid-test.

:func:`migrate_guest` starts a VMM with only ``--api-socket`` (its terminal becomes the guest's
serial console, as the source's config says ``--serial tty``), has it receive the migration
(``vm.receive-migration``) while the source sends it (``vm.send-migration``), and returns the
destination as a :class:`Guest` whose shell is ready (its state moved with the guest's RAM). The
source VMM exits on its own once the guest runs on the destination.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from vmsh.errors import VmshError
from vmsh.harness.guest import Guest
from vmsh.harness.snapshots import launch_argv
from vmsh.harness.waiting import wait_until


def start_receiver(workdir: Path, name: str = "dest", extra_flags: list[str] | None = None,
                   timeout: float = 120.0) -> tuple[Guest, Path]:
    """A VMM started with only ``--api-socket`` (and ``extra_flags``) in ``workdir/name``; returns it
    and its API socket."""
    api = workdir / f"{name}.sock"
    guest = Guest(launch_argv(["--api-socket", str(api), *(extra_flags or [])]), workdir=workdir / name,
                  boot_timeout=timeout)
    guest.start()
    wait_until(api.exists, 30, f"the API socket {api}", interval=0.05, process=guest.exit_status)
    guest.mark_shell_ready()  # the guest's shell was set up on the source: its state migrates
    return guest, api


def migrate_apis(source_api: str | Path, dest_api: str | Path, sock: str | Path, *, local: bool = False,
                 timeout: float = 300.0) -> None:
    """Receive at ``sock`` on ``dest_api`` (that call blocks until the migration ends) and send
    from ``source_api``.

    :raises VmshError: either side's error (the source's first).
    """
    from vmsh.api.client import ApiClient

    sock = Path(sock)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            with ApiClient(str(dest_api), timeout=timeout) as client:
                client.put("vm.receive-migration", {"receiver_url": f"unix:{sock}"})
        except VmshError as err:
            errors.append(err)

    thread = threading.Thread(target=receive, name="migration-receive", daemon=True)
    thread.start()
    wait_until(lambda: sock.exists() or not thread.is_alive(), 30, f"the migration socket {sock}", interval=0.02)
    try:
        with ApiClient(str(source_api), timeout=timeout) as client:
            client.put("vm.send-migration", {"destination_url": f"unix:{sock}", "local": local})
    finally:
        thread.join(timeout)
    if errors:
        raise errors[0]


def migrate_guest(guest: Guest, workdir: Path, *, local: bool = False, name: str = "migrated",
                  extra_flags: list[str] | None = None, **kw: Any) -> Guest:
    """Move ``guest`` (started with ``--api-socket``) to a new VMM (launched with ``extra_flags``
    besides its API socket); returns the destination.

    :raises VmshError: when the migration failed (``guest`` then still runs).
    """
    if guest.api_socket is None:
        raise VmshError("migrate_guest needs a guest started with --api-socket")
    dest, api = start_receiver(workdir, name, extra_flags, timeout=guest.boot_timeout)
    try:
        migrate_apis(guest.api_socket, api, workdir / f"{name}-migration.sock", local=local, **kw)
    except BaseException:
        dest.close()
        raise
    return dest
