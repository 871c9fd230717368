"""``vmsh remote``: cloud-hypervisor's ``ch-remote``, talking to a VMM's API socket.

``vmsh remote --api-socket /tmp/vm.sock <subcommand> [args]``. Device arguments use the
launcher's option syntax (``add-disk path=/img,readonly=on``) and go through the config
layer, so a typo is caught before anything is sent. A response body is printed as it came;
an error prints the server's error chain and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from vmsh.errors import OptionParseError, UsageError, VmshError

USAGE = """\
usage: vmsh remote [--api-socket <path>] <subcommand> [args]

subcommands:
  ping | info | counters                          query the VMM and its VM
  describe                                        the machine a created VM would give its guest (vmsh)
  create [FILE|-]                                 create a VM from a JSON VmConfig (default: stdin)
  boot | shutdown | reboot | pause | resume       lifecycle
  power-button | nmi | delete | shutdown-vmm
  add-disk|add-net|add-pmem|add-fs|add-vsock|add-vdpa|add-device|add-user-device <option syntax>
  remove-device <id>
  resize [--cpus <n>] [--memory <size>] [--balloon <size>]
  resize-zone --id <zone> --size <size>
  snapshot <destination_url>                      e.g. file:///tmp/snap (the VM must be paused)
  restore <source_url=...,prefault=on|off,...>

vmsh extensions:
  registers [<cpu_id>]                            a vCPU's registers (the VM must be paused)
  read-memory <address> [<length>]                guest RAM at a guest physical address, in hex
  profile-start [<hz>] | profile-stop [<system_map>]   sample the guest's instruction pointers
