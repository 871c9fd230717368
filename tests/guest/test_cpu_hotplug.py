"""CPU hotplug in a real guest (the default kernel has CONFIG_HOTPLUG_CPU and
CONFIG_ACPI_HOTPLUG_CPU): ``vm.resize desired_vcpus`` takes a guest booted with ``--cpus
boot=1,max=4`` to 4 vCPUs, which its ACPI processor driver adds (and the test onlines, as
cloud-hypervisor's integration tests do: there is no udev in the initramfs), then to 2, which
the guest offlines and ejects by itself; a snapshot of it restores with 2 vCPUs; bad requests
are refused with cloud-hypervisor's statuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsh.api.client import ApiClient, ApiError
from vmsh.harness import restore_guest, wait_until

CPUS = "boot=1,max=4"


@pytest.fixture
def guest(vmsh_guest, vmsh_snapshots, tmp_path: Path):
    snap = vmsh_snapshots.get(vmsh_guest.flags("--cpus", CPUS))
    api = tmp_path / "api.sock"
    clone = restore_guest(snap, tmp_path / "clone", extra_flags=["--api-socket", str(api)])
    clone.api = str(api)
    yield clone
    clone.close()


def cpus(guest, what: str) -> str:
    return guest.check_output(f"cat /sys/devices/system/cpu/{what}")


def online_all(guest) -> None:
    guest.check_output("for c in /sys/devices/system/cpu/cpu[1-9]*; do "
                       "[ -f $c/online ] && [ $(cat $c/online) = 0 ] && echo 1 > $c/online; done; true")


def test_resize_1_4_2_and_restore(guest, tmp_path: Path) -> None:
    assert cpus(guest, "present") == "0"
    with ApiClient(guest.api) as api:
        api.put("vm.resize", {"desired_vcpus": 4})
        assert api.get("vm.info")["config"]["cpus"]["boot_vcpus"] == 4
        wait_until(lambda: cpus(guest, "present") == "0-3", 60, "the guest to add vCPUs 1-3")
        online_all(guest)
        assert cpus(guest, "online") == "0-3"
        assert guest.check_output("grep -c ^processor /proc/cpuinfo") == "4"
        # each new CPU runs work: the scheduler uses it
        assert guest.check_output("taskset -c 3 cat /proc/self/stat | cut -d' ' -f39") == "3"

        api.put("vm.resize", {"desired_vcpus": 2})
        assert api.get("vm.info")["config"]["cpus"]["boot_vcpus"] == 2
        wait_until(lambda: cpus(guest, "present") == "0-1", 60, "the guest to eject vCPUs 2-3")
        assert cpus(guest, "online") == "0-1"

        def ejected() -> bool:
            # the guest writes the eject bit after it has let the CPUs go: until the VMM has
            # parked both, a resize is answered 429 (the same count is then no change: 204)
            try:
                api.put("vm.resize", {"desired_vcpus": 2})
            except ApiError as err:
                assert err.status == 429, err
                return False
            return True

        wait_until(ejected, 60, "the VMM to see vCPUs 2-3 ejected")

        # bad requests: beyond max and below 1 are errors (500), nothing changes
        for desired in (5, 0):
            with pytest.raises(ApiError) as info:
                api.put("vm.resize", {"desired_vcpus": desired})
            assert info.value.status == 500
        assert api.get("vm.info")["config"]["cpus"]["boot_vcpus"] == 2

        snap = tmp_path / "resized"
        snap.mkdir()
        api.put("vm.pause")
        api.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    guest.close()
    api2 = tmp_path / "api2.sock"
    clone = restore_guest(snap, tmp_path / "clone2", extra_flags=["--api-socket", str(api2)])
    try:
        assert cpus(clone, "online") == "0-1" and cpus(clone, "present") == "0-1"
        assert clone.check_output("taskset -c 1 cat /proc/self/stat | cut -d' ' -f39") == "1"
        with ApiClient(str(api2)) as api:
            assert api.get("vm.info")["config"]["cpus"]["boot_vcpus"] == 2
            api.put("vm.resize", {"desired_vcpus": 3})  # the restored VM still grows
            wait_until(lambda: cpus(clone, "present") == "0-2", 60, "the restored guest to add vCPU 2")
    finally:
        clone.close()
