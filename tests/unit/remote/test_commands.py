"""ch-remote's subcommands: each one parsed in both ``--flag value`` and ``--flag=value`` forms,
and the request it sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmsh.errors import OptionParseError, UsageError, error_chain
from vmsh.remote.clap import ClapExit, parse
from vmsh.remote.commands import BIN_NAME, REMOTE, RawBody, build_request, check_needed, request_for

#: every subcommand: its arguments (flags with their values as separate words), then
#: (method, endpoint, the body or the keys it must hold)
TABLE: list[tuple[str, list[str], tuple[str, str, Any]]] = [
    ("add-device", ["path=/dev/vfio/7,id=v0"], ("PUT", "vm.add-device", {"path": "/dev/vfio/7", "id": "v0"})),
    ("add-disk", ["path=/img,readonly=on,id=d0"],
     ("PUT", "vm.add-disk", {"path": "/img", "readonly": True, "id": "d0"})),
    ("add-fs", ["tag=t,socket=/s"], ("PUT", "vm.add-fs", {"tag": "t", "socket": "/s"})),
    ("add-pmem", ["file=/p,size=1M"], ("PUT", "vm.add-pmem", {"file": "/p", "size": 1 << 20})),
    ("add-net", ["tap=tap0,id=n0"], ("PUT", "vm.add-net", {"tap": "tap0", "id": "n0"})),
    ("add-user-device", ["socket=/u,id=u0"], ("PUT", "vm.add-user-device", {"socket": "/u", "id": "u0"})),
    ("add-vdpa", ["path=/dev/vhost-vdpa-0"], ("PUT", "vm.add-vdpa", {"path": "/dev/vhost-vdpa-0"})),
    ("add-vsock", ["cid=3,socket=/v"], ("PUT", "vm.add-vsock", {"cid": 3, "socket": "/v"})),
    ("remove-device", ["_disk0"], ("PUT", "vm.remove-device", {"id": "_disk0"})),
    ("info", [], ("GET", "vm.info", None)),
    ("counters", [], ("GET", "vm.counters", None)),
    ("pause", [], ("PUT", "vm.pause", None)),
    ("reboot", [], ("PUT", "vm.reboot", None)),
    ("power-button", [], ("PUT", "vm.power-button", None)),
    ("resize", ["--cpus", "4", "--memory", "1G", "--balloon", "512M"],
     ("PUT", "vm.resize", {"desired_vcpus": 4, "desired_ram": 1 << 30, "desired_balloon": 512 << 20})),
    ("resize-zone", ["--id", "mem0", "--size", "1G"],
     ("PUT", "vm.resize-zone", {"id": "mem0", "desired_ram": 1 << 30})),
    ("resume", [], ("PUT", "vm.resume", None)),
    ("boot", [], ("PUT", "vm.boot", None)),
    ("delete", [], ("PUT", "vm.delete", None)),
    ("shutdown", [], ("PUT", "vm.shutdown", None)),
    ("snapshot", ["file:///tmp/snap"], ("PUT", "vm.snapshot", {"destination_url": "file:///tmp/snap"})),
    ("restore", ["source_url=file:///s,prefault=on"],
     ("PUT", "vm.restore", {"source_url": "file:///s", "prefault": True})),
    ("coredump", ["file:///tmp/core"], ("PUT", "vm.coredump", {"destination_url": "file:///tmp/core"})),
    ("send-migration", ["unix:/m", "--local"],
     ("PUT", "vm.send-migration", {"destination_url": "unix:/m", "local": True})),
    ("receive-migration", ["unix:/m"], ("PUT", "vm.receive-migration", {"receiver_url": "unix:/m"})),
    ("create", ["VMJSON"], ("PUT", "vm.create", RawBody('{"payload": {"kernel": "/k"}}'))),
    ("ping", [], ("GET", "vmm.ping", None)),
    ("shutdown-vmm", [], ("PUT", "vmm.shutdown", None)),
    ("nmi", [], ("PUT", "vm.nmi", None)),
    ("describe", [], ("GET", "vm.describe", None)),
    ("registers", ["1"], ("PUT", "vm.registers", {"cpu_id": 1})),
    ("read-memory", ["0x1000", "16"], ("PUT", "vm.read-memory", {"address": 0x1000, "length": 16})),
    ("profile-start", ["500"], ("PUT", "vm.profile-start", {"hz": 500})),
    ("profile-stop", ["/boot/System.map"], ("PUT", "vm.profile-stop", {"system_map": "/boot/System.map"})),
]


def equals_form(args: list[str]) -> list[str]:
    """``--flag value`` pairs joined into ``--flag=value`` (switches stay as they are)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def test_the_table_covers_every_subcommand() -> None:
    assert sorted(name for name, _, _ in TABLE) == sorted(c.name for c in REMOTE.subcommands)


