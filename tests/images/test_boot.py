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
