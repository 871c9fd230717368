"""The VMM's action registry: every endpoint, its HTTP method, its body, and the states it accepts.

:data:`ACTIONS` is what the HTTP server routes, what :mod:`vmsh.api.openapi` documents and what
``Vmm.call`` (:mod:`vmsh.engine.vmm`) dispatches: each :class:`Action` names its endpoint
(``vm.boot``), its request body type, and its :class:`Rule`, the one place that says which
VMM states (no config, created, a Running or Paused VM) the action accepts and with which of
cloud-hypervisor's error texts it refuses the others. Actions marked ``extension`` are vmsh's
own (cloud-hypervisor has no such endpoint); the OpenAPI document says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from vmsh.config import model as m
from vmsh.engine.state import VmState, check_transition
from vmsh.errors import NotFoundError, StateError, VmshError


class _HasState(Protocol):
    @property
    def state(self) -> VmState: ...


class VmmState(Protocol):
    """What a :class:`Rule` reads of the VMM: its config and its VM."""

    @property
    def config(self) -> Any: ...
    @property
    def vm(self) -> _HasState | None: ...


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which VMM states an action accepts; checked by ``Vmm.call`` before its handler.

    The checks run in this order, each with cloud-hypervisor's error text:

    1. ``created``: True needs a VM config (else ``VM is not created``, 404); False refuses
       one (``VM is already created``).
    2. ``booted``: True needs a built VM (``VM is not booted``, 404); False refuses one with
       ``refusal`` (a :attr:`refusal_error`).
    3. With a built VM: ``states`` are the VM states accepted, else ``refusal``; ``to`` is a
       state the VM must be allowed to move to (``Invalid transition from A to B``).

    ``refusal`` may name ``{endpoint}`` (``vm.boot``), ``{action}`` (``boot``) and ``{state}``
    (the VM's state).
    """

    created: bool | None = None
    booted: bool | None = None
    to: VmState | None = None
    states: frozenset[VmState] | None = None
    refusal: str = ""
    refusal_error: type[VmshError] = StateError

    def check(self, vmm: VmmState, action: Action) -> None:
        """:raises VmshError: when ``vmm``'s state does not allow the action."""
        if self.created is True and vmm.config is None:
            raise NotFoundError("VM is not created")
        if self.created is False and vmm.config is not None:
            raise StateError("VM is already created")
        vm = vmm.vm
        if vm is None:
            if self.booted is True:
                raise NotFoundError("VM is not created" if vmm.config is None else "VM is not booted")
            return
        if self.booted is False or (self.states is not None and vm.state not in self.states):
            raise self.refusal_error(self.refusal.format(endpoint=action.endpoint, action=action.name,
                                                         state=vm.state.value))
        if self.to is not None:
            check_transition(vm.state, self.to)


_ANY = Rule()
_CREATED = Rule(created=True)
_BOOTED = Rule(booted=True)


@dataclasses.dataclass(frozen=True)
class Action:
    """One entry of the registry: the API endpoint, what its body is, the states it accepts."""

    name: str
    #: "GET" or "PUT"
    http_method: str
    #: the config dataclass of the body, ``dict`` for a free-form JSON object, None for no body
    body: type | None
    #: endpoint prefix: "vm" or "vmm"
    scope: str = "vm"
    rule: Rule = _ANY
    #: for a vmsh extension (an endpoint cloud-hypervisor does not have): what it does
    extension: str = ""

    @property
    def endpoint(self) -> str:
        return f"{self.scope}.{self.name}"

    @property
    def path(self) -> str:
        return f"/api/v1/{self.endpoint}"


@dataclasses.dataclass(kw_only=True)
class SnapshotRequest:
    """``vm.snapshot`` body."""

    destination_url: str = m.field()


@dataclasses.dataclass(kw_only=True)
class CoredumpRequest:
    """``vm.coredump`` body: a ``file://`` URL naming the core file to create."""

    destination_url: str = m.field()


@dataclasses.dataclass(kw_only=True)
class SendMigrationRequest:
    """``vm.send-migration`` body: the destination's ``unix:PATH``; ``local`` hands guest RAM
    over as file descriptors instead of copying it."""

    destination_url: str = m.field()
    local: bool = m.field(False)


@dataclasses.dataclass(kw_only=True)
class ReceiveMigrationRequest:
    """``vm.receive-migration`` body: the ``unix:PATH`` to listen on."""

    receiver_url: str = m.field()


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


@dataclasses.dataclass(kw_only=True)
class RegistersRequest:
    """``vm.registers`` body (vmsh extension)."""

    DENY_UNKNOWN_FIELDS = True

    cpu_id: int = m.field(0, kind="u32")


@dataclasses.dataclass(kw_only=True)
class ReadMemoryRequest:
    """``vm.read-memory`` body (vmsh extension): guest physical ``address``, ``length`` bytes."""

    DENY_UNKNOWN_FIELDS = True

    address: int = m.field(kind="u64")
    length: int = m.field(64, kind="u32")


@dataclasses.dataclass(kw_only=True)
class ProfileStartRequest:
    """``vm.profile-start`` body (vmsh extension): samples per second."""

    DENY_UNKNOWN_FIELDS = True

    hz: int = m.field(200, kind="u32")


