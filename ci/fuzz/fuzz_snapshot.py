"""Fuzz campaign: the snapshot loader on mutated snapshot directories.

The seed is ``tests/engine/fixtures/snapshot-v1.tar.gz`` (a snapshot with one device of every
kind vmsh snapshots). Each input changes one or more of its parts: ``config.json`` (bytes
mutated, or one value of its JSON replaced), ``state.json`` (a value of the tree replaced, a
node's embedded state JSON changed the same way, or the file's bytes mutated), and the memory
file (``memory-ranges``: truncated, extended or removed). The directory is then read the way
``vm.restore`` reads it: :func:`vmsh.engine.snapshot.read_saved_vm`, then every device's saved
state decoded with :func:`vmsh.engine.persist.from_plain` into its state class as the device
manager does (``DeviceManager._decode_state``: a virtio-pci transport's state, then its
device's), and restored into a real device model through the device manager's
``_restore_state``: the platform devices (serial, CMOS, GED, PCI hotplug registers, and the
PCI configuration ports and POST port that snapshots of format 1 lack, which some inputs add)
and pvpanic built fresh for each input as the builder builds them from the snapshot's config,
the virtio devices reset behind a fresh virtio-pci transport. Only
:class:`vmsh.errors.SnapshotError` may come out.

Usage: ``python3 ci/fuzz/fuzz_snapshot.py --inputs 100000``
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ci.fuzz import fuzzlib
from ci.fuzz.fuzz_virtio import NoWatcher
from tests.unit.devices.virtio.driver import FakeRouter
from tests.unit.fakes import FakeTrigger
from vmsh.devices.acpi import Ged, PciHotplugController
from vmsh.devices.backends.tap import Tap
from vmsh.devices.legacy.cmos import Cmos
from vmsh.devices.legacy.post import PostPort
from vmsh.devices.legacy.serial import Serial16550
from vmsh.devices.pci.root import PciBus, PciConfigIo
from vmsh.devices.pvpanic import PvPanicDevice
from vmsh.devices.virtio.balloon import VirtioBalloon, VirtioBalloonState
from vmsh.devices.virtio.block import VirtioBlock, VirtioBlockState
from vmsh.devices.virtio.console import VirtioConsole, VirtioConsoleState
from vmsh.devices.virtio.device import VirtioDevice
from vmsh.devices.virtio.net import NetState, VirtioNet
from vmsh.devices.virtio.pci import VirtioPciDevice, VirtioPciState
from vmsh.devices.virtio.pmem import VirtioPmem, VirtioPmemState
from vmsh.devices.virtio.rng import VirtioRng, VirtioRngState
from vmsh.devices.virtio.vsock.device import VirtioVsock, VirtioVsockState
from vmsh.devices.virtio.watchdog import VirtioWatchdog, VirtioWatchdogState
from vmsh.engine.device_manager import _restore_state
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.pci_windows import MMIO32_START
from vmsh.engine.persist import CONFIG_FILE, MEMORY_FILE, STATE_FILE, from_plain, to_plain
from vmsh.engine.snapshot import SavedVm, read_saved_vm
from vmsh.errors import SnapshotError, VmshError

FIXTURE = Path(__file__).resolve().parents[2] / "tests/engine/fixtures/snapshot-v1.tar.gz"
#: where the fixture's pmem device is mapped (its saved state names the address)
PMEM_START, PMEM_SIZE = 0x1_0020_0000, 2 << 20

#: the platform devices by snapshot id, each made as ``create_platform_devices`` (and the device
#: manager, for the configuration ports) makes it from the snapshot's config
LEGACY_DEVICES: dict[str, Callable[[SavedVm], Any]] = {
    "__pci_config_io": lambda saved: PciConfigIo(PciBus(0)),
    "__serial": lambda saved: Serial16550(FakeTrigger(), lambda data: None),
    "__cmos": lambda saved: Cmos(min(saved.config.memory.size, MMIO32_START),
                                 max(0, saved.config.memory.size - MMIO32_START), FakeTrigger()),
    "__post": lambda saved: PostPort(),
    "__ged": lambda saved: Ged(FakeTrigger()),
    "__pci_hotplug": lambda saved: PciHotplugController(saved.config.num_pci_segments(), lambda seg, slot: None),
}
#: platform devices whose state snapshots of format 1 do not have: some inputs add one
NEWER_LEGACY = ("__pci_config_io", "__post")
#: plain PCI devices (no virtio transport) by snapshot id
PCI_DEVICES: dict[str, Callable[[], Any]] = {"__pvpanic": lambda: PvPanicDevice(lambda events: None)}
#: device id in the fixture -> state class of the virtio device behind virtio-pci
VIRTIO_STATES: dict[str, type[Any]] = {
    "_disk0": VirtioBlockState, "_net1": NetState, "__console": VirtioConsoleState, "__rng": VirtioRngState,
    "_pmem2": VirtioPmemState, "_vsock3": VirtioVsockState, "__balloon": VirtioBalloonState,
    "__watchdog": VirtioWatchdogState,
}

_SCALARS: list[Any] = [None, True, False, 0, 1, -1, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1,
                       1 << 63, (1 << 64) - 1, 1 << 64, -(1 << 63) - 1, 10 ** 300, 0.5, 1e308, "", "x", "AAAA",
                       "!!notbase64", "A" * 10_001, [], {}, [0], [[]], {"a": 1}]


@dataclass
class Seed:
    config_text: str
    tree: dict[str, Any]
    memory_size: int


SEED: Seed | None = None


def _seed() -> Seed:
    global SEED
    if SEED is None:
        with tarfile.open(FIXTURE) as tar:
            def text(name: str) -> str:
                member = tar.extractfile(name)
                assert member is not None
                return member.read().decode()

            memory = tar.getmember(MEMORY_FILE)
            SEED = Seed(text(CONFIG_FILE), json.loads(text(STATE_FILE)), memory.size)
    return SEED


@dataclass
class SnapshotInput:
    config: bytes
    state: bytes
    memory_size: int | None  # None: no memory file


def _random_value(rnd: random.Random) -> Any:
    pick = rnd.randrange(6)
    if pick < 3:
        return rnd.choice(_SCALARS)
    if pick == 3:
        return rnd.getrandbits(rnd.choice((8, 16, 32, 64, 65))) * rnd.choice((1, -1))
    if pick == 4:
        return [rnd.choice(_SCALARS) for _ in range(rnd.randrange(4))]
    return {rnd.choice(("a", "data", "state", "snapshots", "snapshot_data", "version")): rnd.choice(_SCALARS)}


def _mutate_value(rnd: random.Random, value: Any, rounds: int) -> Any:
    for _ in range(rounds):
        paths = fuzzlib.json_paths(value)
        path = rnd.choice(paths)
        op = rnd.randrange(4)
        if op == 0 and path:  # delete a key or an item
            parent = _get(value, path[:-1])
            copy = dict(parent) if isinstance(parent, dict) else list(parent)
            del copy[path[-1]]
            value = fuzzlib.json_replace(value, path[:-1], copy)
        elif op == 1:  # copy another part of the tree here
            value = fuzzlib.json_replace(value, path, _get(value, rnd.choice(paths)))
        else:
            value = fuzzlib.json_replace(value, path, _random_value(rnd))
    return value


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


def _state_nodes(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of the embedded state strings (``...["snapshot_data"]["state"]``)."""
    out = []
    if isinstance(tree, dict):
        data = tree.get("snapshot_data")
        if isinstance(data, dict) and isinstance(data.get("state"), str):
            out.append((*prefix, "snapshot_data", "state"))
        children = tree.get("snapshots")
        if isinstance(children, dict):
            for name, child in children.items():
                out += _state_nodes(child, (*prefix, "snapshots", name))
    return out


