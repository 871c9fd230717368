"""What the guest's own kernel does with vmsh's platform events: ACPI PCI hotplug (add-disk,
add-net and remove-device on a running guest, through acpiphp), the ACPI power button (the
tiny power-button driver signals /init, which powers off) and pvpanic (a panic the guest
triggers itself becomes cloud-hypervisor's ``guest panic`` event); and the event monitor's
whole record of a VM's life, checked against the records cloud-hypervisor v40 writes and their
order (its ``event!`` sites in ``vmm/src/lib.rs``, ``vmm/src/vm.rs``,
``vmm/src/device_manager.rs`` and ``virtio-devices/src/*.rs``).

Most tests restore a clone of one booted guest with its own API socket and event file; the
lifecycle test boots its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest.eventlog import activated, by_id, events_of, resets, vm, wait_for_event, wait_for_events
from vmsh.api.client import ApiClient
from vmsh.harness.snapshots import restore_guest


@pytest.fixture
def clone(vmsh_clone, tmp_path: Path):
    """A clone with ``.api`` (socket path) and ``.events`` (event-monitor file)."""

    def make(*flags: str):
        api, events = tmp_path / "api.sock", tmp_path / "events.json"
        guest = vmsh_clone(*flags, restore_flags=["--api-socket", f"path={api}",
                                                  "--event-monitor", f"path={events}"])
        guest.api, guest.events = str(api), events
        return guest

    return make


def wait_in_guest(guest, condition: str, tries: int = 300) -> None:
    """Poll a shell condition in the guest (5 per second) until it holds."""
    guest.check_output(f"i=0; until {condition}; do [ $i -lt {tries} ] || exit 1; i=$((i+1)); sleep 0.2; done",
                       timeout=tries / 5 + 30)


def test_hotplugged_disk_appears_in_the_guest_and_ejects(clone, tmp_path: Path) -> None:
    guest = clone()
    image = tmp_path / "hot.img"
    with open(image, "wb") as f:
        f.write(b"VMSH-HOTPLUG-DISK".ljust(512, b"\0"))
        f.truncate(8 << 20)
    with ApiClient(guest.api) as api:
        info = api.put("vm.add-disk", {"path": str(image), "id": "hot0", "serial": "hot-serial"})
    assert info["id"] == "hot0"
    # acpiphp rescans the slot on the GED's notification and virtio-blk binds to it
    wait_in_guest(guest, "[ -e /sys/block/vda ]")
    assert guest.check_output("cat /sys/block/vda/serial") == "hot-serial"  # (no newline in this file)
    assert guest.check_output("cat /sys/block/vda/size") == str(16384)
    assert guest.check_output("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 17") == "VMSH-HOTPLUG-DISK"
    # the PCI function the guest found is at the address vmsh reported
    slot = info["bdf"].rsplit(":", 1)[1]
    assert guest.check_output("readlink -f /sys/block/vda/device").split("/")[-2] == f"0000:00:{slot}"

    # virtio-blk bound to it: cloud-hypervisor's device activation event
    assert ("virtio-device", "activated", {"id": "hot0"}) in events_of(guest.events)
    with ApiClient(guest.api) as api:
        api.put("vm.remove-device", {"id": "hot0"})
    props = wait_for_event(guest.events, "vm", "device-removed")
    assert props == {"id": "hot0", "bdf": info["bdf"]}
    # the driver let go of the device (a reset) before the guest ejected the slot
    assert events_of(guest.events)[-2:] == [("virtio-device", "reset", {"id": "hot0"}),
                                            ("vm", "device-removed", {"id": "hot0", "bdf": info["bdf"]})]
    wait_in_guest(guest, "[ ! -e /sys/block/vda ]")
    with ApiClient(guest.api) as api:
        assert not api.get("vm.info")["config"].get("disks")
    # the guest keeps running, and the slot can be used again
    with ApiClient(guest.api) as api:
        again = api.put("vm.add-disk", {"path": str(image), "id": "hot1"})
    assert again["bdf"] == info["bdf"]
    wait_in_guest(guest, "[ -e /sys/block/vda ]")


def test_hotplugged_net_device_gets_its_mac(clone) -> None:
    guest = clone()
    mac = "52:54:00:12:34:99"
    with ApiClient(guest.api) as api:
        api.put("vm.add-net", {"mac": mac, "id": "hotnet"})
    wait_in_guest(guest, "[ -e /sys/class/net/eth0 ]")
    assert guest.check_output("cat /sys/class/net/eth0/address") == mac


def test_power_button_powers_the_guest_off(clone) -> None:
    guest = clone()
    with ApiClient(guest.api) as api:
        api.put("vm.power-button")
    # /init traps the tiny power-button driver's SIGUSR2, syncs and powers off: vmsh exits 0
    assert guest.wait_exit(timeout=120) == 0
    assert ("vm", "shutdown", {}) in events_of(guest.events)


def test_guest_panic_becomes_the_panic_event(clone) -> None:
    guest = clone("--pvpanic")
    guest.send("echo c > /proc/sysrq-trigger\n")
    props = wait_for_event(guest.events, "guest", "panic", timeout=120)
    assert props == {"event": "panic"}
    guest.expect("Kernel panic - not syncing: sysrq triggered crash", timeout=30)


def test_the_whole_life_of_a_vm_in_cloud_hypervisor_s_events(vmsh_guest, vmsh_image, tmp_path: Path) -> None:
    """Boot, pause, resume, snapshot, a restore of that snapshot, a guest reboot and a guest
    poweroff: every record and its place, as cloud-hypervisor v40 writes them."""
    api, events = tmp_path / "api.sock", tmp_path / "events.json"
    devices = ["__console", "__rng", "_disk0"]  # by id (see by_id)
    guest = vmsh_guest("--rng", "src=/dev/urandom", "--disk", f"path={vmsh_image('raw-disk')},readonly=on",
                       "--api-socket", f"path={api}", "--event-monitor", f"path={events}",
                       console=f"file={tmp_path / 'hvc0.log'}")
    # The drivers have started their devices before /init prints its ready marker.
    boot = events_of(events)
    assert boot[:3] == [("vmm", "starting", {}), *vm("booting", "booted")]
    # booted comes as soon as the vCPUs run, long before the guest's drivers start the devices
    assert by_id(boot[3:]) == activated(devices)

    (tmp_path / "snap").mkdir()
    with ApiClient(str(api)) as client:
        client.put("vm.pause")
        client.put("vm.resume")
        client.put("vm.pause")
        client.put("vm.snapshot", {"destination_url": f"file://{tmp_path / 'snap'}"})
        client.put("vm.resume")
    assert events_of(events)[len(boot):] == vm("pausing", "paused", "resuming", "resumed", "pausing", "paused",
                                                "snapshotting", "snapshotted", "resuming", "resumed")

    # A restore brings the running devices back (activated) before it says restoring.
    clone_events = tmp_path / "clone-events.json"
    clone = restore_guest(tmp_path / "snap", tmp_path / "clone",
                          extra_flags=["--event-monitor", f"path={clone_events}"], timeout=120)
    try:
        restored = events_of(clone_events)
        assert restored[0] == ("vmm", "starting", {})
        # the devices in the order they are created (console, disks, rng), as cloud-hypervisor's
        assert restored[1:] == [*activated(["__console", "_disk0", "__rng"]),
                                *vm("restoring", "restored", "resuming", "resumed")]
    finally:
        clone.close()

    # A guest reboot: Linux's device_shutdown resets every virtio device (virtio_dev_shutdown),
    # then the VMM rebuilds the VM (no booting/booted) and the new guest starts the devices.
    mark = len(events_of(events))
    guest.send("reboot -f\n")
    guest.wait_ready()
    rebooted = wait_for_events(events, mark + 2 * len(devices) + 2, "the reboot's events")[mark:]
    assert by_id(rebooted[:len(devices)]) == resets(devices)
    assert rebooted[len(devices):len(devices) + 2] == vm("rebooting", "rebooted")
    assert by_id(rebooted[len(devices) + 2:]) == activated(devices)

    # A guest poweroff: the resets, then what cloud-hypervisor's exit event does (vmm_shutdown ->
    # vm_delete -> vm_shutdown): vm shutdown, vm deleted, vmm shutdown.
    mark = len(events_of(events))
    guest.send("poweroff -f\n")
    assert guest.wait_exit(timeout=120) == 0
    end = events_of(events)[mark:]
    assert by_id(end[:len(devices)]) == resets(devices)
    assert end[len(devices):] == [*vm("shutdown", "deleted"), ("vmm", "shutdown", {})]


def test_api_shutdown_then_vmm_shutdown(clone) -> None:
    """``vm.shutdown`` stops the VM without the guest's part (no virtio resets) and says only
    ``vm shutdown``; ``vmm.shutdown`` then deletes the config and ends the VMM (cloud-hypervisor's
    ``vm_shutdown``, ``vm_delete``, ``vmm_shutdown``)."""
    guest = clone()
    mark = len(events_of(guest.events))
    with ApiClient(guest.api) as api:
        api.put("vm.shutdown")
        assert api.get("vm.info")["state"] == "Created"
        assert events_of(guest.events)[mark:] == vm("shutdown")
        api.put("vmm.shutdown")
    assert guest.wait_exit(timeout=60) == 0
    assert events_of(guest.events)[mark:] == [*vm("shutdown", "deleted"), ("vmm", "shutdown", {})]
