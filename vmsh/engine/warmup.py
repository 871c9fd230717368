"""Paying a restore's once-per-process costs before the restore is asked for (a pooled VMM).

The first ``vm.restore`` in a fresh VMM process is slower than the next ones: measured on the
development host, 21-28 ms against 15-18 ms for a second and third restore of the same
snapshot in the same process. The difference is work done once per process and cached:
evaluating the string annotations of every config and state class a snapshot is decoded into
and checked against (``typing.get_type_hints``: ~270 ``compile`` calls), importing the device
modules a config builds lazily, and reading the host facts the config checks cache
(``/proc/cpuinfo``'s AMX flag).

:func:`warm_restore` does exactly that work, and nothing else: it reads no snapshot, opens no
KVM VM, starts no thread, and leaves nothing behind but those caches, so a VMM that ran it
behaves as one that did not. The harness's VMM pool (``vmsh.harness.pool``) asks for it with
the environment variable :data:`WARM_RESTORE_ENV`; ``vmsh launch`` runs it before it serves
its API, so a pooled process that answers is a warm one.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import time
import typing
from collections.abc import Iterable, Iterator
from typing import Any

LOG = logging.getLogger(__name__)

#: set to ``1`` in a ``vmsh launch`` process's environment: warm up for a restore before serving
WARM_RESTORE_ENV = "VMSH_WARM_RESTORE"

#: the device modules a restore imports only when the snapshot's config has such a device
#: (``vmsh.engine.virtio_devices``)
_LAZY_DEVICE_MODULES = (
    "vmsh.devices.backends.tap",
    "vmsh.devices.virtio.balloon",
    "vmsh.devices.virtio.block",
    "vmsh.devices.virtio.console",
    "vmsh.devices.virtio.iommu",
    "vmsh.devices.virtio.mem",
    "vmsh.devices.virtio.net",
    "vmsh.devices.virtio.pmem",
    "vmsh.devices.virtio.vsock",
    "vmsh.devices.virtio.watchdog",
)


def warm_restore() -> float:
    """Do a restore's once-per-process work now (see the module docstring); returns the seconds
    it took."""
    from vmsh.config import serde
    from vmsh.config.model import RestoreConfig, VmConfig
    from vmsh.devices import state as device_state
    from vmsh.engine import persist
    from vmsh.engine.builder import host_has_amx
    from vmsh.engine.kvm_state import VcpuState, VmKvmState

    start = time.monotonic()
    for name in _LAZY_DEVICE_MODULES:
        importlib.import_module(name)
    for cls in _dataclasses_within([RestoreConfig, VmConfig]):
        serde.prepare(cls)
    for cls in _dataclasses_within([VcpuState, VmKvmState, *device_state_types()]):
        persist.prepare(cls)
        device_state.prepare(cls)
    host_has_amx()
    took = time.monotonic() - start
    LOG.debug("warmed up for a restore in %.1f ms", took * 1000)
    return took


def device_state_types() -> list[type]:
    """The state classes of every device class in the loaded ``vmsh.devices`` modules."""
    found: dict[type, None] = {}
    for name, module in list(sys.modules.items()):
        if not (name == "vmsh.devices" or name.startswith("vmsh.devices.")):
            continue
        # getattr: sys.modules may hold None for a module whose import failed
        for obj in list(getattr(module, "__dict__", {}).values()):
            state_type = getattr(obj, "state_type", None) if isinstance(obj, type) else None
            if isinstance(state_type, type) and dataclasses.is_dataclass(state_type):
                found[state_type] = None
    return list(found)


def _dataclasses_within(roots: Iterable[type]) -> Iterator[type]:
    """``roots`` and every dataclass their field types name, each once."""
    seen: set[type] = set()
    todo: list[Any] = list(roots)
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp in seen:
                continue
            seen.add(tp)
            yield tp
            todo.extend(typing.get_type_hints(tp, include_extras=True).values())
        else:
            todo.extend(arg for arg in typing.get_args(tp) if arg is not Ellipsis)
