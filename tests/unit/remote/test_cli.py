"""``vmsh remote`` (ch-remote) end to end: its output bytes and exit statuses, against a stand-in
socket that answers with chosen bytes, and against a live API server with a stand-in VM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.api.fake_vm import FakeVm
from tests.unit.remote.fake_api import FakeApi, response
from tests.unit.remote.test_commands import TABLE
from vmsh.api.http import ApiServer
from vmsh.engine.events import EventMonitor
from vmsh.engine.vmm import Vmm
from vmsh.remote.cli import NO_SOCKET, main

#: a body spaced as no JSON encoder would: it must come out byte for byte
ODD_BODY = b'{ "id":"test0" ,"bdf" : "0000:00:06.0","n":[1,  2]}'


def run(capfdbinary: pytest.CaptureFixture[bytes], argv: list[str]) -> tuple[int, bytes, bytes]:
    status = main(argv)
    out, err = capfdbinary.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def no_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMSH_API_SOCKET", raising=False)


@pytest.mark.parametrize("name, args", [(name, args) for name, args, _ in TABLE
                                         if name not in ("describe", "profile-stop")], ids=lambda v: str(v))
def test_every_subcommand_prints_the_body_as_received(name: str, args: list[str], tmp_path: Path,
                                                      capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    (tmp_path / "vm.json").write_text("{}")
    args = [str(tmp_path / "vm.json") if a == "VMJSON" else a for a in args]
    with FakeApi(tmp_path / "api.sock", response("200 OK", ODD_BODY)) as api:
        assert run(capfdbinary, [f"--api-socket={api.path}", name, *args]) == (0, ODD_BODY + b"\n", b"")
    assert len(api.requests) == 1


def test_the_compact_body_of_the_issue(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    body = b'{"id":"test0","bdf":"0000:00:06.0"}'
    with FakeApi(tmp_path / "api.sock", response("200 OK", body, "Content-Type: application/json")) as api:
        assert run(capfdbinary, ["--api-socket", api.path, "add-disk", "path=/img,id=test0"]) == (0, body + b"\n", b"")


@pytest.mark.parametrize("reply, out", [
    (response("204 No Content", None), b""),      # no Content-Length: nothing printed
    (response("200 OK", b""), b"\n"),             # an empty body is printed, as ch-remote's println! does
])
def test_empty_responses(reply: bytes, out: bytes, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    with FakeApi(tmp_path / "api.sock", reply) as api:
        assert run(capfdbinary, ["--api-socket", api.path, "boot"]) == (0, out, b"")


@pytest.mark.parametrize("status, name", [("400 Bad Request", "BadRequest"), ("404 Not Found", "NotFound"),
                                          ("500 Internal Server Error", "InternalServerError"),
                                          ("501 Not Implemented", "NotImplemented"), ("409 Conflict", "Unknown")])
def test_server_errors(status: str, name: str, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    body = json.dumps(["Error from API", "VM is not created"]).encode()
    with FakeApi(tmp_path / "api.sock", response(status, body)) as api:
        assert run(capfdbinary, ["--api-socket", api.path, "info"]) == (
            1, b"", f"Error running command: Server responded with an error: {name}\n"
                    "  Error from API: VM is not created\n".encode())


def test_a_server_that_hangs_up(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    with FakeApi(tmp_path / "api.sock", None) as api:
        assert run(capfdbinary, ["--api-socket", api.path, "ping"]) == (
            1, b"", b"Error running command: HTTP output is missing protocol statement\n")


def test_without_a_socket(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert run(capfdbinary, ["ping"]) == (1, NO_SOCKET.encode(), b"")
    assert run(capfdbinary, ["--api-socket", str(tmp_path / "none"), "ping"]) == (
        1, b"", b"Error opening HTTP socket: No such file or directory (os error 2)\n")


def test_the_request_on_the_wire(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    vm_json = tmp_path / "vm.json"
    vm_json.write_bytes(b'{"payload":  {"kernel": "/k"}}\n')
    with FakeApi(tmp_path / "api.sock", response("204 No Content", None)) as api:
        assert run(capfdbinary, [f"--api-socket={api.path}", "resize", "--cpus=4"])[0] == 0
        assert run(capfdbinary, [f"--api-socket={api.path}", "create", str(vm_json)])[0] == 0
        assert run(capfdbinary, [f"--api-socket={api.path}", "ping"])[0] == 0
    head = b"HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
    assert api.requests == [
        b"PUT /api/v1/vm.resize " + head + b'Content-Length: 19\r\n\r\n{"desired_vcpus":4}',
        # create sends the file as it is, as ch-remote does
        b"PUT /api/v1/vm.create " + head + b"Content-Length: 31\r\n\r\n" + vm_json.read_bytes(),
        b"GET /api/v1/vmm.ping " + head + b"\r\n",
    ]


def test_usage_errors_send_nothing(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    with FakeApi(tmp_path / "api.sock", response("204 No Content", None)) as api:
        status, out, err = run(capfdbinary, ["--api-socket", api.path, "resize", "--vcpus", "2"])
    assert (status, out) == (2, b"") and err.startswith(b"error: unexpected argument '--vcpus' found\n")
    assert api.requests == []


def test_bad_option_syntax_is_reported_after_connecting(tmp_path: Path,
                                                        capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    with FakeApi(tmp_path / "api.sock", response("204 No Content", None)) as api:
        status, out, err = run(capfdbinary, ["--api-socket", api.path, "add-disk", "path=/a,bogus=1"])
    assert (status, out, api.requests) == (1, b"", [])
    assert err == b"Error running command: Error parsing disk syntax: Error parsing --disk: Unknown option: bogus\n"


def test_help_and_version(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    status, out, err = run(capfdbinary, ["--help"])
    assert status == 0 and out.startswith(b"Remotely control a cloud-hypervisor VMM.\n") and err == b""
    status, out, err = run(capfdbinary, [])
    assert status == 2 and err.startswith(b"Remotely control a cloud-hypervisor VMM.\n") and out == b""


# -- against the live API server -------------------------------------------------------------------


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
    boot = remote(sock, "boot")
    assert (boot.returncode, boot.stdout) == (0, "")
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
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error running command: Server responded with an error: NotFound\n")
    assert "VM is not created" in result.stderr
    result = remote(sock, "add-disk", "path=/a,bogus=1")
    assert result.returncode == 1 and result.stderr == (
        "Error running command: Error parsing disk syntax: Error parsing --disk: Unknown option: bogus\n")
    assert remote(sock, "frobnicate").returncode == 2
    result = remote(sock, "create", stdin="{bad")
    assert result.returncode == 1 and "BadRequest" in result.stderr
    assert "Traceback" not in result.stderr
