"""pvpanic on a built VM: the guest's write to the device's BAR becomes the ``guest panic``
event (a tiny kernel stands in for the guest; the write is what Linux's pvpanic-pci does)."""

from __future__ import annotations

from pathlib import Path

from tests.engine import tiny_kernel
from tests.engine.conftest import run_now
from tests.engine.test_hotplug import Events
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine.builder import build_for_boot
from vmsh.engine.virtio_devices import PVPANIC_ID


def test_pvpanic_write_emits_guest_panic(tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(tiny_kernel.hello_poweroff())
    cfg = normalize(vm_config_from_argv(["--kernel", str(kernel), "--serial", "null", "--console", "off", "--pvpanic"]))
    events = Events()
    vm = build_for_boot(cfg, events, lambda kind, detail: None, run_now)
    try:
        entry = vm.devices.devices[PVPANIC_ID]
        config = vm.devices.buses[0].config_read(0, entry.slot, 0, 0, 4)
        assert config == bytes.fromhex("361b 1100")
        bar = entry.transport.bar_address()
        assert vm.mmio.read(bar, 1) == b"\x03"  # PANICKED | CRASH_LOADED supported
        vm.mmio.write(bar, b"\x01")
        vm.mmio.write(bar, b"\x02")
        assert ("guest", "panic", {"event": "panic"}) in events.seen
        assert ("guest", "panic", {"event": "crash_loaded"}) in events.seen
    finally:
        vm.shutdown()
