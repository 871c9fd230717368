"""The launcher's command line: its flags, their defaults and help, and argv parsing.

The flags are cloud-hypervisor v40's (``cloud-hypervisor --help``), with its rules:
options that take several values (``--disk``, ``--net``, ...) collect every value up to the
next flag and may be repeated (``--disk a b`` equals ``--disk a --disk b``); other options
may appear once; ``--opt=value`` is accepted too. :func:`parse_argv` gives a
:class:`LauncherArgs`; :func:`vm_config_from_args` builds the (unvalidated) VmConfig from it.
vmsh's own additions (``--dry-run``, ``--describe``, ``--profile``) are marked as such in the help.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vmsh.config import model as m
from vmsh.config.parse import OPTION_PARSERS
from vmsh.errors import UsageError

VM, VMM, LOGGING, VMSH = "vm-config", "vmm-config", "logging", "vmsh"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One launcher flag."""

    name: str
    help: str
    #: "one" (a single value), "many" (values appended), "flag" (no value), "count" (-v)
    arity: str = "one"
    default: str | None = None
    group: str = VM
    short: str | None = None
    choices: tuple[str, ...] = ()

    @property
    def value_name(self) -> str:
        return self.name.replace("-", "_")


def _syntax(name: str) -> str:
    return OPTION_PARSERS[name][1]


FLAGS: tuple[Flag, ...] = (
    Flag("cpus", _syntax("cpus"), default="boot=1,max_phys_bits=46"),
    Flag("platform", _syntax("platform")),
    Flag("memory", f'Memory parameters "{_syntax("memory")}"', default="size=512M"),
    Flag("memory-zone", f'User defined memory zone parameters "{_syntax("memory-zone")}"', arity="many"),
    Flag("firmware", "Path to firmware that is loaded in an architectural specific way"),
    Flag(
        "kernel",
        "Path to kernel to load. This may be a kernel or firmware that supports a PVH "
        "entry point (e.g. vmlinux) or architecture equivalent",
    ),
    Flag("initramfs", "Path to initramfs image"),
    Flag("cmdline", "Kernel command line"),
    Flag("rate-limit-group", _syntax("rate-limit-group"), arity="many"),
    Flag("disk", _syntax("disk"), arity="many"),
    Flag("net", _syntax("net"), arity="many"),
    Flag("rng", f'Random number generator parameters "{_syntax("rng")}"', default="src=/dev/urandom"),
    Flag("balloon", _syntax("balloon")),
    Flag("fs", _syntax("fs"), arity="many"),
    Flag("pmem", _syntax("pmem"), arity="many"),
    Flag("serial", f"Control serial port: {_syntax('serial')}", default="null"),
    Flag("console", f'Control (virtio) console: "{_syntax("console")}"', default="tty"),
    Flag("device", _syntax("device"), arity="many"),
    Flag("user-device", _syntax("user-device"), arity="many"),
    Flag("vdpa", _syntax("vdpa"), arity="many"),
    Flag("vsock", _syntax("vsock")),
    Flag("pvpanic", "Enable pvpanic device", arity="flag"),
    Flag("numa", _syntax("numa"), arity="many"),
    Flag("pci-segment", _syntax("pci-segment"), arity="many"),
    Flag("watchdog", "Enable virtio-watchdog", arity="flag"),
    Flag("v", "Sets the level of debugging output", arity="count", group=LOGGING, short="v"),
    Flag("log-file", "Log file. Standard error is used if not specified", group=LOGGING),
    Flag("api-socket", f"HTTP API socket (UNIX domain socket): {_syntax('api-socket')}.", group=VMM),
    Flag("event-monitor", f"File to report events on: {_syntax('event-monitor')}", group=VMM),
    Flag("restore", _syntax("restore"), group=VMM),
    Flag("seccomp", "Seccomp filtering: true|false|log", default="true", group=VMM, choices=("true", "false", "log")),
    Flag("tpm", _syntax("tpm"), group=VMM),
    Flag("sgx-epc", _syntax("sgx-epc"), arity="many"),
    Flag("debug-console", f"Debug console: {_syntax('debug-console')}", default="off,iobase=0xe9"),
    Flag("gdb", f"GDB socket (UNIX domain socket): {_syntax('gdb')}", group=VMM),
    Flag("version", "Print version", arity="flag", group=VMM, short="V"),
    Flag("dry-run", "vmsh: print the validated configuration as canonical JSON and exit", arity="flag", group=VMSH),
    Flag("describe", "vmsh: print the machine the guest would see (ACPI, SMBIOS, CPUID, memory map, PCI, virtio) "
         "as JSON and exit without running it", arity="flag", group=VMSH),
    Flag("profile", f"vmsh: sample the guest's instruction pointers, report by symbol at exit: {_syntax('profile')}",
         group=VMSH),
)

