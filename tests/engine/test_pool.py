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

from vmsh.api.client import ApiClient, ApiError
from vmsh.engine.warmup import WARM_RESTORE_ENV
from vmsh.harness.guest import Guest
from vmsh.harness.pool import VmmPool
from vmsh.harness.snapshots import launch_argv
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


def _threads_and_kvm_fds(pid: int) -> tuple[list[str], list[str]]:
    threads = sorted(p.read_text().strip() for p in Path(f"/proc/{pid}/task").glob("*/comm"))
    fds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds.append(os.readlink(fd))
        except OSError:
            pass
    return threads, [target for target in fds if "kvm" in target]


def test_a_pooled_process_is_warmed_up_and_has_no_vm_until_its_restore(tmp_path: Path) -> None:
    """The pool asks its processes to warm up for a restore (vmsh.engine.warmup); that leaves
    nothing a plain ``vmsh launch --api-socket`` process does not have: no VM (``vm.info`` says
    so), no KVM descriptor, the same threads."""
    pool = VmmPool(tmp_path / "pool", size=1)
    plain = Guest(launch_argv(["--api-socket", str(tmp_path / "plain.sock")]), workdir=tmp_path / "plain").start()
    try:
        warm = pool.take()
        try:
            environ = Path(f"/proc/{warm.pid}/environ").read_bytes().split(b"\0")
            assert f"{WARM_RESTORE_ENV}=1".encode() in environ
            wait_until(lambda: (tmp_path / "plain.sock").exists(), 60, "the plain VMM's API socket")
            for guest in (warm, plain):
                assert guest.api_socket is not None
                with ApiClient(guest.api_socket) as client:
                    client.get("vmm.ping")
                    with pytest.raises(ApiError) as err:
                        client.get("vm.info")
                    assert err.value.status == 404 and err.value.messages[-1] == "VM is not created"
            # the API's connection threads end when their clients go: compare once both have
            wait_until(lambda: _threads_and_kvm_fds(warm.pid) == _threads_and_kvm_fds(plain.pid), 10,
                       "the warmed-up VMM to have the threads and KVM descriptors of a plain one")
            assert _threads_and_kvm_fds(warm.pid)[1] == []
        finally:
            warm.close()
    finally:
        plain.close()
        pool.close()


OWNER = textwrap.dedent("""
    import json, sys, time
    from vmsh.harness.pool import VmmPool
    pool = VmmPool(sys.argv[1], size=2)
    taken = pool.take()  # handed out (a Guest owns it now) and replaced
    pool.wait_ready()
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
