"""The language's debugging commands: ``coredump FILE``.

They sit beside :mod:`vmsh.script.commands` (which imports this module at its end so that the
commands are registered) and, like the inspection commands there, go through the session's
target, so they work the same on a VM in this process and after ``connect``.
"""

from __future__ import annotations

import logging
import os

from vmsh.errors import UsageError
from vmsh.script.commands import command
from vmsh.script.interface import SessionApi as Session

LOG = logging.getLogger(__name__)


@command("coredump", "coredump FILE",
         "write the paused VM's memory and vCPU registers as an ELF core file (FILE must not exist)", "inspection")
def _coredump(session: Session, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("coredump takes one argument: the file to write")
    path = args[0]
    url = path if path.startswith("file://") else "file://" + os.path.abspath(path)
    session.target.call("vm.coredump", {"destination_url": url})
    session.out(f"core dump written to {url[len('file://'):]}")
