"""The harness's pool of idle VMM processes (:mod:`vmsh.harness.pool`): bounded, a broken process
is replaced and never handed out, and nothing is left behind when the pool closes or its owner
is interrupted (Ctrl-C) or killed halfway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmsh.harness.pool import VmmPool
from vmsh.harness.waiting import wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, the pool's owner, reaps it)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _leftovers(root: Path, pids: list[int]) -> list[str]:
    return [f"pid {p}" for p in pids if _alive(p)] + [str(s) for s in root.rglob("*.sock*")]


def test_pool_is_bounded_and_replaces_a_broken_process(tmp_path: Path) -> None:
    pool = VmmPool(tmp_path / "pool", size=2)
    try:
        first, second = pool.idle_pids()
        os.kill(first, signal.SIGKILL)
        taken = pool.take()
        assert taken.pid == second and pool.replaced == 1  # the killed one was not handed out
        assert pool.idle_pids() == []
        pool.fill()
        assert len(pool.idle_pids()) == 2 and first not in pool.idle_pids()
        taken.close()
        all_pids = [first, second, *pool.idle_pids()]
    finally:
        pool.close()
    wait_until(lambda: not _leftovers(tmp_path / "pool", all_pids), 30, "the pool's processes and sockets to go")


OWNER = textwrap.dedent("""
    import json, sys, time
    from vmsh.harness.pool import VmmPool
    pool = VmmPool(sys.argv[1], size=2)
    taken = pool.take()  # handed out (a Guest owns it now) and replaced
    pool.fill()
    for guest in pool._idle:
        pool._answers(guest)
    print(json.dumps([taken.pid, *pool.idle_pids()]), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_no_leftovers_when_the_owner_dies(tmp_path: Path, how: signal.Signals) -> None:
    root = tmp_path / "pool"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(root)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert owner.stdout is not None
        pids = json.loads(owner.stdout.readline())
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        assert len(list(root.rglob("*.sock"))) == 3
        owner.send_signal(how)
        owner.wait(30)
    finally:
        owner.kill()
        owner.wait()
    wait_until(lambda: not _leftovers(root, pids), 30, "the pool's processes and sockets to go")
