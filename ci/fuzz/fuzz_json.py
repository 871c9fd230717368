"""Fuzz campaign: a JSON VmConfig (the ``vm.create`` body, a snapshot's ``config.json``).

Inputs are JSON texts of four kinds: valid configs (the canonical JSON of the options campaign's
seed command lines) with their bytes mutated; the same configs decoded, with one value somewhere
in the tree replaced by a wrong-typed, huge, negative, fractional or deeply nested value, then
encoded again; nesting thousands of levels deep; and integers of thousands of digits. Each text
goes through :func:`vm_config_from_json`, :func:`normalize` and :func:`canonical_json`, and the
canonical JSON must read back to the same config. Only :class:`vmsh.errors.ConfigError` may come
out.

Usage: ``python3 ci/fuzz/fuzz_json.py --inputs 100000``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz import fuzzlib
from vmsh.config import canonical_json, normalize, vm_config_from_argv, vm_config_from_json
from vmsh.errors import ConfigError

#: command lines whose configs seed the campaign (together they use every device kind)
SEED_ARGV = [
    ["--kernel", "/vmlinux"],
    ["--kernel", "/vmlinux", "--cmdline", "console=ttyS0", "--initramfs", "/i", "--cpus", "boot=2,max=4",
     "--memory", "size=1G,shared=on", "--disk", "path=/a", "path=/b,readonly=on,num_queues=2",
     "--net", "tap=t0,mac=12:34:56:78:9a:bc", "--rng", "src=/dev/urandom", "--balloon", "size=64M",
     "--pmem", "file=/p,size=128M", "--vsock", "cid=3,socket=/s", "--watchdog", "--pvpanic"],
    ["--firmware", "/fw", "--memory", "size=0,shared=on", "--memory-zone", "id=z0,size=256M",
     "--numa", "guest_numa_id=0,cpus=[0],memory_zones=[z0]", "--console", "off", "--serial", "tty",
     "--fs", "tag=t,socket=/s", "--platform", "num_pci_segments=2", "--pci-segment", "pci_segment=1"],
    ["--kernel", "/vmlinux", "--rate-limit-group", "id=g0,bw_size=1000,bw_refill_time=100",
     "--disk", "path=/a,rate_limit_group=g0", "--cpus", "boot=2,topology=1:2:1:1,affinity=[0@[0],1@[1]]"],
]
SEEDS = [json.loads(canonical_json(vm_config_from_argv(argv))) for argv in SEED_ARGV]
SEED_TEXTS = [json.dumps(seed).encode() for seed in SEEDS] + [b"{}", b'{"payload": {"kernel": "/k"}}']

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.sampled_from([-1, 0, 1 << 15, 1 << 16, 1 << 31, 1 << 32, 1 << 63, 1 << 64, -(1 << 63) - 1, 10**300]),
    st.text(max_size=20), st.sampled_from(["", "on", "tap0", "12:34:56:78:9a:bc", "10.0.0.1", "acpi", "/p"]),
)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                                max_size=4),
                     max_leaves=12)


@st.composite
def _structural(draw: st.DrawFn) -> bytes:
    value = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(fuzzlib.json_paths(value)))
        new = draw(_JSON)
        if isinstance(new, dict) and draw(st.booleans()) and isinstance(value, dict):
            new = {**draw(st.sampled_from(SEEDS)), **new}  # an extra key among valid ones
        value = fuzzlib.json_replace(value, path, new)
    return json.dumps(value).encode()


@st.composite
def _deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([10, 100, 500, 999, 1000, 5000, 100_000]))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return b"[" * depth + b"]" * depth
    if kind == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"payload": {"kernel": "/k"}, "disks": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def _huge_int(draw: st.DrawFn) -> bytes:
    digits = draw(st.sampled_from([20, 21, 300, 4300, 4301, 5000, 100_000]))
    sign = draw(st.sampled_from(["", "-"]))
    field = draw(st.sampled_from(['"cpus": {"boot_vcpus": %s}', '"memory": {"size": %s}', '"iommu": %s',
                                  '"disks": [{"path": "/a", "num_queues": %s}]', '"x": %s']))
    return ('{"payload": {"kernel": "/k"}, ' + field % (sign + "9" * digits) + "}").encode()


def inputs() -> st.SearchStrategy[bytes]:
    return st.one_of(fuzzlib.mutated(SEED_TEXTS, max_rounds=6), _structural(), _deep(), _huge_int())


def target(text: bytes) -> None:
    cfg = normalize(vm_config_from_json(text))
    canonical = canonical_json(cfg)
    try:
        back = vm_config_from_json(canonical)
    except ConfigError as err:
        raise AssertionError(f"the canonical JSON of a valid config is refused: {err}") from err
    if canonical_json(normalize(back)) != canonical:
        raise AssertionError("the canonical JSON of a valid config does not read back to the same config")


CAMPAIGN = fuzzlib.Campaign("json", inputs(), target, (ConfigError,), time_limit=2.0)

if __name__ == "__main__":
    sys.exit(fuzzlib.main(CAMPAIGN))
