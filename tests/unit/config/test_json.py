"""JSON VmConfigs: cloud-hypervisor bodies load unchanged; wrong types are named."""

from __future__ import annotations

import json

import pytest

from vmsh.config import canonical_json, normalize, restore_config_from_json, to_json_value, vm_config_from_json
from vmsh.config import model as m
from vmsh.errors import OptionParseError, error_chain


def test_docs_example_body_loads() -> None:
    body = {
        "cpus": {"boot_vcpus": 4, "max_vcpus": 4},
        "payload": {"kernel": "/opt/clh/kernel/vmlinux", "cmdline": "console=ttyS0 console=hvc0 root=/dev/vda1 rw"},
        "disks": [{"path": "/opt/clh/images/focal-server-cloudimg-amd64.raw"}],
        "rng": {"src": "/dev/urandom"},
        "net": [{"ip": "192.168.10.10", "mask": "255.255.255.0", "mac": "12:34:56:78:90:01"}],
    }
    cfg = normalize(vm_config_from_json(json.dumps(body)))
    assert cfg.cpus.boot_vcpus == 4
    assert cfg.disks is not None and cfg.disks[0].id == "_disk0"
    assert cfg.net is not None and cfg.net[0].id == "_net1" and cfg.net[0].num_queues == 2


def test_later_spellings_are_aliases() -> None:
    a = vm_config_from_json({"platform": {"system_serial_number": "S1", "system_uuid": "U1"}})
    b = vm_config_from_json({"platform": {"serial_number": "S1", "uuid": "U1"}})
    assert a == b
    assert a.platform == m.PlatformConfig(serial_number="S1", uuid="U1")


def test_unknown_keys_are_ignored_except_in_rate_limiters() -> None:
    assert vm_config_from_json({"payload": {"kernel": "/k"}, "landlock_enable": False}).payload is not None
    bad = {"rate_limit_groups": [{"id": "g", "rate_limiter_config": {"bandwidth": {"size": 1, "refill_time": 1, "x": 1}}}]}
    with pytest.raises(OptionParseError) as info:
        vm_config_from_json(bad)
    assert "rate_limit_groups[0].rate_limiter_config.bandwidth: unknown field `x`" in str(info.value.__cause__)


def test_net_fds_in_json_are_placeholders() -> None:
    cfg = vm_config_from_json({"net": [{"fds": [7, 8], "num_queues": 4}]})
    assert cfg.net is not None and cfg.net[0].fds == [-1, -1]
    assert to_json_value(cfg)["net"][0]["fds"] == [-1, -1]


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"cpus": {"boot_vcpus": 1}}', "cpus: missing field `max_vcpus`"),
        ('{"cpus": {"boot_vcpus": 256, "max_vcpus": 256}}', "cpus.boot_vcpus: invalid value: integer `256`, expected u8"),
        ('{"memory": {"size": "1G"}}', 'memory.size: invalid type: string "1G", expected u64'),
        ('{"memory": {"size": 1.5}}', "memory.size: invalid type: floating point `1.5`, expected u64"),
        ('{"memory": {"size": -1}}', "memory.size: invalid value: integer `-1`, expected u64"),
        ('{"memory": {"size": 1, "hotplug_method": "Dimm"}}', "memory.hotplug_method: unknown variant `Dimm`, expected one of `Acpi`, `VirtioMem`"),
        ('{"disks": {"path": "/a"}}', "disks: invalid type: a map, expected a sequence"),
        ('{"disks": [{"readonly": "yes"}]}', 'disks[0].readonly: invalid type: string "yes", expected a boolean'),
        ('{"disks": [{"queue_size": null}]}', "disks[0].queue_size: invalid type: null, expected u16"),
        ('{"net": [{"ip": "1.2.3"}]}', "net[0].ip: invalid IP address syntax"),
        ('{"net": [{"mac": "nope"}]}', "net[0].mac: invalid MAC address: nope"),
        ('{"serial": {"file": "/x"}}', "serial: missing field `mode`"),
        ('{"platform": {"serial_number": "a", "system_serial_number": "b"}}', "platform: duplicate field `system_serial_number`"),
        ('[1, 2]', "invalid type: a sequence, expected struct VmConfig"),
        ('{"payload": ', "Expecting value at line 1 column 13"),
    ],
)
def test_json_errors_name_the_path(body: str, message: str) -> None:
    with pytest.raises(OptionParseError) as info:
        vm_config_from_json(body)
    chain = error_chain(info.value)
    assert chain[0].startswith("Error parsing JSON VmConfig")
    assert chain[-1] == message


def test_canonical_json_is_stable_and_complete() -> None:
    cfg = normalize(vm_config_from_json({"payload": {"kernel": "/k"}}))
    text = canonical_json(cfg)
    assert json.loads(text)["rng"] == {"src": "/dev/urandom", "iommu": False}
    assert normalize(vm_config_from_json(text)) == cfg
    assert canonical_json(normalize(vm_config_from_json(text))) == text


def test_restore_config() -> None:
    cfg = restore_config_from_json('{"source_url": "file:///snap", "prefault": true}')
    assert cfg == m.RestoreConfig(source_url="file:///snap", prefault=True)
    with pytest.raises(OptionParseError):
        restore_config_from_json("{}")


def test_device_ids_share_one_counter_and_skip_taken_names() -> None:
    cfg = normalize(vm_config_from_json({
        "payload": {"kernel": "/k"},
        "disks": [{"path": "/a"}, {"path": "/b", "id": "_disk1"}, {"path": "/c"}],
        "net": [{}],
        "pmem": [{"file": "/p"}],
        "vsock": {"cid": 3, "socket": "/v"},
    }))
    assert [d.id for d in cfg.disks or []] == ["_disk0", "_disk1", "_disk2"]
    assert [n.id for n in cfg.net or []] == ["_net3"]
    assert [p.id for p in cfg.pmem or []] == ["_pmem4"]
    assert cfg.vsock is not None and cfg.vsock.id == "_vsock5"


def test_iommu_is_derived_from_devices_and_platform() -> None:
    assert normalize(vm_config_from_json({"payload": {"kernel": "/k"}, "pmem": [{"file": "/p", "iommu": True}]})).iommu
    assert normalize(vm_config_from_json({"payload": {"kernel": "/k"}, "platform": {"num_pci_segments": 2, "iommu_segments": [1]}})).iommu
    assert not normalize(vm_config_from_json({"payload": {"kernel": "/k"}})).iommu
