"""``vmsh launch``: the cloud-hypervisor compatible launcher.

Takes cloud-hypervisor's flags, builds the VmConfig through :mod:`vmsh.config` and hands
it to the engine. ``--dry-run`` (a vmsh addition) prints the validated configuration as
canonical JSON instead; ``--describe`` prints the machine the guest would see
(:mod:`vmsh.engine.describe`) without running it. Exit status: 0 on success, 1 on an error (printed as one line,
the error and its causes joined by ``: ``), 2 on a malformed command line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from vmsh import __version__
from vmsh.engine.events import GuestEvent
from vmsh.engine.warmup import WARM_RESTORE_ENV
from vmsh.errors import UsageError, VmshError, error_chain

if TYPE_CHECKING:
    from collections.abc import Callable

    from vmsh.config.launcher_args import LauncherArgs, VmmOptions
    from vmsh.config.model import ProfileConfig, RestoreConfig, VmConfig
    from vmsh.engine.console import ConsoleBackend
    from vmsh.engine.events import EventMonitor
    from vmsh.engine.vmm import (
        GuestEventSink,
        MigrationReceiver,
        Post,
        RestoreFactory,
        VmFactory,
        VmLike,
        Vmm,
    )

LOG = logging.getLogger(__name__)

#: The cloud-hypervisor release whose launcher vmsh follows.
CH_COMPAT_VERSION = "v40.0"


def print_error(err: BaseException) -> None:
    """Write ``err`` and its causes to stderr as one line."""
    sys.stderr.write(": ".join(error_chain(err)) + "\n")


def main(argv: list[str]) -> int:
    """Run ``vmsh launch`` with ``argv`` (the flags after ``launch``)."""
    from vmsh.config import canonical_json, normalize, parse_argv, vm_config_from_args
    from vmsh.config.launcher_args import has_payload, help_text, vmm_options_from_args

    if not argv:
        sys.stderr.write(help_text())
        return 2
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(help_text())
        return 0
    try:
        args = parse_argv(argv)
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if args.get("version"):
        print(f"vmsh {__version__} (cloud-hypervisor {CH_COMPAT_VERSION} launcher)")
        return 0
    # Everything the VMM creates (sockets, ptys' links, snapshots) is private to the user.
    os.umask(0o077)
    try:
        vmm = vmm_options_from_args(args)
        if args.get("dry-run"):
            sys.stdout.write(canonical_json(normalize(vm_config_from_args(args))))
            return 0
        if args.get("describe"):
            return describe(args)
        from vmsh import logsetup

        try:
            logsetup.setup(vmm.verbosity, vmm.log_file)
        except OSError as err:
            raise VmshError("Error creating log file") from err
        if not has_payload(args) and vmm.restore is None and vmm.api_socket is None:
            raise VmshError("Nothing to run: give --kernel or --firmware, --restore, or --api-socket")
        cfg = normalize(vm_config_from_args(args)) if has_payload(args) else None
        from vmsh.engine import seccomp

        seccomp.configure(vmm.seccomp)  # each thread installs its filter once its setup is done
        return run(vmm, cfg)
    except VmshError as err:
        print_error(err)
        return 1


def describe(args: LauncherArgs) -> int:
    """``--describe``: build the VM the flags ask for, print its machine description, exit."""
    from vmsh.config import normalize, vm_config_from_args
    from vmsh.config.launcher_args import has_payload
    from vmsh.engine.describe import canonical_text, describe_config

    if not has_payload(args):
        raise VmshError("--describe needs a VM: give --kernel or --firmware")
    sys.stdout.write(canonical_text(describe_config(normalize(vm_config_from_args(args)))))
    return 0


def _open_events(opts: VmmOptions) -> EventMonitor:
    from vmsh.engine.events import EventMonitor

    endpoint = opts.event_monitor
    if endpoint is None:
        return EventMonitor()
    try:
        return EventMonitor.open(path=endpoint.path, fd=endpoint.fd)
    except OSError as err:
        raise VmshError("Error doing event monitor I/O") from err


def vm_factories(profile: ProfileConfig | None = None,
                 tty: ConsoleBackend | None = None) -> tuple[VmFactory, RestoreFactory]:
    """The engine's VM builders (:mod:`vmsh.engine.builder`) in the shape
    :class:`~vmsh.engine.vmm.Vmm` calls them: ``build(config, events, on_guest_event, post)``
    and ``restore(directory, restore, events, on_guest_event, post)``; ``tty`` is the backend of
    ``--serial tty``/``--console tty`` (the shell's captured console), None the terminal."""
    from vmsh.engine.builder import build_for_boot, build_from_snapshot

    def build(config: VmConfig, events: EventMonitor, on_guest_event: GuestEventSink, post: Post) -> VmLike:
        return build_for_boot(config, events, on_guest_event, post, profile=profile, tty=tty)

    def restore(directory: str, request: RestoreConfig, events: EventMonitor, on_guest_event: GuestEventSink,
                post: Post) -> VmLike:
        return build_from_snapshot(directory, request, events, on_guest_event, post, profile=profile, tty=tty)

    return build, restore


def migration_receiver(profile: ProfileConfig | None = None, tty: ConsoleBackend | None = None) -> MigrationReceiver:
    """The engine's side of ``vm.receive-migration`` (:func:`vmsh.engine.migration.receive`),
    building the VM as a restore does (:func:`vmsh.engine.builder.build_restored`)."""

    def receive(url: str, events: EventMonitor, on_guest_event: GuestEventSink, post: Post,
                adopt: Callable[[VmLike], None]) -> None:
        from vmsh.engine import migration
        from vmsh.engine.builder import build_restored, check_restorable

        migration.receive(url, check_restorable,
                          lambda saved, memory, serial: build_restored(saved, memory, events, on_guest_event, post,
                                                                       profile=profile, tty=tty, serial=serial),
                          adopt)

    return receive


def _describe_config(cfg: VmConfig) -> dict[str, Any]:
    from vmsh.engine.describe import describe_config

    return describe_config(cfg)


def make_vmm(events: EventMonitor, *, profile: ProfileConfig | None = None, tty: ConsoleBackend | None = None,
             exit_on_poweroff: bool = True, factories: tuple[VmFactory, RestoreFactory] | None = None) -> Vmm:
    """A :class:`~vmsh.engine.vmm.Vmm` wired to the engine: it builds, restores and describes VMs
    (``factories``, for tests, replaces :func:`vm_factories`)."""
    from vmsh.engine.vmm import Vmm

    build, restore = factories if factories is not None else vm_factories(profile, tty)
    return Vmm(events, vm_factory=build, restore_factory=restore, describer=_describe_config,
               exit_on_poweroff=exit_on_poweroff, migration_receiver=migration_receiver(profile, tty))


def run(opts: VmmOptions, cfg: VmConfig | None, *,
        factories: tuple[VmFactory, RestoreFactory] | None = None) -> int:
    """Run the VMM: create and boot ``cfg`` (or restore), serve the API, and run the VMM's
    control loop on this (the main) thread until the VMM exits.

    Returns 0 when the guest powers off or the VMM is shut down (API or SIGTERM/SIGINT);
    raises :class:`VmshError` when the VM cannot be built or booted, or fails while it runs.
    ``factories`` (tests) replaces the engine's VM builders (:func:`vm_factories`).
    """
    from vmsh.engine.vcpu import install_kick_handler

    install_kick_handler()  # VMs may be built on the API thread, where signals cannot be set up
    events = _open_events(opts)
    events.emit("vmm", "starting")
    vmm = make_vmm(events, profile=opts.profile, factories=factories)
    server = None
    gdb_stub = None
    stop_signals = []

    # A signal handler runs in the main thread between two bytecodes, possibly while that
    # thread holds the event queue's lock: it only records the signal, the loop acts on it.
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        stop_signals.append((sig, signal.signal(sig, on_signal)))
    try:
        # The lock from before the API listens: a request that comes while the command line's VM
        # is built or restored waits for it, instead of finding no VM ("VM is not created").
        with vmm.lock:
            if cfg is None and opts.restore is None and os.environ.get(WARM_RESTORE_ENV) == "1":
                # a pooled VMM (vmsh.harness.pool): its first restore pays no first-call costs
                from vmsh.engine.warmup import warm_restore

                warm_restore()
            if opts.api_socket is not None:
                from vmsh.api.http import ApiServer

                server = ApiServer(vmm, path=opts.api_socket.path, fd=opts.api_socket.fd).start()
            if opts.gdb is not None and opts.gdb.path is not None:
                from vmsh.engine.gdb.stub import GdbStub

                gdb_stub = GdbStub(vmm, opts.gdb.path).start()
            if cfg is not None:
                vmm.do("vm.create", cfg)
                vmm.do("vm.boot")
            elif opts.restore is not None:
                vmm.do("vm.restore", opts.restore)
        from vmsh.engine import seccomp

        # Setup is done: the main thread only runs the control loop from here (a no-op unless
        # main() configured --seccomp).
        seccomp.apply(seccomp.ThreadKind.VMM, "vmm")
        vmm.run_control_loop(until=lambda: bool(received))
        if not vmm.exited.is_set():  # a signal: stop after what is already queued
            vmm.guest_event(GuestEvent.STOP, f"signal {signal.Signals(received[0]).name}")
            vmm.run_control_loop()
        ended = vmm.exit_event
        if ended is not None and ended[0] == GuestEvent.FATAL:
            raise VmshError(f"The VM stopped: {ended[1]}")
        return 0
    finally:
        if not vmm.exited.is_set():
            vmm.vmm_shutdown()
        if server is not None:
            server.close()
        if gdb_stub is not None:
            gdb_stub.close()
        events.close()
        for sig, previous in stop_signals:
            signal.signal(sig, previous)
