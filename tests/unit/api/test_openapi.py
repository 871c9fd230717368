"""The shipped OpenAPI document: current, valid, and what the server really does."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.unit.engine.device_machine import Machines
from vmsh.api.client import ApiClient, ApiError
from vmsh.api.http import ApiServer
from vmsh.api.openapi import load, render
from vmsh.engine.vmm import ACTIONS, Vmm

from .fake_vm import FakeVm

SPEC = load()


def schema_for(ref_or_schema: dict) -> dict:
    """A standalone JSON schema (OpenAPI's nullable mapped to JSON Schema's null type)."""

    def convert(node):
        if isinstance(node, dict):
            node = {k: convert(v) for k, v in node.items()}
            if node.pop("nullable", False):
                if "$ref" in node:
                    return {"anyOf": [{"$ref": node.pop("$ref")}, {"type": "null"}], **node}
                node["type"] = [node["type"], "null"] if "type" in node else node.get("type")
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
            node.pop("format", None)
            return node
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    defs = convert(SPEC["components"]["schemas"])
    return {**convert(ref_or_schema), "components": {"schemas": defs}}


def validate_response(endpoint: str, body: object) -> None:
    op = next(iter(SPEC["paths"][f"/{endpoint}"].values()))
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, schema_for(schema))


def test_document_is_current_and_valid() -> None:
    assert json.loads(render()) == SPEC, "run: python -m vmsh.api.openapi"
    validate(SPEC)


def test_every_action_is_documented_with_its_method() -> None:
    documented = {(path, method.upper()) for path, ops in SPEC["paths"].items() for method in ops}
    assert documented == {(f"/{a.scope}.{a.name}", a.http_method) for a in ACTIONS}


@pytest.fixture
def client(tmp_path: Path):
    server = ApiServer(Vmm(vm_factory=FakeVm), path=str(tmp_path / "api.sock")).start()
    with ApiClient(str(tmp_path / "api.sock")) as c:
        yield c
    server.close()


def test_server_replies_match_the_document(client) -> None:
    validate_response("vmm.ping", client.get("vmm.ping"))
    body = {"payload": {"kernel": "/k"}, "disks": [{"path": "/a"}], "net": [{"mac": "12:34:56:78:90:ab"}]}
    jsonschema.validate(body, schema_for({"$ref": "#/components/schemas/VmConfig"}))
    client.put("vm.create", body)
    client.put("vm.boot")
    validate_response("vm.info", client.get("vm.info"))
    validate_response("vm.counters", client.get("vm.counters"))


def test_error_bodies_match_the_document(client) -> None:
    with pytest.raises(ApiError) as info:
        client.get("vm.info")
    jsonschema.validate(info.value.messages, schema_for({"$ref": "#/components/schemas/ErrorChain"}))


def test_schema_rejects_what_the_server_rejects(client) -> None:
    bad = {"cpus": {"boot_vcpus": 300, "max_vcpus": 300}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema_for({"$ref": "#/components/schemas/VmConfig"}))
    with pytest.raises(ApiError) as info:
        client.put("vm.create", bad)
    assert info.value.status == 400


def test_hot_add_replies_are_documented_as_pci_device_info() -> None:
    from vmsh.engine.hotplug import bdf

    adds = [a for a in ACTIONS if a.name.startswith("add-")]
    assert adds
    for action in adds:
        responses = SPEC["paths"][f"/{action.endpoint}"]["put"]["responses"]
        schema = responses["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/PciDeviceInfo"}
        assert "204" in responses
    # what HotplugManager.add returns fits it
    jsonschema.validate({"id": "_disk1", "bdf": bdf(0, 5)}, schema_for(schema))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "_disk1"}, schema_for(schema))


def test_u64_fields_document_their_maximum(client) -> None:
    size = SPEC["components"]["schemas"]["MemoryConfig"]["properties"]["size"]
    assert (size["minimum"], size["maximum"], size["format"]) == (0, (1 << 64) - 1, "uint64")
    too_big = {"payload": {"kernel": "/k"}, "memory": {"size": 1 << 64}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_big, schema_for({"$ref": "#/components/schemas/VmConfig"}))
    with pytest.raises(ApiError) as info:
        client.put("vm.create", too_big)
    assert info.value.status == 400


@pytest.fixture
def machine():
    machines = Machines()
    yield machines
    machines.close()


def test_vm_info_device_tree_has_cloud_hypervisors_node_shape(machine, tmp_path) -> None:
    from vmsh.config.model import VmConfig
    from vmsh.engine.vm import Vm

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = Vm.__new__(Vm)
    vm.devices = machine({"disks": [{"path": str(disk)}], "pvpanic": True})
    vm.config = VmConfig()  # memory_actual_size comes from it
    info = vm.info()
    tree = info["device_tree"]
    assert set(tree) == {"__ioapic", "__serial", "_disk0", "_virtio-pci-_disk0", "__rng", "_virtio-pci-__rng",
                         "__pvpanic"}
    assert tree["_disk0"]["parent"] == "_virtio-pci-_disk0"
    assert tree["_virtio-pci-_disk0"]["children"] == ["_disk0"]
    bar = tree["_virtio-pci-_disk0"]["resources"][0]["PciBar"]
    assert (bar["size"], bar["type_"]) == (0x80000, "Mmio32")
    validate_response("vm.info", {"config": {"payload": {"kernel": "/k"}}, "state": "Running", **info})
    # the schema holds the node's shape: a node without pci_bdf, or an untagged resource, is refused
    node = dict(tree["_disk0"])
    del node["pci_bdf"]
    with pytest.raises(jsonschema.ValidationError):
        validate_response("vm.info", {"config": {"payload": {"kernel": "/k"}}, "state": "Running",
                                      "device_tree": {"_disk0": node}})
    with pytest.raises(jsonschema.ValidationError):
        validate_response("vm.info", {"config": {"payload": {"kernel": "/k"}}, "state": "Running",
                                      "device_tree": {"_disk0": {**tree["_disk0"], "resources": [{"base": 1}]}}})
