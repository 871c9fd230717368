"""One control loop: the launcher and the shell handle a guest's poweroff and a fatal error
through the same :class:`vmsh.engine.vmm.Vmm` loop, with the same events (no KVM: a stand-in VM
reports the guest event as soon as it boots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.api.fake_vm import FakeVm
from vmsh import launcher
from vmsh.config import model as m
from vmsh.config.launcher_args import VmmOptions
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.errors import VmshError
from vmsh.harness.waiting import wait_until
from vmsh.script.session import Session


def reporting(kind: str, detail: str) -> Any:
    """A VM factory whose VMs report ``kind`` from a 'vCPU thread' right after booting."""

    class Vm(FakeVm):
        def boot(self) -> None:
            super().boot()
            self.on_guest_event(kind, detail)

    return Vm


def events_in(path: Path) -> list[tuple[str, str]]:
    records = [json.loads(r) for r in path.read_text().split("\n\n") if r.strip()]
    return [(r["source"], r["event"]) for r in records]


def run_launcher(tmp_path: Path, kind: str, detail: str) -> tuple[int | str, list[tuple[str, str]]]:
    path = tmp_path / "launcher-events"
    opts = VmmOptions(api_socket=None, event_monitor=m.EndpointConfig(path=str(path)), gdb=None, restore=None,
                      seccomp="true", verbosity=0, log_file=None)
    try:
        result: int | str = launcher.run(opts, m.VmConfig(payload=m.PayloadConfig(kernel="/k")),
                                         factories=(reporting(kind, detail), FakeVm))
    except VmshError as err:
        result = str(err)
    return result, events_in(path)


def run_shell(tmp_path: Path, kind: str, detail: str) -> tuple[list[str], str, list[tuple[str, str]]]:
    path = tmp_path / "shell-events"
    events = EventMonitor.open(path=str(path))
    out: list[str] = []
    session = Session(out.append, events=events, factories=(reporting(kind, detail), FakeVm))
    try:
        session.execute("create --kernel /k; boot")
        wait_until(lambda: session.messages, 10, "the shell's control loop to handle the guest event", interval=0.01)
        session.execute("info state")
        return session.messages, out[-1], events_in(path)
    finally:
        session.close()
        events.close()


BOOTED = [("vm", "booting"), ("vm", "booted"), ("vm", "shutdown")]


@pytest.mark.parametrize("kind, detail, notice, launcher_result", [
    (GuestEvent.POWEROFF, "acpi", "the guest powered off", 0),
    (GuestEvent.FATAL, "vcpu0: boom", "the VM stopped: vcpu0: boom", "The VM stopped: vcpu0: boom"),
])
def test_launcher_and_shell_handle_guest_events_alike(tmp_path: Path, kind: str, detail: str, notice: str,
                                                        launcher_result: int | str) -> None:
    result, launched = run_launcher(tmp_path, kind, detail)
    assert result == launcher_result
    # the launcher's VMM exits with its guest (cloud-hypervisor's events)
    assert launched == [("vmm", "starting"), *BOOTED, ("vm", "deleted"), ("vmm", "shutdown")]

    messages, state, shell = run_shell(tmp_path, kind, detail)
    # the shell keeps its VMM and the config (as --no-shutdown): the same VM events, then nothing
    assert shell == BOOTED == launched[1:4]
    assert messages == [notice]
    assert state == '"Created"'
