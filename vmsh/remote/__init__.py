"""``vmsh remote``: cloud-hypervisor's ``ch-remote`` (v40), talking to a VMM's API socket.

``vmsh remote [--api-socket <path>] <COMMAND> [args]``, with ch-remote's subcommands, arguments,
help, errors, output and exit statuses, plus vmsh's own subcommands (``describe``,
``registers``, ``read-memory``, ``profile-start``, ``profile-stop``). :mod:`.clap` parses the
command line as clap does, :mod:`.commands` holds the command tree and builds each request,
:mod:`.transport` sends it and reads the response as ch-remote does, :mod:`.cli` is the main.
"""

from __future__ import annotations

from vmsh.remote.cli import main
from vmsh.remote.commands import build_request

__all__ = ["build_request", "main"]