"""

_SIMPLE = {
    "ping": ("GET", "vmm.ping"), "info": ("GET", "vm.info"), "counters": ("GET", "vm.counters"),
    "describe": ("GET", "vm.describe"),
    "boot": ("PUT", "vm.boot"), "shutdown": ("PUT", "vm.shutdown"), "reboot": ("PUT", "vm.reboot"),
    "pause": ("PUT", "vm.pause"), "resume": ("PUT", "vm.resume"), "power-button": ("PUT", "vm.power-button"),
    "nmi": ("PUT", "vm.nmi"), "delete": ("PUT", "vm.delete"), "shutdown-vmm": ("PUT", "vmm.shutdown"),
}
#: add-* subcommand -> the launcher option whose syntax it takes
_ADD = {
    "add-disk": "disk", "add-net": "net", "add-pmem": "pmem", "add-fs": "fs", "add-vsock": "vsock",
    "add-vdpa": "vdpa", "add-device": "device", "add-user-device": "user-device",
}
_UNSUPPORTED = {"coredump", "send-migration", "receive-migration", "add-generic-vhost-user", "resize-disk"}


#: the vmsh extension subcommands -> their optional positional arguments (body keys), numbers or not
_INSPECT: dict[str, tuple[tuple[str, bool], ...]] = {
    "registers": (("cpu_id", True),),
    "read-memory": (("address", True), ("length", True)),
    "profile-start": (("hz", True),),
    "profile-stop": (("system_map", False),),
}


def _inspect_body(command: str, args: list[str]) -> dict[str, Any]:
    keys = _INSPECT[command]
    required = 1 if command == "read-memory" else 0
    if not required <= len(args) <= len(keys):
        names = " ".join(f"<{k}>" if i < required else f"[<{k}>]" for i, (k, _) in enumerate(keys))
        raise UsageError(f"{command} takes {names}")
    body: dict[str, Any] = {}
    for (key, number), value in zip(keys, args, strict=False):
        try:
            body[key] = int(value, 0) if number else value
        except ValueError:
            raise UsageError(f"{command}: {key} is a number (0x... for hex), not {value}") from None
    return body


def build_request(command: str, args: list[str]) -> tuple[str, str, Any, list[int]]:
    """Turn a subcommand and its arguments into ``(method, endpoint, body, fds)``.

    :raises UsageError: for a malformed command line.
    :raises OptionParseError: for a bad option string.
    """
    from vmsh.config import to_json_value
    from vmsh.config.options import byte_sized, integer
    from vmsh.config.parse import OPTION_PARSERS

    if command in _SIMPLE:
        if args:
            raise UsageError(f"{command} takes no arguments")
        method, endpoint = _SIMPLE[command]
        return method, endpoint, None, []
    if command in _ADD:
        if len(args) != 1:
            raise UsageError(f"{command} takes one argument: the --{_ADD[command]} option syntax")
        device = OPTION_PARSERS[_ADD[command]][0](args[0])
        fds: list[int] = []
        if command == "add-net" and device.fds is not None:
            fds, device.fds = device.fds, None
        body = {k: v for k, v in to_json_value(device).items() if v is not None}
        return "PUT", f"vm.{command}", body, fds
    if command == "create":
        if len(args) > 1:
            raise UsageError("create takes at most one argument: a JSON file, or - for stdin")
        source = args[0] if args else "-"
        try:
            if source == "-":
                text = sys.stdin.read()
            else:
                with open(source, encoding="utf-8") as file:
                    text = file.read()
        except OSError as err:
            raise VmshError(f"Cannot read {source}") from err
        try:
            return "PUT", "vm.create", json.loads(text), []
        except json.JSONDecodeError as err:
            raise OptionParseError(f"{source} is not JSON: {err}") from None
    if command == "remove-device":
        if len(args) != 1:
            raise UsageError("remove-device takes one argument: the device id")
        return "PUT", "vm.remove-device", {"id": args[0]}, []
    if command == "snapshot":
        if len(args) != 1:
            raise UsageError("snapshot takes one argument: the destination URL (file:///dir)")
        return "PUT", "vm.snapshot", {"destination_url": args[0]}, []
    if command == "restore":
        if len(args) != 1:
            raise UsageError("restore takes one argument: source_url=file:///dir[,prefault=on][,resume=on]")
        restore = OPTION_PARSERS["restore"][0](args[0])
        # the taps of net_fds travel as SCM_RIGHTS, in order; the body keeps ids and counts
        fds = [fd for entry in restore.net_fds or [] for fd in entry.fds or []]
        for entry in restore.net_fds or []:
            entry.fds = None
        return "PUT", "vm.restore", to_json_value(restore), fds
    if command in ("resize", "resize-zone"):
        flags = dict(zip(args[::2], args[1::2], strict=False))  # an odd count is refused below
        if len(args) % 2 or not flags:
            raise UsageError(f"{command} takes flags with values")
        allowed = {"--cpus", "--memory", "--balloon"} if command == "resize" else {"--id", "--size"}
        for flag in flags:
            if flag not in allowed:
                raise UsageError(f"{command}: unexpected argument '{flag}'")
        try:
            if command == "resize":
                body = {}
                if "--cpus" in flags:
                    body["desired_vcpus"] = integer("u8")(flags["--cpus"])
                if "--memory" in flags:
                    body["desired_ram"] = byte_sized(flags["--memory"])
                if "--balloon" in flags:
                    body["desired_balloon"] = byte_sized(flags["--balloon"])
                return "PUT", "vm.resize", body, []
            if set(flags) != allowed:
                raise UsageError("resize-zone needs --id and --size")
            return "PUT", "vm.resize-zone", {"id": flags["--id"], "desired_ram": byte_sized(flags["--size"])}, []
        except ValueError as err:
            raise OptionParseError(f"Invalid value for {command}: {err}") from None
    if command in _INSPECT:
        return "PUT", f"vm.{command}", _inspect_body(command, args), []
    if command in _UNSUPPORTED:
        raise VmshError(f"{command} is not supported by vmsh")
    raise UsageError(f"unknown subcommand '{command}'")


def main(argv: list[str]) -> int:
    from vmsh.api.client import ApiClient
    from vmsh.launcher import print_error

    args = list(argv)
    socket_path = os.environ.get("VMSH_API_SOCKET")
    if args[:1] in (["-h"], ["--help"]) or not args:
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    if args[0] == "--api-socket":
        if len(args) < 2:
            sys.stderr.write("error: a value is required for '--api-socket <path>'\n")
            return 2
        socket_path, args = args[1], args[2:]
    elif args[0].startswith("--api-socket="):
        socket_path, args = args[0].partition("=")[2], args[1:]
    if not args:
        sys.stderr.write(USAGE)
        return 2
    if socket_path is None:
        sys.stderr.write("error: --api-socket <path> is required\n")
        return 2
    try:
        method, endpoint, body, fds = build_request(args[0], args[1:])
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n{USAGE}")
        return 2
    except VmshError as err:
        print_error(err)
        return 1
    try:
        with ApiClient(socket_path, timeout=None) as client:
            result = client.request(method, endpoint, body, fds)
    except VmshError as err:
        print_error(err)
        return 1
    if result is not None and args[0] == "describe":
        from vmsh.engine.describe import canonical_text

        sys.stdout.write(canonical_text(result))  # the same text as `vmsh launch --describe`
    elif result is not None and args[0] == "profile-stop":
        sys.stdout.write(result["report"] + "\n")
    elif result is not None:
        print(json.dumps(result))
    return 0
