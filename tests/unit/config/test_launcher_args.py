"""The launcher's command line: repeated options, defaults, and usage errors."""

from __future__ import annotations

import pytest

from vmsh.config import parse_argv, vm_config_from_argv
from vmsh.config.launcher_args import FLAGS, help_text
from vmsh.config.parse import OPTION_PARSERS
from vmsh.errors import UsageError

K = ["--kernel", "/k"]


def test_multi_value_options_append_alike() -> None:
    a = vm_config_from_argv([*K, "--disk", "path=/a", "path=/b", "--net", "tap=t0"])
    b = vm_config_from_argv([*K, "--disk", "path=/a", "--net", "tap=t0", "--disk", "path=/b"])
    assert a == b
    assert [d.path for d in a.disks or []] == ["/a", "/b"]


def test_equals_form() -> None:
    assert vm_config_from_argv(["--kernel=/k", "--cpus=boot=2"]).cpus.boot_vcpus == 2


def test_defaults_apply_only_when_absent() -> None:
    args = parse_argv(K)
    assert args.get("cpus") == "boot=1,max_phys_bits=46"
    assert args.get("serial") == "null"
    assert "cpus" not in args.given


def test_verbosity_counts() -> None:
    assert parse_argv(["-v", "-vv"]).verbosity == 3
    assert parse_argv(["-v", "-v"]).verbosity == 2


def test_cmdline_with_commas_is_one_value() -> None:
    cfg = vm_config_from_argv([*K, "--cmdline", "console=ttyS0,115200 root=/dev/vda"])
    assert cfg.payload is not None and cfg.payload.cmdline == "console=ttyS0,115200 root=/dev/vda"


def test_gdb_is_parsed_into_the_vmm_options() -> None:
    from vmsh.config.launcher_args import vmm_options_from_args

    opts = vmm_options_from_args(parse_argv(["--gdb", "path=/tmp/gdb"]))
    assert opts.gdb is not None and opts.gdb.path == "/tmp/gdb"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unexpected argument '--bogus' found"),
        (["--cpus"], "a value is required for '--cpus <cpus>' but none was supplied"),
        (["--cpus", "boot=1", "--cpus", "boot=2"], "the argument '--cpus <cpus>' cannot be used multiple times"),
        (["--kernel", "/a", "/b"], "unexpected argument '/b' found"),
        (["--pvpanic=on"], "unexpected value 'on' for '--pvpanic' found; no more were expected"),
        (["--seccomp", "maybe"], "invalid value 'maybe' for '--seccomp <seccomp>'"),
        (["-x"], "unexpected argument '-x' found"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_argv(argv)
    assert str(info.value).startswith(message)


def test_every_option_of_the_seed_is_a_flag() -> None:
    names = {f.name for f in FLAGS}
    seed = {
        "cpus", "platform", "memory", "memory-zone", "firmware", "kernel", "initramfs", "cmdline",
        "rate-limit-group", "disk", "net", "rng", "balloon", "fs", "pmem", "serial", "console", "device",
        "user-device", "vdpa", "vsock", "pvpanic", "numa", "pci-segment", "watchdog", "tpm", "sgx-epc",
        "debug-console", "restore", "api-socket", "event-monitor", "seccomp", "gdb", "v", "log-file", "version",
    }
    assert seed <= names


def test_help_shows_every_syntax_string() -> None:
    text = help_text()
    for name, (_, syntax) in OPTION_PARSERS.items():
        if name != "restore":
            assert syntax in text, name
    assert "--disk <disk>..." in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--api-socket", "/tmp/api.sock"], ("api_socket", "/tmp/api.sock", None)),
        (["--api-socket", "path=/tmp/api.sock"], ("api_socket", "/tmp/api.sock", None)),
        (["--api-socket", "fd=7"], ("api_socket", None, 7)),
        (["--event-monitor", "path=/tmp/ev"], ("event_monitor", "/tmp/ev", None)),
        (["--event-monitor", "fd=5"], ("event_monitor", None, 5)),
    ],
)
def test_vmm_endpoints(argv: list[str], expected: tuple) -> None:
    from vmsh.config.launcher_args import vmm_options_from_args

    attr, path, fd = expected
    endpoint = getattr(vmm_options_from_args(parse_argv(argv)), attr)
    assert (endpoint.path, endpoint.fd) == (path, fd)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--event-monitor", "mode=x"], "Error parsing --event-monitor: Unknown option: mode"),
        (["--event-monitor", ""], "Error parsing --event-monitor: path or fd required"),
        (["--gdb", "port=1"], "Error parsing --gdb: Unknown option: port"),
        (["--gdb", ""], "Error parsing --gdb: path required"),
        (["--restore", "prefault=on"], "Error parsing --restore: source_url missing"),
        (["--api-socket", "fd=x"], "Error parsing --api-socket: Unable to convert x for fd"),
        (["--profile", "hz=0"], "Error parsing --profile: hz must be between 1 and 100000: 0"),
    ],
)
def test_vmm_option_errors(argv: list[str], message: str) -> None:
    from vmsh.config.launcher_args import vmm_options_from_args
    from vmsh.errors import ConfigError, error_chain

    with pytest.raises(ConfigError) as info:
        vmm_options_from_args(parse_argv(argv))
    assert ": ".join(error_chain(info.value)) == message
