"""Every command of the language: its syntax, its one-line help, and what it does.

Lifecycle and device commands go through the session's target (the VMM's action registry);
device and resize arguments use the launcher's option syntax, parsed by the config layer
(the same code as ``vmsh remote``). Inspection commands that read the VM's insides (``regs``,
``x``, ``profile``) use vmsh's extension actions (``vm.registers``, ``vm.read-memory``,
``vm.profile-start``, ``vm.profile-stop``), so they work the same after ``connect``.

A command sees the session only through :class:`~vmsh.script.interface.SessionApi`.
"""

from __future__ import annotations

import json
import operator
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmsh.errors import UsageError, VmshError
from vmsh.script.interface import QuitRequest
from vmsh.script.interface import SessionApi as Session
from vmsh.script.lexer import unescape


@dataclass(frozen=True)
class Command:
    name: str
    syntax: str
    summary: str
    func: Callable[[Session, list[str]], None]
    group: str

    def run(self, session: Session, args: list[str]) -> None:
        self.func(session, args)


COMMANDS: dict[str, Command] = {}


CommandFunc = Callable[[Session, list[str]], None]


def command(name: str, syntax: str, summary: str, group: str) -> Callable[[CommandFunc], CommandFunc]:
    def register(func: CommandFunc) -> CommandFunc:
        COMMANDS[name] = Command(name, syntax, summary, func, group)
        return func

    return register


def _no_args(name: str, args: list[str]) -> None:
    if args:
        raise UsageError(f"{name} takes no arguments")