@st.composite
def snapshot_input(draw: st.DrawFn) -> SnapshotInput:
    seed = _seed()
    rnd = draw(st.randoms(use_true_random=False))
    config = seed.config_text.encode()
    tree: Any = seed.tree
    state: bytes | None = None
    memory_size: int | None = seed.memory_size
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        what = rnd.randrange(11)
        if what == 0:
            config = fuzzlib.mutate(config, rnd, rnd.randint(1, 8))
        elif what == 1:
            try:
                config = json.dumps(_mutate_value(rnd, json.loads(config), rnd.randint(1, 3))).encode()
            except (ValueError, RecursionError):
                config = fuzzlib.mutate(config, rnd, 1)
        elif what in (2, 3):
            tree = _mutate_value(rnd, tree, rnd.randint(1, 3))
        elif what in (4, 5, 6, 7):  # a device's (or the root's, a vCPU's) own state
            nodes = _state_nodes(tree)
            if nodes:
                path = rnd.choice(nodes)
                text = _get(tree, path)
                try:
                    decoded = json.loads(text)
                except (ValueError, RecursionError):  # an earlier step made it malformed
                    decoded = None
                if rnd.randrange(12) == 0:  # nesting deeper than the decoder's recursion, or too many digits
                    new = rnd.choice(("[" * 100_000 + "]" * 100_000, "9" * 5000, '{"index": ' + "9" * 4301 + "}"))
                elif decoded is not None and rnd.randrange(4):
                    new = json.dumps(_mutate_value(rnd, decoded, rnd.randint(1, 4)), separators=(",", ":"))
                else:
                    new = fuzzlib.mutate(text.encode(), rnd, rnd.randint(1, 4)).decode("utf-8", "replace")
                tree = fuzzlib.json_replace(tree, path, new)
        elif what == 8:
            state = fuzzlib.mutate(json.dumps(tree).encode(), rnd, rnd.randint(1, 8))
            if rnd.randrange(8) == 0:
                state = rnd.choice((b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"null"))
        elif what == 9:  # a state format 1 did not have: a fresh device's, mutated
            dev_id = rnd.choice(NEWER_LEGACY)
            fresh = PciConfigIo(PciBus(0)) if dev_id == "__pci_config_io" else PostPort()
            plain = to_plain(fresh.state())
            if rnd.randrange(4):
                plain = _mutate_value(rnd, plain, rnd.randint(1, 3))
            node = {"snapshots": {}, "snapshot_data": {"state": json.dumps(plain, separators=(",", ":"))}}
            where = ("snapshots", "device-manager", "snapshots")
            try:
                children = _get(tree, where)
            except (KeyError, IndexError, TypeError):  # an earlier step removed the device manager
                children = None
            if isinstance(children, dict):
                tree = fuzzlib.json_replace(tree, where, {**children, dev_id: node})
        else:
            memory_size = rnd.choice((None, 0, 1, seed.memory_size - 1, seed.memory_size + 1, seed.memory_size // 2,
                                      seed.memory_size * 2))
    if state is None:
        state = json.dumps(tree).encode()
    return SnapshotInput(config, state, memory_size)


