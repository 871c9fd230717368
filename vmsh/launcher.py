"""``vmsh launch``: the cloud-hypervisor compatible launcher.

Takes cloud-hypervisor's flags, builds the VmConfig through :mod:`vmsh.config` and hands
it to the engine. ``--dry-run`` (a vmsh addition) prints the validated configuration as
canonical JSON instead. Exit status: 0 on success, 1 on an error (printed as one line,
the error and its causes joined by ``: ``), 2 on a malformed command line.
"""

from __future__ import annotations

import logging
import os
import sys

from vmsh import __version__
from vmsh.errors import UsageError, VmshError, error_chain

LOG = logging.getLogger(__name__)

#: The cloud-hypervisor release whose launcher vmsh follows.
CH_COMPAT_VERSION = "v40.0"


def print_error(err: BaseException) -> None:
    """Write ``err`` and its causes to stderr as one line."""
    sys.stderr.write(": ".join(error_chain(err)) + "\n")


def main(argv: list[str]) -> int:
    """Run ``vmsh launch`` with ``argv`` (the flags after ``launch``)."""
    from vmsh.config import canonical_json, normalize, parse_argv, vm_config_from_args
    from vmsh.config.launcher_args import has_payload, help_text, vmm_options_from_args

    if not argv:
        sys.stderr.write(help_text())
        return 2
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(help_text())
        return 0
    try:
        args = parse_argv(argv)
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if args.get("version"):
        print(f"vmsh {__version__} (cloud-hypervisor {CH_COMPAT_VERSION} launcher)")
        return 0
    # Everything the VMM creates (sockets, ptys' links, snapshots) is private to the user.
    os.umask(0o077)
    try:
        vmm = vmm_options_from_args(args)
        if args.get("dry-run"):
            sys.stdout.write(canonical_json(normalize(vm_config_from_args(args))))
            return 0
        from vmsh import logsetup

        try:
            logsetup.setup(vmm.verbosity, vmm.log_file)
        except OSError as err:
            raise VmshError("Error creating log file") from err
        if not has_payload(args) and vmm.restore is None:
            raise VmshError("Nothing to run: give --kernel or --firmware, or --restore")
        cfg = normalize(vm_config_from_args(args)) if has_payload(args) else None
        return _run(vmm, cfg)
    except VmshError as err:
        print_error(err)
        return 1


def _run(vmm: object, cfg: object) -> int:
    """Create and boot the VM and serve it until it ends."""
    try:
        from vmsh.engine.runner import run_launcher  # type: ignore[import-not-found]
    except ImportError as err:
        raise VmshError("This vmsh cannot run VMs yet: the engine is not installed") from err
    return int(run_launcher(vmm, cfg))
