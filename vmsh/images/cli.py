"""``vmsh images``: build the guest images and print where they are.

    vmsh images build [NAME...]   build all targets, or those named (targets or artifacts)
    vmsh images path NAME         print the absolute path of one artifact
    vmsh images list              show every artifact and whether it is built
"""

from __future__ import annotations

import logging
import sys

from vmsh.errors import ImageError

log = logging.getLogger(__name__)

USAGE = __doc__.split("\n", 2)[2]


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmsh images: %(message)s"))
    root = logging.getLogger("vmsh.images")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str]) -> int:
    """Run ``vmsh images`` with ``argv``; return the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write("usage:\n" + USAGE)
        return 0 if argv else 2
    _setup_logging()
    from vmsh.images import cache, targets

    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "build":
            names = targets.resolve(args or list(targets.TARGETS))
            for name in names:
                directory, built = targets.build(name)
                if not built:
                    log.info("%s: up to date (%s)", name, directory)
            return 0
        if cmd == "path":
            if len(args) != 1:
                sys.stderr.write("usage: vmsh images path NAME\n")
                return 2
            print(targets.artifact_path(args[0]))
            return 0
        if cmd == "list":
            print(f"cache: {cache.cache_root()}")
            for name in targets.ARTIFACTS:
                try:
                    where = str(targets.artifact_path(name))
                except ImageError as err:
                    where = f"- ({err})"
                print(f"{name:<22} {where}")
            return 0
    except ImageError as err:
        sys.stderr.write(f"Error: {err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        return 130
    sys.stderr.write(f"vmsh images: unknown command '{cmd}'\nusage:\n{USAGE}")
    return 2
