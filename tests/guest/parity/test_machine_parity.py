"""Machine parity: each configuration's launcher flags and its JSON VmConfig describe
byte-identical machines.

The flag form goes through ``vmsh launch --describe``; the JSON form through a running
``vmsh launch --api-socket`` (``vm.create``, then ``GET vm.describe``, then ``vm.delete``).
Both build the VM (KVM objects, memory with the kernel and tables, devices, vCPUs) without
running it, so these need /dev/kvm but no boot. A difference is reported by the JSON paths
where the two descriptions part.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.guest.parity.configs import CASES, Case
from vmsh.api.client import ApiClient
from vmsh.engine.describe import canonical_text
from vmsh.harness.snapshots import launch_argv

MAX_PATHS = 12


def differences(a: Any, b: Any, path: str = "$") -> list[str]:
    """The JSON paths where ``a`` and ``b`` differ (at most a few, shortest first)."""
    if type(a) is not type(b):
        return [f"{path}: {str(a)[:80]!r} != {str(b)[:80]!r}"]
    if isinstance(a, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'CLI' if key in a else 'JSON'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list):
        out = [f"{path}: length {len(a)} != {len(b)}"] if len(a) != len(b) else []
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {str(a)[:80]!r} != {str(b)[:80]!r}"]


def describe_cli(flags: list[str]) -> str:
    proc = subprocess.run(launch_argv(["--describe", *flags]), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"vmsh launch --describe failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def describe_api(socket: str, config: dict[str, Any]) -> str:
    with ApiClient(socket, timeout=120) as client:
        client.put("vm.create", config)
        try:
            return canonical_text(client.get("vm.describe"))
        finally:
            client.put("vm.delete")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_flags_and_json_describe_the_same_machine(case: Case, render_case, api_vmm) -> None:
    flags, config = render_case(case)
    cli = describe_cli(flags)
    api = describe_api(str(api_vmm.socket), config)
    if cli != api:
        paths = differences(json.loads(cli), json.loads(api))
        shown = "\n  ".join(paths[:MAX_PATHS]) or "(same data, different text)"
        pytest.fail(f"{case.name}: the flags and the JSON give different machines:\n  {shown}\n"
                    f"flags: {flags}\njson: {json.dumps(config)}")
    check_agrees_with_config(json.loads(cli), config)


def check_agrees_with_config(desc: dict[str, Any], config: dict[str, Any]) -> None:
    """The description says what the JSON asked for (a few facts per part)."""
    cpus = config.get("cpus", {})
    assert len(desc["vcpus"]) == cpus.get("boot_vcpus", 1)
    assert desc["boot"]["cmdline"] == config["payload"]["cmdline"]
    assert desc["boot"]["protocol"] == ("bzimage" if config["payload"]["kernel"].endswith("bzImage") else "pvh")
    ram = sum(e["size"] for e in desc["boot"]["e820"] if e["type"] == 1)
    memory = config.get("memory", {})
    size = memory.get("size", 512 << 20) + sum(z["size"] for z in memory.get("zones", []))
    assert size - (1 << 20) <= ram <= size  # the map leaves out [640 KiB, 1 MiB)
    assert sum(r["size"] for r in desc["ram"]["regions"]) == size
    signatures = [t["signature"] for t in desc["acpi"]]
    assert {"RSDP", "XSDT", "FACP", "APIC", "DSDT", "MCFG"} <= set(signatures)
    madt = next(t for t in desc["acpi"] if t["signature"] == "APIC")
    assert bytes.fromhex(madt["hex"]).count(bytes([0, 8])) >= cpus.get("max_vcpus", 1)  # one LAPIC entry each
    platform = config.get("platform", {})
    strings = [s for st in desc["smbios"]["structures"] for s in st["strings"]]
    if platform.get("serial_number"):
        assert platform["serial_number"] in strings
    for text in platform.get("oem_strings", []):
        assert text in strings
    segments = {p["bdf"][:4] for p in desc["pci"]}
    assert len(segments) == platform.get("num_pci_segments", 1)
    ids = {p["id"] for p in desc["pci"] if p["id"]}
    pci_devices = config.get("disks", []) + config.get("net", []) + config.get("pmem", [])
    expected = {"__rng"} | {d.get("id") for d in pci_devices if d.get("id")}
    expected |= {"__pvpanic"} if config.get("pvpanic") else set()
    expected |= {"__balloon"} if "balloon" in config else set()
    expected |= {"__watchdog"} if config.get("watchdog") else set()
    expected |= {"__console"} if config["console"]["mode"] != "Off" else set()
    assert expected <= ids
    n_devices = (len(config.get("disks", [])) + len(config.get("net", [])) + len(config.get("pmem", []))
                 + ("vsock" in config) + len(expected - {d.get("id") for d in pci_devices}))
    assert len(ids) == n_devices, (sorted(ids), n_devices)
    for net in config.get("net", []):
        dev = next(v for k, v in desc["virtio"].items() if v["device_type"] == 1
                   and bytes.fromhex(v["config"])[:6] == bytes.fromhex(net["mac"].replace(":", "")))
        if "mtu" in net:
            assert int.from_bytes(bytes.fromhex(dev["config"])[10:12], "little") == net["mtu"]