@dataclasses.dataclass(kw_only=True)
class ProfileStopRequest:
    """``vm.profile-stop`` body (vmsh extension): a System.map to name addresses by, and how
    many of the hottest entries to list."""

    DENY_UNKNOWN_FIELDS = True

    system_map: str | None = m.field(None)
    top: int = m.field(40, kind="u32")


#: config lists whose devices can be plugged into a running VM
HOTPLUG_KINDS = frozenset({"disks", "net", "fs", "pmem", "vsock"})

#: add-* action -> the VmConfig list attribute (or the single-device attribute for vsock)
ADD_TARGETS = {
    "add-device": "devices",
    "add-disk": "disks",
    "add-fs": "fs",
    "add-pmem": "pmem",
    "add-net": "net",
    "add-vsock": "vsock",
    "add-vdpa": "vdpa",
    "add-user-device": "user_devices",
}


def _add(name: str, body: type) -> Action:
    """An add-* action: a running VM takes the kinds in :data:`HOTPLUG_KINDS` only."""
    if ADD_TARGETS[name] in HOTPLUG_KINDS:
        return Action(name, "PUT", body, rule=_CREATED)
    return Action(name, "PUT", body, rule=Rule(
        created=True, booted=False, refusal="{action}: these devices cannot be hotplugged into a running VM",
        refusal_error=VmshError))


_LIVE = frozenset({VmState.RUNNING, VmState.PAUSED})

ACTIONS: tuple[Action, ...] = (
    Action("ping", "GET", None, scope="vmm"),
    Action("shutdown", "PUT", None, scope="vmm"),
    Action("create", "PUT", m.VmConfig, rule=Rule(created=False)),
    # a Paused VM is resumed
    Action("boot", "PUT", None, rule=Rule(created=True, states=frozenset({VmState.PAUSED}),
                                          refusal="VM is already created")),
    Action("shutdown", "PUT", None, rule=Rule(booted=True, to=VmState.SHUTDOWN)),
    Action("reboot", "PUT", None, rule=Rule(booted=True, states=_LIVE,
                                            refusal="Invalid transition from {state} to Running")),
    Action("power-button", "PUT", None, rule=_BOOTED),
    Action("pause", "PUT", None, rule=Rule(booted=True, to=VmState.PAUSED)),
    Action("resume", "PUT", None, rule=Rule(booted=True, to=VmState.RUNNING)),
    Action("nmi", "PUT", None, rule=_BOOTED),
    Action("delete", "PUT", None),
    Action("info", "GET", None, rule=_CREATED),
    Action("counters", "GET", None, rule=_BOOTED),
    Action("describe", "GET", None,
           rule=Rule(created=True, booted=False,
                     refusal="vm.describe needs a created VM that is not booted (it is {state})"),
           extension="the machine a created (not booted) VM gives its guest, as `vmsh launch --describe` prints it"),
    Action("resize", "PUT", ResizeRequest, rule=_BOOTED),
    Action("resize-zone", "PUT", ResizeZoneRequest, rule=_BOOTED),
    _add("add-device", m.DeviceConfig),
    _add("add-disk", m.DiskConfig),
    _add("add-fs", m.FsConfig),
    _add("add-pmem", m.PmemConfig),
    _add("add-net", m.NetConfig),
    _add("add-vsock", m.VsockConfig),
    _add("add-vdpa", m.VdpaConfig),
    _add("add-user-device", m.UserDeviceConfig),
    Action("remove-device", "PUT", RemoveDeviceRequest, rule=_CREATED),
    Action("snapshot", "PUT", SnapshotRequest,
           rule=Rule(booted=True, states=frozenset({VmState.PAUSED}),
                     refusal="Trying to snapshot while VM is running")),
    Action("coredump", "PUT", CoredumpRequest,
           rule=Rule(booted=True, states=frozenset({VmState.PAUSED}),
                     refusal="Trying to coredump while VM is running")),
    Action("send-migration", "PUT", SendMigrationRequest, rule=Rule(booted=True, states=_LIVE,
                                                                    refusal="VM is not running")),
    Action("receive-migration", "PUT", ReceiveMigrationRequest,
           rule=Rule(created=False, booted=False, refusal="VM is already created")),
    Action("restore", "PUT", m.RestoreConfig, rule=Rule(created=False, booted=False, refusal="VM is already created")),
    Action("registers", "PUT", RegistersRequest,
           rule=Rule(booted=True, states=frozenset({VmState.PAUSED}),
                     refusal="{endpoint} needs a paused VM (it is {state}): pause first"),
           extension="the general and special registers of vCPU `cpu_id` of the paused VM (KVM_GET_REGS, "
                     "KVM_GET_SREGS)"),
    Action("read-memory", "PUT", ReadMemoryRequest, rule=_BOOTED,
           extension="`length` bytes (at most 1 MiB) of guest RAM at guest physical `address`, in hex; "
                     "a range that is not all RAM is a 400"),
    Action("profile-start", "PUT", ProfileStartRequest, rule=_BOOTED,
           extension="start sampling every vCPU's instruction pointer `hz` times a second"),
    Action("profile-stop", "PUT", ProfileStopRequest, rule=_BOOTED,
           extension="stop sampling and return the report (the hottest `top` addresses, by symbol when "
                     "`system_map` names a System.map on the VMM's host)"),
)

ACTIONS_BY_PATH = {a.path: a for a in ACTIONS}
ACTIONS_BY_ENDPOINT = {a.endpoint: a for a in ACTIONS}
