"""Memory hotplug in a real guest (the ``kernel-full`` flavour has CONFIG_MEMORY_HOTPLUG,
CONFIG_ACPI_HOTPLUG_MEMORY with CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE, and CONFIG_VIRTIO_MEM):

- ``hotplug_method=acpi``: ``vm.resize desired_ram`` adds a memory device the guest's
  ``acpi_memhotplug`` driver onlines, and MemTotal grows by it;
- ``hotplug_method=virtio-mem``: the guest's virtio-mem driver plugs blocks up to the requested
  size and unplugs them when it shrinks, and MemTotal follows;
- each resized guest is snapshotted and restored with the same RAM, and bad requests get
  cloud-hypervisor's errors (HTTP 500, nothing changed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient, ApiError
from vmsh.harness import restore_guest, wait_until
from vmsh.harness.requirements import unavailable

#: the kernel flavour with memory hotplug and virtio-mem, and its config
KERNEL, KERNEL_CONFIG = "kernel-full", "kernel-full-config"
MIB, GIB = 1 << 20, 1 << 30


def full_kernel(vmsh_image) -> str:
    """The kernel image with memory hotplug and virtio-mem, or a loud skip naming the options."""
    try:
        config = Path(vmsh_image(KERNEL_CONFIG)).read_text().splitlines()
    except (pytest.skip.Exception, pytest.fail.Exception) as err:  # an unknown or unbuilt image
        unavailable(f"a guest kernel with memory hotplug ({KERNEL}, issue #19) is not available: {err}")
    for option in ("CONFIG_ACPI_HOTPLUG_MEMORY=y", "CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE=y", "CONFIG_VIRTIO_MEM=y"):
        if option not in config:
            unavailable(f"the guest kernel {KERNEL} lacks {option}")
    vmsh_image(KERNEL)
    return KERNEL


def boot(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path: Path, memory: str, name: str, *flags: str):
    """A clone of a booted full-kernel guest with ``--memory memory``, with an API socket."""
    snap = vmsh_snapshots.get(vmsh_guest.flags("--memory", memory, *flags, kernel=full_kernel(vmsh_image)))
    api = tmp_path / f"{name}.sock"
    guest = restore_guest(snap, tmp_path / name, extra_flags=["--api-socket", str(api)])
    guest.api = str(api)
    return guest


def mem_total_kib(guest) -> int:
    return int(guest.check_output("grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2"))


def blocks_online(guest, *blocks: int) -> str:
    """The state of the guest's memory blocks ``blocks`` (``/sys/devices/system/memory``)."""
    paths = " ".join(f"/sys/devices/system/memory/memory{b}/state" for b in blocks)
    return guest.check_output(f"cat {paths} | tr '\\n' ' '").strip()


def refused(api: ApiClient, endpoint: str, body: dict) -> str:
    with pytest.raises(ApiError) as info:
        api.put(endpoint, body)
    assert info.value.status == 500, info.value
    return str(info.value)


def snapshot_and_restore(guest, api: ApiClient, tmp_path: Path, name: str):
    snap = tmp_path / name
    snap.mkdir()
    api.put("vm.pause")
    api.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    guest.close()
    sock = tmp_path / f"{name}.sock"
    clone = restore_guest(snap, tmp_path / f"{name}-clone", extra_flags=["--api-socket", str(sock)])
    clone.api = str(sock)
    return clone, snap


def test_acpi_grows_and_restores(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path: Path) -> None:
    guest = boot(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path, "size=512M,hotplug_size=1G", "acpi")
    try:
        before = mem_total_kib(guest)
        with ApiClient(guest.api) as api:
            assert api.get("vm.info")["memory_actual_size"] == 512 * MIB
            api.put("vm.resize", {"desired_ram": 768 * MIB})
            info = api.get("vm.info")
            # cloud-hypervisor v40: the configured size becomes the new total
            assert info["config"]["memory"]["size"] == 768 * MIB
            assert info["memory_actual_size"] == 768 * MIB
            wait_until(lambda: mem_total_kib(guest) - before == 256 * 1024, 120,
                       "the guest to online the hot-added 256 MiB")
            assert guest.check_output("cat /sys/bus/acpi/devices/PNP0C80:00/status") == "15"
            # the new RAM is the two 128 MiB memory blocks at 4 GiB, both online
            assert blocks_online(guest, 32, 33) == "online online"
            # bad requests: not a multiple of 128 MiB, shrinking ACPI RAM, beyond hotplug_size
            assert "not a valid size" in refused(api, "vm.resize", {"desired_ram": 800 * MIB})
            assert "cannot be removed" in refused(api, "vm.resize", {"desired_ram": 640 * MIB})
            assert "Not enough space" in refused(api, "vm.resize", {"desired_ram": 2048 * MIB})
            assert api.get("vm.info")["memory_actual_size"] == 768 * MIB
            guest, snap = snapshot_and_restore(guest, api, tmp_path, "acpi-snap")
        assert (snap / "memory-ranges").stat().st_size == 768 * MIB
        assert mem_total_kib(guest) == before + 256 * 1024
        assert blocks_online(guest, 32, 33) == "online online"
        with ApiClient(guest.api) as api:
            assert api.get("vm.info")["memory_actual_size"] == 768 * MIB
        # the restored VM still grows, here through ch-remote's front-end
        remote(guest, "resize", "--memory", "1G")
        wait_until(lambda: mem_total_kib(guest) - before == 512 * 1024, 120,
                   "the restored guest to online 256 MiB more")
        assert blocks_online(guest, 34, 35) == "online online"
    finally:
        guest.close()


