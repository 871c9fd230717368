"""The tap backend: creation, host-side setup, and a frame through it (needs root and /dev/net/tun)."""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess

import pytest

from vmsh.devices.backends.tap import TUN_F_CSUM, Tap, parse_mac
from vmsh.errors import DeviceError
from vmsh.harness.waiting import wait_until

pytestmark = pytest.mark.skipif(
    not os.access("/dev/net/tun", os.R_OK | os.W_OK) or os.geteuid() != 0,
    reason="needs root and /dev/net/tun to create tap devices")

HOST_MAC = "12:34:56:78:9a:bc"
GUEST_MAC = "52:54:00:12:34:56"


def _subnet() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 200 + int(worker[2:] or 0) % 50


@pytest.fixture
def tap():
    t = Tap.open(None)
    yield t
    t.close()


def _arp_request(sender_ip: str, target_ip: str) -> bytes:
    eth = b"\xff" * 6 + parse_mac(GUEST_MAC) + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + parse_mac(GUEST_MAC) + bytes(map(int, sender_ip.split(".")))
    arp += b"\0" * 6 + bytes(map(int, target_ip.split(".")))
    return eth + arp


def test_host_side_is_configured(tap: Tap) -> None:
    net = _subnet()
    tap.configure(ip=f"10.{net}.0.1", mask="255.255.255.0", mtu=1400, mac=HOST_MAC)
    assert tap.name.startswith("vmtap")
    info = json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", tap.name],
                                     capture_output=True, text=True, check=True).stdout)[0]
    assert info["mtu"] == 1400
    assert info["address"] == HOST_MAC
    assert "UP" in info["flags"]
    assert [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"] == [(f"10.{net}.0.1", 24)]


def test_a_frame_goes_through_with_its_vnet_header(tap: Tap) -> None:
    net = _subnet()
    tap.configure(ip=f"10.{net}.1.1", mask="255.255.255.0", mac=HOST_MAC)
    tap.set_offload(TUN_F_CSUM)
    os.write(tap.fds[0], bytes(12) + _arp_request(f"10.{net}.1.2", f"10.{net}.1.1"))

    def arp_reply() -> bytes | None:
        if select.select([tap.fds[0]], [], [], 0.1)[0]:
            frame = os.read(tap.fds[0], 2048)[12:]  # after the vnet header
            if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                return frame
        return None  # nothing yet, or another frame (IPv6 router solicitations, ...)

    frame = wait_until(arp_reply, 10, "an ARP reply from the host side of the tap", interval=0)
    assert frame[:6] == parse_mac(GUEST_MAC)
    assert frame[22:28] == parse_mac(HOST_MAC)


def test_multi_queue_tap_has_one_fd_per_queue() -> None:
    t = Tap.open(None, queues=2)
    try:
        assert len(t.fds) == 2
    finally:
        t.close()


def test_bad_names_and_addresses_are_clear_errors(tap: Tap) -> None:
    with pytest.raises(DeviceError, match="longer than 15"):
        Tap.open("a-name-much-too-long")
    with pytest.raises(DeviceError, match=f"Cannot configure tap {tap.name}"):
        tap.configure(mask="255.0.255.300")
