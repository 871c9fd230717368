"""The VMM control layer: one action registry that every front-end calls, and one control loop.

:class:`Vmm` holds at most one VM config and one running VM, as cloud-hypervisor's VMM
does. Its actions (``create``, ``boot``, ``pause``, ``info``, ``add-disk``, ``snapshot``,
...) are listed in :data:`~vmsh.engine.actions.ACTIONS` with the HTTP method and request body
type the API uses and the states each accepts (:class:`~vmsh.engine.actions.Rule`), so the HTTP
server, ``vmsh remote``, the shell and the launcher all reach the same code. Each action has one
handler (:data:`HANDLERS`).

Serialization: every action and every item of the control queue runs holding
:attr:`Vmm.lock`, so actions (from API connections or the shell), guest events and callables
given to :meth:`Vmm.post` never run at the same time. Guest events (poweroff, reset, fatal)
and posted callables arrive from vCPU or device threads; they only go into the control
queue, and :meth:`Vmm.run_control_loop` (the launcher's main thread, the shell's control
thread) runs them in the order they came, as cloud-hypervisor's VMM thread does with its
channel and eventfd.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from vmsh import __version__
from vmsh.config import model as m
from vmsh.config import normalize, to_json_value
from vmsh.engine import coredump, inspect, migration
from vmsh.engine.actions import (
    ACTIONS,
    ACTIONS_BY_ENDPOINT,
    ACTIONS_BY_PATH,
    ADD_TARGETS,
    HOTPLUG_KINDS,
    Action,
    CoredumpRequest,
    ProfileStartRequest,
    ProfileStopRequest,
    ReadMemoryRequest,
    ReceiveMigrationRequest,
    RegistersRequest,
    RemoveDeviceRequest,
    ResizeRequest,
    ResizeZoneRequest,
    Rule,
    SendMigrationRequest,
    SnapshotRequest,
)
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.engine.state import VmState
from vmsh.errors import NotFoundError, ValidationError, VmshError

LOG = logging.getLogger(__name__)

__all__ = [
    "ACTIONS",
    "ACTIONS_BY_ENDPOINT",
    "ACTIONS_BY_PATH",
    "HANDLERS",
    "HOTPLUG_KINDS",
    "Action",
    "Describer",
    "GuestEvent",
    "MigrationReceiver",
    "Post",
    "RestoreFactory",
    "Rule",
    "VmFactory",
    "VmLike",
    "Vmm",
]


class VmLike(Protocol):
    """What the control layer needs of a VM (see :class:`vmsh.engine.vm.Vm`)."""

    state: VmState

    def boot(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def shutdown(self) -> None: ...
    def power_button(self) -> None: ...
    def nmi(self) -> None: ...
    def counters(self) -> dict[str, dict[str, int]]: ...
    def info(self) -> dict[str, Any]: ...
    def snapshot(self, directory: str) -> None: ...


#: Queues a callable for the control loop (thread-safe; see :meth:`Vmm.post`).
Post = Callable[[Callable[[], None]], None]
#: Where a VM reports guest events: ``on_guest_event(kind, detail)`` (thread-safe).
GuestEventSink = Callable[[str, str], None]
#: Builds a VM from a normalized config: ``factory(config, events, on_guest_event, post)``.
VmFactory = Callable[[m.VmConfig, EventMonitor, GuestEventSink, Post], VmLike]
#: Rebuilds a VM from a snapshot: ``factory(directory, restore, events, on_guest_event, post)``.
RestoreFactory = Callable[[str, m.RestoreConfig, EventMonitor, GuestEventSink, Post], VmLike]
#: Takes one live migration at ``receiver_url``: ``receiver(url, events, on_guest_event, post,
#: adopt)`` builds the VM the source sends and calls ``adopt(vm)`` (which resumes it) before it
#: tells the source the migration is complete (see :func:`vmsh.engine.migration.receive`).
MigrationReceiver = Callable[[str, EventMonitor, GuestEventSink, Post, Callable[[VmLike], None]], None]
#: Describes the machine a normalized config gives its guest (``vm.describe``; see
#: :func:`vmsh.engine.describe.describe_config`).
Describer = Callable[[m.VmConfig], dict[str, Any]]

#: an item of the control queue: a guest event ``(kind, detail)`` or a posted callable
_ControlItem = tuple[str, str] | Callable[[], None]


def _nothing() -> None:
    """Posted to wake the control loop up (it then sees that the VMM has exited)."""


class Vmm:
    """The VMM: one VM config, at most one VM, the actions on them, and the control queue.

    ``vm_factory`` and ``restore_factory`` build VMs (see :data:`VmFactory`); ``describer``
    serves ``vm.describe``. Front-ends wire them (:func:`vmsh.launcher.vm_factories`), so this
    layer does not import the machine it controls.
    """

    def __init__(
        self,
        events: EventMonitor | None = None,
        vm_factory: VmFactory | None = None,
        restore_factory: RestoreFactory | None = None,
        *,
        describer: Describer | None = None,
        exit_on_poweroff: bool = True,
        migration_receiver: MigrationReceiver | None = None,
    ) -> None:
        self.events = events or EventMonitor()
        #: False: a guest poweroff or a fatal error shuts the VM down but keeps the VMM and its
        #: config (the shell; cloud-hypervisor's ``--no-shutdown`` for poweroff)
        self.exit_on_poweroff = exit_on_poweroff
        self.config: m.VmConfig | None = None
        self.vm: VmLike | None = None
        self._vm_factory = vm_factory
        self._restore_factory = restore_factory
        self._describer = describer
        self._migration_receiver = migration_receiver
        #: serializes actions and control items; front-ends hold it for multi-step sequences
        self.lock = threading.RLock()
        self._control: queue.Queue[_ControlItem] = queue.Queue()
        #: identifies the current VM for the callables it posts (None: no VM)
        self._vm_token: object | None = None
        self.exited = threading.Event()
        #: the guest event that made the VMM exit, if one did
        self.exit_event: tuple[str, str] | None = None

    # --- dispatch ---------------------------------------------------------------------------

    def call(self, action: Action, body: Any = None) -> Any:
        """Run ``action`` with its (already decoded) body; returns its JSON-able result.

        :raises VmshError: when the VMM's state does not allow it (:class:`Rule`) or it fails.
        """
        with self.lock:
            action.rule.check(self, action)
            return HANDLERS[action.endpoint](self, body)

    def do(self, endpoint: str, body: Any = None) -> Any:
        """:meth:`call` by endpoint name (``"vm.boot"``), for front-ends and internal steps."""
        return self.call(ACTIONS_BY_ENDPOINT[endpoint], body)

    # --- the control queue ----------------------------------------------------------------------

    def guest_event(self, kind: str, detail: str = "") -> None:
        """Called from any thread when the guest powers off, resets or fails (a
        :class:`GuestEvent`); the control loop acts on it."""
        self._control.put((kind, detail))

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` for the control loop; thread-safe, never blocks.

        The loop runs it holding :attr:`lock`, in order with guest events and other posted
        callables, never concurrently with an action. vCPU threads use it to hand the
        topology changes a guest asks for (ejecting a PCI slot, moving a BAR) to the control
        loop. An exception from ``fn`` is logged; the loop goes on.
        """
        self._control.put(fn)

    def _post_for_vm(self, token: object, fn: Callable[[], None]) -> None:
        """The ``post`` a VM factory gets: ``fn`` is dropped when that VM is gone by the time
        the loop reaches it (shut down, deleted, replaced by a reboot)."""

        def run_if_current() -> None:
            if self._vm_token is token:
                fn()
            else:
                LOG.debug("dropped a callable posted by a VM that is gone: %r", fn)

        self._control.put(run_if_current)

    def process_control(self, timeout: float | None = None) -> tuple[str, str] | None:
        """Run the next item of the control queue, waiting up to ``timeout`` seconds for one.

        Returns the guest event it handled, or None (a posted callable, or nothing came).
        """
        try:
            item = self._control.get(timeout=timeout)
        except queue.Empty:
            return None
        if callable(item):
            with self.lock:
                try:
                    item()
                except Exception:  # a bug in one callable must not stop the control loop
                    LOG.exception("a callable posted to the control loop failed")
            return None
        self._handle_guest_event(*item)
        return item

    def run_control_loop(self, until: Callable[[], bool] | None = None, poll: float = 0.2,
                         on_event: Callable[[str, str], None] | None = None) -> tuple[str, str] | None:
        """Run the control queue until the VMM exits or ``until()`` is true (checked at least
        every ``poll`` seconds). ``on_event(kind, detail)`` is told of each guest event after
        it was handled. Returns :attr:`exit_event`."""
        while not self.exited.is_set() and not (until is not None and until()):
            event = self.process_control(poll)
            if event is not None and on_event is not None:
                on_event(*event)
        return self.exit_event

    def _handle_guest_event(self, kind: str, detail: str) -> None:
        """Act on one guest event (cloud-hypervisor's VMM thread on its reset/exit events)."""
        with self.lock:
            if kind == GuestEvent.RESET:
                LOG.info("guest reset: rebooting")
                try:
                    self.do("vm.reboot")
                except VmshError as err:
                    LOG.error("reboot failed: %s", err)
                    self._exit((kind, detail))
                return
            LOG.info("guest %s%s", kind, f": {detail}" if detail else "")
            if kind in (GuestEvent.POWEROFF, GuestEvent.FATAL) and not self.exit_on_poweroff:
                self._drop_vm()
                return
            self._exit((kind, detail))

    def _exit(self, event: tuple[str, str]) -> None:
        self.exit_event = event
        self.vmm_shutdown()

    def _drop_pending_resets(self) -> None:
        """A guest reset often comes twice (ACPI, then i8042): drop the resets already queued."""
        pending: list[_ControlItem] = []
        while True:
            try:
                item = self._control.get_nowait()
            except queue.Empty:
                break
            if callable(item) or item[0] != GuestEvent.RESET:
                pending.append(item)
        for item in pending:
            self._control.put(item)

    # --- VMM --------------------------------------------------------------------------------

    def _ping(self, _body: None) -> dict[str, Any]:
        return {"build_version": __version__, "version": __version__, "pid": os.getpid(), "features": ["kvm"]}

    def vmm_shutdown(self, _body: None = None) -> None:
        """Delete the VM and stop the VMM (``vmm.shutdown``; also when the launcher ends)."""
        with self.lock:
            self._delete(None)
            self.events.emit("vmm", "shutdown")
            self.exited.set()
        self._control.put(_nothing)

    # --- lifecycle ----------------------------------------------------------------------------

    def _set_vm(self, vm: VmLike | None, token: object | None) -> None:
        self.vm = vm
        self._vm_token = token

    def _drop_vm(self) -> None:
        """Shut the VM down whatever its state (``vm shutdown``); its config stays."""
        if self.vm is not None:
            self.vm.shutdown()
            self._set_vm(None, None)
            self.events.emit("vm", "shutdown")

    def _create(self, cfg: m.VmConfig) -> None:
        """Store a config; nothing is built until ``boot``."""
        self.config = cfg

    def _boot(self, _body: None) -> None:
        """Validate the config, build the VM and start it (a Paused VM is resumed).

        Events as cloud-hypervisor's ``Vmm::vm_boot``: ``booting``, then ``booted`` once it
        runs (a Paused VM's ``resuming``/``resumed`` come between)."""
        if self.vm is not None:
            self.events.emit("vm", "booting")
            self.do("vm.resume")
            self.events.emit("vm", "booted")
            return
        if self._vm_factory is None:
            raise VmshError("This VMM cannot build VMs")
        self.events.emit("vm", "booting")
        self._build_and_boot()
        self.events.emit("vm", "booted")

    def _build_and_boot(self) -> None:
        """Build a VM from the config and start it (``vm.boot``, and the second half of a reboot)."""
        assert self._vm_factory is not None and self.config is not None  # the rule
        cfg = normalize(self.config)
        token = object()
        vm = self._vm_factory(cfg, self.events, self.guest_event, functools.partial(self._post_for_vm, token))
        try:
            vm.boot()
        except BaseException:
            vm.shutdown()
            raise
        self.config = cfg
        self._set_vm(vm, token)

    def _shutdown(self, _body: None) -> None:
        """Stop the VM; its config stays, so it can be booted again."""
        self._drop_vm()

    def _reboot(self, _body: None) -> None:
        """Shut the VM down and boot a fresh one from the same config (``rebooting``,
        ``rebooted``: cloud-hypervisor's ``Vmm::vm_reboot`` boots without ``booting``/``booted``)."""
        assert self.vm is not None  # the rule
        if self._vm_factory is None:
            raise VmshError("This VMM cannot build VMs")
        self.events.emit("vm", "rebooting")
        self.vm.shutdown()
        self._set_vm(None, None)
        self._drop_pending_resets()
        self._build_and_boot()
        self.events.emit("vm", "rebooted")

    def _pause(self, _body: None) -> None:
        assert self.vm is not None
        self.events.emit("vm", "pausing")
        self.vm.pause()
        self.events.emit("vm", "paused")

    def _resume(self, _body: None) -> None:
        assert self.vm is not None
        self.events.emit("vm", "resuming")
        self.vm.resume()
        self.events.emit("vm", "resumed")

    def _power_button(self, _body: None) -> None:
        assert self.vm is not None
        self.vm.power_button()

    def _nmi(self, _body: None) -> None:
        assert self.vm is not None
        self.vm.nmi()

    def _delete(self, _body: None) -> None:
        """Shut the VM down if it runs and forget its config; no error without a VM."""
        self._drop_vm()
        if self.config is not None:
            self.config = None
            self.events.emit("vm", "deleted")

    # --- inspection -------------------------------------------------------------------------

    def _info(self, _body: None) -> dict[str, Any]:
        """``vm.info``: the config, the state and the memory size."""
        assert self.config is not None
        result: dict[str, Any] = {
            "config": to_json_value(self.config),
            "state": (self.vm.state if self.vm else VmState.CREATED).value,
            "memory_actual_size": self.config.memory.total_size(),
        }
        if self.vm is not None:
            result.update(self.vm.info())
        return result

    def _counters(self, _body: None) -> dict[str, dict[str, int]]:
        assert self.vm is not None
        return self.vm.counters()

    def _describe(self, _body: None) -> dict[str, Any]:
        """``vm.describe`` (a vmsh extra): the machine the created config gives its guest,
        described from a throwaway VM built from a normalized copy of the config."""
        if self._describer is None:
            raise VmshError("This VMM cannot describe VMs")
        assert self.config is not None
        return self._describer(normalize(copy.deepcopy(self.config)))

    def _inspectable(self) -> Any:
        """The VM for :mod:`vmsh.engine.inspect` (its rule made sure there is one)."""
        assert self.vm is not None
        return self.vm

    def _registers(self, request: RegistersRequest) -> dict[str, Any]:
        return inspect.registers(self._inspectable(), request.cpu_id)

    def _read_memory(self, request: ReadMemoryRequest) -> dict[str, Any]:
        return inspect.read_memory(self._inspectable(), request.address, request.length)

    def _profile_start(self, request: ProfileStartRequest) -> None:
        inspect.start_profiler(self._inspectable(), request.hz)

    def _profile_stop(self, request: ProfileStopRequest) -> dict[str, str]:
        return inspect.stop_profiler(self._inspectable(), request.system_map, request.top)

    # --- devices ------------------------------------------------------------------------------

    def _add_device(self, action: str, device: Any) -> dict[str, str] | None:
        """Add a device: to the config of a VM not booted yet, or hotplugged into the running
        guest through ACPI PCI hotplug (then cloud-hypervisor's PciDeviceInfo is returned)."""
        assert self.config is not None
        attr = ADD_TARGETS[action]
        candidate = copy.deepcopy(self.config)
        if attr == "vsock":
            candidate.vsock = device
        else:
            setattr(candidate, attr, (getattr(candidate, attr) or []) + [device])
        if candidate.payload is not None or self.vm is not None:
            candidate = normalize(candidate)  # validate (and name the device) before committing
        if self.vm is None:
            self.config = candidate
            return None
        vm: Any = self.vm
        added = candidate.vsock if attr == "vsock" else getattr(candidate, attr)[-1]
        info: dict[str, str] | None = vm.hotplug_device(attr, added)
        # The VM's config object is the one vm.info shows: update it in place.
        if attr == "vsock":
            vm.config.vsock = added
        else:
            setattr(vm.config, attr, (getattr(vm.config, attr) or []) + [added])
        self.config = vm.config
        return info

    def _remove_device(self, request: RemoveDeviceRequest) -> None:
        """Remove a device: from the config of a VM not booted yet, or by asking the running
        guest to eject it (the ``device-removed`` event follows when it has)."""
        assert self.config is not None
        if self.vm is not None:
            vm: Any = self.vm
            if not vm.unplug_device(request.id):
                raise NotFoundError(f"No device with id {request.id}")
            return
        for attr in ("disks", "net", "fs", "pmem", "devices", "user_devices", "vdpa"):
            items = getattr(self.config, attr)
            if items and any(item.id == request.id for item in items):
                kept = [item for item in items if item.id != request.id]
                setattr(self.config, attr, kept or None)
                return
        if self.config.vsock is not None and self.config.vsock.id == request.id:
            self.config.vsock = None
            return
        raise NotFoundError(f"No device with id {request.id}")

    def _resize(self, request: ResizeRequest) -> None:
        """``resizing``, the changes, then ``resized`` if they all worked (cloud-hypervisor's
        ``Vm::resize``)."""
        self.events.emit("vm", "resizing")
        self._resize_vm(request)
        self.events.emit("vm", "resized")

    def _resize_vm(self, request: ResizeRequest) -> None:
        vm: Any = self.vm
        if request.desired_vcpus is not None:
            vm.resize_vcpus(request.desired_vcpus)
        if request.desired_ram is not None:
            vm.resize_memory(request.desired_ram)
        if request.desired_balloon is not None:
            vm.resize_balloon(request.desired_balloon)

    def _resize_zone(self, request: ResizeZoneRequest) -> None:
        vm: Any = self.vm
        vm.resize_zone(request.id, request.desired_ram)

    # --- snapshot -------------------------------------------------------------------------------

    def _snapshot(self, request: SnapshotRequest) -> None:
        assert self.vm is not None
        directory = _file_url_path(request.destination_url)
        self.events.emit("vm", "snapshotting")
        self.vm.snapshot(directory)
        self.events.emit("vm", "snapshotted")

    def _coredump(self, request: CoredumpRequest) -> None:
        """``vm.coredump``: the paused guest as an ELF core (:mod:`vmsh.engine.coredump`)."""
        path = _file_url_path(request.destination_url)
        self.events.emit("vm", "coredumping")
        coredump.dump_vm(self._inspectable(), path)

    def _restore(self, request: m.RestoreConfig) -> None:
        if self._restore_factory is None:
            raise VmshError("This VMM cannot restore VMs")
        directory = _file_url_path(request.source_url)
        token = object()
        vm = self._restore_factory(directory, request, self.events, self.guest_event,
                                   functools.partial(self._post_for_vm, token))
        # Only now, as cloud-hypervisor does: its Vm::new loads the snapshot's memory and devices
        # (the running virtio devices' ``activated`` events come from there), then Vm::restore
        # says ``restoring`` and ``restored``. A snapshot refused while building says neither.
        self.events.emit("vm", "restoring")
        self._set_vm(vm, token)
        self.config = getattr(vm, "config", None)
        self.events.emit("vm", "restored")
        if request.resume:
            self.do("vm.resume")


    # --- live migration ---------------------------------------------------------------------------

    def _send_migration(self, request: SendMigrationRequest) -> None:
        """``vm.send-migration``: the whole exchange runs here, holding the lock, as
        cloud-hypervisor's VMM thread runs it (:func:`vmsh.engine.migration.send`). On success
        the VMM exits once the answer is sent (the guest runs on at the destination); on failure
        the VM is resumed if the migration paused it, and runs on here."""
        vm = self.vm
        assert vm is not None
        paused_here = False

        def pause() -> None:
            nonlocal paused_here
            if vm.state is VmState.RUNNING:  # a VM paused before the migration stays as it is
                self._pause(None)
                paused_here = True

        try:
            migration.send(vm, request.destination_url, request.local, pause)
        except BaseException:
            if paused_here and self.vm is vm and vm.state is VmState.PAUSED:
                try:
                    self._resume(None)
                except VmshError as err:
                    LOG.error("cannot resume the VM after the failed migration: %s", err)
            raise
        LOG.info("the VM was migrated to %s", request.destination_url)
        # after the API has answered: the control loop runs this once the lock is free. The
        # launcher exits as cloud-hypervisor does; the shell (which keeps its VMM when the guest
        # powers off) forgets the VM and its config.
        if self.exit_on_poweroff:
            self.post(lambda: self._exit((GuestEvent.MIGRATED, request.destination_url)))
        else:
            self.post(lambda: self._delete(None))

    def _receive_migration(self, request: ReceiveMigrationRequest) -> None:
        """``vm.receive-migration``: listen, take one migration, and run the VM it brings. A
        failed migration leaves this VMM as it was: no VM, no config."""
        if self._migration_receiver is None:
            raise VmshError("This VMM cannot receive migrations")
        token = object()

        def adopt(vm: VmLike) -> None:
            # cloud-hypervisor's destination restores the VM (State) and resumes it (Complete)
            self.events.emit("vm", "restoring")
            self._set_vm(vm, token)
            self.config = getattr(vm, "config", None)
            self.events.emit("vm", "restored")
            try:
                self._resume(None)
            except BaseException:
                self._set_vm(None, None)
                self.config = None
                raise

        self._migration_receiver(request.receiver_url, self.events, self.guest_event,
                                 functools.partial(self._post_for_vm, token), adopt)