FLAGS_BY_NAME = {flag.name: flag for flag in FLAGS}
FLAGS_BY_SHORT = {flag.short: flag for flag in FLAGS if flag.short}


@dataclasses.dataclass
class LauncherArgs:
    """What the command line said: values as given (strings), ``None`` for absent flags."""

    values: dict[str, Any]
    #: flags the user gave explicitly (defaults not included)
    given: set[str]

    def get(self, name: str) -> Any:
        return self.values.get(name)

    @property
    def verbosity(self) -> int:
        return int(self.values.get("v") or 0)


def _usage_error(message: str) -> UsageError:
    return UsageError(f"{message}\n\nFor more information, try '--help'.")


def parse_argv(argv: list[str]) -> LauncherArgs:
    """Parse the launcher's arguments (without the program name).

    :raises UsageError: for an unknown flag, a missing value, a repeated single flag or a
        stray argument, with clap's wording.
    """
    values: dict[str, Any] = {}
    given: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("--") and len(token) > 2:
            name, eq, inline = token[2:].partition("=")
            flag = FLAGS_BY_NAME.get(name)
            if flag is None or (flag.short and flag.name == flag.short):
                raise _usage_error(f"unexpected argument '{token}' found")
        elif token.startswith("-") and len(token) >= 2 and token[1] != "-":
            letters = token[1:]
            if set(letters) == {"v"}:
                values["v"] = int(values.get("v") or 0) + len(letters)
                given.add("v")
                continue
            flag = FLAGS_BY_SHORT.get(letters)
            if flag is None:
                raise _usage_error(f"unexpected argument '{token}' found")
            name, eq, inline = flag.name, "", ""
        else:
            raise _usage_error(f"unexpected argument '{token}' found")

        shown = f"--{flag.name}" + ("" if flag.arity == "flag" else f" <{flag.value_name}>")
        if flag.arity in ("one", "flag") and flag.name in given:
            raise _usage_error(f"the argument '{shown}' cannot be used multiple times")
        given.add(flag.name)
        if flag.arity == "flag":
            if eq:
                raise _usage_error(f"unexpected value '{inline}' for '{shown}' found; no more were expected")
            values[flag.name] = True
            continue
        if flag.arity == "count":
            values[flag.name] = int(values.get(flag.name) or 0) + 1
            continue
        collected: list[str] = [inline] if eq else []
        while i < len(argv) and not (argv[i].startswith("-") and len(argv[i]) > 1) and (
            flag.arity == "many" or not collected
        ):
            collected.append(argv[i])
            i += 1
        if not collected:
            raise _usage_error(f"a value is required for '{shown}' but none was supplied")
        if flag.choices and collected[0] not in flag.choices:
            possible = ", ".join(flag.choices)
            raise _usage_error(f"invalid value '{collected[0]}' for '{shown}'\n  [possible values: {possible}]")
        if flag.arity == "many":
            values.setdefault(flag.name, []).extend(collected)
        else:
            values[flag.name] = collected[0]
    for flag in FLAGS:
        if flag.default is not None and flag.name not in values:
            values[flag.name] = flag.default
    return LauncherArgs(values=values, given=given)


