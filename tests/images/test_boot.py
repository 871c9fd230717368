"""Each kernel boots to /init's ready marker under QEMU TCG, runs commands, powers off.

This checks the images without vmsh. ELF vmlinux kernels boot through their PVH note
on ``-M microvm``; bzImages through SeaBIOS on ``-M pc``. Timeouts are generous
(TCG on 2 busy cores under pytest-xdist), each boot is normally a few seconds.
"""

from __future__ import annotations

import pytest

from vmsh.images.qemu import BootSpec, QemuGuest

pytestmark = pytest.mark.images

BOOTS = [
    pytest.param("vmlinux", "initramfs", "microvm", id="default-pvh-microvm"),
    pytest.param("kernel", "initramfs", "pc", id="default-bzimage-pc"),
    pytest.param("vmlinux-full", "initramfs", "microvm", id="full-pvh-microvm"),
    pytest.param("debian-vmlinux", "debian-initramfs", "microvm", id="debian-pvh-microvm"),
    pytest.param("debian-kernel", "debian-initramfs", "pc", id="debian-bzimage-pc"),
]

READY_TIMEOUT = 90


@pytest.mark.parametrize(("kernel", "initrd", "machine"), BOOTS)
def test_boots_to_ready_marker_and_powers_off(image, kernel, initrd, machine):
    spec = BootSpec(image(kernel), image(initrd), machine=machine,
                    cmdline="console=ttyS0 quiet")
    with QemuGuest(spec) as guest:
        guest.wait_ready(READY_TIMEOUT)
        assert guest.run("echo $((40 + 2))") == "42"
        # /proc/cmdline is exactly what the VMM passed: the default kernel's built-in
        # line (CONFIG_CMDLINE_HIDDEN) takes effect without showing up here
        assert guest.run("cat /proc/cmdline") == spec.full_cmdline()
        assert guest.run("hostname") == "vmsh-guest"
        assert guest.run("tty") == "/dev/ttyS0"
        # job control: the shell has a controlling terminal
        assert "sleep" in guest.run("sleep 30 & jobs; kill %1")
        # applets run by name although the image links only a few of them
        assert guest.run("echo abc | sed s/b/B/ | awk '{print $1}' | tr a A") == "ABc"
        assert "UP" in guest.run("ip -o link show lo")
        mounts = guest.run("cat /proc/mounts")
        for fs in ("proc /proc", "sysfs /sys", "devtmpfs /dev", "devpts /dev/pts", "tmpfs /tmp"):
            assert fs in mounts, fs
        if kernel.startswith("debian"):
            assert "virtio_pci" in guest.run("cat /proc/modules")
        else:
            assert guest.run("cat /proc/modules 2>&1 | head -1").startswith("cat:")
            # the built-in line took effect
            assert "Clearing CPUID bits" in guest.run("dmesg | grep -m1 Clearing")
        guest.send("poweroff\n")
        assert guest.wait_exit(60) == 0


def test_full_kernel_sees_two_numa_nodes_and_a_hotplug_slot(image):
    """The full flavour (guest-images/kernel/full.config) on a two-node ACPI machine with
    room for hot-added memory: both nodes with their CPU and memory, the SLIT distances,
    and nothing broken for a guest that uses none of it."""
    half = 128
    numa = []
    for node in (0, 1):
        numa += ["-object", f"memory-backend-ram,id=m{node},size={half}M",
                 "-numa", f"node,nodeid={node},cpus={node},memdev=m{node}"]
    numa += ["-numa", "dist,src=0,dst=1,val=20"]
    spec = BootSpec(image("kernel-full"), image("initramfs"), machine="pc",
                    cmdline="console=ttyS0 quiet", memory_mb=2 * half, cpus=2,
                    extra_args=["-m", f"{2 * half}M,slots=2,maxmem=1G", *numa])
    with QemuGuest(spec) as guest:
        guest.wait_ready(READY_TIMEOUT)
        assert guest.run("nproc") == "2"
        assert guest.run("ls -d /sys/devices/system/node/node*").split() == [
            "/sys/devices/system/node/node0", "/sys/devices/system/node/node1"]
        assert guest.run("cat /sys/devices/system/node/node1/cpulist") == "1"
        assert guest.run("cat /sys/devices/system/node/node0/distance") == "10 20"
        # each node has its RAM, less the kernel's early allocations; node 1 (the top of RAM
        # below 4 GiB) also gives 64 MiB to the swiotlb bounce buffer, which x86 sets up
        # because the SRAT's hotplug range reaches past 4 GiB
        for node in (0, 1):
            kib = int(guest.run(f"awk '/MemTotal:/ {{print $4}}' /sys/devices/system/node/node{node}/meminfo"))
            assert half * 1024 // 4 < kib <= half * 1024, (node, kib)
        # memory blocks are there to online and offline (CONFIG_MEMORY_HOTPLUG)
        assert guest.run("cat /sys/devices/system/memory/auto_online_blocks") == "online"
        # CPU hotplug: the second CPU goes offline and comes back
        guest.run("echo 0 > /sys/devices/system/cpu/cpu1/online")
        assert guest.run("cat /sys/devices/system/cpu/online") == "0"
        guest.run("echo 1 > /sys/devices/system/cpu/cpu1/online")
        assert guest.run("cat /sys/devices/system/cpu/online") == "0-1"
        guest.send("poweroff\n")
        assert guest.wait_exit(60) == 0
