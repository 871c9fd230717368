"""Guest parity: a configuration booted from its launcher flags (``vmsh launch``) and from
its JSON VmConfig (the API's ``vm.create`` + ``vm.boot``) looks the same from inside.

A fixed set of probes runs in each guest (CPUs, memory, command line, DMI, PCI functions
with vendor/device/class, block devices with size/ro/serial, net devices with MAC/MTU);
the two outputs must be identical and agree with the configuration. Boots are expensive on
this host (about a minute each), so by default only the configurations marked ``boot=True``
in :mod:`tests.guest.parity.configs` run; ``--vmsh-parity-all`` runs every bootable one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.parity.configs import CASES, DISK0_SIZE, DISK1_SIZE, Case

LOG = logging.getLogger(__name__)

#: one shell command: every probe, one fact per line, in a fixed order. Files are read with
#: the shell's own ``read`` (no fork): on PVM hosts each fork+exec costs about a second of
#: emulated kernel work, and a $(cat ...) per fact made the probe take minutes.
PROBES = " ; ".join([
    "r() { v=; read -r v 2>/dev/null < $1; }",
    "r /sys/devices/system/cpu/online; echo cpus $(grep -c ^processor /proc/cpuinfo) online=$v",
    "grep MemTotal /proc/meminfo",
    "r /proc/cmdline; echo cmdline $v",
    "for f in bios_vendor bios_version sys_vendor product_name product_serial product_uuid; do"
    " r /sys/class/dmi/id/$f; echo dmi $f=$v; done",
    "echo dmi-table $(md5sum < /sys/firmware/dmi/tables/DMI 2>/dev/null)",
    "for d in /sys/bus/pci/devices/*; do r $d/vendor; a=$v; r $d/device; b=$v; r $d/class;"
    " echo pci ${d##*/} $a $b $v; done",
    "for b in /sys/block/vd*; do [ -e $b ] || continue; r $b/size; s=$v; r $b/ro; o=$v; r $b/serial;"
    " set -- $b/mq/*; echo blk ${b##*/} size=$s ro=$o serial=$v mq=$#; done",
    "for n in /sys/class/net/eth*; do [ -e $n ] || continue; r $n/address; a=$v; r $n/mtu;"
    " set -- $n/queues/*; echo net ${n##*/} $a $v queues=$#; done",
    "echo probes-done",
])
PROBE_TIMEOUT = 300.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "boot_case" in metafunc.fixturenames:
        run_all = metafunc.config.getoption("vmsh_parity_all")
        cases = [c for c in CASES if c.bootable and (run_all or c.boot)]
        metafunc.parametrize("boot_case", cases, ids=[c.name for c in cases])


def probe(guest: Any) -> str:
    out = guest.check_output(PROBES, timeout=PROBE_TIMEOUT)
    assert out.rstrip().endswith("probes-done"), out
    return out


def boot_and_probe(vmsh_guest: Any, how: str, spec: Any) -> tuple[str, float]:
    start = time.monotonic()
    guest = vmsh_guest.launch(spec) if how == "flags" else vmsh_guest(config=spec)
    booted = time.monotonic() - start
    try:
        return probe(guest), booted
    finally:
        guest.close()


def test_flags_and_json_guests_see_the_same_machine(boot_case: Case, render_case, vmsh_guest) -> None:
    flags, config = render_case(boot_case)
    cli, cli_boot = boot_and_probe(vmsh_guest, "flags", flags)
    api, api_boot = boot_and_probe(vmsh_guest, "json", config)
    LOG.warning("%s: boot %.1fs (flags), %.1fs (JSON)", boot_case.name, cli_boot, api_boot)
    assert cli == api, f"{boot_case.name}: the guests differ\n--- flags\n{cli}\n--- json\n{api}"
    check_agrees_with_config(cli, config, Path(config.get("disks", [{}])[0].get("path", "/")).parent)


def check_agrees_with_config(out: str, config: dict[str, Any], files: Path) -> None:
    lines = out.splitlines()
    facts = {line.split(" ", 1)[0]: line for line in lines}
    boot = config.get("cpus", {}).get("boot_vcpus", 1)
    assert facts["cpus"].split()[1] == str(boot), facts["cpus"]
    assert facts["cmdline"] == f"cmdline {config['payload']['cmdline']}"
    dmi = dict(line[4:].split("=", 1) for line in lines if line.startswith("dmi ") and "=" in line)
    platform = config.get("platform", {})
    if "serial_number" in platform:
        assert dmi["product_serial"] == platform["serial_number"]
    if "uuid" in platform:
        assert dmi["product_uuid"].lower() == platform["uuid"].lower()
    pci = [line.split()[2:] for line in lines if line.startswith("pci ")]
    virtio = [p for p in pci if p[0] == "0x1af4"]
    n_virtio = (len(config.get("disks", [])) + len(config.get("net", [])) + len(config.get("pmem", []))
                + 1 + ("balloon" in config) + ("vsock" in config) + bool(config.get("watchdog"))
                + (config["console"]["mode"] != "Off"))
    assert len(virtio) == n_virtio, pci
    assert (["0x1b36", "0x0011", "0x088000"] in pci) == bool(config.get("pvpanic")), pci
    blk = [dict(kv.split("=", 1) for kv in line.split()[2:]) for line in lines if line.startswith("blk ")]
    disks = config.get("disks", [])
    assert len(blk) == len(disks), blk
    sizes = {str(files / "disk0.img"): DISK0_SIZE, str(files / "disk1.img"): DISK1_SIZE}
    for dev, disk in zip(blk, disks, strict=True):  # vda, vdb, ... in the order the disks were given
        assert int(dev["size"]) * 512 == sizes[disk["path"]], (dev, disk)
        assert dev["ro"] == ("1" if disk.get("readonly") else "0"), (dev, disk)
        if "serial" in disk:
            assert dev["serial"] == disk["serial"], (dev, disk)
        assert int(dev["mq"]) == disk.get("num_queues", 1), (dev, disk)
    nets = [line.split()[2:] for line in lines if line.startswith("net ")]
    assert len(nets) == len(config.get("net", [])), nets
    for (mac, mtu, queues), net in zip(nets, config.get("net", []), strict=True):
        assert mac == net["mac"]
        assert int(mtu) == net.get("mtu", 1500)
        # rx and tx queues per pair: num_queues (default 2) in all
        assert int(queues.split("=")[1]) == net.get("num_queues", 2), queues
