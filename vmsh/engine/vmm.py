"""The VMM control layer: one action registry that every front-end calls.

:class:`Vmm` holds at most one VM config and one running VM, as cloud-hypervisor's VMM
does. Its actions (``create``, ``boot``, ``pause``, ``info``, ``add-disk``, ``snapshot``,
...) are listed in :data:`ACTIONS` with the HTTP method and request body type the API uses,
so the HTTP server, ``vmsh remote``, the shell and the launcher all reach the same code.
Actions are serialized by one lock; guest-initiated events (poweroff, reset) arrive from
vCPU threads through :meth:`Vmm.guest_event` and are handled on the caller's control loop.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from vmsh import __version__
from vmsh.config import model as m
from vmsh.config import normalize, to_json_value
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.engine.state import VmState, check_transition
from vmsh.errors import NotFoundError, StateError, ValidationError, VmshError

LOG = logging.getLogger(__name__)


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


#: Builds a VM from a normalized config: ``factory(config, events, on_guest_event)``.
VmFactory = Callable[[m.VmConfig, EventMonitor, Callable[[str, str], None]], VmLike]
#: Rebuilds a VM from a snapshot directory: ``factory(directory, restore, events, on_guest_event)``.
RestoreFactory = Callable[[str, m.RestoreConfig, EventMonitor, Callable[[str, str], None]], VmLike]


@dataclasses.dataclass(frozen=True)
class Action:
    """One entry of the registry: the API endpoint and what its body is."""

    name: str
    #: "GET" or "PUT"
    http_method: str
    #: the config dataclass of the body, ``dict`` for a free-form JSON object, None for no body
    body: type | None
    #: endpoint prefix: "vm" or "vmm"
    scope: str = "vm"

    @property
    def path(self) -> str:
        return f"/api/v1/{self.scope}.{self.name}"

    @property
    def method_name(self) -> str:
        return self.name.replace("-", "_")


@dataclasses.dataclass(kw_only=True)
class SnapshotRequest:
    """``vm.snapshot`` body."""

    destination_url: str = m.field()


@dataclasses.dataclass(kw_only=True)
class RemoveDeviceRequest:
    """``vm.remove-device`` body."""

    id: str = m.field()


@dataclasses.dataclass(kw_only=True)
class ResizeRequest:
    """``vm.resize`` body."""

    desired_vcpus: int | None = m.field(None, kind="u8")
    desired_ram: int | None = m.field(None, kind="u64")
    desired_balloon: int | None = m.field(None, kind="u64")


@dataclasses.dataclass(kw_only=True)
class ResizeZoneRequest:
    """``vm.resize-zone`` body."""

    id: str = m.field()
    desired_ram: int = m.field(kind="u64")


ACTIONS: tuple[Action, ...] = (
    Action("ping", "GET", None, scope="vmm"),
    Action("shutdown", "PUT", None, scope="vmm"),
    Action("create", "PUT", m.VmConfig),
    Action("boot", "PUT", None),
    Action("shutdown", "PUT", None),
    Action("reboot", "PUT", None),
    Action("power-button", "PUT", None),
    Action("pause", "PUT", None),
    Action("resume", "PUT", None),
    Action("nmi", "PUT", None),
    Action("delete", "PUT", None),
    Action("info", "GET", None),
    Action("counters", "GET", None),
    Action("describe", "GET", None),
    Action("resize", "PUT", ResizeRequest),
    Action("resize-zone", "PUT", ResizeZoneRequest),
    Action("add-device", "PUT", m.DeviceConfig),
    Action("add-disk", "PUT", m.DiskConfig),
    Action("add-fs", "PUT", m.FsConfig),
    Action("add-pmem", "PUT", m.PmemConfig),
    Action("add-net", "PUT", m.NetConfig),
    Action("add-vsock", "PUT", m.VsockConfig),
    Action("add-vdpa", "PUT", m.VdpaConfig),
    Action("add-user-device", "PUT", m.UserDeviceConfig),
    Action("remove-device", "PUT", RemoveDeviceRequest),
    Action("snapshot", "PUT", SnapshotRequest),
    Action("restore", "PUT", m.RestoreConfig),
)

ACTIONS_BY_PATH = {a.path: a for a in ACTIONS}

#: add-* action -> (VmConfig list attribute, or the single-device attribute for vsock)
#: config lists whose devices can be plugged into a running VM
HOTPLUG_KINDS = frozenset({"disks", "net", "pmem", "vsock"})

_ADD_TARGETS = {
    "add-device": "devices",
    "add-disk": "disks",
    "add-fs": "fs",
    "add-pmem": "pmem",
    "add-net": "net",
    "add-vsock": "vsock",
    "add-vdpa": "vdpa",
    "add-user-device": "user_devices",
}


class Vmm:
    """The VMM: one VM config, at most one VM, and the actions on them."""

    def __init__(
        self,
        events: EventMonitor | None = None,
        vm_factory: VmFactory | None = None,
        restore_factory: RestoreFactory | None = None,
        *,
        exit_on_poweroff: bool = True,
    ) -> None:
        self.events = events or EventMonitor()
        #: False: a guest poweroff shuts the VM down but keeps the VMM (``--no-shutdown``)
        self.exit_on_poweroff = exit_on_poweroff
        self.config: m.VmConfig | None = None
        self.vm: VmLike | None = None
        self._vm_factory = vm_factory
        self._restore_factory = restore_factory
        #: serializes actions; front-ends hold it for multi-step sequences
        self.lock = threading.RLock()
        #: guest events waiting for the control loop
        self.guest_events: queue.Queue[tuple[str, str]] = queue.Queue()
        self.exited = threading.Event()

    # --- dispatch ---------------------------------------------------------------------------

    def call(self, action: Action, body: Any = None) -> Any:
        """Run ``action`` with its (already decoded) body; returns its JSON-able result."""
        with self.lock:
            if action.scope == "vmm":
                return self.vmm_shutdown() if action.name == "shutdown" else self.ping()
            if action.name in _ADD_TARGETS:
                return self.add_device_config(action.name, body)
            method = getattr(self, action.method_name)
            return method(body) if action.body is not None else method()

    def guest_event(self, kind: str, detail: str = "") -> None:
        """Called from any thread when the guest powers off, resets or fails."""
        self.guest_events.put((kind, detail))

    def handle_guest_event(self, kind: str, detail: str) -> bool:
        """Act on one guest event; returns True when the VMM should exit."""
        with self.lock:
            if kind == GuestEvent.RESET:
                LOG.info("guest reset: rebooting")
                try:
                    self.reboot()
                except VmshError as err:
                    LOG.error("reboot failed: %s", err)
                    self.vmm_shutdown()
                    return True
                return False
            LOG.info("guest %s%s", kind, f": {detail}" if detail else "")
            if kind == GuestEvent.POWEROFF and not self.exit_on_poweroff:
                if self.vm is not None:
                    self.shutdown()
                return False
            self.vmm_shutdown()
            return True

    # --- VMM --------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {"build_version": __version__, "version": __version__, "pid": os.getpid(), "features": ["kvm"]}

    def vmm_shutdown(self) -> None:
        """Delete the VM and stop the VMM."""
        self.delete()
        self.events.emit("vmm", "shutdown")
        self.exited.set()

    # --- lifecycle ----------------------------------------------------------------------------

    def _require_vm(self) -> VmLike:
        if self.vm is None:
            raise NotFoundError("VM is not created" if self.config is None else "VM is not booted")
        return self.vm

    def create(self, cfg: m.VmConfig) -> None:
        """Store a config; nothing is built until ``boot``."""
        if self.config is not None:
            raise StateError("VM is already created")
        self.config = cfg

    def boot(self) -> None:
        """Validate the config, build the VM and start it (a Paused VM is resumed)."""
        if self.vm is not None:
            if self.vm.state is VmState.PAUSED:
                self.resume()
                return
            raise StateError("VM is already created")
        if self.config is None:
            raise NotFoundError("VM is not created")
        if self._vm_factory is None:
            raise VmshError("This VMM cannot build VMs")
        cfg = normalize(self.config)
        self.events.emit("vm", "booting")
        vm = self._vm_factory(cfg, self.events, self.guest_event)
        try:
            vm.boot()
        except BaseException:
            vm.shutdown()
            raise
        self.config = cfg
        self.vm = vm
        self.events.emit("vm", "booted")

    def shutdown(self) -> None:
        """Stop the VM; its config stays, so it can be booted again."""
        vm = self._require_vm()
        check_transition(vm.state, VmState.SHUTDOWN)
        vm.shutdown()
        self.vm = None
        self.events.emit("vm", "shutdown")

    def reboot(self) -> None:
        """Shut the VM down and boot a fresh one from the same config."""
        vm = self._require_vm()
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError(f"Invalid transition from {vm.state.value} to {VmState.RUNNING.value}")
        self.events.emit("vm", "rebooting")
        vm.shutdown()
        self.vm = None
        # A guest reset often comes twice (ACPI, then i8042): drop the resets already queued.
        pending = []
        while not self.guest_events.empty():
            event = self.guest_events.get_nowait()
            if event[0] != GuestEvent.RESET:
                pending.append(event)
        for event in pending:
            self.guest_events.put(event)
        self.boot()
        self.events.emit("vm", "rebooted")

    def pause(self) -> None:
        vm = self._require_vm()
        check_transition(vm.state, VmState.PAUSED)
        self.events.emit("vm", "pausing")
        vm.pause()
        self.events.emit("vm", "paused")

    def resume(self) -> None:
        vm = self._require_vm()
        check_transition(vm.state, VmState.RUNNING)
        self.events.emit("vm", "resuming")
        vm.resume()
        self.events.emit("vm", "resumed")

    def power_button(self) -> None:
        self._require_vm().power_button()

    def nmi(self) -> None:
        self._require_vm().nmi()

    def delete(self) -> None:
        """Shut the VM down if it runs and forget its config; no error without a VM."""
        if self.vm is not None:
            self.vm.shutdown()
            self.vm = None
            self.events.emit("vm", "shutdown")
        if self.config is not None:
            self.config = None
            self.events.emit("vm", "deleted")

    # --- inspection -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``vm.info``: the config, the state and the memory size."""
        if self.config is None:
            raise NotFoundError("VM is not created")
        result: dict[str, Any] = {
            "config": to_json_value(self.config),
            "state": (self.vm.state if self.vm else VmState.CREATED).value,
            "memory_actual_size": self.config.memory.total_size(),
        }
        if self.vm is not None:
            result.update(self.vm.info())
        return result

    def counters(self) -> dict[str, dict[str, int]]:
        return self._require_vm().counters()

    def describe(self) -> dict[str, Any]:
        """``vm.describe`` (a vmsh extra): the machine the created config gives its guest.

        Builds a throwaway VM from a normalized copy of the config, describes it
        (:mod:`vmsh.engine.describe`) and releases it; valid in the Created state only.
        """
        if self.config is None:
            raise NotFoundError("VM is not created")
        if self.vm is not None:
            raise StateError(f"vm.describe needs a created VM that is not booted (it is {self.vm.state.value})")
        from vmsh.engine.describe import describe_config

        return describe_config(normalize(copy.deepcopy(self.config)))

    # --- devices ------------------------------------------------------------------------------

    def add_device_config(self, action: str, device: Any) -> dict[str, str] | None:
        """Add a device: to the config of a VM not booted yet, or hotplugged into the running
        guest through ACPI PCI hotplug (then cloud-hypervisor's PciDeviceInfo is returned)."""
        if self.config is None:
            raise NotFoundError("VM is not created")
        attr = _ADD_TARGETS[action]
        if self.vm is not None and attr not in HOTPLUG_KINDS:
            raise VmshError(f"{action}: these devices cannot be hotplugged into a running VM")
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
        added = candidate.vsock if attr == "vsock" else getattr(candidate, attr)[-1]
        info = self.vm.hotplug_device(attr, added)
        # The VM's config object is the one vm.info shows: update it in place.
        if attr == "vsock":
            self.vm.config.vsock = added
        else:
            setattr(self.vm.config, attr, (getattr(self.vm.config, attr) or []) + [added])
        self.config = self.vm.config
        return info

    def remove_device(self, request: RemoveDeviceRequest) -> None:
        """Remove a device: from the config of a VM not booted yet, or by asking the running
        guest to eject it (the ``device-removed`` event follows when it has)."""
        if self.config is None:
            raise NotFoundError("VM is not created")
        if self.vm is not None:
            if not self.vm.unplug_device(request.id):
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

    def resize(self, request: ResizeRequest) -> None:
        vm = self._require_vm()
        cfg = vm.config
        if request.desired_vcpus is not None and request.desired_vcpus != cfg.cpus.boot_vcpus:
            raise VmshError("resize: changing the vCPUs of a running VM is not supported yet")
        if request.desired_ram is not None and request.desired_ram != cfg.memory.total_size():
            raise VmshError("resize: changing the RAM of a running VM is not supported yet (use the balloon)")
        if request.desired_balloon is not None:
            vm.resize_balloon(request.desired_balloon)

    def resize_zone(self, request: ResizeZoneRequest) -> None:
        self._require_vm()
        raise VmshError("resize-zone: memory zones cannot be resized yet")

    # --- snapshot -------------------------------------------------------------------------------

    def snapshot(self, request: SnapshotRequest) -> None:
        vm = self._require_vm()
        if vm.state is not VmState.PAUSED:
            raise StateError("Trying to snapshot while VM is running")
        directory = _file_url_path(request.destination_url)
        self.events.emit("vm", "snapshotting")
        vm.snapshot(directory)
        self.events.emit("vm", "snapshotted")

    def restore(self, request: m.RestoreConfig) -> None:
        if self.config is not None or self.vm is not None:
            raise StateError("VM is already created")
        if self._restore_factory is None:
            raise VmshError("This VMM cannot restore VMs")
        directory = _file_url_path(request.source_url)
        self.events.emit("vm", "restoring")
        vm = self._restore_factory(directory, request, self.events, self.guest_event)
        self.vm = vm
        self.config = getattr(vm, "config", None)
        self.events.emit("vm", "restored")
        if request.resume:
            self.resume()


def _file_url_path(url: str) -> str:
    if not url.startswith("file://"):
        raise ValidationError(f"Unsupported URL (only file:// is): {url}")
    return url[len("file://"):]