@dataclasses.dataclass
class VmmOptions:
    """The VMM-level options of a command line, parsed."""

    api_socket: m.EndpointConfig | None
    event_monitor: m.EndpointConfig | None
    gdb: m.EndpointConfig | None
    restore: m.RestoreConfig | None
    seccomp: str
    verbosity: int
    log_file: str | None
    profile: m.ProfileConfig | None = None


def vmm_options_from_args(args: LauncherArgs) -> VmmOptions:
    """Parse the VMM-level options (``--api-socket``, ``--event-monitor``, ``--restore``, ...).

    :raises OptionParseError: ``Error parsing --<option>`` for the first bad option.    """

    def one(name: str) -> Any:
        value = args.get(name)
        return None if value is None else OPTION_PARSERS[name][0](value)

    gdb = one("gdb")
    return VmmOptions(
        api_socket=one("api-socket"),
        event_monitor=one("event-monitor"),
        gdb=gdb,
        restore=one("restore"),
        seccomp=args.get("seccomp") or "true",
        verbosity=args.verbosity,
        log_file=args.get("log-file"),
        profile=one("profile"),
    )


def has_payload(args: LauncherArgs) -> bool:
    """Whether the command line names a kernel or firmware (so a VM is created)."""
    return args.get("kernel") is not None or args.get("firmware") is not None


def vm_config_from_args(args: LauncherArgs) -> m.VmConfig:
    """Build the VmConfig the command line describes (not validated yet).

    :raises OptionParseError: ``Error parsing --<option>`` for the first bad option.
    """

    def one(name: str) -> Any:
        value = args.get(name)
        return None if value is None else OPTION_PARSERS[name][0](value)

    def many(name: str) -> list[Any] | None:
        items = args.get(name)
        return None if items is None else [OPTION_PARSERS[name][0](item) for item in items]

    memory = one("memory")
    zones = many("memory-zone")
    if zones is not None:
        memory.zones = zones
    payload = None
    if has_payload(args):
        payload = m.PayloadConfig(
            firmware=args.get("firmware"),
            kernel=args.get("kernel"),
            cmdline=args.get("cmdline"),
            initramfs=args.get("initramfs"),
        )
    return m.VmConfig(
        cpus=one("cpus"),
        memory=memory,
        payload=payload,
        rate_limit_groups=many("rate-limit-group"),
        disks=many("disk"),
        net=many("net"),
        rng=one("rng"),
        balloon=one("balloon"),
        fs=many("fs"),
        pmem=many("pmem"),
        serial=one("serial"),
        console=one("console"),
        debug_console=one("debug-console"),
        devices=many("device"),
        user_devices=many("user-device"),
        vdpa=many("vdpa"),
        vsock=one("vsock"),
        pvpanic=bool(args.get("pvpanic")),
        sgx_epc=many("sgx-epc"),
        numa=many("numa"),
        watchdog=bool(args.get("watchdog")),
        pci_segments=many("pci-segment"),
        platform=one("platform"),
        tpm=one("tpm"),
    )


def help_text(prog: str = "vmsh launch") -> str:
    """The ``--help`` text: every flag with its syntax string."""
    lines = [
        "Launch a VM, cloud-hypervisor style.",
        "",
        f"Usage: {prog} [OPTIONS]",
        "",
        "Options:",
    ]
    for flag in FLAGS:
        head = f"-{flag.short}, " if flag.short else "    "
        head += f"--{flag.name}" if flag.name != flag.short else ""
        if flag.short and flag.name == flag.short:
            head = f"-{flag.short}"
        if flag.arity in ("one", "many"):
            head += f" <{flag.value_name}>" + ("..." if flag.arity == "many" else "")
        text = flag.help
        if flag.default is not None:
            text += f" [default: {flag.default}]"
        if flag.choices:
            text += f" [possible values: {', '.join(flag.choices)}]"
        lines.append(f"  {head}")
        lines.append(f"          {text}")
    lines.append("  -h, --help")
    lines.append("          Print help")
    return "\n".join(lines) + "\n"
