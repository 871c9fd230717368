"""Fixtures of the parity suite: the files the configurations name, and a VMM serving the API."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.parity.configs import DISK0_SIZE, DISK1_SIZE, PMEM_SIZE, Case, render
from vmsh.harness.snapshots import launch_argv


def worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:] or 0) % 200


@pytest.fixture(scope="module")
def parity_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``{tmp}``: the disk and pmem images the configurations name (zeros, fixed sizes)."""
    root = tmp_path_factory.mktemp("parity")
    for name, size in (("disk0.img", DISK0_SIZE), ("disk1.img", DISK1_SIZE), ("pmem.img", PMEM_SIZE)):
        with open(root / name, "wb") as f:
            f.truncate(size)
    return root


@pytest.fixture(scope="module")
def render_case(vmsh_image: Callable[[str], str],
                parity_files: Path) -> Callable[[Case], tuple[list[str], dict[str, Any]]]:
    """``render_case(case)``: its complete launcher flags and JSON VmConfig for this worker."""

    def render_one(case: Case) -> tuple[list[str], dict[str, Any]]:
        subs = {"kernel": vmsh_image(case.kernel), "initramfs": vmsh_image("initramfs"),
                "tmp": str(parity_files), "n": str(worker_index())}
        return render(case, subs)

    return render_one


class ApiVmm:
    """A ``vmsh launch --api-socket`` process, as the JSON route's front door."""

    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "api.sock"
        self.log = open(workdir / "vmm.log", "wb")  # noqa: SIM115 - the VMM writes it until close()
        self.proc = subprocess.Popen(launch_argv(["--api-socket", str(self.socket)]), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API VMM did not start: {(workdir / 'vmm.log').read_text()}")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def api_vmm(tmp_path_factory: pytest.TempPathFactory, vmsh_image: Callable[[str], str]) -> Iterator[ApiVmm]:
    vmm = ApiVmm(tmp_path_factory.mktemp("api"))
    yield vmm
    vmm.close()
