"""Black-box: ``vmsh launch --dry-run`` and ``vmsh config normalize`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmsh.config import to_json_value, vm_config_from_json
from vmsh.config.render import to_argv


def vmsh(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmsh", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


PARITY_CASES = [
    (["--kernel", "/k"], {"payload": {"kernel": "/k"}}),
    (
        ["--kernel", "/k", "--cpus", "boot=2", "--memory", "size=1G", "--disk", "path=/a", "path=/b,readonly=on",
         "--net", "tap=t0,mac=12:34:56:78:90:ab", "--cmdline", "console=ttyS0,115200 quiet"],
        {"payload": {"kernel": "/k", "cmdline": "console=ttyS0,115200 quiet"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
         "memory": {"size": 1 << 30}, "disks": [{"path": "/a"}, {"path": "/b", "readonly": True}],
         "net": [{"tap": "t0", "mac": "12:34:56:78:90:ab"}]},
    ),
    (
        ["--firmware", "/fw", "--serial", "tty", "--console", "off", "--platform", "serial_number=S,uuid=U,oem_strings=[a,b]",
         "--pvpanic", "--vsock", "cid=3,socket=/v"],
        {"payload": {"firmware": "/fw"}, "serial": {"mode": "Tty"}, "console": {"mode": "Off"},
         "platform": {"system_serial_number": "S", "uuid": "U", "oem_strings": ["a", "b"]}, "pvpanic": True,
         "vsock": {"cid": 3, "socket": "/v"}},
    ),
]


@pytest.mark.parametrize("argv, body", PARITY_CASES)
def test_dry_run_and_normalize_print_identical_text(argv: list[str], body: dict) -> None:
    a = vmsh("launch", "--dry-run", *argv)
    b = vmsh("config", "normalize", "-", stdin=json.dumps(body))
    assert (a.returncode, a.stderr) == (0, "")
    assert (b.returncode, b.stderr) == (0, "")
    assert a.stdout == b.stdout
    assert json.loads(a.stdout)["payload"]


def test_normalized_text_renders_back_to_the_same_flags(tmp_path) -> None:
    text = vmsh("launch", "--dry-run", *PARITY_CASES[1][0]).stdout
    (tmp_path / "vm.json").write_text(text)
    again = vmsh("launch", "--dry-run", *to_argv(vm_config_from_json(text)))
    assert again.stdout == text
    assert vmsh("config", "normalize", str(tmp_path / "vm.json")).stdout == text
    assert json.loads(text) == to_json_value(vm_config_from_json(text))


@pytest.mark.parametrize(
    "args, status, stderr",
    [
        (["launch", "--dry-run", "--kernel", "/k", "--disk", "path=/a,foo=1"], 1, "Error parsing --disk: Unknown option: foo\n"),
        (["launch", "--dry-run", "--kernel", "/k", "--cpus", "boot=2,max=1"], 1, "Max CPUs (1) lower than boot CPUs (2)\n"),
        (["launch", "--dry-run", "--kernel", "/k", "--cpus"], 2, None),
        (["launch", "--dry-run", "--nope"], 2, None),
        (["config", "normalize", "/nonexistent/vm.json"], 1, None),
        (["config", "bogus"], 2, None),
        (["bogus"], 2, None),
    ],
)
def test_errors_are_one_clear_line_without_traceback(args: list[str], status: int, stderr: str | None) -> None:
    result = vmsh(*args)
    assert result.returncode == status
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    if stderr is not None:
        assert result.stderr == stderr
    else:
        assert result.stderr.strip()


def test_normalize_reports_bad_json_types() -> None:
    result = vmsh("config", "normalize", "-", stdin='{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": "2", "max_vcpus": 2}}')
    assert result.returncode == 1
    assert result.stderr == 'Error parsing JSON VmConfig: cpus.boot_vcpus: invalid type: string "2", expected u8\n'


def test_launch_help_lists_syntax() -> None:
    result = vmsh("launch", "--help")
    assert result.returncode == 0
    assert "--disk <disk>..." in result.stdout and "path=<disk_image_path>" in result.stdout


def test_version() -> None:
    result = vmsh("launch", "-V")
    assert result.returncode == 0 and result.stdout.startswith("vmsh ")
