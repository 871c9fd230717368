"""The OpenAPI 3.0 description of vmsh's HTTP API, derived from the action registry and
the config model, so the document cannot drift from what the server accepts.

``openapi.json`` beside this module is the shipped copy; ``python -m vmsh.api.openapi``
rewrites it, and a test fails when it is out of date.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from vmsh import __version__
from vmsh.config import model as m
from vmsh.config.options import INT_RANGES
from vmsh.engine.actions import ACTIONS

SPEC_PATH = Path(__file__).with_name("openapi.json")

_RESPONSES: dict[str, dict[str, Any]] = {
    "vmm.ping": {
        "type": "object",
        "required": ["version", "pid"],
        "properties": {
            "build_version": {"type": "string"},
            "version": {"type": "string"},
            "pid": {"type": "integer"},
            "features": {"type": "array", "items": {"type": "string"}},
        },
    },
    "vm.info": {
        "type": "object",
        "required": ["config", "state"],
        "properties": {
            "config": {"$ref": "#/components/schemas/VmConfig"},
            "state": {"type": "string", "enum": ["Created", "Running", "Shutdown", "Paused", "BreakPoint"]},
            "memory_actual_size": {"type": "integer", "format": "int64"},
            "device_tree": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/DeviceNode"}},
        },
    },
    "vm.describe": {
        "type": "object",
        "description": "vmsh extra: the machine a created (not booted) VM gives its guest, as "
                       "`vmsh launch --describe` prints it (see vmsh.engine.describe).",
        "required": ["format", "acpi", "smbios", "boot", "ram", "vcpus", "pci", "virtio", "buses"],
        "properties": {
            "format": {"type": "integer"},
            "acpi": {"type": "array", "items": {"type": "object"}},
            "smbios": {"type": "object"},
            "boot": {"type": "object"},
            "ram": {"type": "object"},
            "vcpus": {"type": "array", "items": {"type": "object"}},
            "pci": {"type": "array", "items": {"type": "object"}},
            "virtio": {"type": "object"},
            "buses": {"type": "object"},
        },
    },
    "vm.registers": {
        "type": "object",
        "description": "vmsh extension: one vCPU's registers as KVM reports them (struct kvm_regs, "
                       "struct kvm_sregs), every value an integer.",
        "required": ["cpu_id", "regs", "sregs"],
        "properties": {
            "cpu_id": {"type": "integer"},
            "regs": {"type": "object", "additionalProperties": {"type": "integer", "format": "int64"}},
            "sregs": {"type": "object"},
        },
    },
    "vm.read-memory": {
        "type": "object",
        "description": "vmsh extension: guest RAM at a guest physical address.",
        "required": ["address", "data"],
        "properties": {
            "address": {"type": "integer", "format": "int64"},
            "data": {"type": "string", "description": "the bytes in hex, two digits each"},
        },
    },
    "vm.profile-stop": {
        "type": "object",
        "description": "vmsh extension: the profiler's report.",
        "required": ["report"],
        "properties": {"report": {"type": "string"}},
    },
    "vm.counters": {
        "type": "object",
        "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer", "format": "int64"}},
    },
}


#: schemas the replies refer to (cloud-hypervisor's names)
_SHARED: dict[str, dict[str, Any]] = {
    "DeviceNode": {
        "type": "object",
        "description": "One node of vm.info's device tree, keyed by its id: a platform device "
                       "(__ioapic, __serial, __debug_console), a virtio device, the virtio-pci "
                       "transport that carries it (_virtio-pci-<id>; parent and children link them), "
                       "or a plain PCI device (__pvpanic).",
        "required": ["id", "resources", "parent", "children", "pci_bdf"],
        "properties": {
            "id": {"type": "string"},
            "resources": {"type": "array", "items": {"$ref": "#/components/schemas/DeviceResource"}},
            "parent": {"type": "string", "nullable": True},
            "children": {"type": "array", "items": {"type": "string"}},
            "pci_bdf": {"type": "string", "nullable": True,
                        "description": "segment:bus:device.function in hex, e.g. 0000:00:03.0"},
        },
    },
    "DeviceResource": {
        "type": "object",
        "description": "One resource of a device, tagged with its kind as cloud-hypervisor's "
                       "vm-device Resource enum is serialized: a PCI BAR or a guest physical "
                       "address range (a pmem region).",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {
            "PciBar": {
                "type": "object",
                "required": ["index", "base", "size", "type_", "prefetchable"],
                "properties": {
                    "index": {"type": "integer"},
                    "base": {"type": "integer", "format": "int64"},
                    "size": {"type": "integer", "format": "int64"},
                    "type_": {"type": "string", "enum": ["Io", "Mmio32", "Mmio64"]},
                    "prefetchable": {"type": "boolean"},
                },
            },
            "MmioAddressRange": {
                "type": "object",
                "required": ["base", "size"],
                "properties": {"base": {"type": "integer", "format": "int64"},
                               "size": {"type": "integer", "format": "int64"}},
            },
        },
    },
    "PciDeviceInfo": {
        "type": "object",
        "description": "The PCI address a device hot-added to a running VM got.",
        "required": ["id", "bdf"],
        "properties": {"id": {"type": "string"}, "bdf": {"type": "string"}},
    },
}

#: the add-* actions: 200 with a PciDeviceInfo on a running VM (hotplug), 204 before boot
_HOTPLUG_PREFIX = "add-"


def _type_schema(tp: Any, kind: str | None, schemas: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return {**_type_schema(inner, kind, schemas), "nullable": True}
    if origin is list:
        (elem,) = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(elem, kind, schemas)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        _add_schema(tp, schemas)
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [member.value for member in tp]}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        if kind == "fd":
            low, high = INT_RANGES["i32"]
            return {"type": "integer", "format": "int32", "minimum": low, "maximum": high}
        low, high = INT_RANGES[kind or "u64"]
        schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
        if high <= 0x7FFF_FFFF:
            schema["format"] = "int32"
        elif high < 1 << 63:
            schema["format"] = "int64"
        else:
            schema["format"] = "uint64"  # OpenAPI's int64 would say 2^63 - 1 is the largest
        return schema
    if tp is str:
        if kind == "ipv4":
            return {"type": "string", "format": "ipv4"}
        return {"type": "string"}
    raise TypeError(f"no schema for {tp!r}")


def _add_schema(cls: type, schemas: dict[str, Any]) -> None:
    if cls.__name__ in schemas:
        return
    schemas[cls.__name__] = {}  # placeholder against recursion
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        name = f.metadata.get("json") or f.name
        properties[name] = _type_schema(hints[f.name], f.metadata.get("kind"), schemas)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(name)
        elif f.default is not dataclasses.MISSING and f.default is not None:
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            properties[name]["default"] = default
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if getattr(cls, "DENY_UNKNOWN_FIELDS", False):
        schema["additionalProperties"] = False
    schemas[cls.__name__] = schema


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document of the API."""
    schemas: dict[str, Any] = dict(_SHARED)
    schemas["ErrorChain"] = {"type": "array", "items": {"type": "string"},
                             "description": "The error and its causes, outermost first."}
    paths: dict[str, Any] = {}
    errors = {
        str(code): {"description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorChain"}}}}
        for code, text in (
            (400, "Malformed request or invalid configuration"), (404, "No such endpoint, VM or device"),
            (409, "Duplicate device id or path"), (413, "Request body over 4 MiB"), (429, "Busy"),
            (500, "The action failed (wrong state or internal error)"),
        )
    }
    for action in ACTIONS:
        endpoint = action.endpoint
        op: dict[str, Any] = {"operationId": endpoint.replace(".", "_").replace("-", "_"), "responses": dict(errors)}
        if action.extension:
            op["description"] = f"vmsh extension (not in cloud-hypervisor): {action.extension}."
        if action.body is not None:
            _add_schema(action.body, schemas)
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{action.body.__name__}"}}},
            }
        if endpoint in _RESPONSES:
            schema_name = "".join(part.capitalize() for part in endpoint.replace("-", ".").split(".")) + "Response"
            schemas[schema_name] = _RESPONSES[endpoint]
            op["responses"]["200"] = {
                "description": "OK",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
            }
        elif action.name.startswith(_HOTPLUG_PREFIX):
            op["responses"]["200"] = {
                "description": "The device was hot-added to the running VM",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PciDeviceInfo"}}},
            }
            op["responses"]["204"] = {"description": "The device was added to the VM's config (not booted yet)"}
        elif endpoint == "vmm.shutdown":
            op["responses"]["204"] = {"description": "The VMM shuts down"}
        else:
            op["responses"]["204"] = {"description": "Done"}
        paths[f"/{endpoint}"] = {action.http_method.lower(): op}
    _add_schema(m.VmConfig, schemas)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "vmsh API",
            "version": __version__,
            "description": "The VMM's HTTP API on its unix socket (cloud-hypervisor compatible).",
        },
        "servers": [{"url": "http://localhost/api/v1"}],
        "paths": paths,
        "components": {"schemas": dict(sorted(schemas.items()))},
    }


def render() -> str:
    return json.dumps(build_openapi(), indent=2, sort_keys=False) + "\n"


def load() -> dict[str, Any]:
    """The shipped document."""
    document: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    return document


if __name__ == "__main__":
    SPEC_PATH.write_text(render())
    sys.stdout.write(f"wrote {SPEC_PATH}\n")
