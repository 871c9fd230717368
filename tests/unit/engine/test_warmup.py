"""The warm-up a pooled VMM runs before it answers (:mod:`vmsh.engine.warmup`): it covers what a
restore decodes and checks, and leaves nothing behind (no thread, no descriptor, no KVM VM)."""

from __future__ import annotations

import os
import threading

from vmsh.config import serde
from vmsh.config.model import RestoreConfig, VmConfig
from vmsh.devices import state as device_state
from vmsh.devices.legacy.serial import SerialState
from vmsh.engine import persist
from vmsh.engine.kvm_state import VcpuState, VmKvmState
from vmsh.engine.warmup import device_state_types, warm_restore


def _fds() -> dict[str, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory listing's own descriptor, closed meanwhile
            pass
    return fds


def test_warm_up_leaves_no_thread_descriptor_or_vm_behind() -> None:
    threads, fds = set(threading.enumerate()), _fds()
    warm_restore()
    assert set(threading.enumerate()) == threads
    # no new descriptor (a KVM one above all); the worker may hold others' from earlier tests
    new = set(_fds().items()) - set(fds.items())
    assert not new, new


def test_warm_up_covers_the_classes_a_restore_decodes() -> None:
    from vmsh.devices.virtio.block import VirtioBlock  # imported by the warm-up too
    from vmsh.devices.virtio.pci import VirtioPciState

    warm_restore()
    types = device_state_types()
    assert SerialState in types and VirtioBlock.state_type in types and VirtioPciState in types
    # every class is now a cache hit: a restore evaluates no annotation
    for prepare, cache, classes in (
        (persist.prepare, persist._hints, [VcpuState, VmKvmState, SerialState, VirtioPciState]),
        (device_state.prepare, device_state._checked_fields, [SerialState, VirtioBlock.state_type]),
        (serde.prepare, serde._hints, [VmConfig, RestoreConfig]),
    ):
        for cls in classes:
            misses = cache.cache_info().misses
            prepare(cls)
            assert cache.cache_info().misses == misses, cls
