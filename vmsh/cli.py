"""The ``vmsh`` command: dispatches to its subcommands, importing each lazily.

``vmsh launch`` is the cloud-hypervisor compatible launcher; ``vmsh config`` works on
JSON VmConfigs; ``vmsh images`` builds and locates the guest images. Each subcommand
lives in its own module with a ``main(argv) -> int`` function, so that ``vmsh launch``
never pays for importing the shell.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "launch": ("vmsh.launcher", "start a VM with cloud-hypervisor's launcher flags"),
    "remote": ("vmsh.remote", "control a running VMM through its API socket (ch-remote)"),
    "config": ("vmsh.config_cli", "check and normalize a JSON VmConfig"),
    "images": ("vmsh.images.cli", "build the guest images and print their paths"),
    "run": ("vmsh.script.cli", "run a script of shell commands (FILE.vmsh)"),
}

USAGE = (
    "usage: vmsh                    the interactive shell\n"
    "       vmsh -c 'CMD; CMD'      run shell commands\n"
    "       vmsh <command> [args...]\n\ncommands:\n"
    + "".join(f"  {name:<8} {summary}\n" for name, (_, summary) in SUBCOMMANDS.items())
)


def main(argv: list[str] | None = None) -> int:
    """Run ``vmsh`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        from vmsh.repl import main as repl_main

        return repl_main()
    if args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] == "-c":
        from vmsh.script.cli import run_inline

        return run_inline(args[1:])
    if args[0] in ("-V", "--version"):
        from vmsh import __version__

        print(f"vmsh {__version__}")
        return 0
    name = args[0]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"vmsh: unknown command '{name}'\n{USAGE}")
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