class _Harness:
    def __init__(self) -> None:
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.mem: GuestMemoryMmap | None = None
        #: the fixture's virtio devices, built as its config says, for the restore step
        self.devices: dict[str, VirtioDevice] = {}

    def setup(self) -> None:
        seed = _seed()
        self.tmp = tempfile.TemporaryDirectory(prefix="vmsh-fuzz-snapshot-")
        d = self.tmp.name
        with open(f"{d}/disk.img", "wb") as f:
            f.truncate(1 << 20)
        with open(f"{d}/pmem.img", "wb") as f:
            f.truncate(PMEM_SIZE)
        self.mem = GuestMemoryMmap.create(seed.memory_size)
        makers: dict[str, Callable[[], VirtioDevice]] = {
            "_disk0": lambda: VirtioBlock(f"{d}/disk.img"),
            "_net1": lambda: VirtioNet(Tap.open(None, 1), b"\x52\x54\0\x12\x34\x56", NoWatcher()),
            "__console": lambda: VirtioConsole(out=lambda data: None),
            "__rng": lambda: VirtioRng(),
            "_pmem2": lambda: VirtioPmem(f"{d}/pmem.img", PMEM_START, PMEM_SIZE),
            "_vsock3": lambda: VirtioVsock(3, f"{d}/vsock.sock", NoWatcher()),
            "__balloon": lambda: VirtioBalloon(0),
            "__watchdog": lambda: VirtioWatchdog(FakeTrigger(), interval=3600),
        }
        for dev_id, make in makers.items():
            try:
                self.devices[dev_id] = make()
            except (OSError, VmshError):  # no tap without root and /dev/net/tun: decode only
                pass

    def teardown(self) -> None:
        for dev in self.devices.values():
            dev.close()
        self.devices.clear()
        if self.mem is not None:
            self.mem.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    def target(self, inp: SnapshotInput) -> None:
        assert self.tmp is not None
        d = Path(self.tmp.name) / "snap"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        (d / CONFIG_FILE).write_bytes(inp.config)
        (d / STATE_FILE).write_bytes(inp.state)
        if inp.memory_size is not None:
            with open(d / MEMORY_FILE, "wb") as f:
                f.truncate(inp.memory_size)  # sparse: no 32 MiB written per input
        saved = read_saved_vm(str(d))
        restore_platform(saved)
        states = decode_devices(saved.devices)
        # then restore each virtio device as DeviceManager.restore does, into the device reset
        # (as built) behind a fresh transport
        assert self.mem is not None
        for dev_id, state in states.items():
            dev = self.devices.get(dev_id)
            if dev is not None:
                dev.reset()
                _restore_state(dev_id, VirtioPciDevice(dev, self.mem, FakeRouter()), state)


