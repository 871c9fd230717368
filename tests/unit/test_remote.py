"""``vmsh remote`` (ch-remote) against a live API server with a stand-in VM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.api.fake_vm import FakeVm
from vmsh.api.http import ApiServer
from vmsh.engine.events import EventMonitor
from vmsh.engine.vmm import Vmm
from vmsh.errors import UsageError
from vmsh.remote import build_request


@pytest.fixture
def server(tmp_path: Path):
    vmm = Vmm(EventMonitor(), vm_factory=FakeVm)
    sock = str(tmp_path / "api.sock")
    srv = ApiServer(vmm, path=sock).start()
    yield sock, vmm
    srv.close()


def remote(sock: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmsh", "remote", "--api-socket", sock, *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


def test_remote_lifecycle(server, tmp_path: Path) -> None:
    sock, vmm = server
    (tmp_path / "vm.json").write_text(json.dumps({"payload": {"kernel": "/k"}}))
    assert remote(sock, "create", str(tmp_path / "vm.json")).returncode == 0
    assert remote(sock, "add-disk", "path=/img,readonly=on,id=d0").returncode == 0
    assert remote(sock, "boot").returncode == 0
    info = remote(sock, "info")
    assert info.returncode == 0
    assert json.loads(info.stdout)["state"] == "Running"
    assert json.loads(info.stdout)["config"]["disks"][0]["readonly"] is True
    assert remote(sock, "pause").returncode == 0
    assert remote(sock, "snapshot", "file:///tmp/snap").returncode == 0
    assert vmm.vm.calls[-1] == "snapshot /tmp/snap"
    assert remote(sock, "resume").returncode == 0
    assert json.loads(remote(sock, "counters").stdout) == {"_disk0": {"read_bytes": 0}}


def test_remote_errors(server) -> None:
    sock, _ = server
    result = remote(sock, "info")
    assert result.returncode == 1 and "404" in result.stderr and "VM is not created" in result.stderr
    result = remote(sock, "add-disk", "path=/a,bogus=1")
    assert result.returncode == 1 and result.stderr == "Error parsing --disk: Unknown option: bogus\n"
    assert remote(sock, "frobnicate").returncode == 2
    assert remote(sock, "create", stdin="{bad").returncode == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["ping"], ("GET", "vmm.ping", None)),
        (["shutdown-vmm"], ("PUT", "vmm.shutdown", None)),
        (["remove-device", "_disk0"], ("PUT", "vm.remove-device", {"id": "_disk0"})),
        (["resize", "--cpus", "2", "--memory", "1G"], ("PUT", "vm.resize", {"desired_vcpus": 2, "desired_ram": 1 << 30})),
        (["resize-zone", "--id", "z", "--size", "512M"], ("PUT", "vm.resize-zone", {"id": "z", "desired_ram": 512 << 20})),
        (["restore", "source_url=file:///s,resume=on"], ("PUT", "vm.restore", {"source_url": "file:///s", "prefault": False, "net_fds": None, "resume": True})),
        (["registers"], ("PUT", "vm.registers", {})),
        (["registers", "1"], ("PUT", "vm.registers", {"cpu_id": 1})),
        (["read-memory", "0x1000", "16"], ("PUT", "vm.read-memory", {"address": 0x1000, "length": 16})),
        (["profile-start", "500"], ("PUT", "vm.profile-start", {"hz": 500})),
        (["profile-stop", "/boot/System.map"], ("PUT", "vm.profile-stop", {"system_map": "/boot/System.map"})),
        (["profile-stop"], ("PUT", "vm.profile-stop", {})),
    ],
)
def test_build_request(argv: list[str], expected: tuple) -> None:
    method, endpoint, body, fds = build_request(argv[0], argv[1:])
    assert (method, endpoint, body) == expected and fds == []


def test_add_net_fds_travel_as_scm_rights() -> None:
    _, endpoint, body, fds = build_request("add-net", ["fd=[5,6],num_queues=4"])
    assert endpoint == "vm.add-net" and fds == [5, 6] and "fds" not in body


def test_restore_net_fds_travel_as_scm_rights() -> None:
    _, endpoint, body, fds = build_request("restore", ["source_url=file:///s,net_fds=[net0@[5,6],net1@[7]]"])
    assert endpoint == "vm.restore" and fds == [5, 6, 7]
    assert [(n["id"], n["num_fds"], n.get("fds")) for n in body["net_fds"]] == [("net0", 2, None), ("net1", 1, None)]


@pytest.mark.parametrize("argv", [["boot", "x"], ["snapshot"], ["resize", "--vcpus", "2"], ["resize-zone", "--id", "z"],
                                  ["read-memory"], ["read-memory", "x"], ["registers", "0", "1"]])
def test_build_request_usage(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        build_request(argv[0], argv[1:])
