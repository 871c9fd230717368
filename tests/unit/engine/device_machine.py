"""A device manager built as the builder builds one (the platform devices, then every PCI
device of a config) over a stand-in for the KVM VM file descriptor, for tests that look at the
machine's devices without KVM."""

from __future__ import annotations

from typing import Any

from tests.unit.fakes import FakeTrigger
from vmsh.config import normalize, vm_config_from_json
from vmsh.engine.bus import Bus
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.pci_windows import pci_segments
from vmsh.engine.platform_devices import create_platform_devices
from vmsh.engine.virtio_devices import PlatformHooks, add_config_devices

RAM = 32 << 20


class FakeVmFd:
    """Takes the KVM VM ioctls the device manager makes (routes, irqfds, ioeventfds, memory
    slots) and does nothing."""

    def set_gsi_routing(self, *args: Any) -> None:
        pass

    def irqfd(self, *args: Any, **kwargs: Any) -> None:
        pass

    def ioeventfd(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_user_memory_region(self, *args: Any) -> None:
        pass


class Machines:
    """Builds device managers over one guest RAM; ``close()`` closes them all."""

    def __init__(self) -> None:
        self.memory = GuestMemoryMmap.create(RAM)
        self.made: list[DeviceManager] = []

    def __call__(self, extra: dict[str, Any]) -> DeviceManager:
        """The devices of ``{"payload": {"kernel": "/k"}, "serial": {"mode": "Null"},
        "console": {"mode": "Off"}, **extra}``."""
        cfg = normalize(vm_config_from_json({"payload": {"kernel": "/k"}, "serial": {"mode": "Null"},
                                             "console": {"mode": "Off"}, **extra}))
        devices = DeviceManager(FakeVmFd(), self.memory, Bus("pio"), Bus("mmio"), pci_segments(cfg, RAM, 40),
                                handoff=lambda work: work())
        self.made.append(devices)
        platform = create_platform_devices(cfg, devices, lambda gsi: FakeTrigger(), FakeTrigger(), FakeTrigger(),
                                           None, lambda segment, slot: None)
        for backend in platform.backends:
            backend.close()
        add_config_devices(devices, cfg, PlatformHooks(reset=FakeTrigger()))
        return devices

    def close(self) -> None:
        for devices in self.made:
            devices.close()
        self.memory.close()
