"""``Guest(pass_fds=...)``: the VMM process keeps the fds it is given (``--net fd=N``), and
only those, under the same numbers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmsh.harness import Guest

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.needs(BUSYBOX is not None, "busybox is not installed (apt-get install busybox-static)")


def test_passed_fd_is_open_in_the_child_and_others_are_not(tmp_path: Path) -> None:
    passed_r, passed_w = os.pipe()
    other_r, other_w = os.pipe()
    os.set_inheritable(passed_r, True)
    os.set_inheritable(other_r, True)  # inheritable, but not passed: the child must not get it
    try:
        os.write(passed_w, b"through-the-fd\n")
        with Guest([BUSYBOX, "sh", "-c", "echo VMSH-READY; exec busybox sh -i"], workdir=tmp_path,
                   boot_timeout=20, pass_fds=(passed_r,)) as guest:
            guest.wait_ready()
            assert guest.check_output(f"read line <&{passed_r}; echo $line") == "through-the-fd"
            assert guest.run(f"[ -e /proc/self/fd/{other_r} ]").status == 1
    finally:
        for fd in (passed_r, passed_w, other_r, other_w):
            os.close(fd)