def _options(args: list[str], allowed: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Split ``key=value`` words (keys in ``allowed``) from the positional ones."""
    positional, options = [], {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in allowed:
            options[key] = value
        else:
            positional.append(arg)
    return positional, options


def parse_duration(text: str) -> float:
    """``10``, ``1.5s``, ``500ms``, ``2m`` -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not match:
        raise UsageError(f"not a duration: {text} (examples: 30, 1.5s, 500ms, 2m)")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def _file_url(path: str) -> str:
    return path if path.startswith("file://") else "file://" + os.path.abspath(path)


def _show(session: Session, value: Any) -> None:
    if value is not None:
        session.out(json.dumps(value, indent=2, sort_keys=True))


# --- lifecycle --------------------------------------------------------------------------------------


@command("create", "create <launcher flags>",
         "create a VM from cloud-hypervisor launcher flags (--kernel ... --disk ...)", "lifecycle")
def _create(session: Session, args: list[str]) -> None:
    from vmsh.config import parse_argv, to_json_value, vm_config_from_args

    if not args:
        raise UsageError("create needs launcher flags, e.g. create --kernel vmlinux --cpus boot=2")
    cfg = vm_config_from_args(parse_argv(args))
    session.target.call("vm.create", to_json_value(cfg))


def _simple(name: str, endpoint: str, summary: str) -> None:
    def run(session: Session, args: list[str]) -> None:
        _no_args(name, args)
        # a boot (not the resume of a paused VM) or a reboot starts the guest from scratch:
        # ``run`` waits for its shell prompt again
        booting = endpoint == "vm.reboot" or (endpoint == "vm.boot" and session.state() != "Paused")
        if booting:
            session.stream.reset_shell(booting=True)
        session.target.call(endpoint)
        if booting:
            _attach_remote_console(session)

    COMMANDS[name] = Command(name, name, summary, run, "lifecycle")


for _name, _endpoint, _summary in (
    ("boot", "vm.boot", "boot the created VM (or resume a paused one)"),
    ("pause", "vm.pause", "pause every vCPU"),
    ("resume", "vm.resume", "resume a paused VM"),
    ("shutdown", "vm.shutdown", "stop the VM; its config stays, so it can be booted again"),
    ("reboot", "vm.reboot", "shut down and boot a fresh VM from the same config"),
    ("power-button", "vm.power-button", "press the ACPI power button"),
    ("nmi", "vm.nmi", "inject an NMI"),
    ("delete", "vm.delete", "stop the VM and forget its config"),
):
    _simple(_name, _endpoint, _summary)


@command("snapshot", "snapshot DIR",
         "write a snapshot of the paused VM into DIR (created if missing; must hold no snapshot)", "lifecycle")
def _snapshot(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("snapshot takes one argument: the directory")
    if session.target.local:
        try:
            os.makedirs(args[0], exist_ok=True)
        except OSError as err:
            raise VmshError(f"Cannot create the snapshot directory {args[0]}") from err
    session.target.call("vm.snapshot", {"destination_url": _file_url(args[0])})


def _unix_url(path: str) -> str:
    return path if path.startswith("unix:") else "unix:" + os.path.abspath(path)


@command("migrate", "migrate SOCKET [local=on]",
         "live-migrate the VM to the VMM receiving at SOCKET (unix:PATH or a path); local=on hands the "
         "shared guest RAM over instead of copying it; the VM leaves this session once it runs there", "lifecycle")
def _migrate(session: Session, args: list[str]) -> None:
    positional, opts = _options(args, ("local",))
    if len(positional) != 1 or opts.get("local", "off") not in ("on", "off", "true", "false"):
        raise UsageError("migrate takes the destination socket and optional local=on")
    session.target.call("vm.send-migration", {"destination_url": _unix_url(positional[0]),
                                              "local": opts.get("local") in ("on", "true")})


@command("receive", "receive SOCKET",
         "wait at SOCKET (unix:PATH or a path) for a VM migrated from another VMM, and run it", "lifecycle")
def _receive(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("receive takes one argument: the socket to listen on")
    session.target.call("vm.receive-migration", {"receiver_url": _unix_url(args[0])})
    session.stream.reset_shell()


@command("restore", "restore DIR [resume=on] [prefault=on]",
         "rebuild the VM saved in DIR (paused unless resume=on)", "lifecycle")
def _restore(session: Session, args: list[str]) -> None:
    positional, opts = _options(args, ("resume", "prefault"))
    if len(positional) != 1:
        raise UsageError("restore takes a directory and optional resume=on, prefault=on")
    text = ",".join([f"source_url={_file_url(positional[0])}", *(f"{k}={v}" for k, v in opts.items())])
    _via_remote_syntax(session, "restore", [text])
    session.stream.reset_shell()


def _attach_remote_console(session: Session) -> None:
    """A remote VM's console is connected as soon as it boots, so that ``run`` sees its
    shell prompt (a serial socket keeps no output for a late client)."""
    if not session.target.local:
        try:
            session.console()
        except VmshError:
            pass  # a serial port that cannot be reached: send/expect/run say so when used


def _via_remote_syntax(session: Session, name: str, args: list[str]) -> None:
    from vmsh.remote import build_request

    _, endpoint, body, fds = build_request(name, args)
    session.target.call(endpoint, body, fds)


def _adder(name: str) -> Callable[[Session, list[str]], None]:
    return lambda session, args: _via_remote_syntax(session, name, args)


for _name, _option in (("add-disk", "disk"), ("add-net", "net"), ("add-pmem", "pmem"), ("add-fs", "fs"),
                       ("add-vsock", "vsock"), ("add-vdpa", "vdpa"), ("add-device", "device"),
                       ("add-user-device", "user-device")):
    COMMANDS[_name] = Command(_name, f"{_name} <--{_option} syntax>", f"add a {_option} to the VM (cold: before boot)",
                              _adder(_name), "devices")


@command("remove-device", "remove-device ID", "remove a device by id", "devices")
def _remove_device(session: Session, args: list[str]) -> None:
    _via_remote_syntax(session, "remove-device", args)


@command("resize", "resize [--cpus N] [--memory SIZE] [--balloon SIZE]", "change vCPUs, RAM or the balloon", "devices")
def _resize(session: Session, args: list[str]) -> None:
    _via_remote_syntax(session, "resize", args)


@command("resize-zone", "resize-zone --id ZONE --size SIZE", "change a memory zone's RAM (virtio-mem)", "devices")
def _resize_zone(session: Session, args: list[str]) -> None:
    _via_remote_syntax(session, "resize-zone", args)


# --- inspection -------------------------------------------------------------------------------------


@command("info", "info [SECTION]",
         "show the VM's state and config (SECTION: a dotted path, e.g. config.cpus)", "inspection")
def _info(session: Session, args: list[str]) -> None:
    info = session.target.call("vm.info")
    for part in (args[0].split(".") if args else []):
        if not isinstance(info, dict) or part not in info:
            raise VmshError(f"info has no section {args[0]}")
        info = info[part]
    _show(session, info)


@command("counters", "counters", "device counters and KVM's own statistics", "inspection")
def _counters(session: Session, args: list[str]) -> None:
    _no_args("counters", args)
    _show(session, session.target.call("vm.counters"))


@command("ping", "ping", "check that the VMM answers", "inspection")
def _ping(session: Session, args: list[str]) -> None:
    _no_args("ping", args)
    _show(session, session.target.call("vmm.ping"))


_GENERAL_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                 "r14", "r15", "rip", "rflags")
_CONTROL_REGS = ("cr0", "cr2", "cr3", "cr4", "efer", "apic_base")


@command("regs", "regs [VCPU]", "the registers of a vCPU of the paused VM", "inspection")
def _regs(session: Session, args: list[str]) -> None:
    if len(args) > 1:
        raise UsageError("regs takes an optional vCPU index")
    try:
        index = int(args[0]) if args else 0
    except ValueError:
        raise UsageError("regs: the vCPU index is a number") from None
    if index < 0:
        raise UsageError("regs: the vCPU index is 0 or more")
    reply = session.target.call("vm.registers", {"cpu_id": index})
    regs, sregs = reply["regs"], reply["sregs"]
    lines = [f"{n:>6} {regs[n]:#018x}" for n in _GENERAL_REGS]
    lines += [f"{n:>6} {sregs[n]:#018x}" for n in _CONTROL_REGS]
    for n in ("cs", "ds", "ss"):
        seg = sregs[n]
        lines.append(f"{n:>6} sel={seg['selector']:#06x} base={seg['base']:#x} limit={seg['limit']:#x} "
                     f"l={seg['l']} db={seg['db']}")
    session.out("\n".join(lines))
    session.variables["rip"] = f"{regs['rip']:#x}"


@command("x", "x ADDR [LEN]", "hex dump of guest physical memory (LEN bytes, default 64)", "inspection")
def _x(session: Session, args: list[str]) -> None:
    if not 1 <= len(args) <= 2:
        raise UsageError("x takes an address and an optional length")
    try:
        addr, length = int(args[0], 0), int(args[1], 0) if len(args) > 1 else 64
    except ValueError:
        raise UsageError("x: the address and length are numbers (0x... for hex)") from None
    if addr < 0:
        raise UsageError("x: the address is 0 or more")
    if not 0 < length <= 1 << 20:
        raise UsageError("x: the length must be between 1 and 1 MiB")
    reply = session.target.call("vm.read-memory", {"address": addr, "length": length})
    data = bytes.fromhex(reply["data"])
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{addr + off:016x}  {chunk.hex(' '):<47}  {text}")
    session.out("\n".join(lines))


@command("profile", "profile start [hz=N] | stop [system_map=PATH] | report",
         "sample the guest's instruction pointers", "inspection")
def _profile(session: Session, args: list[str]) -> None:
    positional, opts = _options(args, ("hz", "system_map"))
    if len(positional) != 1 or positional[0] not in ("start", "stop", "report"):
        raise UsageError("profile start [hz=N] | stop [system_map=PATH] | report")
    action = positional[0]
    if action == "start":
        try:
            hz = int(opts.get("hz", "200"))
        except ValueError:
            raise UsageError("profile: hz is a number of samples per second") from None
        session.target.call("vm.profile-start", {"hz": hz})
    elif action == "stop":
        system_map = opts.get("system_map")
        if system_map is None:
            try:
                from vmsh.images import image_path

                system_map = str(image_path("system-map"))
            except VmshError:
                system_map = None
        reply = session.target.call("vm.profile-stop", {"system_map": system_map})
        session.variables["profile"] = reply["report"]
        session.out(session.variables["profile"])
    else:
        if "profile" not in session.variables:
            raise VmshError("No profile yet: profile start, then profile stop")
        session.out(session.variables["profile"])


@command("wait", "wait STATE [timeout=DUR]",
         "wait until the VM is in STATE (Running, Paused, Created, ...)", "inspection")
def _wait(session: Session, args: list[str]) -> None:
    positional, opts = _options(args, ("timeout",))
    if len(positional) != 1:
        raise UsageError("wait takes a state: Created, Running, Paused, Shutdown")
    want = positional[0].lower()
    deadline = time.monotonic() + parse_duration(opts.get("timeout", "60"))
    while session.state().lower() != want:
        if time.monotonic() > deadline:
            raise VmshError(f"timeout waiting for state {positional[0]} (it is {session.state()})")
        time.sleep(0.05)


# --- console ------------------------------------------------------------------------------------------


@command("send", "send TEXT... [timeout=DUR]",
         r"type TEXT into the guest console (\n, \r, \t, \e escapes), waiting for the guest to read it", "console")
def _send(session: Session, args: list[str]) -> None:
    timeout = "30"
    if len(args) > 1 and args[-1].startswith("timeout="):  # only last, so text may say timeout=
        timeout = args.pop().partition("=")[2]
    session.console().send(unescape(" ".join(args)), timeout=parse_duration(timeout))


@command("expect", "expect PATTERN [timeout=DUR]", "wait for a regex in the guest's console output", "console")
def _expect(session: Session, args: list[str]) -> None:
    positional, opts = _options(args, ("timeout",))
    if len(positional) != 1:
        raise UsageError("expect takes one pattern (quote it if it has blanks)")
    match = session.console().expect(positional[0], parse_duration(opts.get("timeout", "30")))
    session.variables["match"] = match.group(0).decode("utf-8", "replace")


@command("run", "run COMMAND...", "run a shell command in the guest; sets $status and $output", "console")
def _run(session: Session, args: list[str]) -> None:
    if not args:
        raise UsageError("run needs a command")
    output, status = session.console().run(" ".join(args), timeout=float(session.variables.get("run_timeout", "120")))
    session.variables["output"], session.variables["status"] = output, str(status)
    if output:
        session.out(output)


@command("console", "console", "attach the terminal to the guest's serial console (Ctrl-] detaches)", "console")
def _console(session: Session, args: list[str]) -> None:
    raise VmshError("console needs the interactive shell; scripts use send, expect and run")


@command("record", "record FILE | record stop",
         "write what you do from now on (commands, console typing) as a script vmsh run replays", "console")
def _record(session: Session, args: list[str]) -> None:
    raise VmshError("record needs the interactive shell")


# --- flow ---------------------------------------------------------------------------------------------


@command("set", "set NAME VALUE...", "set a variable ($NAME, ${NAME})", "flow")
def _set(session: Session, args: list[str]) -> None:
    if not args or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args[0]):
        raise UsageError("set takes a variable name and a value")
    session.variables[args[0]] = " ".join(args[1:])


@command("echo", "echo WORDS...", "print the words", "flow")
def _echo(session: Session, args: list[str]) -> None:
    session.out(" ".join(args))


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _number_or_text(a: str, b: str) -> tuple[Any, Any]:
    try:
        return float(a), float(b)
    except ValueError:
        return a, b


@command("assert", "assert VALUE | A OP B", "fail unless true; OP: == != < <= > >= =~ (regex) contains", "flow")
def _assert(session: Session, args: list[str]) -> None:
    if len(args) == 1:
        ok = args[0] not in ("", "0", "false", "False", "no", "off")
    elif len(args) == 3:
        left, op, right = args
        if op == "=~":
            ok = re.search(right, left) is not None
        elif op == "contains":
            ok = right in left
        elif op in _OPS:
            ok = _OPS[op](*(_number_or_text(left, right) if op not in ("==", "!=") else (left, right)))
        else:
            raise UsageError(f"assert: unknown operator {op}")
    else:
        raise UsageError("assert takes one value, or A OP B (quote values with blanks)")
    if not ok:
        raise VmshError("assertion failed: " + " ".join(repr(a) if " " in a or not a else a for a in args))


@command("sleep", "sleep DUR", "wait (30, 1.5s, 500ms, 2m)", "flow")
def _sleep(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("sleep takes one duration")
    time.sleep(parse_duration(args[0]))


@command("source", "source FILE", "run the commands of FILE", "flow")
def _source(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("source takes one file")
    session.run_file(args[0])


@command("image", "image NAME [VAR]",
         "set $VAR (default: $NAME) to the path of a built guest image (vmlinux, initramfs, ...)", "flow")
def _image(session: Session, args: list[str]) -> None:
    from vmsh.images import image_path

    if not 1 <= len(args) <= 2:
        raise UsageError("image takes an image name and an optional variable name")
    var = args[1] if len(args) == 2 else args[0].replace("-", "_")
    session.variables[var] = str(image_path(args[0]))


@command("connect", "connect PATH", "drive the VMM behind an API socket (vmsh launch --api-socket PATH)", "flow")
def _connect(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("connect takes the API socket path")
    session.connect(args[0])


@command("quit", "quit [STATUS]", "leave (a VM started here is shut down)", "flow")
def _quit(session: Session, args: list[str]) -> None:
    raise QuitRequest(int(args[0]) if args else 0)


COMMANDS["exit"] = Command("exit", "exit [STATUS]", "the same as quit", _quit, "flow")


@command("help", "help [COMMAND]", "list the commands, or show one command's syntax", "flow")
def _help(session: Session, args: list[str]) -> None:
    if args:
        cmd = COMMANDS.get(args[0])
        if cmd is None:
            raise VmshError(f"no command {args[0]}")
        session.out(f"{cmd.syntax}\n    {cmd.summary}")
        return
    groups: dict[str, list[Command]] = {}
    for cmd in COMMANDS.values():
        groups.setdefault(cmd.group, []).append(cmd)
    lines = []
    for group, cmds in groups.items():
        lines.append(f"{group}:")
        lines += [f"  {c.name:<16} {c.summary}" for c in cmds]
    session.out("\n".join(lines))
