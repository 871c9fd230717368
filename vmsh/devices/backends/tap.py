"""Host tap interfaces: the backend of virtio-net (``--net tap=,ip=,mask=,host_mac=,mtu=``).

A tap is opened through ``/dev/net/tun`` (linux Documentation/networking/tuntap.rst) with
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: every frame carries a virtio-net header in front,
so the guest's checksum and segmentation offloads pass through untouched
(``TUNSETOFFLOAD``, ``TUNSETVNETHDRSZ``). ``IFF_MULTI_QUEUE`` gives one fd per queue pair.
The host side's address, netmask, MTU and MAC are set with the classic ``SIOCSIF*``
ioctls, so no ``ip`` command is needed.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct

from vmsh.errors import DeviceError

LOG = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# linux/sockios.h, linux/if.h, linux/if_arp.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    """``struct ifreq``: the interface name, then a 24-byte union."""
    return name.encode().ljust(IFNAMSIZ, b"\0") + payload.ljust(24, b"\0")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("<H", socket.AF_INET) + b"\0\0" + socket.inet_aton(address)


def parse_mac(mac: str) -> bytes:
    """``12:34:56:78:9a:bc`` as 6 bytes."""
    return bytes(int(part, 16) for part in mac.split(":"))


class Tap:
    """One tap interface with one fd per queue pair."""

    def __init__(self, name: str, fds: list[int]) -> None:
        self.name = name
        self.fds = fds

    @classmethod
    def open(cls, name: str | None, queues: int = 1, *, vnet_hdr_size: int = 12) -> Tap:
        """Open (or create) tap ``name`` (``vmtap%d`` when None: the kernel picks the number).

        :raises DeviceError: when the tap cannot be opened or set up.
        """
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        wanted = name or "vmtap%d"
        if len(wanted.encode()) >= IFNAMSIZ:
            raise DeviceError(f"Tap name {wanted!r} is longer than {IFNAMSIZ - 1} bytes")
        fds: list[int] = []
        try:
            for _ in range(queues):
                fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                fds.append(fd)
                req = bytearray(_ifreq(wanted, struct.pack("<H", flags)))
                fcntl.ioctl(fd, TUNSETIFF, req)
                wanted = req[:IFNAMSIZ].rstrip(b"\0").decode()  # the real name for the next queues
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("<i", vnet_hdr_size))
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise DeviceError(f"Cannot open tap {name or 'vmtap%d'}: {err.strerror}") from err
        LOG.debug("tap %s open with %d queue(s)", wanted, queues)
        return cls(wanted, fds)

    def set_offload(self, flags: int) -> None:
        """``TUNSETOFFLOAD``: which offloads the host may hand to the guest (TUN_F_*)."""
        for fd in self.fds:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            except OSError as err:
                raise DeviceError(f"Tap {self.name}: offloads {flags:#x} refused") from err

    def configure(self, *, ip: str | None = None, mask: str | None = None, mtu: int | None = None,
                  mac: str | None = None) -> None:
        """Set the host side's address, netmask, MTU and MAC, and bring the link up."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                fd = sock.fileno()
                if mac is not None:
                    fcntl.ioctl(fd, SIOCSIFHWADDR, _ifreq(self.name, struct.pack("<H", ARPHRD_ETHER) + parse_mac(mac)))
                if mtu is not None:
                    fcntl.ioctl(fd, SIOCSIFMTU, _ifreq(self.name, struct.pack("<i", mtu)))
                if ip is not None:
                    fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(self.name, _sockaddr_in(ip)))
                if mask is not None:
                    ipaddress.IPv4Address(mask)
                    fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(self.name, _sockaddr_in(mask)))
                cur = fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(self.name))
                flags = struct.unpack_from("<H", cur, IFNAMSIZ)[0] | IFF_UP
                fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(self.name, struct.pack("<H", flags)))
        except (OSError, ValueError) as err:
            raise DeviceError(f"Cannot configure tap {self.name}: {err}") from err

    def close(self) -> None:
        """Close every queue's fd (a tap vmsh created goes away with its last fd)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