def restore_platform(saved: SavedVm) -> None:
    """Restore the saved platform devices and pvpanic into fresh device models, as
    ``DeviceManager.restore`` does (a PCI device's ``pci_slot`` taken off its state first)."""
    for dev_id, make in LEGACY_DEVICES.items():
        if dev_id in saved.devices:
            device = make(saved)
            _restore_state(dev_id, device, from_plain(device.state_type, saved.devices[dev_id], dev_id))
    for dev_id, make_pci in PCI_DEVICES.items():
        if dev_id in saved.devices:
            raw = saved.devices[dev_id]
            if not isinstance(raw, dict):
                raise SnapshotError(f"{dev_id}: expected an object")
            raw = {key: value for key, value in raw.items() if key != "pci_slot"}
            device = make_pci()
            _restore_state(dev_id, device, from_plain(device.state_type, raw, dev_id))


def decode_devices(devices: dict[str, Any]) -> dict[str, VirtioPciState]:
    """Decode each virtio device's saved state as ``DeviceManager.restore`` does."""
    states = {}
    for dev_id, raw in devices.items():
        if dev_id in LEGACY_DEVICES or dev_id in PCI_DEVICES:
            continue  # restore_platform's
        if not isinstance(raw, dict):
            raise SnapshotError(f"{dev_id}: expected an object")
        raw = dict(raw)
        raw.pop("pci_slot", None)
        if dev_id in VIRTIO_STATES:
            state = from_plain(VirtioPciState, {**raw, "device": None}, dev_id)
            device = from_plain(VIRTIO_STATES[dev_id], raw.get("device"), f"{dev_id}.device")
            states[dev_id] = dataclasses.replace(state, device=device)
        # an id the fixture does not have: the device manager refuses it (devices do not match)
    return states


HARNESS = _Harness()
CAMPAIGN = fuzzlib.Campaign("snapshot", snapshot_input(), HARNESS.target, (SnapshotError,), time_limit=5.0,
                            setup=HARNESS.setup, teardown=HARNESS.teardown)

if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(fuzzlib.main(CAMPAIGN))
