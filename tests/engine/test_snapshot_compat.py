"""A snapshot written by an earlier vmsh release (format 1, ``fixtures/snapshot-v1.tar.gz``, one
device of every kind) still restores: the letters guest goes on printing, every device is back."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from vmsh.api.client import ApiClient

FIXTURE = Path(__file__).parent / "fixtures" / "snapshot-v1.tar.gz"
DEVICES = ["__console", "_disk0", "_net1", "__rng", "_pmem2", "_vsock3", "__balloon", "__watchdog", "__pvpanic"]


def unpack(tmp_path: Path) -> Path:
    """The fixture with its ``/FIXTURE`` paths moved into ``tmp_path`` and its files created."""
    snap = tmp_path / "snapshot"
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(snap, filter="data")
    config = snap / "config.json"
    config.write_text(config.read_text().replace("/FIXTURE", str(tmp_path)))
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    with open(tmp_path / "pmem.img", "wb") as f:
        f.truncate(2 << 20)
    return snap


@pytest.mark.kvm
def test_release_1_snapshot_restores(tmp_path: Path) -> None:
    snap = unpack(tmp_path)
    api, serial = tmp_path / "api.sock", tmp_path / "serial.log"
    proc = subprocess.Popen([sys.executable, "-m", "vmsh", "launch", "--restore", f"source_url=file://{snap}",
                             "--api-socket", str(api)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not api.exists():
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]  # stderr=PIPE: never None
            assert time.monotonic() < deadline, "the VMM did not come up"
            time.sleep(0.05)
        with ApiClient(str(api)) as client:
            info = client.get("vm.info")
            assert info["state"] == "Paused"
            config = info["config"]
            assert [d["id"] for d in config["disks"]] == ["_disk0"] and config["net"][0]["mac"] == "52:54:00:12:34:56"
            assert set(DEVICES) <= set(client.get("vm.counters"))
            before = serial.read_bytes() if serial.exists() else b""
            client.put("vm.resume")
            deadline = time.monotonic() + 30
            while len(serial.read_bytes()) <= len(before):
                assert time.monotonic() < deadline, "the restored guest printed nothing"
                time.sleep(0.1)
            printed = serial.read_bytes()[len(before):]
            assert printed[:1].isalpha(), printed
            assert client.get("vm.info")["state"] == "Running"
    finally:
        proc.kill()
        proc.wait()


def test_fixture_holds_every_device_kind() -> None:
    with tarfile.open(FIXTURE) as tar:
        member = tar.extractfile("state.json")
        assert member is not None
        tree = json.load(member)
    devices = tree["snapshots"]["device-manager"]["snapshots"]
    assert set(devices) == {"__serial", "__cmos", "__ged", "__pci_hotplug", *DEVICES}
