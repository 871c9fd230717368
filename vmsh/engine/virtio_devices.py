"""The virtio devices a VmConfig asks for, created and plugged into the ``DeviceManager``.

One function per kind, in cloud-hypervisor's creation order (disks, nets, rng), so slots
come out as its do. Every host resource (image file, tap, entropy source) is opened here,
and a failure names the option and the device id.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vmsh.config import model as m
from vmsh.devices.backends.tap import Tap, parse_mac
from vmsh.devices.virtio.block import VirtioBlock
from vmsh.devices.virtio.net import VirtioNet, format_mac
from vmsh.devices.virtio.rng import VirtioRng
from vmsh.engine.device_manager import DeviceManager
from vmsh.errors import DeviceError, VmshError

LOG = logging.getLogger(__name__)

RNG_ID = "__rng"


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (what cloud-hypervisor picks when none is set)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


def add_config_devices(manager: DeviceManager, cfg: m.VmConfig) -> None:
    """Create and plug every virtio device of ``cfg``."""
    for disk in cfg.disks or []:
        _add(manager, disk.id, "--disk", lambda d=disk: _block(d), segment=disk.pci_segment,
             bar64=disk.pci_segment != 0)
    for net in cfg.net or []:
        _add(manager, net.id, "--net", lambda n=net: _net(manager, n), segment=net.pci_segment)
    if cfg.rng is not None:
        _add(manager, RNG_ID, "--rng", lambda: VirtioRng(cfg.rng.src))


def _add(manager: DeviceManager, dev_id: str | None, option: str, make: Any, *, segment: int = 0,
         bar64: bool = True) -> None:
    assert dev_id is not None, "normalize() names every device"
    try:
        device = make()
    except (DeviceError, OSError, ValueError) as err:
        raise VmshError(f"{option}: cannot create {dev_id}") from err
    try:
        manager.add_virtio(dev_id, device, segment=segment, bar64=bar64)
    except BaseException:
        device.close()
        raise


def _block(disk: m.DiskConfig) -> VirtioBlock:
    if disk.path is None:
        raise DeviceError("a disk needs path=")
    return VirtioBlock(disk.path, readonly=disk.readonly, direct=disk.direct, num_queues=disk.num_queues,
                       queue_size=disk.queue_size, serial=disk.serial)


def _net(manager: DeviceManager, net: m.NetConfig) -> VirtioNet:
    pairs = max(1, net.num_queues // 2)
    if net.fds:
        tap = Tap(f"fd{net.fds[0]}", list(net.fds))
    else:
        tap = Tap.open(net.tap, pairs)
        try:
            tap.configure(ip=net.ip, mask=net.mask, mtu=net.mtu, mac=net.host_mac)
        except DeviceError:
            tap.close()
            raise
    if not net.mac:
        # Written back into the config, as cloud-hypervisor does: vm.info shows it and a
        # snapshot's config.json brings the same MAC back on restore.
        net.mac = format_mac(random_mac())
    mac = parse_mac(net.mac)
    return VirtioNet(tap, mac, manager.loop, queue_size=net.queue_size, mtu=net.mtu,
                     offload_csum=net.offload_csum, offload_tso=net.offload_tso, offload_ufo=net.offload_ufo)