@pytest.mark.parametrize("form", ["space", "equals"])
@pytest.mark.parametrize("name, args, expected", TABLE, ids=[row[0] for row in TABLE])
def test_every_subcommand_in_both_forms(name: str, args: list[str], expected: tuple[str, str, Any], form: str,
                                        tmp_path: Path) -> None:
    vm_json = tmp_path / "vm.json"
    vm_json.write_text('{"payload": {"kernel": "/k"}}')
    args = [str(vm_json) if a == "VMJSON" else a for a in args]
    argv = ["--api-socket", "/run/vm.sock", name, *args]
    if form == "equals":
        argv = equals_form(argv)
        assert argv[0] == "--api-socket=/run/vm.sock"
    matches = parse(REMOTE, argv, BIN_NAME)
    assert matches.get("api-socket") == "/run/vm.sock" and matches.subcommand is not None
    command, sub = matches.subcommand
    check_needed(command, sub)
    method, endpoint, body, fds = request_for(command, sub)
    assert (command, method, endpoint, fds) == (name, expected[0], expected[1], [])
    if name.startswith("add-") or name == "restore":  # the config layer fills in the rest
        assert {k: body[k] for k in expected[2]} == expected[2]
    else:
        assert body == expected[2]


def test_resize_with_equals_was_a_usage_error_and_is_not() -> None:
    assert build_request("resize", ["--cpus=4"]) == ("PUT", "vm.resize", {"desired_vcpus": 4}, [])
    assert build_request("resize", []) == ("PUT", "vm.resize", {}, [])  # ch-remote sends it too


def test_add_net_fds_travel_as_scm_rights() -> None:
    _, endpoint, body, fds = build_request("add-net", ["fd=[5,6],num_queues=4"])
    assert endpoint == "vm.add-net" and fds == [5, 6] and "fds" not in body


def test_restore_net_fds_travel_as_scm_rights() -> None:
    _, endpoint, body, fds = build_request("restore", ["source_url=file:///s,net_fds=[net0@[5,6],net1@[7]]"])
    assert endpoint == "vm.restore" and fds == [5, 6, 7]
    assert [(n["id"], n["num_fds"], n.get("fds")) for n in body["net_fds"]] == [("net0", 2, None), ("net1", 1, None)]


@pytest.mark.parametrize("args, message", [
    (["--cpus=x"], "Error parsing CPU count: invalid digit found in string"),
    (["--cpus=-1"], "Error parsing CPU count: invalid digit found in string"),
    (["--cpus=256"], "Error parsing CPU count: number too large to fit in target type"),
    (["--cpus="], "Error parsing CPU count: cannot parse integer from empty string"),
    (["--memory=1X"], 'Error parsing memory size: InvalidValue("1X")'),
    (["--balloon", "abcG"], 'Error parsing balloon size: InvalidValue("abc")'),
])
def test_resize_values_fail_in_ch_remote_s_words(args: list[str], message: str) -> None:
    with pytest.raises(OptionParseError) as caught:
        build_request("resize", args)
    assert str(caught.value) == message


def test_cpu_count_parses_as_rust_s_u8() -> None:
    assert build_request("resize", ["--cpus", "+3"])[2] == {"desired_vcpus": 3}
    assert build_request("resize", ["--cpus", "255"])[2] == {"desired_vcpus": 255}


def test_option_syntax_errors_name_the_syntax() -> None:
    with pytest.raises(OptionParseError) as caught:
        build_request("add-disk", ["path=/a,bogus=1"])
    assert error_chain(caught.value)[:2] == ["Error parsing disk syntax", "Error parsing --disk"]
    assert "bogus" in error_chain(caught.value)[-1]
    with pytest.raises(OptionParseError, match="Error parsing restore syntax"):
        build_request("restore", ["prefault=maybe"])


@pytest.mark.parametrize("argv", [["boot", "x"], ["snapshot"], ["resize", "--vcpus", "2"], ["resize-zone", "--id", "z"],
                                  ["read-memory"], ["read-memory", "x"], ["registers", "0", "1"], ["add-disk"],
                                  ["frobnicate"]])
def test_build_request_usage(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        build_request(argv[0], argv[1:])


def test_needed_arguments_are_reported_as_clap_reports_required_ones() -> None:
    with pytest.raises(ClapExit) as caught:
        build_request("resize-zone", ["--id=z"])
    assert caught.value.status == 2 and caught.value.text == (
        "error: the following required arguments were not provided:\n  --size <size>\n\n"
        "Usage: vmsh remote resize-zone --id <id> --size <size>\n\nFor more information, try '--help'.\n")
    with pytest.raises(ClapExit) as caught:
        build_request("add-disk", [])
    assert "\n  <disk_config>\n\nUsage: vmsh remote add-disk <disk_config>\n" in caught.value.text