def _adder(action: str) -> Callable[[Vmm, Any], Any]:
    return lambda vmm, device: vmm._add_device(action, device)


#: endpoint -> handler, called by :meth:`Vmm.call` with the lock held after the action's rule
HANDLERS: dict[str, Callable[[Vmm, Any], Any]] = {
    "vmm.ping": Vmm._ping,
    "vmm.shutdown": Vmm.vmm_shutdown,
    "vm.create": Vmm._create,
    "vm.boot": Vmm._boot,
    "vm.shutdown": Vmm._shutdown,
    "vm.reboot": Vmm._reboot,
    "vm.power-button": Vmm._power_button,
    "vm.pause": Vmm._pause,
    "vm.resume": Vmm._resume,
    "vm.nmi": Vmm._nmi,
    "vm.delete": Vmm._delete,
    "vm.info": Vmm._info,
    "vm.counters": Vmm._counters,
    "vm.describe": Vmm._describe,
    "vm.resize": Vmm._resize,
    "vm.resize-zone": Vmm._resize_zone,
    **{f"vm.{name}": _adder(name) for name in ADD_TARGETS},
    "vm.remove-device": Vmm._remove_device,
    "vm.snapshot": Vmm._snapshot,
    "vm.coredump": Vmm._coredump,
    "vm.restore": Vmm._restore,
    "vm.send-migration": Vmm._send_migration,
    "vm.receive-migration": Vmm._receive_migration,
    "vm.registers": Vmm._registers,
    "vm.read-memory": Vmm._read_memory,
    "vm.profile-start": Vmm._profile_start,
    "vm.profile-stop": Vmm._profile_stop,
}


def _file_url_path(url: str) -> str:
    if not url.startswith("file://"):
        raise ValidationError(f"Unsupported URL (only file:// is): {url}")
    return url[len("file://"):]
