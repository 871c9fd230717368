"""The seed launcher's whole ``test_valid_vm_config_*`` table: launcher flags and a JSON
VmConfig either describe the same VM or, where the seed says so, a different one.

As in the seed, the flags are parsed *and validated* (which derives ``iommu``), the JSON
is only deserialized. ``seed_cases.json`` was extracted from the seed's test module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsh.config import canonical_json, normalize, vm_config_from_argv, vm_config_from_json
from vmsh.config import model as m

CASES = json.loads((Path(__file__).parent / "seed_cases.json").read_text())


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c['test'].removeprefix('test_valid_vm_config_')}-{i}" for i, c in enumerate(CASES)]
)
def test_seed_case(case: dict) -> None:
    from_cli = vm_config_from_argv(case["argv"])
    from_json = vm_config_from_json(case["json"])
    if case["equal"]:
        assert from_cli == from_json
        # Where the seed says equal, the canonical texts are equal too.
        assert canonical_json(normalize(from_cli)) == canonical_json(normalize(from_json))
    else:
        assert from_cli != from_json


def test_seed_default_values() -> None:
    cfg = vm_config_from_argv(["--kernel", "/path/to/kernel"])
    assert cfg == m.VmConfig(
        cpus=m.CpusConfig(boot_vcpus=1, max_vcpus=1, max_phys_bits=46),
        memory=m.MemoryConfig(size=536_870_912, thp=True, hotplug_method=m.HotplugMethod.ACPI),
        payload=m.PayloadConfig(kernel="/path/to/kernel"),
        rng=m.RngConfig(src="/dev/urandom"),
        serial=m.ConsoleConfig(mode=m.ConsoleOutputMode.NULL),
        console=m.ConsoleConfig(mode=m.ConsoleOutputMode.TTY),
        debug_console=m.DebugConsoleConfig(mode=m.ConsoleOutputMode.OFF, iobase=0xE9),
    )
    assert cfg.iommu is False and cfg.pvpanic is False and cfg.watchdog is False
