"""``vmsh remote``'s main: ch-remote v40's command line, output and exit statuses.

In ch-remote's order: the command line is parsed (usage errors: clap's text on stderr, status
2); without ``--api-socket`` (or ``VMSH_API_SOCKET``, a vmsh addition) it says so on stdout and
exits 1; a socket it cannot open is ``Error opening HTTP socket: ...``, status 1; then the
subcommand's request is built (a bad option string is ``Error running command: ...``, status 1)
and sent. A response body is printed as the server sent it, with a newline; a 204 prints
nothing. A status other than 100, 200 or 204 is ``Error running command: Server responded with
an error: <status>``, status 1, followed (a vmsh addition) by the server's error chain.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from vmsh.errors import VmshError, error_chain
from vmsh.remote.clap import ClapExit, parse
from vmsh.remote.commands import BIN_NAME, REMOTE, RawBody, check_needed, request_for
from vmsh.remote.transport import TransportError, connect, exchange, os_error_text

NO_SOCKET = "Please either provide the api-socket option or dbus-service-name and dbus-object-path options\n"


def encode_body(body: Any) -> bytes | None:
    """The request body's bytes: a file's text as it is, anything else as compact JSON."""
    if body is None:
        return None
    if isinstance(body, RawBody):
        return body.text.encode()
    return json.dumps(body, separators=(",", ":")).encode()


def _fail(message: str) -> int:
    sys.stderr.write(f"Error running command: {message}\n")
    return 1


def _server_messages(body: bytes | None) -> list[str]:
    try:
        decoded = json.loads(body or b"")
    except ValueError:
        return [body.decode("utf-8", "replace")] if body else []
    return [str(m) for m in decoded] if isinstance(decoded, list) else [str(decoded)]


def _print_result(command: str, body: bytes) -> None:
    out = sys.stdout.buffer
    if command == "describe":
        from vmsh.engine.describe import canonical_text

        out.write(canonical_text(json.loads(body)).encode())  # the same text as `vmsh launch --describe`
    elif command == "profile-stop":
        out.write(json.loads(body)["report"].encode() + b"\n")
    else:
        out.write(body + b"\n")
    out.flush()


def main(argv: list[str]) -> int:
    """Run ``vmsh remote`` with ``argv`` (the arguments after ``remote``); returns the exit status."""
    try:
        matches = parse(REMOTE, argv, BIN_NAME)
        assert matches.subcommand is not None
        command, sub_matches = matches.subcommand
        check_needed(command, sub_matches)
    except ClapExit as done:
        (sys.stdout if done.to_stdout else sys.stderr).write(done.text)
        return done.status
    socket_path = matches.get("api-socket") or os.environ.get("VMSH_API_SOCKET")
    if not socket_path:
        sys.stdout.write(NO_SOCKET)
        return 1
    try:
        sock = connect(socket_path)
    except OSError as err:
        sys.stderr.write(f"Error opening HTTP socket: {os_error_text(err)}\n")
        return 1
    with sock:
        try:
            method, endpoint, body, fds = request_for(command, sub_matches)
            response = exchange(sock, method, endpoint, encode_body(body), fds)
        except TransportError as err:
            return _fail(str(err))
        except VmshError as err:
            return _fail(": ".join(error_chain(err)))
    if not response.ok:
        code = _fail(f"Server responded with an error: {response.status_name}")
        messages = _server_messages(response.body)
        if messages:
            sys.stderr.write(f"  {': '.join(messages)}\n")
        return code
    if response.body is not None:
        _print_result(command, response.body)
    return 0
