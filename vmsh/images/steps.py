"""Running and reporting the long steps of an image build.

Each step prints one line when it starts (to stderr, through logging) and its
duration when it ends; the output of external commands goes to the target's log
file, whose path is in the error if the command fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from vmsh.errors import ImageError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def step(target: str, what: str) -> Iterator[None]:
    """Announce a step of ``target`` and report how long it took."""
    log.info("%s: %s ...", target, what)
    start = time.monotonic()
    yield
    log.info("%s: %s done (%.1f s)", target, what, time.monotonic() - start)


def run_logged(
    cmd: Sequence[str],
    logfile: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    heartbeat: float | None = None,
    what: str | None = None,
) -> None:
    """Run ``cmd`` with its output appended to ``logfile``; raise ImageError on failure.

    With ``heartbeat``, a line with the log's last line is printed every so many
    seconds, so a 15-minute compile visibly advances.
    """
    logfile.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    label = what or Path(cmd[0]).name
    with open(logfile, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        except FileNotFoundError as err:
            raise ImageError(f"{cmd[0]} not found") from err
        stop = threading.Event()
        if heartbeat:
            threading.Thread(
                target=_heartbeat, args=(logfile, label, heartbeat, stop), daemon=True
            ).start()
        try:
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            stop.set()
    if rc != 0:
        raise ImageError(f"{label} failed (exit {rc}), log: {logfile}")


def _heartbeat(logfile: Path, label: str, every: float, stop: threading.Event) -> None:
    """Print the last line of a growing log every ``every`` seconds until ``stop``."""
    start = time.monotonic()
    while not stop.wait(every):
        try:
            with open(logfile, "rb") as fh:
                fh.seek(max(0, os.path.getsize(logfile) - 400))
                last = fh.read().decode(errors="replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        log.info("  %s: %d s, %s", label, time.monotonic() - start, last[0].strip() if last else "")
