"""``--cpus topology`` whose counts are not powers of two: the vCPUs' x2APIC ids (their KVM ids)
are sparse, as cloud-hypervisor packs them, and survive a snapshot and restore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.engine import tiny_kernel
from tests.engine.test_snapshot import read_printed, wait_for_socket
from vmsh.api.client import ApiClient

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]


def _snapshot(tmp_path: Path) -> Path:
    kernel = tmp_path / "letters.elf"
    kernel.write_bytes(tiny_kernel.letters())
    api, snap = tmp_path / "api.sock", tmp_path / "snap"
    snap.mkdir()
    proc = subprocess.Popen([*LAUNCH, "--kernel", str(kernel), "--cpus", "boot=6,topology=3:1:1:2", "--serial", "tty",
                             "--console", "off", "--api-socket", str(api)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_socket(api, proc)
        read_printed(proc)
        with ApiClient(str(api)) as client:
            client.put("vm.pause")
            client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    finally:
        proc.kill()
        proc.wait()
    return snap


def _vcpus(snap: Path) -> dict[str, dict]:
    tree = json.loads((snap / "state.json").read_text())
    return tree["snapshots"]["cpu-manager"]["snapshots"]


def _restore(snap: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*LAUNCH, "--restore", f"source_url=file://{snap},resume=on"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sparse_apic_ids_are_kept_by_snapshot_and_restore(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    vcpus = _vcpus(snap)
    # keyed by the vCPU's number; each holds its KVM id, its x2APIC id: threads 0-2 of package 0
    # and of package 1, whose id starts at 4 (two bits number three threads)
    assert sorted(vcpus, key=int) == ["0", "1", "2", "3", "4", "5"]
    ids = [json.loads(vcpus[str(i)]["snapshot_data"]["state"])["vcpu_id"] for i in range(6)]
    assert ids == [0, 1, 2, 4, 5, 6]
    proc = _restore(snap)
    try:
        assert read_printed(proc)  # the restored guest runs on
    finally:
        proc.kill()
        proc.wait()


def test_a_vcpu_whose_id_the_topology_does_not_give_is_refused(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    tree = json.loads((snap / "state.json").read_text())
    vcpu = tree["snapshots"]["cpu-manager"]["snapshots"]["3"]
    state = json.loads(vcpu["snapshot_data"]["state"])
    state["vcpu_id"] = 3
    vcpu["snapshot_data"]["state"] = json.dumps(state)
    (snap / "state.json").write_text(json.dumps(tree))
    result = subprocess.run([*LAUNCH, "--restore", f"source_url=file://{snap}"], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 1, result.stderr
    assert b"vcpu3 has KVM id 3, its topology gives 4" in result.stderr and b"Traceback" not in result.stderr
