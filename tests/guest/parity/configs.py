"""The parity configurations: each written once as launcher flags and once as a JSON VmConfig.

The two forms are written independently, by hand, the way a user would write them; neither
is generated from the other, so a difference in how the config layer reads them shows up
as a different machine.

Placeholders, replaced in every string by :func:`render`: ``{kernel}`` (the case's kernel
image), ``{initramfs}``, ``{tmp}`` (a directory holding ``disk0.img`` (8 MiB),
``disk1.img`` (16 MiB), ``pmem.img`` (4 MiB) and room for sockets and logs) and ``{n}``
(the xdist worker's number, for subnets).

What every case shares is also written in both forms (:data:`BASE_FLAGS` / :data:`BASE_JSON`
and :data:`DEFAULT_FLAGS` / :data:`DEFAULT_JSON`, the latter applied unless the case sets that
option itself): the payload, ``console=ttyS0`` on the command line, the serial port on the
VMM's terminal and no virtio console, which is what the harness drives.

Net devices always fix their MAC: without one, each build draws a random MAC.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

DISK0_SIZE = 8 << 20
DISK1_SIZE = 16 << 20
PMEM_SIZE = 4 << 20
CMDLINE = "console=ttyS0 quiet"
UUID = "4f1c2a3b-5d6e-4f70-8a9b-0c1d2e3f4a5b"

BASE_FLAGS = ("--kernel", "{kernel}", "--initramfs", "{initramfs}")
BASE_JSON: dict[str, Any] = {"payload": {"kernel": "{kernel}", "initramfs": "{initramfs}"}}
#: option -> its flags, used unless the case gives that option
DEFAULT_FLAGS = {"--cmdline": ("--cmdline", CMDLINE), "--serial": ("--serial", "tty"), "--console": ("--console", "off")}
#: JSON path -> value, used unless the case sets it
DEFAULT_JSON: dict[tuple[str, ...], Any] = {
    ("payload", "cmdline"): CMDLINE,
    ("serial",): {"mode": "Tty"},
    ("console",): {"mode": "Off"},
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    flags: tuple[str, ...]
    json: dict[str, Any]
    #: the guest image: "vmlinux" (ELF, PVH entry) or "kernel" (bzImage)
    kernel: str = "vmlinux"
    #: booted in the guest-parity test by default (the rest with --vmsh-parity-all)
    boot: bool = False
    #: can be booted and probed by the harness (needs the serial console on the terminal)
    bootable: bool = True


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _substitute(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, text in subs.items():
            value = value.replace("{" + key + "}", text)
        return value
    if isinstance(value, list):
        return [_substitute(v, subs) for v in value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, subs) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, subs) for k, v in value.items()}
    return value


def full_flags(case: Case) -> list[str]:
    flags = list(BASE_FLAGS) + list(case.flags)
    for option, default in DEFAULT_FLAGS.items():
        if option not in case.flags:
            flags += default
    return flags


def full_json(case: Case) -> dict[str, Any]:
    cfg = _deep_merge(BASE_JSON, case.json)
    for path, default in DEFAULT_JSON.items():
        node = cfg
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], copy.deepcopy(default))
    return cfg


def render(case: Case, subs: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """The case's complete launcher flags and JSON VmConfig with the placeholders filled in."""
    return _substitute(full_flags(case), subs), _substitute(full_json(case), subs)


def C(name: str, flags: list[str] | tuple[str, ...], json: dict[str, Any], **kw: Any) -> Case:
    return Case(name, tuple(flags), json, **kw)


