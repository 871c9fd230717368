"""ch-remote v40's command tree, and the API request each subcommand sends.

:data:`REMOTE` is ch-remote's command line as clap sees it (subcommands, their arguments,
about and help strings), followed by vmsh's own subcommands. :func:`request_for` turns a parsed
subcommand into ``(method, endpoint, body, fds)``; device arguments use the launcher's option
syntax and go through the config layer, so a typo is caught before anything is sent.
:func:`build_request` does both for callers that hold a subcommand and its arguments (the shell).

Like ch-remote v40, the positional of ``add-*``, ``remove-device``, ``snapshot``, ``restore`` and
the migration commands, and ``resize-zone``'s ``--id`` and ``--size``, are optional to clap (so
help and usage lines read the same) but needed to run: ch-remote v40 panics without them, vmsh
says which are missing, in clap's words, with status 2.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from vmsh.errors import OptionParseError, UsageError, VmshError
from vmsh.remote.clap import Arg, Command, Matches, missing_required, parse

#: what ``vmsh remote --version`` names, as the launcher names cloud-hypervisor's version
CH_REMOTE_VERSION = "v40.0"
BIN_NAME = "vmsh remote"


def _syntax(option: str) -> str:
    from vmsh.config.parse import OPTION_PARSERS

    return str(OPTION_PARSERS[option][1])


def _positional(command: str, about: str, arg_id: str, help_text: str) -> Command:
    return Command(command, about, (Arg(arg_id, help_text, kind="positional"),))


def _restore_help() -> str:
    return (f'Restore from a VM snapshot. \nRestore parameters "{_syntax("restore")}" \n'
            "`source_url` should be a valid URL (e.g file:///foo/bar or tcp://192.168.1.10/foo) \n"
            "`prefault` brings memory pages in when enabled (disabled by default) \n"
            "`net_fds` is a list of net ids with new file descriptors. "
            "Only net devices backed by FDs directly are needed as input.")


def _size_help(what: str) -> str:
    return f"New {what} size in bytes (supports K/M/G suffix)"


def _tree() -> Command:
    from vmsh import __version__

    ch_remote = (
        _positional("add-device", "Add VFIO device", "device_config",
                    f'Direct device assignment parameters "{_syntax("device")}"'),
        _positional("add-disk", "Add block device", "disk_config", f'Disk parameters "{_syntax("disk")}"'),
        _positional("add-fs", "Add virtio-fs backed fs device", "fs_config", f'virtio-fs parameters "{_syntax("fs")}"'),
        _positional("add-pmem", "Add persistent memory device", "pmem_config",
                    f'Persistent memory parameters "{_syntax("pmem")}"'),
        _positional("add-net", "Add network device", "net_config", f'Network parameters "{_syntax("net")}"'),
        _positional("add-user-device", "Add userspace device", "device_config",
                    f'Userspace device "{_syntax("user-device")}"'),
        _positional("add-vdpa", "Add vDPA device", "vdpa_config", f'vDPA device "{_syntax("vdpa")}"'),
        _positional("add-vsock", "Add vsock device", "vsock_config", f'Virtio VSOCK parameters "{_syntax("vsock")}"'),
        _positional("remove-device", "Remove VFIO and PCI device", "id", "<device_id>"),
        Command("info", "Info on the VM"),
        Command("counters", "Counters from the VM"),
        Command("pause", "Pause the VM"),
        Command("reboot", "Reboot the VM"),
        Command("power-button", "Trigger a power button in the VM"),
        Command("resize", "Resize the VM", (
            Arg("cpus", "New vCPUs count", long="cpus"),
            Arg("memory", _size_help("memory"), long="memory"),
            Arg("balloon", _size_help("balloon"), long="balloon"),
        )),
        Command("resize-zone", "Resize a memory zone", (
            Arg("id", "Memory zone identifier", long="id"),
            Arg("size", _size_help("memory zone"), long="size"),
        )),
        Command("resume", "Resume the VM"),
        Command("boot", "Boot a created VM"),
        Command("delete", "Delete a VM"),
        Command("shutdown", "Shutdown the VM"),
        _positional("snapshot", "Create a snapshot from VM", "snapshot_config", "<destination_url>"),
        _positional("restore", "Restore VM from a snapshot", "restore_config", _restore_help()),
        _positional("coredump", "Create a coredump from VM", "coredump_config", "<file_path>"),
        Command("send-migration", "Initiate a VM migration", (
            Arg("send_migration_config", "<destination_url>", kind="positional"),
            Arg("send_migration_local", long="local", kind="switch"),
        )),
        _positional("receive-migration", "Receive a VM migration", "receive_migration_config", "<receiver_url>"),
        Command("create", "Create VM from a JSON configuration", (Arg("path", kind="positional", default="-"),)),
        Command("ping", "Ping the VMM to check for API server availability"),
        Command("shutdown-vmm", "Shutdown the VMM"),
        Command("nmi", "Trigger NMI"),
    )
    vmsh_own = (
        Command("describe", "The machine a created VM would give its guest (vmsh)"),
        Command("registers", "A vCPU's registers; the VM must be paused (vmsh)",
                (Arg("cpu_id", "vCPU index [default: 0]", kind="positional"),)),
        Command("read-memory", "Guest RAM at a guest physical address, in hex (vmsh)", (
            Arg("address", "Guest physical address (0x... for hex)", kind="positional", required=True),
            Arg("length", "Bytes to read", kind="positional"),
        )),
        Command("profile-start", "Start sampling the guest's instruction pointers (vmsh)",
                (Arg("hz", "Samples a second", kind="positional"),)),
        Command("profile-stop", "Stop sampling and print the profile (vmsh)",
                (Arg("system_map", "The guest kernel's System.map, to name functions", kind="positional"),)),
    )
    return Command("vmsh", "Remotely control a cloud-hypervisor VMM.",
                   (Arg("api-socket", "HTTP API socket path (UNIX domain socket).", long="api-socket"),),
                   ch_remote + vmsh_own, version=f"{__version__} (ch-remote {CH_REMOTE_VERSION})")


REMOTE = _tree()

#: subcommand -> the arguments it cannot run without (see the module docstring)
NEEDED: dict[str, tuple[str, ...]] = {
    **{name: (arg,) for name, arg in (
        ("add-device", "device_config"), ("add-disk", "disk_config"), ("add-fs", "fs_config"),
        ("add-pmem", "pmem_config"), ("add-net", "net_config"), ("add-user-device", "device_config"),
        ("add-vdpa", "vdpa_config"), ("add-vsock", "vsock_config"), ("remove-device", "id"),
        ("snapshot", "snapshot_config"), ("restore", "restore_config"), ("coredump", "coredump_config"),
        ("send-migration", "send_migration_config"), ("receive-migration", "receive_migration_config"))},
    "resize-zone": ("id", "size"),
}

#: subcommands that send no body -> (method, endpoint)
_SIMPLE = {
    "ping": ("GET", "vmm.ping"), "info": ("GET", "vm.info"), "counters": ("GET", "vm.counters"),
    "describe": ("GET", "vm.describe"),
    "boot": ("PUT", "vm.boot"), "shutdown": ("PUT", "vm.shutdown"), "reboot": ("PUT", "vm.reboot"),
    "pause": ("PUT", "vm.pause"), "resume": ("PUT", "vm.resume"), "power-button": ("PUT", "vm.power-button"),
    "nmi": ("PUT", "vm.nmi"), "delete": ("PUT", "vm.delete"), "shutdown-vmm": ("PUT", "vmm.shutdown"),
}
#: add-* subcommand -> (the launcher option whose syntax it takes, ch-remote's name for that syntax)
_ADD = {
    "add-disk": ("disk", "disk"), "add-net": ("net", "network"), "add-pmem": ("pmem", "persistent memory"),
    "add-fs": ("fs", "filesystem"), "add-vsock": ("vsock", "vsock"), "add-vdpa": ("vdpa", "vDPA device"),
    "add-device": ("device", "device"), "add-user-device": ("user-device", "user device"),
}
#: subcommands whose one positional is sent as a one-key body -> that key
_URL_BODY = {"snapshot": "destination_url", "coredump": "destination_url", "receive-migration": "receiver_url"}


@dataclasses.dataclass(frozen=True)
class RawBody:
    """A request body sent as it is (``create`` sends the file's text, as ch-remote does)."""

    text: str


def parse_subcommand(command: str, args: list[str]) -> Matches:
    """Parse one subcommand's arguments, and check that the ones it needs are there.

    :raises vmsh.remote.clap.ClapExit: a usage error (or help), in clap's words.
    """
    sub = REMOTE.subcommand(command)
    if sub is None or sub.name == "help":
        parse(REMOTE, [command, *args], BIN_NAME)  # raises clap's error, or help's text
        raise UsageError(f"unknown subcommand '{command}'")
    matches = parse(sub, args, f"{BIN_NAME} {command}")
    check_needed(command, matches)
    return matches


def check_needed(command: str, matches: Matches) -> None:
    """:raises vmsh.remote.clap.ClapExit: when an argument the subcommand needs is missing."""
    sub = REMOTE.subcommand(command)
    assert sub is not None
    needed = NEEDED.get(command, ())
    model = dataclasses.replace(sub, args=tuple(dataclasses.replace(a, required=True) if a.id in needed else a
                                                for a in sub.args))
    missing = [a for a in model.args if a.id in needed and a.id not in matches.values]
    if missing:
        used = [a for a in model.args if a.id in matches.values]
        raise missing_required(model, f"{BIN_NAME} {command}", missing, used)


def build_request(command: str, args: list[str]) -> tuple[str, str, Any, list[int]]:
    """Turn a subcommand and its arguments into ``(method, endpoint, body, fds)``.

    :raises UsageError: for a malformed command line (a ``ClapExit``, whose ``text`` is clap's).
    :raises OptionParseError: for a bad option string or value.
    """
    return request_for(command, parse_subcommand(command, args))


def _rust_u8(text: str) -> int:
    """``str::parse::<u8>``, with Rust's error texts (ch-remote's ``--cpus``)."""
    digits = text[1:] if text.startswith("+") else text
    if not text:
        raise ValueError("cannot parse integer from empty string")
    if not digits or not all("0" <= c <= "9" for c in digits):
        raise ValueError("invalid digit found in string")
    if int(digits) > 0xFF:
        raise ValueError("number too large to fit in target type")
    return int(digits)


def _byte_sized(what: str, text: str) -> int:
    """A K/M/G size; the error reads as ch-remote's (``Error parsing memory size: InvalidValue("x")``)."""
    from vmsh.config.options import byte_sized

    try:
        return byte_sized(text)
    except ValueError:
        bare = text.strip().rstrip("KMG")
        quoted = '"' + bare.replace("\\", "\\\\").replace('"', '\\"') + '"'
        raise OptionParseError(f"Error parsing {what} size: InvalidValue({quoted})") from None


def _read_create(path: str) -> RawBody:
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                data = file.read()
        return RawBody(data.decode("utf-8"))
    except UnicodeDecodeError:
        problem = "stream did not contain valid UTF-8"
    except OSError as err:
        problem = f"{err.strerror} (os error {err.errno})"
    where = "stdin" if path == "-" else "file"
    raise VmshError(f"Error reading from {where}: {problem}")


def request_for(command: str, matches: Matches) -> tuple[str, str, Any, list[int]]:
    """The request a parsed subcommand sends: ``(method, endpoint, body, fds)``.

    :raises OptionParseError: for a bad option string or value, worded as ch-remote's.
    """
    from vmsh.config import to_json_value
    from vmsh.config.parse import OPTION_PARSERS

    value = matches.get
    if command in _SIMPLE:
        method, endpoint = _SIMPLE[command]
        return method, endpoint, None, []
    if command in _ADD:
        option, name = _ADD[command]
        try:
            device = OPTION_PARSERS[option][0](value(NEEDED[command][0]) or "")
        except VmshError as err:
            raise OptionParseError(f"Error parsing {name} syntax") from err
        fds: list[int] = []
        if command == "add-net" and device.fds is not None:
            fds, device.fds = device.fds, None  # the taps travel as SCM_RIGHTS
        body = {k: v for k, v in to_json_value(device).items() if v is not None}
        return "PUT", f"vm.{command}", body, fds
    if command == "create":
        return "PUT", "vm.create", _read_create(value("path") or "-"), []
    if command == "remove-device":
        return "PUT", "vm.remove-device", {"id": value("id")}, []
    if command in _URL_BODY:
        return "PUT", f"vm.{command}", {_URL_BODY[command]: value(NEEDED[command][0])}, []
    if command == "send-migration":
        body = {"destination_url": value("send_migration_config"), "local": matches.flag("send_migration_local")}
        return "PUT", "vm.send-migration", body, []
    if command == "restore":
        try:
            restore = OPTION_PARSERS["restore"][0](value("restore_config") or "")
        except VmshError as err:
            raise OptionParseError("Error parsing restore syntax") from err
        # the taps of net_fds travel as SCM_RIGHTS, in order; the body keeps ids and counts
        fds = [fd for entry in restore.net_fds or [] for fd in entry.fds or []]
        for entry in restore.net_fds or []:
            entry.fds = None
        return "PUT", "vm.restore", to_json_value(restore), fds
    if command == "resize":
        body = {}
        if value("cpus") is not None:
            try:
                body["desired_vcpus"] = _rust_u8(value("cpus") or "")
            except ValueError as err:
                raise OptionParseError(f"Error parsing CPU count: {err}") from None
        if value("memory") is not None:
            body["desired_ram"] = _byte_sized("memory", value("memory") or "")
        if value("balloon") is not None:
            body["desired_balloon"] = _byte_sized("balloon", value("balloon") or "")
        return "PUT", "vm.resize", body, []
    if command == "resize-zone":
        body = {"id": value("id"), "desired_ram": _byte_sized("memory", value("size") or "")}
        return "PUT", "vm.resize-zone", body, []
    return "PUT", f"vm.{command}", _inspect_body(command, matches), []


#: vmsh's own subcommands -> their positionals (body keys), and whether each is a number
_INSPECT: dict[str, tuple[tuple[str, bool], ...]] = {
    "registers": (("cpu_id", True),),
    "read-memory": (("address", True), ("length", True)),
    "profile-start": (("hz", True),),
    "profile-stop": (("system_map", False),),
}


def _inspect_body(command: str, matches: Matches) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, number in _INSPECT[command]:
        text = matches.get(key)
        if text is None:
            continue
        try:
            body[key] = int(text, 0) if number else text
        except ValueError:
            raise UsageError(f"{command}: {key} is a number (0x... for hex), not {text}") from None
    return body
