"""A VM stand-in for control-layer tests: records calls, keeps a state, no KVM."""

from __future__ import annotations

from typing import Any

from vmsh.engine.state import VmState, check_transition
from vmsh.errors import VmshError


class FakeVm:
    def __init__(self, config: Any, events: Any, on_guest_event: Any, post: Any = None) -> None:
        self.config = config
        self.post = post
        self.state = VmState.CREATED
        self.calls: list[str] = []
        self.on_guest_event = on_guest_event

    def _go(self, target: VmState, name: str) -> None:
        check_transition(self.state, target)
        self.state = target
        self.calls.append(name)

    def boot(self) -> None:
        self._go(VmState.RUNNING, "boot")

    def pause(self) -> None:
        self._go(VmState.PAUSED, "pause")

    def resume(self) -> None:
        self._go(VmState.RUNNING, "resume")

    def shutdown(self) -> None:
        self.state = VmState.SHUTDOWN
        self.calls.append("shutdown")

    def power_button(self) -> None:
        self.calls.append("power_button")

    def nmi(self) -> None:
        self.calls.append("nmi")

    def counters(self) -> dict[str, dict[str, int]]:
        return {"_disk0": {"read_bytes": 0}}

    def info(self) -> dict[str, Any]:
        return {}

    def snapshot(self, directory: str) -> None:
        self.calls.append(f"snapshot {directory}")

    def resize_vcpus(self, desired: int) -> bool:
        """The real one's bounds (``Vm.resize_vcpus``), no vCPUs."""
        self.calls.append(f"resize_vcpus {desired}")
        if not 1 <= desired <= self.config.cpus.max_vcpus:
            raise VmshError(f"resize: desired_vcpus {desired} is out of range")
        changed = desired != self.config.cpus.boot_vcpus
        self.config.cpus.boot_vcpus = desired
        return changed
