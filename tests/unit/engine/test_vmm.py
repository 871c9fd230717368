"""The control layer without KVM: the handler table, the state rules, the control queue."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.unit.api.fake_vm import FakeVm
from vmsh.config import model as m
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.engine.state import VmState
from vmsh.engine.vmm import ACTIONS, ACTIONS_BY_ENDPOINT, HANDLERS, Vmm
from vmsh.errors import NotFoundError, StateError, ValidationError, VmshError

CONFIG = m.VmConfig(payload=m.PayloadConfig(kernel="/k"))


class RecordingEvents(EventMonitor):
    def __init__(self) -> None:
        super().__init__(None)
        self.records: list[tuple[str, str]] = []

    def emit(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        self.records.append((source, event))


def make_vmm(state: str, **kwargs: Any) -> Vmm:
    """A VMM with no config (``none``), a config (``created``), or a Running/Paused fake VM."""
    vmm = Vmm(RecordingEvents(), vm_factory=FakeVm, **kwargs)
    if state != "none":
        vmm.do("vm.create", m.VmConfig(payload=m.PayloadConfig(kernel="/k")))
    if state in ("running", "paused"):
        vmm.do("vm.boot")
    if state == "paused":
        vmm.do("vm.pause")
    return vmm


def test_every_action_has_one_handler() -> None:
    assert set(HANDLERS) == {a.endpoint for a in ACTIONS}
    assert len(ACTIONS_BY_ENDPOINT) == len(ACTIONS)


@pytest.mark.parametrize(
    "state, endpoint, body, error, message",
    [
        ("none", "vm.boot", None, NotFoundError, "VM is not created"),
        ("none", "vm.info", None, NotFoundError, "VM is not created"),
        ("none", "vm.counters", None, NotFoundError, "VM is not created"),
        ("none", "vm.describe", None, NotFoundError, "VM is not created"),
        ("none", "vm.registers", {}, NotFoundError, "VM is not created"),
        ("created", "vm.create", CONFIG, StateError, "VM is already created"),
        ("created", "vm.restore", {"source_url": "file:///s"}, StateError, "VM is already created"),
        ("created", "vm.counters", None, NotFoundError, "VM is not booted"),
        ("created", "vm.pause", None, NotFoundError, "VM is not booted"),
        ("created", "vm.read-memory", {"address": 0}, NotFoundError, "VM is not booted"),
        ("created", "vm.profile-start", {}, NotFoundError, "VM is not booted"),
        ("running", "vm.boot", None, StateError, "VM is already created"),
        ("running", "vm.resume", None, StateError, "Invalid transition from Running to Running"),
        ("running", "vm.snapshot", {"destination_url": "file:///s"}, StateError,
         "Trying to snapshot while VM is running"),
        ("running", "vm.describe", None, StateError,
         "vm.describe needs a created VM that is not booted (it is Running)"),
        ("running", "vm.add-vdpa", {"path": "/dev/vhost-vdpa-0"}, VmshError,
         "add-vdpa: these devices cannot be hotplugged into a running VM"),
        # a virtio-fs device can be hot-added, but only to a VM whose RAM a backend can map
        ("running", "vm.add-fs", {"tag": "t", "socket": "/s"}, ValidationError,
         "Using vhost-user requires using shared memory or huge pages"),
        ("running", "vm.registers", {}, StateError, "vm.registers needs a paused VM (it is Running): pause first"),
        ("running", "vm.restore", {"source_url": "file:///s"}, StateError, "VM is already created"),
        ("paused", "vm.pause", None, StateError, "Invalid transition from Paused to Paused"),
    ],
)
def test_state_rules(state: str, endpoint: str, body: Any, error: type[Exception], message: str) -> None:
    from vmsh.config.serde import from_json_value

    vmm = make_vmm(state)
    action = ACTIONS_BY_ENDPOINT[endpoint]
    if isinstance(body, dict):
        body = from_json_value(action.body, body)  # type: ignore[arg-type]  # every action given a dict has a body type
    calls = list(vmm.vm.calls) if vmm.vm is not None else []
    events = list(vmm.events.records)  # type: ignore[attr-defined]  # RecordingEvents
    with pytest.raises(error) as info:
        vmm.call(action, body)
    assert str(info.value) == message
    # a refused action does nothing
    assert (list(vmm.vm.calls) if vmm.vm is not None else []) == calls
    assert vmm.events.records == events  # type: ignore[attr-defined]


def test_boot_resumes_a_paused_vm() -> None:
    vmm = make_vmm("paused")
    vmm.do("vm.boot")
    assert vmm.vm is not None and vmm.vm.state is VmState.RUNNING
    # cloud-hypervisor's Vmm::vm_boot around Vm::boot, which resumes a paused VM
    assert vmm.events.records[-4:] == [  # type: ignore[attr-defined]
        ("vm", "booting"), ("vm", "resuming"), ("vm", "resumed"), ("vm", "booted")]


def test_reboot_events_are_cloud_hypervisor_s() -> None:
    vmm = make_vmm("running")
    before = len(vmm.events.records)  # type: ignore[attr-defined]
    vmm.do("vm.reboot")
    # Vmm::vm_reboot builds and boots the new VM itself: no booting/booted between
    assert vmm.events.records[before:] == [("vm", "rebooting"), ("vm", "rebooted")]  # type: ignore[attr-defined]
    assert vmm.vm is not None and vmm.vm.state is VmState.RUNNING


def test_resize_says_resizing_and_resized_only_when_it_worked() -> None:
    from vmsh.engine.actions import ResizeRequest

    vmm = make_vmm("running")
    before = len(vmm.events.records)  # type: ignore[attr-defined]
    vmm.do("vm.resize", ResizeRequest(desired_vcpus=1))
    assert vmm.events.records[before:] == [("vm", "resizing"), ("vm", "resized")]  # type: ignore[attr-defined]
    with pytest.raises(VmshError):
        vmm.do("vm.resize", ResizeRequest(desired_vcpus=4))
    assert vmm.events.records[before + 2:] == [("vm", "resizing")]  # type: ignore[attr-defined]


def test_restoring_follows_the_devices_the_restore_brought_back() -> None:
    def restore(directory: str, request: Any, events: EventMonitor, on_guest_event: Any, post: Any) -> FakeVm:
        # a running virtio device of the snapshot is activated while the VM is rebuilt
        events.emit("virtio-device", "activated", {"id": "__console"})
        vm = FakeVm(CONFIG, events, on_guest_event, post)
        vm.state = VmState.PAUSED
        return vm

    vmm = Vmm(RecordingEvents(), vm_factory=FakeVm, restore_factory=restore)
    vmm.do("vm.restore", m.RestoreConfig(source_url="file:///s"))
    assert vmm.events.records == [  # type: ignore[attr-defined]
        ("virtio-device", "activated"), ("vm", "restoring"), ("vm", "restored")]


def test_describe_uses_the_describer_the_front_end_gave() -> None:
    seen = []

    def describer(cfg: m.VmConfig) -> dict[str, Any]:
        seen.append(cfg)
        return {"format": 1}

    vmm = make_vmm("created", describer=describer)
    assert vmm.do("vm.describe") == {"format": 1}
    assert seen[0] is not vmm.config  # a normalized copy
    with pytest.raises(VmshError, match="cannot describe"):
        make_vmm("created").do("vm.describe")


# --- the control queue ----------------------------------------------------------------------------


def test_posted_callables_and_guest_events_run_in_order_holding_the_lock() -> None:
    vmm = make_vmm("running", exit_on_poweroff=False)
    order: list[str] = []

    def step(name: str) -> None:
        # another thread cannot take the VMM lock while a posted callable runs
        free: list[bool] = []
        probe = threading.Thread(target=lambda: free.append(vmm.lock.acquire(blocking=False)))
        probe.start()
        probe.join()
        order.append(f"{name} locked={not free[0]}")

    vmm.post(lambda: step("a"))
    vmm.guest_event(GuestEvent.POWEROFF, "acpi")
    vmm.post(lambda: step("b"))
    for _ in range(3):
        event = vmm.process_control(0)
        if event is not None:
            order.append(f"event {event[0]} vm={vmm.vm is not None}")
    assert order == ["a locked=True", "event poweroff vm=False", "b locked=True"]
    assert vmm.process_control(0) is None  # nothing left


def test_a_failing_callable_does_not_stop_the_loop() -> None:
    vmm = make_vmm("none")
    ran = []

    def bad() -> None:
        raise RuntimeError("bug")

    vmm.post(bad)
    vmm.post(lambda: ran.append(1))
    vmm.process_control(0)
    vmm.process_control(0)
    assert ran == [1]


def test_a_vm_s_post_is_dropped_once_that_vm_is_gone() -> None:
    vmm = make_vmm("running", exit_on_poweroff=False)
    assert isinstance(vmm.vm, FakeVm)
    first = vmm.vm
    ran: list[str] = []
    first.post(lambda: ran.append("while running"))
    vmm.process_control(0)
    first.post(lambda: ran.append("after shutdown"))
    vmm.do("vm.shutdown")
    vmm.do("vm.boot")  # a new VM: the old one's callables are stale
    vmm.process_control(0)
    assert ran == ["while running"]
    assert vmm.vm is not first


def test_reboot_drops_queued_resets_but_keeps_the_rest() -> None:
    vmm = make_vmm("running")
    ran = []
    vmm.guest_event(GuestEvent.RESET, "acpi")
    vmm.guest_event(GuestEvent.RESET, "i8042")
    vmm.post(lambda: ran.append(1))
    assert vmm.process_control(0) == (GuestEvent.RESET, "acpi")
    assert vmm.process_control(0) is None and ran == [1]
    assert vmm.process_control(0) is None
    assert vmm.events.records.count(("vm", "rebooted")) == 1  # type: ignore[attr-defined]


def test_run_control_loop_returns_when_the_vmm_exits() -> None:
    vmm = make_vmm("running")
    seen: list[tuple[str, str]] = []
    vmm.guest_event(GuestEvent.FATAL, "vcpu0: boom")
    ended = vmm.run_control_loop(poll=0.01, on_event=lambda kind, detail: seen.append((kind, detail)))
    assert ended == (GuestEvent.FATAL, "vcpu0: boom") == seen[0]
    assert vmm.exited.is_set() and vmm.vm is None and vmm.config is None


def test_run_control_loop_stops_when_asked() -> None:
    vmm = make_vmm("none")
    stop = threading.Event()
    thread = threading.Thread(target=vmm.run_control_loop, kwargs={"until": stop.is_set, "poll": 0.01})
    thread.start()
    done = threading.Event()
    vmm.post(done.set)
    assert done.wait(10)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and not vmm.exited.is_set()


def test_vmm_shutdown_wakes_the_loop() -> None:
    vmm = make_vmm("running")
    thread = threading.Thread(target=vmm.run_control_loop, kwargs={"poll": 60})
    thread.start()
    vmm.do("vmm.shutdown")
    thread.join(10)
    assert not thread.is_alive()


def test_a_failed_migration_resumes_the_vm_it_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsh.engine import migration
    from vmsh.errors import MigrationError

    vmm = make_vmm("running")

    def failing_send(vm: Any, url: str, local: bool, pause: Any) -> None:
        pause()
        raise MigrationError("The migration peer closed the connection")

    monkeypatch.setattr(migration, "send", failing_send)
    with pytest.raises(MigrationError):
        vmm.do("vm.send-migration", ACTIONS_BY_ENDPOINT["vm.send-migration"].body(destination_url="unix:/x"))
    assert vmm.vm is not None and vmm.vm.state is VmState.RUNNING
    assert vmm.events.records[-4:] == [("vm", "pausing"), ("vm", "paused"), ("vm", "resuming"), ("vm", "resumed")]
    assert not vmm.exited.is_set()


def test_a_migration_of_a_paused_vm_leaves_it_paused_when_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsh.engine import migration
    from vmsh.errors import MigrationError

    vmm = make_vmm("paused")

    def failing_send(vm: Any, url: str, local: bool, pause: Any) -> None:
        pause()
        raise MigrationError("refused")

    monkeypatch.setattr(migration, "send", failing_send)
    with pytest.raises(MigrationError):
        vmm.do("vm.send-migration", ACTIONS_BY_ENDPOINT["vm.send-migration"].body(destination_url="unix:/x"))
    assert vmm.vm is not None and vmm.vm.state is VmState.PAUSED


def test_a_migrated_vmm_exits_once_the_action_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsh.engine import migration

    vmm = make_vmm("running")
    monkeypatch.setattr(migration, "send", lambda vm, url, local, pause: pause())
    vmm.do("vm.send-migration", ACTIONS_BY_ENDPOINT["vm.send-migration"].body(destination_url="unix:/x"))
    assert not vmm.exited.is_set()  # the answer goes out first
    vmm.process_control(1)
    assert vmm.exited.is_set() and vmm.exit_event == (GuestEvent.MIGRATED, "unix:/x")


def test_receive_migration_adopts_and_resumes_the_vm() -> None:
    def receiver(url: str, events: Any, on_guest_event: Any, post: Any, adopt: Any) -> None:
        vm = FakeVm(CONFIG, events, on_guest_event, post)
        vm.state = VmState.PAUSED
        adopt(vm)

    vmm = make_vmm("none", migration_receiver=receiver)
    vmm.do("vm.receive-migration", ACTIONS_BY_ENDPOINT["vm.receive-migration"].body(receiver_url="unix:/x"))
    assert vmm.vm is not None and vmm.vm.state is VmState.RUNNING and vmm.config is CONFIG
    assert vmm.events.records == [("vm", "restoring"), ("vm", "restored"), ("vm", "resuming"), ("vm", "resumed")]
    with pytest.raises(StateError, match="VM is already created"):
        vmm.do("vm.receive-migration", ACTIONS_BY_ENDPOINT["vm.receive-migration"].body(receiver_url="unix:/x"))
