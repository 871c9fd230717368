"""Every ``Describe`` and ``Refused`` entry of tests/option_coverage.py, built for real on KVM with
tiny kernels: the option changes the machine's description, or building the VM refuses it naming
the option."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from tests.engine import tiny_kernel
from tests.option_coverage import TABLE, Describe, Refused, command_line
from vmsh.config import normalize, vm_config_from_argv
from vmsh.engine.describe import describe_config
from vmsh.errors import VmshError, error_chain

DESCRIBED = sorted(name for name, check in TABLE.items() if isinstance(check, Describe))
REFUSED = sorted(name for name, check in TABLE.items() if isinstance(check, Refused))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("coverage")
    made = {
        "kernel": tiny_kernel.hello_poweroff(),
        "kernel2": tiny_kernel.echo_poweroff(),
        "initrd": b"070701" + bytes(4096),
        "disk": bytes(1 << 20),
        "disk2": bytes(2 << 20),
    }
    paths = {"dir": str(root)}
    for name, data in made.items():
        (root / name).write_bytes(data)
        paths[name] = str(root / name)
    for name, size in (("pmem", 2 << 20), ("pmem2", 4 << 20)):
        with open(root / name, "wb") as f:
            f.truncate(size)
        paths[name] = str(root / name)
    return paths


@functools.cache
def _describe(argv: tuple[str, ...]) -> str:
    import json

    return json.dumps(describe_config(normalize(vm_config_from_argv(list(argv)))), sort_keys=True)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two descriptions differ (for the failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("name", DESCRIBED)
def test_option_changes_the_machine(name: str, files: dict[str, str]) -> None:
    check = TABLE[name]
    assert isinstance(check, Describe)
    base = _describe(tuple(command_line(check.base, files)))
    variant = _describe(tuple(command_line(check.variant, files)))
    assert base != variant, f"{name}: {check.variant} does not change the machine"


@pytest.mark.parametrize("name", REFUSED)
def test_option_is_refused_naming_it(name: str, files: dict[str, str]) -> None:
    check = TABLE[name]
    assert isinstance(check, Refused)
    argv = command_line(check.args, files)
    with pytest.raises(VmshError) as info:
        describe_config(normalize(vm_config_from_argv(argv)))
    text = ": ".join(error_chain(info.value))
    assert check.needle in text, f"{name}: {argv} failed with {text!r}"