CASES: tuple[Case, ...] = (
    # --- payload and kernel formats -------------------------------------------------------------
    C("default-pvh", [], {}),
    C("default-bzimage", [], {}, kernel="kernel"),
    C("cmdline", ["--cmdline", "console=ttyS0 quiet vmsh.parity=1 panic=-1 foo=a,b"],
      {"payload": {"cmdline": "console=ttyS0 quiet vmsh.parity=1 panic=-1 foo=a,b"}}),
    C("cmdline-bzimage", ["--cmdline", "console=ttyS0 quiet loglevel=4 vmsh.route=both"],
      {"payload": {"cmdline": "console=ttyS0 quiet loglevel=4 vmsh.route=both"}}, kernel="kernel"),
    # --- cpus -----------------------------------------------------------------------------------
    C("cpus-boot2", ["--cpus", "boot=2"], {"cpus": {"boot_vcpus": 2, "max_vcpus": 2}}),
    C("cpus-boot2-max4", ["--cpus", "boot=2,max=4"], {"cpus": {"boot_vcpus": 2, "max_vcpus": 4}}),
    C("cpus-topology-1-2-1-2", ["--cpus", "boot=4,topology=1:2:1:2"],
      {"cpus": {"boot_vcpus": 4, "max_vcpus": 4,
                "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 2}}}),
    C("cpus-topology-smt", ["--cpus", "boot=2,topology=2:1:1:1"],
      {"cpus": {"boot_vcpus": 2, "max_vcpus": 2,
                "topology": {"threads_per_core": 2, "cores_per_die": 1, "dies_per_package": 1, "packages": 1}}}),
    C("cpus-max-phys-bits-40", ["--cpus", "boot=1,max_phys_bits=40"],
      {"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "max_phys_bits": 40}}),
    C("cpus-boot3-phys-bits-39-bzimage", ["--cpus", "boot=3,max_phys_bits=39"],
      {"cpus": {"boot_vcpus": 3, "max_vcpus": 3, "max_phys_bits": 39}}, kernel="kernel"),
    # --- memory ---------------------------------------------------------------------------------
    C("memory-256M", ["--memory", "size=256M"], {"memory": {"size": 256 << 20}}),
    C("memory-1G", ["--memory", "size=1G"], {"memory": {"size": 1 << 30}}),
    C("memory-3584M-above-4G", ["--memory", "size=3584M"], {"memory": {"size": 3584 << 20}}),
    C("memory-zones", ["--memory", "size=0", "--memory-zone", "id=z0,size=256M", "id=z1,size=128M,shared=on"],
      {"memory": {"size": 0, "zones": [{"id": "z0", "size": 256 << 20},
                                        {"id": "z1", "size": 128 << 20, "shared": True}]}}),
    C("memory-shared-bzimage", ["--memory", "size=640M,shared=on"], {"memory": {"size": 640 << 20, "shared": True}},
      kernel="kernel"),
    # --- platform -------------------------------------------------------------------------------
    C("platform-serial-uuid", ["--platform", f"serial_number=VMSH-PARITY-1,uuid={UUID}"],
      {"platform": {"serial_number": "VMSH-PARITY-1", "uuid": UUID}}),
    C("platform-oem-strings", ["--platform", "oem_strings=[vmsh,parity test,io.systemd.credential:x=y]"],
      {"platform": {"oem_strings": ["vmsh", "parity test", "io.systemd.credential:x=y"]}}),
    C("platform-segments-2", ["--platform", "num_pci_segments=2",
                              "--disk", "path={tmp}/disk0.img,pci_segment=1"],
      {"platform": {"num_pci_segments": 2}, "disks": [{"path": "{tmp}/disk0.img", "pci_segment": 1}]}),
    C("platform-segments-3-system-aliases", ["--platform", f"num_pci_segments=3,system_serial_number=S3,system_uuid={UUID}"],
      {"platform": {"num_pci_segments": 3, "serial_number": "S3", "uuid": UUID}}),
    # --- serial and console -----------------------------------------------------------------------
    C("serial-off", ["--serial", "off", "--cmdline", "quiet"], {"serial": {"mode": "Off"}, "payload": {"cmdline": "quiet"}},
      bootable=False),
    C("serial-null", ["--serial", "null"], {"serial": {"mode": "Null"}}, bootable=False),
    C("serial-file", ["--serial", "file={tmp}/serial.log"], {"serial": {"mode": "File", "file": "{tmp}/serial.log"}},
      bootable=False),
    C("serial-pty", ["--serial", "pty"], {"serial": {"mode": "Pty"}}, bootable=False),
    C("serial-socket", ["--serial", "socket={tmp}/serial.sock"],
      {"serial": {"mode": "Socket", "socket": "{tmp}/serial.sock"}}, bootable=False),
    C("console-tty", ["--console", "tty"], {"console": {"mode": "Tty"}}, bootable=False),
    C("console-pty", ["--console", "pty"], {"console": {"mode": "Pty"}}),
    C("console-file", ["--console", "file={tmp}/console.log"], {"console": {"mode": "File", "file": "{tmp}/console.log"}}),
    C("console-null", ["--console", "null"], {"console": {"mode": "Null"}}),
    # --- disks ----------------------------------------------------------------------------------
    C("disk-readonly", ["--disk", "path={tmp}/disk0.img,readonly=on"],
      {"disks": [{"path": "{tmp}/disk0.img", "readonly": True}]}),
    C("disk-serial-queues", ["--cpus", "boot=2", "--disk", "path={tmp}/disk1.img,serial=PARITY-SER-01,num_queues=2,queue_size=64"],
      {"cpus": {"boot_vcpus": 2, "max_vcpus": 2},
       "disks": [{"path": "{tmp}/disk1.img", "serial": "PARITY-SER-01", "num_queues": 2, "queue_size": 64}]}),
    C("disks-two-bzimage",
      ["--disk", "path={tmp}/disk0.img,readonly=on,serial=RO0", "path={tmp}/disk1.img,id=data,queue_size=256",
       "--cmdline", "console=ttyS0 quiet vmsh.disks=2"],
      {"disks": [{"path": "{tmp}/disk0.img", "readonly": True, "serial": "RO0"},
                 {"path": "{tmp}/disk1.img", "id": "data", "queue_size": 256}],
       "payload": {"cmdline": "console=ttyS0 quiet vmsh.disks=2"}},
      kernel="kernel", boot=True),
    # --- nets -----------------------------------------------------------------------------------
    C("net-mac-mtu", ["--net", "mac=52:54:00:12:34:56,mtu=1400"],
      {"net": [{"mac": "52:54:00:12:34:56", "mtu": 1400}]}),
    C("net-queues-4", ["--cpus", "boot=2", "--net", "mac=52:54:00:12:34:57,num_queues=4,queue_size=128"],
      {"cpus": {"boot_vcpus": 2, "max_vcpus": 2},
       "net": [{"mac": "52:54:00:12:34:57", "num_queues": 4, "queue_size": 128}]}),
    C("net-two-host-ip", ["--net", "mac=52:54:00:12:34:58,ip=10.79.{n}.1,mask=255.255.255.0",
                          "mac=52:54:00:12:34:59,id=net9,mtu=9000"],
      {"net": [{"mac": "52:54:00:12:34:58", "ip": "10.79.{n}.1", "mask": "255.255.255.0"},
               {"mac": "52:54:00:12:34:59", "id": "net9", "mtu": 9000}]}),
    # --- other devices --------------------------------------------------------------------------
    C("rng-dev-random", ["--rng", "src=/dev/random"], {"rng": {"src": "/dev/random"}}),
    C("balloon", ["--balloon", "size=64M,deflate_on_oom=on,free_page_reporting=on"],
      {"balloon": {"size": 64 << 20, "deflate_on_oom": True, "free_page_reporting": True}}),
    C("pmem", ["--pmem", "file={tmp}/pmem.img"], {"pmem": [{"file": "{tmp}/pmem.img"}]}),
    C("pmem-discard-writes", ["--pmem", "file={tmp}/pmem.img,size=4M,discard_writes=on,id=pm"],
      {"pmem": [{"file": "{tmp}/pmem.img", "size": PMEM_SIZE, "discard_writes": True, "id": "pm"}]}),
    C("vsock", ["--vsock", "cid=5,socket={tmp}/vsock.sock"], {"vsock": {"cid": 5, "socket": "{tmp}/vsock.sock"}}),
    C("pvpanic", ["--pvpanic"], {"pvpanic": True}),
    C("watchdog", ["--watchdog"], {"watchdog": True}),
    # --- everything at once ---------------------------------------------------------------------
    C("kitchen-sink",
      ["--cpus", "boot=2", "--memory", "size=768M",
       "--platform", f"serial_number=VMSH-SINK,uuid={UUID},oem_strings=[sink,parity]",
       "--cmdline", "console=ttyS0 quiet vmsh.case=kitchen-sink",
       "--disk", "path={tmp}/disk0.img,readonly=on,serial=SINK-RO", "path={tmp}/disk1.img,num_queues=2",
       "--net", "mac=52:54:00:aa:00:01,mtu=1500,num_queues=4",
       "--rng", "src=/dev/urandom",
       "--balloon", "size=32M",
       "--pmem", "file={tmp}/pmem.img",
       "--vsock", "cid=7,socket={tmp}/vsock.sock",
       "--pvpanic"],
      {"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 768 << 20},
       "platform": {"serial_number": "VMSH-SINK", "uuid": UUID, "oem_strings": ["sink", "parity"]},
       "payload": {"cmdline": "console=ttyS0 quiet vmsh.case=kitchen-sink"},
       "disks": [{"path": "{tmp}/disk0.img", "readonly": True, "serial": "SINK-RO"},
                 {"path": "{tmp}/disk1.img", "num_queues": 2}],
       "net": [{"mac": "52:54:00:aa:00:01", "mtu": 1500, "num_queues": 4}],
       "rng": {"src": "/dev/urandom"},
       "balloon": {"size": 32 << 20},
       "pmem": [{"file": "{tmp}/pmem.img"}],
       "vsock": {"cid": 7, "socket": "{tmp}/vsock.sock"},
       "pvpanic": True},
      boot=True),
)

CASES_BY_NAME = {case.name: case for case in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"