def test_zone_virtio_mem_from_boot(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path: Path) -> None:
    """A memory zone's virtio-mem device, 128 MiB plugged from boot, resized with resize-zone."""
    guest = boot(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path, "size=0,hotplug_method=virtio-mem", "zone",
                 "--memory-zone", "id=z0,size=512M,hotplug_size=256M,hotplugged_size=128M")
    try:
        with ApiClient(guest.api) as api:
            wait_until(lambda: api.get("vm.info")["memory_actual_size"] == 640 * MIB, 120,
                       "the guest to plug the 128 MiB asked for at boot")
        before = mem_total_kib(guest)
        remote(guest, "resize-zone", "--id", "z0", "--size", "768M")
        wait_until(lambda: mem_total_kib(guest) - before == 128 * 1024, 120, "the guest to plug 128 MiB more")
        with ApiClient(guest.api) as api:
            assert api.get("vm.info")["config"]["memory"]["zones"][0]["hotplugged_size"] == 256 * MIB
            assert "unknown memory zone z9" in refused(api, "vm.resize-zone", {"id": "z9", "desired_ram": GIB})
            assert "user defined memory regions" in refused(api, "vm.resize", {"desired_ram": GIB})
            assert "bigger than region_size" in refused(api, "vm.resize-zone", {"id": "z0", "desired_ram": GIB})
    finally:
        guest.close()


def remote(guest, *args: str) -> None:
    """``vmsh remote`` (ch-remote's command line) against the guest's API socket."""
    subprocess.run([sys.executable, "-m", "vmsh", "remote", "--api-socket", guest.api, *args], check=True,
                   capture_output=True, timeout=60)


def test_virtio_mem_grows_shrinks_and_restores(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path: Path) -> None:
    guest = boot(vmsh_guest, vmsh_image, vmsh_snapshots, tmp_path,
                 "size=512M,hotplug_method=virtio-mem,hotplug_size=512M", "vmem")
    try:
        before = mem_total_kib(guest)
        with ApiClient(guest.api) as api:
            assert api.get("vm.info")["memory_actual_size"] == 512 * MIB
            api.put("vm.resize", {"desired_ram": 768 * MIB})
            assert api.get("vm.info")["config"]["memory"]["hotplugged_size"] == 256 * MIB
            wait_until(lambda: mem_total_kib(guest) - before == 256 * 1024, 120,
                       "the guest to plug 256 MiB through virtio-mem")
            wait_until(lambda: api.get("vm.info")["memory_actual_size"] == 768 * MIB, 30,
                       "the device to count the plugged blocks")
            api.put("vm.resize", {"desired_ram": 640 * MIB})
            wait_until(lambda: mem_total_kib(guest) - before == 128 * 1024, 120,
                       "the guest to unplug 128 MiB")
            wait_until(lambda: api.get("vm.info")["memory_actual_size"] == 640 * MIB, 30,
                       "the device to count the unplugged blocks")
            # bad requests: not whole 2 MiB blocks, beyond hotplug_size, below the boot RAM, the same size
            assert "not aligned on block_size" in refused(api, "vm.resize", {"desired_ram": 641 * MIB})
            assert "bigger than region_size" in refused(api, "vm.resize", {"desired_ram": 1536 * MIB})
            assert "less than the boot RAM" in refused(api, "vm.resize", {"desired_ram": 256 * MIB})
            assert "identical" in refused(api, "vm.resize", {"desired_ram": 640 * MIB})
            assert "no memory zone" in refused(api, "vm.resize-zone", {"id": "mem0", "desired_ram": GIB})
            assert api.get("vm.info")["config"]["memory"]["hotplugged_size"] == 128 * MIB
            guest, snap = snapshot_and_restore(guest, api, tmp_path, "vmem-snap")
        memory_file = (snap / "memory-ranges").stat()
        assert memory_file.st_size == GIB  # boot RAM and the whole region, the unplugged part a hole
        assert memory_file.st_blocks * 512 <= GIB - 384 * MIB
        assert mem_total_kib(guest) == before + 128 * 1024
        with ApiClient(guest.api) as api:
            assert api.get("vm.info")["memory_actual_size"] == 640 * MIB
            api.put("vm.resize", {"desired_ram": 896 * MIB})  # the restored device still plugs
            wait_until(lambda: mem_total_kib(guest) - before == 384 * 1024, 120,
                       "the restored guest to plug 256 MiB more")
    finally:
        guest.close()
