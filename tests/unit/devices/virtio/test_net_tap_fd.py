"""virtio-net on a tap that the caller opened (``--net fd=N``): the device makes the fd
non-blocking and gives it its own 12-byte vnet header, whatever the caller left (needs root
and /dev/net/tun)."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest

from vmsh.devices.backends.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, Tap
from vmsh.devices.virtio.net import VNET_HDR_SIZE, VirtioNet

pytestmark = pytest.mark.skipif(
    not os.access("/dev/net/tun", os.R_OK | os.W_OK) or os.geteuid() != 0,
    reason="needs root and /dev/net/tun to create tap devices")

TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int), linux/if_tun.h


class NoWatcher:
    def add(self, fd: int, callback: object) -> None:
        pass

    def remove(self, fd: int) -> None:
        pass


def test_a_callers_blocking_tap_is_made_fit() -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR)  # blocking, as a shell or libvirt would open it
    flags = struct.pack("<H", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(fd, TUNSETIFF, b"vmtap%d".ljust(16, b"\0") + flags.ljust(24, b"\0"))

    def header_size() -> int:
        return struct.unpack("<i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0]

    assert os.get_blocking(fd) and header_size() == 10  # what the kernel gives a new tap
    net = VirtioNet(Tap("fd", [fd]), b"\x02\0\0\0\0\1", NoWatcher())
    try:
        assert not os.get_blocking(fd)
        assert header_size() == VNET_HDR_SIZE
    finally:
        net.close()  # closes fd
