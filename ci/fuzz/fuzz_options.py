"""Fuzz campaign: the launcher's option grammar, every flag of ``vmsh launch``.

Inputs are argument vectors: flags drawn from the launcher's flag table (long, ``--flag=value``
and short forms, unknown flags now and then), each with a value that is either a mutated seed
(a valid option string of that flag) or a fresh ``key=value,...`` list over the flag's own keys
(taken from its syntax text) with values from a pool of edge cases (huge, negative and hex
numbers, sizes, lists, quotes, empty values). Each vector goes the way ``vmsh launch`` and
``--dry-run`` take it: :func:`parse_argv`, :func:`vmm_options_from_args`,
:func:`vm_config_from_args`, :func:`normalize`, :func:`canonical_json`, and the canonical JSON
must read back with :func:`vm_config_from_json` (a valid config whose JSON is refused would be a
bug). Only :class:`vmsh.errors.ConfigError` (usage, parse and validation errors) may come out.

Usage: ``python3 ci/fuzz/fuzz_options.py --inputs 100000``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz import fuzzlib
from vmsh.config import canonical_json, normalize, vm_config_from_json
from vmsh.config.launcher_args import FLAGS, parse_argv, vm_config_from_args, vmm_options_from_args
from vmsh.errors import ConfigError

#: valid option strings per flag: the seeds the mutator starts from
SEEDS: dict[str, list[str]] = {
    "cpus": ["boot=2", "boot=2,max=4,topology=1:2:1:1,kvm_hyperv=on,max_phys_bits=40",
             "boot=2,affinity=[0@[0-1],1@[2]]", "boot=1,features=amx"],
    "platform": ["num_pci_segments=1", "serial_number=abc,uuid=1-2,oem_strings=[a,b]"],
    "memory": ["size=512M", "size=1G,shared=on,hugepages=off", "size=0,hotplug_method=virtio-mem,hotplug_size=1G",
               "size=256M,mergeable=on,prefault=on,thp=on"],
    "memory-zone": ["id=z0,size=256M", "id=z1,size=1G,host_numa_node=0,shared=on,hotplug_size=128M"],
    "firmware": ["/fw.bin"],
    "kernel": ["/vmlinux"],
    "initramfs": ["/initrd"],
    "cmdline": ["console=ttyS0 root=/dev/vda"],
    "rate-limit-group": ["id=g0,bw_size=1000,bw_refill_time=100"],
    "disk": ["path=/img", "path=/img,readonly=on,direct=on,num_queues=4,queue_size=128,id=d0",
             "path=/img,rate_limit_group=g0", "vhost_user=on,socket=/s", "path=/img,serial=abc,pci_segment=0"],
    "net": ["tap=t0", "tap=t0,mac=12:34:56:78:9a:bc,ip=10.0.0.1,mask=255.255.255.0,num_queues=2,queue_size=256",
            "fd=[3,4],mtu=1400", "vhost_user=on,socket=/s,vhost_mode=server"],
    "rng": ["src=/dev/urandom"],
    "balloon": ["size=0", "size=64M,deflate_on_oom=on,free_page_reporting=on"],
    "fs": ["tag=t,socket=/s", "tag=t,socket=/s,num_queues=1,queue_size=512,id=f0"],
    "pmem": ["file=/p", "file=/p,size=128M,discard_writes=on,id=p0"],
    "serial": ["null", "off", "tty", "pty", "file=/log", "socket=/s"],
    "console": ["tty", "off", "null", "file=/log", "pty"],
    "device": ["path=/sys/bus/pci/devices/0000:00:01.0/", "path=/d,iommu=off,id=v0"],
    "user-device": ["socket=/s,id=u0"],
    "vdpa": ["path=/dev/vhost-vdpa-0,num_queues=1"],
    "vsock": ["cid=3,socket=/s", "cid=4,socket=/s,id=vs0"],
    "numa": ["guest_numa_id=0,cpus=[0-1],distances=[1@20],memory_zones=[z0]"],
    "pci-segment": ["pci_segment=1,mmio32_aperture_weight=2"],
    "log-file": ["/log"],
    "api-socket": ["/api.sock", "path=/api.sock", "fd=3"],
    "event-monitor": ["path=/ev", "fd=4"],
    "restore": ["source_url=file:///snap", "source_url=file:///snap,prefault=on"],
    "seccomp": ["true", "false", "log"],
    "tpm": ["socket=/tpm"],
    "sgx-epc": ["id=e0,size=16M"],
    "debug-console": ["off,iobase=0xe9", "file=/log,iobase=0x3f8", "tty"],
    "gdb": ["path=/gdb"],
    "profile": ["path=/prof,hz=99"],
}

#: values that probe the converters' edges
VALUES = [
    "", "0", "1", "-1", "2", "4", "255", "256", "65535", "65536", "4294967295", "4294967296",
    "18446744073709551615", "18446744073709551616", "9" * 40, "0x10", "0xffffffffffffffff", "-0", "+1",
    "1K", "1M", "512M", "1G", "1T", "16E", "1P", "0M", "1.5G", "on", "off", "true", "false", "yes",
    "[]", "[0]", "[0,1]", "[0-3]", "[3-0]", "[0@[0-1]]", "[1@20]", "[0-18446744073709551616]", "[a,b]", "[",
    '"a,b"', '"', "''", "/p", "a" * 300, "12:34:56:78:9a:bc", "zz:34:56:78:9a:bc", "10.0.0.1", "300.1.1.1",
    "1:2:1:1", "0:0:0:0", "1:2", "server", "client", "acpi", "virtio-mem", "\x00", "é", " ", "=", ",",
]


def _keys(syntax: str) -> list[str]:
    return sorted(set(re.findall(r"([a-z_0-9]+)=", syntax))) or ["x"]


KEYS = {flag.name: _keys(flag.help) for flag in FLAGS}
VALUED = [flag for flag in FLAGS if flag.arity in ("one", "many")]


@st.composite
def _pairs(draw: st.DrawFn, flag: str) -> str:
    items = []
    for _ in range(draw(st.integers(1, 6))):
        key = draw(st.sampled_from(KEYS[flag]) if draw(st.integers(0, 15)) else st.sampled_from(["bogus", ""]))
        value = draw(st.sampled_from(VALUES) if draw(st.integers(0, 3)) else st.text(max_size=12))
        items.append(f"{key}={value}" if draw(st.integers(0, 15)) else draw(st.sampled_from([key, f"{key}={value}="])))
    return ",".join(items)


@st.composite
def _seeded(draw: st.DrawFn, flag: str) -> str:
    seeds = SEEDS.get(flag) or ["x"]
    text = draw(fuzzlib.mutated([s.encode() for s in seeds], max_rounds=6))
    return text.decode("utf-8", "replace")


@st.composite
def _arg(draw: st.DrawFn) -> list[str]:
    kind = draw(st.integers(0, 39))
    if kind == 0:  # an unknown flag or a stray word
        return [draw(st.sampled_from(["--bogus", "-x", "stray", "--", "-", "--=1", "-vv", "-V", "--v"]))]
    if kind == 1:  # a flag without a value
        flag = draw(st.sampled_from(FLAGS))
        return [f"--{flag.name}"]
    if kind == 2:
        flag = draw(st.sampled_from([f for f in FLAGS if f.arity in ("flag", "count")]))
        return [f"-{flag.short}" if flag.short else f"--{flag.name}"]
    flag = draw(st.sampled_from(VALUED))
    values = [draw(_seeded(flag.name) if draw(st.booleans()) else _pairs(flag.name))
              for _ in range(draw(st.integers(1, 3 if flag.arity == "many" else 1)))]
    if draw(st.integers(0, 3)) == 0:
        return [f"--{flag.name}={values[0]}", *values[1:]]
    return [f"--{flag.name}", *values]


#: a payload most of the time, so that the whole VmConfig is built and validated
KERNEL = ["--kernel", "/vmlinux"]


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    args = [tok for _ in range(draw(st.integers(0, 4))) for tok in draw(_arg())]
    if draw(st.integers(0, 4)) and not any(a.startswith(("--kernel", "--firmware")) for a in args):
        args = KERNEL + args
    return args


def target(args: list[str]) -> None:
    parsed = parse_argv(args)
    vmm_options_from_args(parsed)
    cfg = normalize(vm_config_from_args(parsed))
    text = canonical_json(cfg)
    try:
        back = vm_config_from_json(text)
    except ConfigError as err:
        raise AssertionError(f"the canonical JSON of a valid config is refused: {err}") from err
    if canonical_json(normalize(back)) != text:
        raise AssertionError("the canonical JSON of a valid config does not read back to the same config")


CAMPAIGN = fuzzlib.Campaign("options", argv(), target, (ConfigError,), time_limit=2.0)

if __name__ == "__main__":
    sys.exit(fuzzlib.main(CAMPAIGN))
