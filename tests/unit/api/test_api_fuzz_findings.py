"""Regression tests for what ``ci/fuzz/api.sh`` (schemathesis against vmsh's openapi.json and
cloud-hypervisor's v40 document) found; ``ci/fuzz/README.md`` lists the findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsh.api.client import ApiClient, ApiError
from vmsh.api.http import ApiServer
from vmsh.engine.vmm import Vmm

from .fake_vm import FakeVm


@pytest.fixture
def client(tmp_path: Path):
    server = ApiServer(Vmm(vm_factory=FakeVm), path=str(tmp_path / "api.sock")).start()
    with ApiClient(str(tmp_path / "api.sock")) as c:
        yield c
    server.close()


@pytest.mark.parametrize("fd", [1 << 31, -(1 << 31) - 1, 1 << 64])
def test_a_net_fd_beyond_i32_is_refused(client, fd: int) -> None:
    """Was: vm.create took ``"fds": [2147483648]`` (204) while the document says int32 and
    cloud-hypervisor's serde refuses it (its fds are i32s)."""
    body = {"payload": {"kernel": "/k"}, "net": [{"fds": [fd]}]}
    with pytest.raises(ApiError) as info:
        client.put("vm.create", body)
    assert info.value.status == 400
    assert info.value.messages[-1] == f"net[0].fds[0]: invalid value: integer `{fd}`, expected i32"


def test_net_fds_within_i32_are_taken(client) -> None:
    client.put("vm.create", {"payload": {"kernel": "/k"}, "net": [{"fds": [(1 << 31) - 1, 0]}]})


def test_hot_add_on_a_segment_a_vm_without_platform_lacks_is_a_400(client) -> None:
    """Was: a 500 ("PCI segment 65534 does not exist" from the hotplug manager, an internal error
    with the stand-in VM); a VM without ``--platform`` has one segment, which validation now
    knows, as cloud-hypervisor's does."""
    client.put("vm.create", {"payload": {"kernel": "/k"}})
    client.put("vm.boot")
    for action, body in (("vm.add-pmem", {"file": "/p", "pci_segment": 65534}),
                         ("vm.add-disk", {"path": "/d", "pci_segment": 1})):
        with pytest.raises(ApiError) as info:
            client.put(action, body)
        assert info.value.status == 400
        assert info.value.messages[-1] == f"Invalid PCI segment id: {body['pci_segment']}"
    # the config is unchanged
    assert not client.get("vm.info")["config"].get("pmem")
