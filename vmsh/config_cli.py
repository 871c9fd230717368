"""``vmsh config``: tools for JSON VmConfigs.

``vmsh config normalize FILE|-`` reads a JSON VmConfig (a ``vm.create`` body), validates
it, names its devices and prints the canonical JSON: the same text ``vmsh launch --dry-run``
prints for the same configuration given as launcher flags.
"""

from __future__ import annotations

import sys

from vmsh.errors import VmshError

USAGE = "usage: vmsh config normalize FILE|-\n"


def main(argv: list[str]) -> int:
    from vmsh.config import canonical_json, normalize, vm_config_from_json
    from vmsh.launcher import print_error

    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    if len(argv) != 2 or argv[0] != "normalize":
        sys.stderr.write(USAGE)
        return 2
    try:
        if argv[1] == "-":
            text = sys.stdin.buffer.read()
        else:
            try:
                with open(argv[1], "rb") as f:
                    text = f.read()
            except OSError as err:
                raise VmshError(f"Cannot read {argv[1]}") from err
        sys.stdout.write(canonical_json(normalize(vm_config_from_json(text))))
        return 0
    except VmshError as err:
        print_error(err)
        return 1
